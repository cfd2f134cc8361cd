"""osync-batch.py (reference §10): every *.conf of a folder run one after the other with
osync.py, the failed ones run again while runs (--max-runs) and time (--max-exec-time) are
left, other arguments passed to osync.py, its own log, exit codes 0/1/2 as osync-batch.sh,
clear errors, osync.py found on PATH, and a stop signal passed to the running osync.py.

Every test runs the real osync-batch.py, which runs the real osync.py, on local replicas.
The batch log always goes to --log-file (never /var/log)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, WORKDIR, Pair, build, check_no_internal_error, clean_env, need, pyenv_python

BATCH = REPO / "osync-batch.py"
BATCH_TIMEOUT = 120
OUTCOMES = (("succeeded", "succeeded"), ("finished with warnings", "warnings"),
            ("failed", "failed"), ("was stopped by signal", "stopped"))


def script(path, lines):
    """An executable shell script at `path`; returns its path as a string."""
    path.write_text("#!/bin/sh\n" + "\n".join(lines) + "\n")
    path.chmod(0o755)
    return str(path)


class Batch(object):
    """A folder of configs, each with its own pair of local replicas, and a way to run
    osync-batch.py on it."""

    def __init__(self, base):
        self.base = Path(base)
        self.confdir = self.base / "conf"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.log = self.base / "batch.log"
        self.osync_log = self.base / "osync.log"
        self.pairs = {}

    def task(self, conf_name, keys=None, lines=()):
        """A config CONF_NAME in the folder, syncing a new pair whose initiator holds one
        file named after it; returns the Pair."""
        stem = conf_name.split(".")[0]
        pair = Pair(self.base / stem)
        build(pair.initiator, {"from_" + stem: stem})
        allkeys = {"INSTANCE_ID": stem}
        allkeys.update(keys or {})
        pair.write_conf(conf_name, allkeys, lines, directory=self.confdir)
        self.pairs[conf_name] = pair
        return pair

    def flaky_command(self, failures):
        """A before command that fails on its first `failures` runs, then succeeds."""
        counter = self.base / "flaky-count"
        return script(self.base / "flaky.sh", [
            'n=$(cat "%s" 2>/dev/null || echo 0)' % counter,
            'echo $((n + 1)) > "%s"' % counter,
            '[ "$n" -ge %d ]' % failures])

    def command(self, *args, path=None, log_file=True):
        argv = [sys.executable, str(BATCH)]
        argv.append("--path=%s" % (path if path is not None else self.confdir))
        if log_file:
            argv.append("--log-file=%s" % self.log)
        return argv + [str(arg) for arg in args]

    def run(self, *args, path=None, expect=None, env=None, argv=None, timeout=BATCH_TIMEOUT):
        """Run the batch to its end (with `argv`: exactly that command); returns the
        CompletedProcess, with .output (stdout + stderr)."""
        command = argv if argv is not None else self.command(*args, path=path)
        r = subprocess.run(command, env=clean_env(self.osync_log, env), cwd=str(self.base),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout)
        r.output = r.stdout + r.stderr
        check_no_internal_error(r)
        if expect is not None:
            assert r.returncode == expect, "expected exit code %d%s" % (expect, self.describe(r))
        return r

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self, r):
        return ("\ncommand: %s\nexit code: %s\n--- output ---\n%s\n--- batch log ---\n%s"
                % (" ".join(r.args), r.returncode, r.output, self.log_text()))

    def runs(self, conf_name):
        """The outcome of each run of CONF_NAME, in order, from the batch log."""
        found = []
        for line in self.log_text().splitlines():
            match = re.search(r"Instance (\S+) (.*)$", line)
            if match and match.group(1) == conf_name:
                found.extend(short for text, short in OUTCOMES if match.group(2).startswith(text))
        return found

    def synced(self, conf_name):
        """Has the file of CONF_NAME's initiator reached its target?"""
        pair = self.pairs[conf_name]
        return any(name.startswith("from_") for name in os.listdir(str(pair.target)))


@pytest.fixture
def batch(tmp_path):
    return Batch(tmp_path)


def test_failed_configs_are_run_again_until_they_succeed_or_run_out_of_runs(batch):
    """One config succeeds, one fails twice then succeeds, one always fails: runs in sorted
    order (*.conf files only), each failure retried up to 3 runs in all, and exit code 1
    since errors were logged."""
    batch.task("b_good.conf")
    batch.task("a_flaky.conf", {"LOCAL_RUN_BEFORE_CMD": batch.flaky_command(2), "STOP_ON_CMD_ERROR": "yes"})
    broken = batch.task("c_broken.conf", {"INITIATOR_SYNC_DIR": str(batch.base / "missing")})
    (batch.confdir / "notes.txt").write_text("not a config\n")
    (batch.confdir / "folder.conf").mkdir()

    r = batch.run(expect=1)

    assert batch.runs("b_good.conf") == ["succeeded"], batch.describe(r)
    assert batch.runs("a_flaky.conf") == ["failed", "failed", "succeeded"], batch.describe(r)
    assert batch.runs("c_broken.conf") == ["failed"] * 3, batch.describe(r)
    assert "Round 1 of at most 3: a_flaky.conf, b_good.conf, c_broken.conf" in batch.log_text()
    assert "Round 3 of at most 3: a_flaky.conf, c_broken.conf" in batch.log_text()
    assert "notes.txt" not in batch.log_text() and "folder.conf" not in batch.log_text()
    assert batch.synced("b_good.conf") and batch.synced("a_flaky.conf")
    assert os.listdir(str(broken.target)) == []
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - \(ERROR\):Instance c_broken.conf failed with exit code 1, "
                     r"will retry\.$", batch.log_text(), re.M), batch.log_text()


@pytest.mark.parametrize("option, runs", [("--max-runs=1", 1), ("--max-retries=2", 2)])
def test_max_runs_counts_every_run_of_a_config(batch, option, runs):
    """--max-runs (and --max-retries, the name osync's README used) is the total number
    of runs: 1 means no retry."""
    flaky = batch.task("flaky.conf", {"LOCAL_RUN_BEFORE_CMD": batch.flaky_command(2)})
    batch.task("broken.conf", {"INITIATOR_SYNC_DIR": str(batch.base / "missing")})
    r = batch.run(option, expect=1)
    assert batch.runs("flaky.conf") == ["failed"] * runs, batch.describe(r)
    assert batch.runs("broken.conf") == ["failed"] * runs, batch.describe(r)
    assert os.listdir(str(flaky.target)) == []


def test_a_config_named_in_upper_case_is_reported_once_and_not_run(batch):
    """The batch finds *.conf in any case, as osync-batch.sh did; osync.py reads only names
    ending in .conf, so the batch says so once instead of failing the config three times."""
    upper = batch.task("UPPER.CONF")
    batch.task("good.conf")
    r = batch.run(expect=1)
    assert "Instance UPPER.CONF is not run: osync.py reads only configs whose name ends in .conf" in r.stderr, \
        batch.describe(r)
    assert batch.log_text().count("UPPER.CONF") == 1, batch.describe(r)
    assert batch.runs("good.conf") == ["succeeded"]
    assert os.listdir(str(upper.target)) == []


def test_a_failure_counts_even_when_a_later_run_succeeds(batch):
    batch.task("flaky.conf", {"LOCAL_RUN_BEFORE_CMD": batch.flaky_command(1)})
    r = batch.run(expect=1)
    assert batch.runs("flaky.conf") == ["failed", "succeeded"], batch.describe(r)
    assert batch.synced("flaky.conf")


def test_time_limit_stops_the_retries_but_not_the_first_round(batch):
    """Failed configs are run again only while the batch has run for less than
    --max-exec-time; every config still gets its first run."""
    slow_failure = script(batch.base / "slow-failure.sh", ["sleep 1.5", "exit 1"])
    batch.task("a_slow.conf", {"LOCAL_RUN_BEFORE_CMD": slow_failure})
    batch.task("b_good.conf")
    r = batch.run("--max-exec-time=1", expect=1)
    assert batch.runs("a_slow.conf") == ["failed"], batch.describe(r)
    assert batch.runs("b_good.conf") == ["succeeded"], batch.describe(r)
    assert batch.synced("b_good.conf")
    assert "--max-exec-time of 1 seconds" in batch.log_text()


def test_warnings_give_exit_code_2_and_no_retry(batch):
    batch.task("warns.conf", lines=['NOT_A_SETTING="x"'])
    batch.task("good.conf")
    r = batch.run(expect=2)
    assert batch.runs("warns.conf") == ["warnings"], batch.describe(r)
    assert batch.runs("good.conf") == ["succeeded"], batch.describe(r)
    assert batch.synced("warns.conf") and batch.synced("good.conf")


def test_success_gives_exit_code_0(batch):
    batch.task("one.conf")
    batch.task("two.conf")
    r = batch.run(expect=0)
    assert batch.runs("one.conf") == ["succeeded"] and batch.runs("two.conf") == ["succeeded"], batch.describe(r)
    assert batch.synced("one.conf") and batch.synced("two.conf")


@pytest.mark.parametrize("switch", ["--silent", "--errors-only"])
def test_screen_switches_apply_to_the_batch_too(batch, switch):
    """--silent: nothing on the screen, even on failure; --errors-only: only the failures.
    The log has every line either way."""
    batch.task("broken.conf", {"INITIATOR_SYNC_DIR": str(batch.base / "missing")})
    r = batch.run(switch, "--max-runs=1", expect=1)
    assert r.stdout == "", batch.describe(r)
    if switch == "--silent":
        assert r.stderr == "", batch.describe(r)
    else:
        assert "Instance broken.conf failed with exit code 1" in r.stderr, batch.describe(r)
    assert batch.runs("broken.conf") == ["failed"] and "Round 1 of at most 1" in batch.log_text()


def test_other_arguments_are_passed_to_osync(batch):
    """--dry reaches osync.py: nothing is copied, and osync.py's log says it was a dry run."""
    pair = batch.task("good.conf")
    r = batch.run("--dry", "--summary", expect=0)
    assert os.listdir(str(pair.target)) == [], batch.describe(r)
    osync_log = batch.osync_log.read_text()
    assert "(dry run) started" in osync_log, osync_log


def test_path_may_name_one_config_file(batch):
    batch.task("good.conf")
    broken = batch.task("broken.conf", {"INITIATOR_SYNC_DIR": str(batch.base / "missing")})
    r = batch.run(path=batch.confdir / "good.conf", expect=0)
    assert batch.runs("good.conf") == ["succeeded"], batch.describe(r)
    assert batch.runs("broken.conf") == [], batch.describe(r)
    assert batch.synced("good.conf") and not (broken.initiator / WORKDIR).exists()


@pytest.mark.parametrize("case, path, args, says", [
    ("no path", "", [], "--path=DIR"),
    ("missing path", "{base}/nowhere", [], "{base}/nowhere does not exist"),
    ("empty folder", "{base}/empty", [], "no *.conf file in {base}/empty"),
    ("no config in folder", "{base}/other", [], "no *.conf file in {base}/other"),
    ("not a file", "/dev/null", [], "/dev/null is neither a folder nor a regular file"),
    ("zero runs", "{conf}", ["--max-runs=0"], "--max-runs=0 is not a whole number of 1 or more"),
    ("runs not a number", "{conf}", ["--max-retries=two"], "--max-retries=two is not a whole number"),
    ("negative time", "{conf}", ["--max-exec-time=-5"], "--max-exec-time=-5 is not a whole number of 0 or more"),
    ("option without value", "{conf}", ["--max-runs"], "--max-runs needs a value"),
])
def test_bad_command_lines_are_one_sentence_and_run_nothing(batch, case, path, args, says):
    batch.task("good.conf")
    (batch.base / "empty").mkdir()
    (batch.base / "other").mkdir()
    (batch.base / "other" / "readme.txt").write_text("x")
    fill = {"base": batch.base, "conf": batch.confdir}
    r = batch.run(*args, path=path.format(**fill), expect=1)
    expected = says.format(**fill)
    assert expected in r.stderr and expected in batch.log_text(), batch.describe(r)
    errors = [line for line in r.stderr.splitlines() if "(ERROR)" in line]
    assert len(errors) == 1, batch.describe(r)
    assert not batch.osync_log.exists(), "osync.py was run" + batch.describe(r)


def test_an_abbreviated_option_is_passed_to_osync_not_taken_for_a_batch_option(batch):
    """--pat=x is no batch option (names are never abbreviated): osync.py gets it and
    refuses it, instead of the batch reading configs from x."""
    pair = batch.task("good.conf")
    r = batch.run("--pat=x", "--max-runs=1", expect=1)
    assert batch.runs("good.conf") == ["failed"], batch.describe(r)
    assert "does not exist" not in r.output + batch.log_text(), batch.describe(r)
    osync_said = batch.osync_log.read_text() if batch.osync_log.exists() else r.output
    assert "--pat=x" in osync_said, osync_said + batch.describe(r)
    assert os.listdir(str(pair.target)) == []


@pytest.mark.parametrize("args, says", [
    (["--max-runs=0"], "--max-runs=0 is not a whole number of 1 or more"),
    (["--path"], "--path needs a value: give it as --path=VALUE."),
    (["--max-exec-time", "soon"], "--max-exec-time=soon is not a whole number of 0 or more"),
], ids=["bad number", "no value", "bad number as next word"])
def test_a_mistake_before_log_file_is_reported_in_that_log(batch, args, says):
    """The batch reads --log-file even when an option before it is wrong, so that the
    mistake lands in the log a crontab names, as one sentence and exit code 1."""
    batch.task("good.conf")
    argv = [sys.executable, str(BATCH)] + args + ["--path=%s" % batch.confdir, "--log-file=%s" % batch.log]
    r = batch.run(argv=argv, expect=1)
    assert says in r.stderr and says in batch.log_text(), batch.describe(r)
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, batch.describe(r)
    assert "usage:" not in r.output, batch.describe(r)
    assert not batch.osync_log.exists(), "osync.py was run" + batch.describe(r)


@pytest.mark.parametrize("args, says", [
    (["--log-file"], "osync-batch.py: --log-file needs a value: give it as --log-file=VALUE."),
    (["--log-file={log}", "--silent=yes"], "osync-batch.py: Argument --silent: ignored explicit argument 'yes'. "
                                   "Run osync-batch.py --help for the options."),
], ids=["no log file", "switch with a value"])
def test_a_wrong_log_option_is_one_sentence_on_the_screen(batch, args, says):
    """When the options that say where to report are wrong themselves, the batch says so
    on the screen (even with --silent), runs nothing and exits 1."""
    batch.task("good.conf")
    argv = batch.command(log_file=False) + [arg.format(log=batch.log) for arg in args]
    r = batch.run(argv=argv, expect=1)
    assert r.stderr == says + "\n" and r.stdout == "", batch.describe(r)
    assert not batch.log.exists() and not (batch.base / "osync-batch.log").exists()
    assert not batch.osync_log.exists(), "osync.py was run" + batch.describe(r)


def test_unwritable_log_file_is_an_error(batch):
    batch.task("good.conf")
    argv = batch.command(log_file=False) + ["--log-file=%s" % (batch.base / "no-such-dir" / "batch.log")]
    r = batch.run(argv=argv, expect=1)
    assert "Cannot write the batch log %s" % (batch.base / "no-such-dir" / "batch.log") in r.stderr, r.output
    assert "--log-file=PATH" in r.stderr
    assert not batch.osync_log.exists()


def path_without_osync():
    """PATH with no directory that holds osync.py or osync."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return [folder for folder in folders if folder and not any(
        os.path.exists(os.path.join(folder, name)) for name in ("osync.py", "osync"))]


@pytest.mark.parametrize("name", ["osync.py", "osync"])
def test_osync_found_on_path_when_not_next_to_the_script(batch, name):
    alone = batch.base / "alone"
    alone.mkdir()
    shutil.copy(str(BATCH), str(alone / "osync-batch.py"))
    tools = batch.base / "tools"
    tools.mkdir()
    (tools / name).symlink_to(REPO / "osync.py")
    pair = batch.task("good.conf")
    argv = [sys.executable, str(alone / "osync-batch.py")] + batch.command()[2:]
    found = batch.run(argv=argv, env={"PATH": os.pathsep.join([str(tools)] + path_without_osync())}, expect=0)
    assert batch.runs("good.conf") == ["succeeded"], batch.describe(found)
    assert batch.synced("good.conf")

    shutil.rmtree(str(pair.target / WORKDIR))
    os.unlink(str(pair.target / "from_good"))
    missing = batch.run(argv=argv, env={"PATH": os.pathsep.join(path_without_osync())}, expect=1)
    assert "osync.py was not found next to osync-batch.py (in %s) nor on PATH" % alone in missing.stderr, \
        batch.describe(missing)
    assert os.listdir(str(pair.target)) == []


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_the_running_osync_and_ends_the_batch(batch, stop):
    """The running osync.py gets the signal and stops cleanly (its lock released); no
    further config starts; the batch ends at once with exit code 2, as osync.py does when a
    signal stops it."""
    started = batch.base / "hook-started"
    sleepy = batch.task("a_sleepy.conf", {"LOCAL_RUN_BEFORE_CMD": script(
        batch.base / "sleepy.sh", ['touch "%s"' % started, "sleep 60"])})
    later = batch.task("b_later.conf")
    process = subprocess.Popen(batch.command(), env=clean_env(batch.osync_log), cwd=str(batch.base),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
    try:
        deadline = time.time() + 30
        while not started.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert started.exists(), "the before command never started"
        os.kill(process.pid, stop)
        stopped_at = time.time()
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert time.time() - stopped_at < 15, "the batch waited for the before command to end"
    log = batch.log_text()
    assert process.returncode == 2, (process.returncode, stdout, stderr, log)
    assert "Traceback" not in stdout + stderr + log
    assert batch.runs("a_sleepy.conf") == ["stopped"], log
    assert batch.runs("b_later.conf") == [], log
    assert "Stopped by signal %s; not run: b_later.conf." % stop.name in log, log
    assert not sleepy.lock("initiator").exists()
    assert os.listdir(str(later.target)) == []


def oldest_python():
    python = pyenv_python("3.6")
    if python is None:
        need("the help is checked under Python 3.6 from pyenv too")
    return python


@pytest.mark.parametrize("python", ["this", "3.6"])
@pytest.mark.parametrize("switch", ["--help", "-h", "-?"])
def test_help_documents_every_option(tmp_path, python, switch):
    """Every spelling of help shows it and exits 0, under the newest and the oldest
    supported Python, and writes no log in the working folder."""
    interpreter = sys.executable if python == "this" else oldest_python()
    r = subprocess.run([interpreter, str(BATCH), switch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       cwd=str(tmp_path), universal_newlines=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r
    assert os.listdir(str(tmp_path)) == []
    for word in ("--path=DIR|FILE", "--path DIR|FILE", "--max-runs N", "--max-retries N", "--max-exec-time S",
                 "--log-file PATH", "--silent", "--errors-only", "-h, --help, -?", "--option=VALUE", "--dry",
                 "Exit codes", "SIGTERM", "PATH"):
        assert word in r.stdout, word
