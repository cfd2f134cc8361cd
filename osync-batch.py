#!/usr/bin/env python3
"""osync-batch.py - run every osync.py config of a folder, one after the other.

A drop-in replacement for osync-batch.sh (osync v1.3): each `*.conf` file of --path (any
case, in sorted order) is run as `osync.py CONF --silent [other arguments]`, waiting for
each run to end.  A run that fails (exit code 1 or 128) is run again in the next round,
while the config has runs left (--max-runs, 3 by default, counts them all) and the batch
has time left (--max-exec-time, 36000 seconds by default, 0 for no limit; osync.py keeps
its own time limits for each run).  A run that ends with warnings (exit code 2) is not run
again.

Exit codes, as osync-batch.sh: 1 if any run failed (even when a later run of the same
config succeeded), 2 if there were only warnings, else 0.  Its own log, one line per run,
goes to --log-file, else /var/log/osync-batch.log, else ./osync-batch.log when /var/log is
not writable.  SIGTERM, SIGINT and SIGHUP stop the batch: the signal is passed to the
osync.py that is running, which stops cleanly, and no further config is started.

Standard library only; CPython 3.6 to 3.13.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

PROGRAM = "osync-batch.py"
DEFAULT_MAX_RUNS = 3
DEFAULT_MAX_EXEC_TIME = 36000
SYSTEM_LOG_DIR = "/var/log"
LOG_FILE_NAME = "osync-batch.log"
# An osync.py run that exits 0 succeeded, 2 had warnings (it is not run again); any other
# code (1, 128 from osync.sh's usage, a crash, a kill) is a failure, run again next round.
WARNINGS_CODE = 2
# The batch finds *.conf in any case, as osync-batch.sh did; osync.py itself reads only
# names that end in this.
OSYNC_CONFIG_SUFFIX = ".conf"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

DESCRIPTION = """\
Run every osync.py config of a folder, one after the other: each *.conf file of DIR (any
case, in sorted order), or the one FILE, is run as `osync.py CONF --silent [osync.py
options]`. A run that fails (exit code 1) is run again after the others, while its config
has runs left and the batch has time left."""

EPILOG = """\
Options take their value as --option=VALUE or as --option VALUE. Every other argument is
passed to each osync.py run, in its order, e.g. --dry, --no-maxtime, --verbose, --summary,
--force-unlock. osync.py is looked for next to %(prog)s, then on PATH (as
osync.py, then osync).

SIGTERM, SIGINT or SIGHUP stops the batch: the running osync.py gets the signal and stops
cleanly; no further config is started.

Exit codes: 0 every run succeeded, 1 a run failed (even if a later run of the same config
succeeded) or the batch could not start, 2 warnings only (a run finished with warnings,
or the batch was stopped by a signal)."""


class BatchError(Exception):
    """A reason the batch cannot go on, said in one sentence."""


# Command line -------------------------------------------------------------------------------

class CommandLineParser(argparse.ArgumentParser):
    """argparse, but a wrong command line is a BatchError (one sentence, in the batch log,
    exit code 1) instead of argparse's usage text and exit code 2."""

    def error(self, message):
        missing_value = re.match(r"argument (\S+): expected one argument$", message)
        if missing_value:
            option = missing_value.group(1)
            raise BatchError("%s needs a value: give it as %s=VALUE." % (option, option))
        raise BatchError("%s%s. Run %s --help for the options." % (message[0].upper(), message[1:], PROGRAM))


def whole_number(option, minimum, example):
    """The type= of a number option: its value as an int.  A value that is not a whole
    number of `minimum` or more is a BatchError that names the option (argparse lets
    errors that are not its own through)."""
    def value(text):
        if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < minimum:
            raise BatchError("%s=%s is not a whole number of %d or more: give e.g. %s=%d."
                             % (option, text, minimum, option, example))
        return int(text)
    return value


def command_line_parser(log_options_only=False):
    """The batch's own options; parse_known_args leaves every other argument, in its order,
    for osync.py.  Option names are never abbreviated: --pat=x is osync.py's, not --path.
    With `log_options_only`, only the options that say where the batch reports, so that a
    mistake in the others can be reported there."""
    parser = CommandLineParser(prog=PROGRAM, allow_abbrev=False, add_help=False,
                               usage="%(prog)s --path=DIR|FILE [batch options] [osync.py options]",
                               description=DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    options = parser.add_argument_group("batch options")
    if not log_options_only:
        options.add_argument("--path", metavar="DIR|FILE",
                             help="The folder of the configs, or one config file (needed).")
        options.add_argument("--max-runs", dest="max_runs", metavar="N", default=DEFAULT_MAX_RUNS,
                             type=whole_number("--max-runs", 1, DEFAULT_MAX_RUNS),
                             help="Runs of each config at most, the first one included (default %(default)s).")
        options.add_argument("--max-retries", dest="max_runs", metavar="N", default=DEFAULT_MAX_RUNS,
                             type=whole_number("--max-retries", 1, DEFAULT_MAX_RUNS),
                             help="The same as --max-runs.")
        options.add_argument("--max-exec-time", dest="max_exec_time", metavar="S", default=DEFAULT_MAX_EXEC_TIME,
                             type=whole_number("--max-exec-time", 0, DEFAULT_MAX_EXEC_TIME),
                             help="Failed configs are run again only while the batch has been running for "
                                  "less than S seconds (default %(default)s; 0: no limit). A run that has "
                                  "started is never cut short: osync.py has its own time limits.")
    options.add_argument("--log-file", metavar="PATH",
                         help="The batch's own log (default %s, or ./%s when %s is not writable). Each "
                              "osync.py run keeps its own log."
                              % (os.path.join(SYSTEM_LOG_DIR, LOG_FILE_NAME), LOG_FILE_NAME, SYSTEM_LOG_DIR))
    options.add_argument("--silent", action="store_true",
                         help="Nothing on the screen (also passed to osync.py, which always gets it).")
    options.add_argument("--errors-only", action="store_true",
                         help="Only warnings and errors on the screen (also passed to osync.py).")
    if not log_options_only:
        options.add_argument("-h", "--help", "-?", action="help", help="Show this help.")
    return parser


def shown(name):
    """A file name as it can be written to a screen or a log, whatever its bytes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# Configs and osync.py -----------------------------------------------------------------------

def find_configs(path):
    """The config files to run: every *.conf (any case) directly in folder `path`, sorted
    by name, or `path` itself when it is a file."""
    if not path:
        raise BatchError("Give the folder of the configs to run with --path=DIR (or one config "
                         "with --path=FILE). Run %s --help for the options." % PROGRAM)
    if os.path.isfile(path):
        return [path]
    if not os.path.exists(path):
        raise BatchError("The config path %s does not exist: give a folder of *.conf files or one "
                         "config file with --path." % shown(path))
    if not os.path.isdir(path):
        raise BatchError("The config path %s is neither a folder nor a regular file: give a folder "
                         "of *.conf files or one config file with --path." % shown(path))
    try:
        names = os.listdir(path)
    except OSError as error:
        raise BatchError("Cannot read the config folder %s (%s): give a folder this user can read "
                         "with --path." % (shown(path), error.strerror or error))
    configs = [os.path.join(path, name) for name in sorted(names)
               if name.lower().endswith(".conf") and os.path.isfile(os.path.join(path, name))]
    if not configs:
        raise BatchError("There is no *.conf file in %s: give the folder that holds the configs "
                         "with --path." % shown(path))
    return configs


def find_osync():
    """The command that starts osync.py: the osync.py next to this script (the one the
    script's link points to, when it is a link), else osync.py or osync on PATH."""
    here = os.path.abspath(__file__)
    for folder in (os.path.dirname(here), os.path.dirname(os.path.realpath(here))):
        beside = os.path.join(folder, "osync.py")
        if os.path.isfile(beside):
            return [sys.executable, beside] if sys.executable else [beside]
    for name in ("osync.py", "osync"):
        found = shutil.which(name)
        if found:
            return [found]
    raise BatchError("osync.py was not found next to %s (in %s) nor on PATH: install osync.py "
                     "beside it or in a directory of PATH." % (PROGRAM, shown(os.path.dirname(here))))


class Options(object):
    """The checked settings of a batch, from the parsed command line and the arguments
    left for osync.py."""

    def __init__(self, request, osync_arguments):
        self.max_runs = request.max_runs
        self.max_exec_time = request.max_exec_time
        self.path = request.path
        self.configs = find_configs(request.path)
        self.osync_command = find_osync()
        # Every run gets --silent right after its config; --errors-only applies to it too.
        self.osync_arguments = (["--errors-only"] if request.errors_only else []) + osync_arguments


# Log ----------------------------------------------------------------------------------------

def log_file_candidates(log_file):
    """Where the batch log may go, best first: --log-file alone when it is given."""
    if log_file:
        return [log_file]
    candidates = []
    if os.access(SYSTEM_LOG_DIR, os.W_OK):
        candidates.append(os.path.join(SYSTEM_LOG_DIR, LOG_FILE_NAME))
    candidates.append(os.path.join(".", LOG_FILE_NAME))
    return candidates


class BatchLog(object):
    """The batch's lines, with a time stamp, in its log file and on the screen; counts the
    warnings and errors, which decide the exit code.  (Plain writes, not the logging module:
    the counts, the traceback for the file only and a screen that may be gone would each
    need a handler or a filter of their own.)"""

    def __init__(self, silent=False, errors_only=False):
        self.silent = silent
        self.errors_only = errors_only
        self.stream = None
        self.path = None
        self.errors = 0
        self.warnings = 0

    def open(self, candidates):
        """Append to the first of `candidates` that can be opened (created with mode 0600)."""
        failures = []
        for path in candidates:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as error:
                failures.append("%s (%s)" % (shown(path), error.strerror or error))
                continue
            self.stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
            self.path = path
            return
        raise BatchError("Cannot write the batch log %s: give a file this user can write with "
                         "--log-file=PATH." % " nor ".join(failures))

    def notice(self, message):
        self._write("", message)

    def warn(self, message):
        self.warnings += 1
        self._write("(WARN):", message)

    def error(self, message):
        self.errors += 1
        self._write("(ERROR):", message)

    def trace(self, text):
        """A traceback, for the log file only."""
        self._write("(ERROR):", text, screen=False)

    def _write(self, tag, message, screen=True):
        line = "%s - %s%s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), tag, message)
        if self.stream is not None:
            self.stream.write(line)
            self.stream.flush()
        if screen and not self.silent and (tag or not self.errors_only):
            write_screen(sys.stderr if tag else sys.stdout, line)

    def exit_code(self):
        if self.errors:
            return 1
        if self.warnings:
            return 2
        return 0

    def close(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def write_screen(stream, text):
    """Show a line; a closed or broken screen (cron with no output, `| head`) is no error."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError, UnicodeEncodeError):
        pass


# Signals ------------------------------------------------------------------------------------

class SignalForwarder(object):
    """Catches SIGTERM, SIGINT and SIGHUP for the whole batch: the first one is passed on to
    the osync.py that is running (which stops cleanly) and no further run is started."""

    def __init__(self):
        self.received = None    # the number of the first stop signal
        self.child = None       # the osync.py process that is running
        self.forwarded = False
        self.previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signum
        self._forward()

    def _forward(self):
        if self.received is None or self.child is None or self.forwarded:
            return
        self.forwarded = True
        try:
            self.child.send_signal(self.received)
        except OSError:
            pass

    def run(self, command):
        """Run `command` to its end; returns its exit code (negative: killed by that signal)."""
        self.forwarded = False
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self._forward()      # a signal that came while the run was being started
        try:
            return self.child.wait()
        finally:
            self.child = None

    def name(self):
        """The name of the stop signal received, e.g. SIGTERM."""
        return signal.Signals(self.received).name


# Batch --------------------------------------------------------------------------------------

def describe_failure(code):
    """How a run that did not succeed ended, for the log: its exit code or the signal."""
    if code < 0:
        try:
            return "was killed by signal %s" % signal.Signals(-code).name
        except ValueError:
            return "was killed by signal %d" % -code
    return "failed with exit code %d" % code


def run_batch(options, log, signals):
    """The rounds: every config once, then the failed ones again while runs and time are
    left.  Returns when every config is done or the batch is stopped."""
    start = time.monotonic()
    pending = options.configs
    log.notice("%s started (PID %d): %d config%s from %s, at most %d run%s each, %s." % (
        PROGRAM, os.getpid(), len(pending), plural(len(pending)), shown(options.path), options.max_runs,
        plural(options.max_runs), "retries for %d seconds" % options.max_exec_time
        if options.max_exec_time else "no time limit"))

    def time_left():
        return not options.max_exec_time or time.monotonic() - start < options.max_exec_time

    def stopped_before(configs, round_number):
        """Is the batch over before `configs` run (a stop signal, or no time for a retry)?
        If so, it says which configs are left out."""
        names = ", ".join(config_name(c) for c in configs)
        if signals.received is not None:
            log.warn("Stopped by signal %s; not run: %s." % (signals.name(), names))
            return True
        if round_number > 1 and not time_left():
            log.warn("Not run again, the batch has used its --max-exec-time of %d seconds: %s."
                     % (options.max_exec_time, names))
            return True
        return False

    refused = [config for config in pending if not config.endswith(OSYNC_CONFIG_SUFFIX)]
    for config in refused:
        log.error("Instance %s is not run: osync.py reads only configs whose name ends in %s (in lower "
                  "case); rename the file." % (config_name(config), OSYNC_CONFIG_SUFFIX))
    pending = [config for config in pending if config not in refused]
    for round_number in range(1, options.max_runs + 1):
        if not pending or stopped_before(pending, round_number):
            return
        log.notice("Round %d of at most %d: %s" % (round_number, options.max_runs,
                                                  ", ".join(config_name(c) for c in pending)))
        failed = []
        for position, config in enumerate(pending):
            if stopped_before(pending[position:], round_number):
                return
            code = signals.run(options.osync_command + [config, "--silent"] + options.osync_arguments)
            name = config_name(config)
            if signals.received is not None:
                log.warn("Instance %s was stopped by signal %s (exit code %d)." % (name, signals.name(), code))
                if code not in (0, WARNINGS_CODE, -signals.received):
                    log.error("Instance %s %s." % (name, describe_failure(code)))
            elif code == 0:
                log.notice("Instance %s succeeded." % name)
            elif code == WARNINGS_CODE:
                log.warn("Instance %s finished with warnings." % name)
            elif round_number == options.max_runs:
                log.error("Instance %s %s; that was its last run (--max-runs=%d)."
                          % (name, describe_failure(code), options.max_runs))
            elif not time_left():
                log.error("Instance %s %s; it is not run again, the batch has used its --max-exec-time "
                          "of %d seconds." % (name, describe_failure(code), options.max_exec_time))
            else:
                log.error("Instance %s %s, will retry." % (name, describe_failure(code)))
                failed.append(config)
        pending = failed


def config_name(config):
    return shown(os.path.basename(config))


def plural(count):
    return "" if count == 1 else "s"


def open_log(argv):
    """The batch log where --log-file, --silent and --errors-only say; they are read on
    their own, so that a mistake elsewhere on the command line is reported there too."""
    report = command_line_parser(log_options_only=True).parse_known_args(argv)[0]
    log = BatchLog(silent=report.silent, errors_only=report.errors_only)
    log.open(log_file_candidates(report.log_file))
    return log


def main(argv=None):
    """Run the batch with these command-line arguments; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:   # --help shows the help and exits here
        request, osync_arguments = command_line_parser().parse_known_args(argv)
        problem = None
    except BatchError as error:   # reported in the batch log, once it is open
        request, osync_arguments, problem = None, None, error
    with SignalForwarder() as signals:
        try:
            log = open_log(argv)
        except BatchError as error:   # shown even with --silent: there is no log to hold it
            write_screen(sys.stderr, "%s: %s\n" % (PROGRAM, error))
            return 1
        try:
            if problem is not None:
                raise problem
            run_batch(Options(request, osync_arguments), log, signals)
        except BatchError as error:
            log.error(str(error))
        except Exception as error:   # a bug: one sentence on the screen, the traceback in the log
            log.trace("Traceback of the unexpected error:\n" + traceback.format_exc().rstrip())
            log.error("Unexpected internal error: %s: %s. Please report it with the log %s."
                      % (type(error).__name__, error, shown(log.path)))
        code = log.exit_code()
        log.notice("%s finished%s." % (PROGRAM, {0: "", 1: " with errors", 2: " with warnings"}[code]))
    log.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
