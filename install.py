#!/usr/bin/env python3
"""install.py - install or remove osync.py, its helpers, /etc/osync and the service files.

Run it from the osync.py source directory (it copies the files that sit next to it):

    sudo ./install.py                     # the init system is found on its own
    sudo ./install.py --remove            # /etc/osync and its configs are kept
    ./install.py --prefix=/tmp/stage --init=systemd --silent     # for a package

Without --prefix it needs root.  With --prefix=DIR every file goes below DIR (DIR/usr/local/bin,
DIR/etc/osync...) with no change of owner, and the files keep naming their final places
(/usr/local/bin/osync.py, /etc/osync), as a package needs.  It never connects anywhere.

osync.py itself goes to /usr/local/lib/osync as a module, byte-compiled there, and
/usr/local/bin/osync.py is a small launcher that imports it (packaging/osync-launcher.py):
a script is compiled again at every start, which costs each osync.py process 25-30 MiB
of peak memory; a module imported from its .pyc does not compile.

Standard library only; Python 3.6 or newer.
"""

import argparse
import filecmp
import glob
import importlib.util
import os
import py_compile
import shutil
import subprocess
import sys

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
INIT_KINDS = ("systemd", "sysv", "openrc", "none")

BIN_DIR = "/usr/local/bin"
# The launcher finds the module folder relative to itself: MODULE_DIR of osync-launcher.py.
LIB_DIR = "/usr/local/lib/osync"
ETC_DIR = "/etc/osync"
SYSTEMD_SYSTEM_DIR = "/lib/systemd/system"
SYSTEMD_USER_DIR = "/etc/systemd/user"
INIT_D_DIR = "/etc/init.d"

# (source path relative to SOURCE_DIR, destination, mode)
PROGRAMS = [
    ("packaging/osync-launcher.py", BIN_DIR + "/osync.py", 0o755),
    ("osync-batch.py", BIN_DIR + "/osync-batch.py", 0o755),
    ("ssh_filter.py", BIN_DIR + "/ssh_filter.py", 0o755),
]
# The module the launcher imports, byte-compiled once installed.
MODULE = ("osync.py", LIB_DIR + "/osync.py", 0o644)
# Examples in /etc/osync: one the user changed is kept, the new one goes beside it as .new.
EXAMPLES = [
    ("sync.conf", ETC_DIR + "/sync.conf.example", 0o644),
    ("packaging/exclude.list.example", ETC_DIR + "/exclude.list.example", 0o644),
]
SERVICES = {
    "systemd": [
        ("packaging/systemd/osync-srv@.service", SYSTEMD_SYSTEM_DIR + "/osync-srv@.service", 0o644),
        ("packaging/systemd/osync-target-helper-srv@.service",
         SYSTEMD_SYSTEM_DIR + "/osync-target-helper-srv@.service", 0o644),
        ("packaging/systemd/osync@.service", SYSTEMD_SYSTEM_DIR + "/osync@.service", 0o644),
        ("packaging/systemd/osync@.timer", SYSTEMD_SYSTEM_DIR + "/osync@.timer", 0o644),
        ("packaging/systemd/user/osync-srv@.service", SYSTEMD_USER_DIR + "/osync-srv@.service", 0o644),
        ("packaging/systemd/user/osync-target-helper-srv@.service",
         SYSTEMD_USER_DIR + "/osync-target-helper-srv@.service", 0o644),
    ],
    "sysv": [
        ("packaging/sysv/osync-srv", INIT_D_DIR + "/osync-srv", 0o755),
    ],
    "openrc": [
        ("packaging/openrc/osync-srv", INIT_D_DIR + "/osync-srv", 0o755),
    ],
    "none": [],
}
# What osync.sh's install.sh left that systemd never loads (the .user suffix): removed
# with --remove.
LEGACY_FILES = [
    SYSTEMD_USER_DIR + "/osync-srv@.service.user",
    SYSTEMD_USER_DIR + "/osync-target-helper-srv@.service.user",
]

NEXT_STEPS = {
    "systemd": """Next steps:
  1. Write a config: cp /etc/osync/sync.conf.example /etc/osync/NAME.conf, edit it, and try it
     with: osync.py /etc/osync/NAME.conf --dry --summary
  2. Either sync on every change (monitor mode):
         systemctl daemon-reload && systemctl enable --now osync-srv@NAME.conf
     or sync every hour:
         systemctl daemon-reload && systemctl enable --now osync@NAME.conf.timer
     (a user's own service: systemctl --user enable --now osync-srv@NAME.conf)""",
    "sysv": """Next steps:
  1. Write a config: cp /etc/osync/sync.conf.example /etc/osync/NAME.conf, edit it, and try it
     with: osync.py /etc/osync/NAME.conf --dry --summary
  2. Enable the service, which runs one monitor per /etc/osync/*.conf:
         update-rc.d osync-srv defaults     (Debian, Ubuntu)  or  chkconfig --add osync-srv
         service osync-srv start""",
    "openrc": """Next steps:
  1. Write a config: cp /etc/osync/sync.conf.example /etc/osync/NAME.conf, edit it, and try it
     with: osync.py /etc/osync/NAME.conf --dry --summary
  2. Link the service under the config's name and enable it:
         ln -s osync-srv /etc/init.d/osync-srv.NAME
         rc-update add osync-srv.NAME default && rc-service osync-srv.NAME start""",
    "none": """Next steps:
  1. Write a config: cp /etc/osync/sync.conf.example /etc/osync/NAME.conf, edit it, and try it
     with: osync.py /etc/osync/NAME.conf --dry --summary
  2. Run it from cron, e.g. a line in /etc/cron.d/osync:
         0 * * * * root /usr/local/bin/osync-batch.py --path=/etc/osync --silent""",
}
SSH_FILTER_ADVICE = """  For a remote target, restrict the initiator's key on the target host with ssh_filter.py:
  install it there too and put command="/usr/local/bin/ssh_filter.py TOKEN" in front of the
  key in ~/.ssh/authorized_keys, with _REMOTE_TOKEN=TOKEN in the config (its header and the
  README, "Restricting the key with ssh_filter.py", say how)."""


# Compiles the installed module for one Python: the .pyc goes where that Python's import
# looks for it (__pycache__ beside the source, the plain, unoptimized name, whatever
# PYTHONPYCACHEPREFIX says), and names the module's final path.  Run by the `python3`
# of PATH when it is another Python than install.py's: it prints the .pyc it wrote, or
# nothing when the Python is too old for osync.py or shares install.py's cache tag.
COMPILE_PROGRAM = """import importlib.util, py_compile, sys
source, final_path, done_tag = sys.argv[1:4]
if sys.version_info < (3, 6) or sys.implementation.cache_tag == done_tag:
    sys.exit(0)
sys.pycache_prefix = None
compiled = importlib.util.cache_from_source(source, optimization='')
py_compile.compile(source, cfile=compiled, dfile=final_path, doraise=True)
print(compiled)
"""


class InstallError(Exception):
    """A problem the user can fix: one sentence, exit code 1."""


class Installer(object):
    """Writes (or removes) the files below `prefix` ("" for the real root) and says what
    it did unless silent."""

    def __init__(self, prefix, silent):
        self.prefix = prefix
        self.silent = silent

    def say(self, text):
        if not self.silent:
            print(text)

    def warn(self, text):
        if not self.silent:
            sys.stderr.write("WARNING: %s\n" % text)

    def place(self, destination):
        """Where a destination path is written: below the prefix, if any."""
        return self.prefix + destination if self.prefix else destination

    def make_dir(self, destination):
        path = self.place(destination)
        if not os.path.isdir(path):
            try:
                os.makedirs(path, 0o755)
            except OSError as error:
                raise InstallError("Cannot create the directory %s: %s." % (path, error.strerror))

    def write(self, source, destination, mode):
        """Copy `source` to `destination` through a temporary file renamed into place, so a
        running osync.py never sees a half-written file."""
        path = self.place(destination)
        self.make_dir(os.path.dirname(destination))
        temporary = "%s.install-%d" % (path, os.getpid())
        try:
            with open(os.path.join(SOURCE_DIR, source), "rb") as handle:
                content = handle.read()
            with open(temporary, "wb") as handle:
                handle.write(content)
            os.chmod(temporary, mode)
            if not self.prefix:
                os.chown(temporary, 0, 0)
            os.replace(temporary, path)
        except OSError as error:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise InstallError("Cannot write %s: %s." % (error.filename or path, error.strerror))
        return path

    def compiled_files(self):
        """The .pyc files of the installed module there are, for any Python."""
        return sorted(glob.glob(os.path.join(self.place(LIB_DIR), "__pycache__", "osync.*.pyc")))

    def compile_module(self, path, destination):
        """Byte-compile the installed module for this Python, and for the one that
        `/usr/bin/env python3` (the launcher's #! line) starts when that is another.
        Python checks a .pyc against its source's time and size at every import."""
        if hasattr(sys, "pycache_prefix"):
            sys.pycache_prefix = None
        compiled = importlib.util.cache_from_source(path, optimization="")
        try:
            py_compile.compile(path, cfile=compiled, dfile=destination, doraise=True)
        except (py_compile.PyCompileError, OSError) as error:
            raise InstallError("Cannot byte-compile %s: %s." % (path, str(error).strip()))
        self.say("Compiled %s" % compiled)
        other = shutil.which("python3")
        if not other or os.path.realpath(other) == os.path.realpath(sys.executable or ""):
            return
        try:
            result = subprocess.run([other, "-c", COMPILE_PROGRAM, path, destination,
                                     sys.implementation.cache_tag],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    universal_newlines=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            problem = str(error)
        else:
            if result.returncode == 0:
                if result.stdout.strip():
                    self.say("Compiled %s" % result.stdout.strip())
                return
            problem = (result.stderr.strip() or "exit code %d" % result.returncode).splitlines()[-1]
        self.warn("%s could not byte-compile %s (%s): osync.py run by it compiles itself at every start."
                  % (other, path, problem))

    def install_module(self):
        """The module and its .pyc files: the old .pyc files go first, so that none of
        another version stays behind."""
        for compiled in self.compiled_files():
            self.unlink(compiled)
        source, destination, mode = MODULE
        path = self.write(source, destination, mode)
        self.say("Installed %s" % path)
        self.compile_module(path, destination)

    def install(self, init):
        self.install_module()
        for source, destination, mode in PROGRAMS:
            self.say("Installed %s" % self.write(source, destination, mode))
        for source, destination, mode in EXAMPLES:
            path = self.place(destination)
            if os.path.exists(path) and not filecmp.cmp(path, os.path.join(SOURCE_DIR, source), shallow=False):
                new = self.write(source, destination + ".new", mode)
                self.say("Kept %s (it differs from this version's); the new one is %s" % (path, new))
            else:
                self.say("Installed %s" % self.write(source, destination, mode))
        for source, destination, mode in SERVICES[init]:
            self.say("Installed %s" % self.write(source, destination, mode))
        if init == "none":
            self.warn("No init system found (systemd, OpenRC or SysV init): no service files installed.")
        self.say("")
        self.say(NEXT_STEPS[init])
        self.say(SSH_FILTER_ADVICE)

    def unlink(self, path):
        """Remove one installed file; False when there is none."""
        if not os.path.lexists(path):
            return False
        try:
            os.unlink(path)
        except OSError as error:
            raise InstallError("Cannot remove %s: %s." % (path, error.strerror))
        return True

    def remove_module(self):
        """The module, its .pyc files and their folders (kept, and said, when they hold
        files that install.py did not put there); whether there was anything to remove."""
        removed_any = False
        for path in self.compiled_files() + [self.place(MODULE[1])]:
            if self.unlink(path):
                removed_any = True
        for folder in (os.path.join(self.place(LIB_DIR), "__pycache__"), self.place(LIB_DIR)):
            if not os.path.isdir(folder):
                continue
            try:
                os.rmdir(folder)
            except OSError as error:
                self.warn("Kept %s: %s (it holds files install.py did not install)." % (folder, error.strerror))
                continue
            removed_any = True
        if removed_any:
            self.say("Removed %s" % self.place(LIB_DIR))
        return removed_any

    def remove(self):
        removed_any = self.remove_module()
        destinations = [destination for _, destination, _ in PROGRAMS]
        for kind in INIT_KINDS:
            destinations += [destination for _, destination, _ in SERVICES[kind]]
        destinations += LEGACY_FILES
        for destination in sorted(set(destinations), key=destinations.index):
            path = self.place(destination)
            if self.unlink(path):
                removed_any = True
                self.say("Removed %s" % path)
        if not removed_any:
            self.say("Nothing to remove: osync.py is not installed in %s." % self.place(BIN_DIR))
        self.say("Kept %s and the configs in it." % self.place(ETC_DIR))
        left = sorted(glob.glob(self.place("/etc/systemd/system/*.wants/osync*@*"))
                      + glob.glob(self.place("/etc/init.d/osync-srv.*"))
                      + glob.glob(self.place("/etc/runlevels/*/osync-srv*"))
                      + glob.glob(self.place("/etc/rc[0-6S].d/[SK][0-9][0-9]osync-srv")))
        if left:
            self.say("These services are still enabled and now point at nothing; disable them "
                     "(systemctl disable, rc-update del, update-rc.d remove, rm):\n  " + "\n  ".join(left))


def detect_init():
    """The init system of this host, as install.sh found it."""
    if os.path.exists("/sbin/openrc-run"):
        return "openrc"
    if os.path.isdir("/run/systemd/system") or os.path.exists("/usr/lib/systemd/systemd"):
        return "systemd"
    if os.path.isdir("/etc/init.d"):
        return "sysv"
    return "none"


def missing_sources(init):
    """The files this install needs that are not next to install.py."""
    needed = [source for source, _, _ in [MODULE] + PROGRAMS + EXAMPLES]
    needed += [source for source, _, _ in SERVICES[init]]
    return [source for source in needed if not os.path.isfile(os.path.join(SOURCE_DIR, source))]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise InstallError("%s: %s (see %s --help)." % (self.prog, message, self.prog))


def parse_arguments(argv):
    parser = Parser(prog="install.py", description=(
        "Install osync.py, osync-batch.py and ssh_filter.py in /usr/local/bin (osync.py as a launcher of the "
        "osync module, byte-compiled in /usr/local/lib/osync), the examples in "
        "/etc/osync (an example you changed is kept, the new one written beside it as NAME.new), "
        "and the service files of the init system; or remove them (--remove), keeping /etc/osync. "
        "Run it from the osync.py source directory. It never connects anywhere."))
    parser.add_argument("--prefix", metavar="DIR",
                        help="Install below DIR (DIR/usr/local/bin, DIR/etc/osync...), with no change of owner and "
                             "no need for root; the files still name /usr/local/bin and /etc/osync (packaging).")
    parser.add_argument("--init", choices=INIT_KINDS,
                        help="The service files to install (default: those of the init system found: "
                             "/sbin/openrc-run: openrc; systemd running or /usr/lib/systemd/systemd: systemd; "
                             "/etc/init.d: sysv; else none).")
    parser.add_argument("--remove", action="store_true",
                        help="Remove the programs, /usr/local/lib/osync and every service file installed; "
                             "keep /etc/osync.")
    parser.add_argument("--silent", action="store_true", help="Print nothing but errors.")
    return parser.parse_args(argv)


def run(argv):
    options = parse_arguments(argv)
    prefix = ""
    if options.prefix is not None:
        if not options.prefix.strip():
            raise InstallError("--prefix is empty: give the directory to install below, e.g. --prefix=/tmp/stage.")
        prefix = os.path.abspath(options.prefix).rstrip("/")
    geteuid = getattr(os, "geteuid", None)
    if not prefix and geteuid is not None and geteuid() != 0:
        raise InstallError("install.py must run as root to write to /usr/local/bin and /etc/osync: run it with "
                           "sudo, or give --prefix=DIR to install below DIR.")
    installer = Installer(prefix, options.silent)
    if options.remove:
        installer.remove()
        return 0
    init = options.init or detect_init()
    missing = missing_sources(init)
    if missing:
        raise InstallError("%s %s missing in %s: run install.py from a complete osync.py source directory."
                           % (", ".join(missing), "is" if len(missing) == 1 else "are", SOURCE_DIR))
    os.umask(0o022)
    installer.install(init)
    return 0


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except InstallError as error:
        sys.stderr.write("ERROR: %s\n" % error)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("ERROR: interrupted; run install.py again to complete the install.\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
