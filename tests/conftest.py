"""Shared fixtures and helpers for the osync.py black-box tests.

Every test runs osync.py in a subprocess.  A test that needs two replicas asks for
the ``pair`` fixture and talks to the replicas only through it:

    pair.initiator      Path of the initiator replica (always local)
    pair.target         Path where the target's files can be inspected
    pair.target_spec    the string given to --target / TARGET_SYNC_DIR
    pair.run(*args, env=None, expect=None)          quicksync mode
    pair.run_conf(conf, *args, env=None, expect=None)  config mode
    pair.conf_keys()    the keys a config file needs to reach this pair

Kinds of pair (``pair.kind``):

    local           the target is a local directory
    remote          the target is ``ssh://root@127.0.0.1:PORT//<abs path>``, served by the
                    session's ``sshd`` fixture; the osync.py agent runs under the oldest
                    supported Python (pyenv's 3.6) on the "remote" side
    remote-newest   the same with the newest Python pyenv has (3.13); for time, only on
                    the REMOTE_NEWEST_SUBSET of the scenarios (OSYNC_REMOTE_NEWEST=all: all)

The remote target is this very host, so ``pair.target`` is still a local path the test
can inspect and edit.  Every test that asks for ``pair`` runs on every kind of
``PAIR_KINDS``; narrow them for a quick run with e.g. ``OSYNC_PAIR_KINDS=local,remote``.
A test that only makes sense on a local target is marked ``@pytest.mark.local_only`` or
listed in ``LOCAL_ONLY`` below (with the reason).
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The tree helpers live in treeutil.py (str, Path or bytes paths); the tests import them
# from here or from there.
from treeutil import (T0, WORKDIR_NAME, build, chattr_supported, dir_files, expected,  # noqa: F401
                      files_only, find_content, link, mkdir, put, remove, snapshot, snapshot_workdir,
                      strip_prefix)

REPO = Path(__file__).resolve().parent.parent
OSYNC = REPO / "osync.py"
WORKDIR = WORKDIR_NAME
RUN_TIMEOUT = 120

# osync.py is importable without side effects: the settings table is the one list of the
# keys a caller's environment could set for a run.
sys.path.insert(0, str(REPO))
import osync  # noqa: E402

# Names to drop besides the settings and their old names: what osync.py reads outside the
# settings table (_DEBUG, _OSYNC_LIFELINE), the osync.sh internals a config of it may hold
# (osync.py skips OSYNC_DIR and COMPRESSION_LEVEL), the debugging variables osync.sh read,
# and the ssh agent (a run must use the key a test gives it, never the caller's agent).
# The v1.0 remote keys come from osync.LEGACY_REMOTE_KEYS.
INTERNAL_VARIABLES = ("_DEBUG", "_OSYNC_LIFELINE", "_PARANOIA_DEBUG", "_LOGGER_SILENT", "_LOGGER_VERBOSE",
                      "_LOGGER_ERR_ONLY", "_LOGGER_PREFIX", "SLEEP_TIME", "IGNORE_OS_TYPE",
                      "OSYNC_DIR", "COMPRESSION_LEVEL", "SSH_AUTH_SOCK")


def _config_keys():
    """Every name that must not leak from the caller's environment into a test run."""
    keys = set(INTERNAL_VARIABLES) | set(osync.LEGACY_REMOTE_KEYS)
    for setting in osync.SETTINGS:
        if setting.key:
            keys.add(setting.key)
        keys.update(setting.old_names)
    return frozenset(keys)


CONFIG_KEYS = _config_keys()


# In strict mode (OSYNC_TEST_STRICT=1, which .ci/run sets) a missing prerequisite fails the
# test that needs it; otherwise it skips, so that a developer's machine runs what it can.
STRICT = os.environ.get("OSYNC_TEST_STRICT", "").strip().lower() in ("1", "yes", "true")


def need(reason):
    """Stop a test whose prerequisite (a program, root, pyenv's Python...) is missing:
    a skip, or in strict mode a failure, with `reason` (what is missing, how to get it)."""
    if STRICT:
        pytest.fail("missing prerequisite (OSYNC_TEST_STRICT=1 makes this a failure): %s" % reason,
                    pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------------------
# Environment and running
# --------------------------------------------------------------------------------------

def clean_env(logfile, extra=None):
    """A copy of os.environ without any config key, with LOGFILE set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_KEYS}
    env["LOGFILE"] = str(logfile)
    env["LC_ALL"] = env.get("LC_ALL") or "C.UTF-8"
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def _tail(text, n=4000):
    text = text or ""
    return text if len(text) <= n else "…" + text[-n:]


def describe(r):
    """Human-readable account of a finished run, for assertion messages."""
    log = ""
    logfile = getattr(r, "logfile", None)
    if logfile and Path(logfile).exists():
        log = Path(logfile).read_text(errors="replace")
    return ("\ncommand: %s\nexit code: %s\n--- stdout ---\n%s\n--- stderr ---\n%s\n--- log tail ---\n%s"
            % (" ".join(map(str, r.args)), r.returncode, _tail(r.stdout), _tail(r.stderr),
               _tail(log, 2000)))


def check_exit(r, expect):
    if expect is None:
        return
    allowed = (expect,) if isinstance(expect, int) else tuple(expect)
    assert r.returncode in allowed, "expected exit code %s%s" % (expect, describe(r))


# osync.py run as the __main__ module from its compiled form, as `python -m osync` runs it:
# a script is compiled again at every start, which costs each of the suite's thousands of
# runs about 80 ms of CPU.  The module's code, __name__, __file__ and sys.argv[0] are the
# same as the script's; a test that needs the script itself passes `script`.
AS_MAIN = ("import runpy, sys; sys.path.insert(0, %r); "
           "runpy.run_module('osync', run_name='__main__', alter_sys=True)" % str(REPO))
_compiled_for = set()


def compiled_osync(python):
    """Compile osync.py once for `python` into __pycache__ (py_compile writes it even under
    PYTHONDONTWRITEBYTECODE); a stale or missing one only means a slower start."""
    if python not in _compiled_for:
        _compiled_for.add(python)
        subprocess.run([python, "-m", "py_compile", str(OSYNC)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def osync_command(argv, python=None, prefix=(), script=None, code=None):
    """The command line of one run: `prefix` (e.g. runuser -u USER --), the Python (this
    one by default), osync.py (run as its compiled __main__ module, or a copy of it at
    `script` run as a script), then `argv`.  With `code`, the Python runs that code instead,
    with the repository directory as its first argument (code that imports osync, changes
    it and calls osync.main)."""
    python = str(python or sys.executable)
    if code is not None:
        program = ["-c", code, str(REPO)]
    elif script is not None:
        program = [str(script)]
    else:
        compiled_osync(python)
        program = ["-c", AS_MAIN]
    return [str(word) for word in prefix] + [python] + program + [str(word) for word in argv]


def check_no_internal_error(r):
    """Errors are sentences: no run may end in a traceback or a bug report."""
    assert "Traceback" not in r.output and "Unexpected internal error" not in r.output, describe(r)


def run_osync(argv, env, cwd, expect=None, timeout=RUN_TIMEOUT, logfile=None, python=None,
              prefix=(), script=None, code=None, internal_error_expected=False):
    """Run osync.py with exactly `argv` to its end; returns the CompletedProcess (text,
    surrogateescape, .output = stdout + stderr).  `env` comes from clean_env().  Every run
    is checked for a traceback, unless the test provokes an internal error on purpose
    (internal_error_expected)."""
    assert OSYNC.exists(), "%s does not exist" % OSYNC
    cmd = osync_command(argv, python, prefix, script, code)
    r = subprocess.run(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, errors="surrogateescape", timeout=timeout)
    r.output = (r.stdout or "") + (r.stderr or "")
    r.logfile = logfile
    check_exit(r, expect)
    if not internal_error_expected:
        check_no_internal_error(r)
    return r


def popen_osync(argv, env, cwd, python=None, prefix=(), script=None, code=None, **popen_options):
    """Start osync.py (see osync_command) without waiting; `env` comes from clean_env().
    By default stdout and stderr are text pipes; `popen_options` override that (binary
    pipes, files, preexec_fn for resource limits, start_new_session...).  Whoever reads
    the output checks it with check_no_internal_error."""
    options = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
               "universal_newlines": True, "errors": "surrogateescape"}
    options.update(popen_options)
    if not options.get("universal_newlines"):
        options.pop("errors", None)
    return subprocess.Popen(osync_command(argv, python, prefix, script, code), env=env,
                            cwd=str(cwd) if cwd is not None else None, **options)


def finish_osync(process, timeout=RUN_TIMEOUT, logfile=None, expect=None):
    """Wait for a text-mode popen_osync run; returns it as run_osync would."""
    stdout, stderr = process.communicate(timeout=timeout)
    r = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    r.output = (stdout or "") + (stderr or "")
    r.logfile = logfile
    check_exit(r, expect)
    check_no_internal_error(r)
    return r


# --------------------------------------------------------------------------------------
# Replica pairs
# --------------------------------------------------------------------------------------

class Pair:
    """Two replicas and a way to run osync.py on them (local target)."""

    kind = "local"

    def __init__(self, base, name="pair"):
        self.interpreter = sys.executable   # the Python that runs osync.py itself
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.initiator = self.base / "initiator"
        self.target = self.base / "target"
        self.initiator.mkdir(exist_ok=True)
        self.target.mkdir(exist_ok=True)
        self.logfile = self.base / "osync.log"
        self.cwd = self.base
        self.default_env = {}

    # -- how the target is named -------------------------------------------------------
    def spec_for(self, path):
        """The --target string for a target directory at local path `path`."""
        return str(path)

    @property
    def target_spec(self):
        return self.spec_for(self.target)

    def extra_args(self):
        """Options every quicksync run of this kind needs (ssh key, token…)."""
        return []

    def conf_keys(self, initiator=None, target=None):
        """Key/value pairs a config file needs to sync this pair (values unquoted)."""
        return {
            "INITIATOR_SYNC_DIR": str(initiator or self.initiator),
            "TARGET_SYNC_DIR": self.spec_for(target or self.target),
        }

    # -- running -----------------------------------------------------------------------
    def env(self, extra=None):
        merged = dict(self.default_env)
        merged.update(extra or {})
        return clean_env(self.logfile, merged)

    def quick_args(self, initiator=None, target_spec=None, instance_id=None):
        args = ["--initiator=%s" % (initiator if initiator is not None else self.initiator),
                "--target=%s" % (target_spec if target_spec is not None else self.target_spec)]
        if instance_id:
            args.append("--instance-id=%s" % instance_id)
        args.append("--non-interactive")
        return args + self.extra_args()

    def run(self, *args, env=None, expect=None, initiator=None, target_spec=None,
            instance_id=None, timeout=RUN_TIMEOUT):
        """Quicksync run: --initiator/--target of this pair (or the overrides) + args."""
        argv = self.quick_args(initiator, target_spec, instance_id) + list(args)
        return run_osync(argv, self.env(env), self.cwd, expect, timeout, self.logfile, self.interpreter)

    def popen(self, *args, env=None, instance_id=None):
        argv = self.quick_args(instance_id=instance_id) + list(args)
        return popen_osync(argv, self.env(env), self.cwd, self.interpreter)

    def run_conf(self, conf, *args, env=None, expect=None, timeout=RUN_TIMEOUT):
        """Config-mode run: osync.py CONF --non-interactive args."""
        argv = [str(conf), "--non-interactive"] + list(args)
        return run_osync(argv, self.env(env), self.cwd, expect, timeout, self.logfile, self.interpreter)

    def run_raw(self, *argv, env=None, expect=None, timeout=RUN_TIMEOUT):
        """osync.py with exactly these arguments (no replica options added)."""
        return run_osync(list(argv), self.env(env), self.cwd, expect, timeout, self.logfile, self.interpreter)

    def write_conf(self, name="task.conf", keys=None, lines=(), directory=None):
        """Write a config file: CONFIG_FILE_REVISION, INSTANCE_ID, the pair's dirs, then
        `keys` (dict, values double-quoted; None removes a key) and raw `lines`."""
        allk = {"CONFIG_FILE_REVISION": "1.3.0", "INSTANCE_ID": "conftask"}
        allk.update(self.conf_keys())
        allk.update(keys or {})
        text = ["[GENERAL]"]
        for k, v in allk.items():
            if v is not None:
                text.append('%s="%s"' % (k, v))
        text.extend(lines)
        d = Path(directory) if directory else self.base / "conf"
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_text("\n".join(text) + "\n")
        return p

    # -- inspection ----------------------------------------------------------------------
    @property
    def roots(self):
        return (self.initiator, self.target)

    def workdir(self, side):
        return self._root(side) / WORKDIR

    def backup(self, side):
        return self.workdir(side) / "backup"

    def deleted(self, side):
        return self.workdir(side) / "deleted"

    def lock(self, side):
        return self.workdir(side) / "lock"

    def _root(self, side):
        if isinstance(side, Path):
            return side
        return {"initiator": self.initiator, "target": self.target}[side]

    def other(self, side):
        return "target" if side == "initiator" else "initiator"

    def root(self, side):
        return self._root(side)

    def state_files(self):
        """Names of every file in both replicas' .osync_workdir/state."""
        names = []
        for root in self.roots:
            d = root / WORKDIR / "state"
            if d.is_dir():
                names += [p.name for p in d.rglob("*") if not p.is_dir()]
        return names

    def full_snapshot(self, with_state=False):
        """Trees (with file mtimes) and work dirs of both replicas.  The lock is left
        out; so is state/ unless with_state."""
        out = {}
        for name, root in (("initiator", self.initiator), ("target", self.target)):
            out[name] = snapshot(root, mtimes=True)
            wd = snapshot_workdir(root, mtimes=True)
            wd.pop("lock", None)
            if not with_state:
                wd = {k: v for k, v in wd.items() if not (k == "state" or k.startswith("state/"))}
            out[name + "-workdir"] = wd
        return out

    def assert_converged(self, *args, env=None, conf=None):
        """An immediate further run exits 0 and changes nothing (trees, mtimes, backup/,
        deleted/)."""
        before = self.full_snapshot()
        if conf is not None:
            r = self.run_conf(conf, *args, env=env, expect=0)
        else:
            r = self.run(*args, env=env, expect=0)
        after = self.full_snapshot()
        assert after == before, "second run changed something" + describe(r)
        return r


# --------------------------------------------------------------------------------------
# sshd on 127.0.0.1 (and ::1 when it can be bound) for the remote kinds
# --------------------------------------------------------------------------------------

SSHD = "/usr/sbin/sshd"


def free_port():
    """A TCP port free on 127.0.0.1 (and on ::1 too when possible)."""
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if not _can_bind6(port) and _ipv6_available():
            continue
        return port
    return port


def _ipv6_available():
    return _can_bind6(0)


def _can_bind6(port):
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def port_accepts(host, port, timeout=0.5):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def keygen(path, comment="osync-test"):
    """A new ed25519 key pair at `path` (and path.pub); returns the public key line."""
    path = Path(path)
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(path)], check=True, stdin=subprocess.DEVNULL)
    return Path(str(path) + ".pub").read_text().strip()


class SshServer:
    """A running sshd.  Attributes: dir, port, host ("127.0.0.1"), ipv6 (True when it
    listens on [::1] too), key / pubkey (the user key authorized for root), known_hosts,
    log, pidfile, config.  Authorized keys live in ``authorized_keys.<user>`` files
    (``authorized_keys`` is root's): add lines with ``authorize(line, user)``."""

    host = "127.0.0.1"
    user = "root"

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o755)          # other test users must reach their files
        self.port = free_port()
        self.ipv6 = _can_bind6(self.port)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        host_pub = keygen(self.host_key, "osync-test-host")
        self.key = self.dir / "id_user"
        self.pubkey = keygen(self.key, "osync-test-user")
        self.authorized_keys = self.authorized_keys_for("root")
        self.authorized_keys.write_text(self.pubkey + "\n")
        names = ["[127.0.0.1]:%d" % self.port, "[localhost]:%d" % self.port]
        if self.ipv6:
            names.append("[::1]:%d" % self.port)
        self.known_hosts = self.dir / "known_hosts"
        kt, kb = host_pub.split()[:2]
        self.known_hosts.write_text("%s %s %s\n" % (",".join(names), kt, kb))
        self.log = self.dir / "sshd.log"
        self.pidfile = self.dir / "sshd.pid"
        self.config = self.dir / "sshd_config"
        listen = ["ListenAddress 127.0.0.1:%d" % self.port]
        if self.ipv6:
            listen.append("ListenAddress [::1]:%d" % self.port)
        self.config.write_text("\n".join(listen + [
            "HostKey %s" % self.host_key,
            "AuthorizedKeysFile %s/authorized_keys.%%u" % self.dir,
            "PidFile %s" % self.pidfile,
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "LogLevel VERBOSE",
            "MaxSessions 50",
            "MaxStartups 100",
            "MaxAuthTries 20",
            "PrintMotd no",
            "UseDNS no",
            # a cheaper key exchange than the post-quantum default: ~0.07 s less for each
            # of the ~1000 connections of a full run
            "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
            # bash started by sshd reads ~/.bashrc only as a top-level shell (SHLVL below 2):
            # a login's interactive setup (e.g. `pyenv init`, whose rehash prints errors when
            # two sessions start at once) is not part of what the tests run on the target
            "SetEnv SHLVL=1",
        ]) + "\n")
        self.proc = None

    def authorized_keys_for(self, user):
        return self.dir / ("authorized_keys." + user)

    def authorize(self, line, user="root"):
        with open(str(self.authorized_keys_for(user)), "a") as f:
            f.write(line.rstrip("\n") + "\n")

    # -- life cycle ----------------------------------------------------------------------
    def start(self):
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD, "-t", "-f", str(self.config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
        assert check.returncode == 0, "sshd -t refused the test config:\n" + check.stdout
        self.log_handle = open(str(self.log), "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self.log_handle,
                                     stderr=self.log_handle)
        deadline = time.time() + 20
        probes = 0
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sshd exited with %s:\n%s" % (self.proc.returncode,
                                                                 self.log_text()))
            ok4 = port_accepts("127.0.0.1", self.port)
            probes += ok4
            if ok4 and self.ipv6:
                ok6 = port_accepts("::1", self.port)
                probes += ok6
            if ok4 and (not self.ipv6 or ok6):
                # let sshd log the probes, so that they never count as a test's connections
                while time.time() < deadline and self.connections(0) < probes:
                    time.sleep(0.05)
                time.sleep(0.2)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sshd did not accept connections on port %d:\n%s"
                           % (self.port, self.log_text()))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log_handle", None):
            self.log_handle.close()

    # -- the log -------------------------------------------------------------------------
    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def mark(self):
        """A point in the log (its current length), for connections()/accepted()."""
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, start, end=None):
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[start:end].decode("utf-8", "replace")

    def count(self, pattern, start, end=None):
        return len(re.findall(pattern, self.log_since(start, end), re.M))

    def connections(self, start, end=None):
        """TCP connections sshd received between two mark()s."""
        return self.count(r"Connection from ", start, end)

    def accepted(self, start, end=None):
        """Successful authentications between two mark()s."""
        return self.count(r"\bAccepted \S+ for ", start, end)

    # -- helpers for tests -----------------------------------------------------------------
    def spec(self, path, user="root", host=None, port=None):
        """ssh://user@host:port/<path> (an absolute path gives the // form)."""
        host = host or self.host
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        userpart = "%s@" % user if user else ""
        return "ssh://%s%s:%d/%s" % (userpart, host, port or self.port, path)

    def ssh_options(self):
        """Options that make a plain ssh client trust this sshd (and nothing else)."""
        return ["-o", "UserKnownHostsFile=%s" % self.known_hosts,
                "-o", "StrictHostKeyChecking=yes"]

    def ssh_optional_args(self):
        """SSH_OPTIONAL_ARGS for osync.py."""
        return " ".join(self.ssh_options())

    def ssh(self, key, command=None, user="root", input=None, timeout=60):
        """Run `ssh -i KEY -p PORT … user@127.0.0.1 [COMMAND]` (COMMAND is one string,
        given to the remote side as is); returns the CompletedProcess."""
        argv = ["ssh", "-F", "/dev/null", "-T", "-i", str(key), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ControlMaster=no",
                "-o", "ControlPath=none"] + self.ssh_options() + ["%s@%s" % (user, self.host)]
        if command is not None:
            argv.append(command)
        return subprocess.run(argv, input=input if input is not None else "",
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout, env=clean_env(os.devnull))


@pytest.fixture(scope="session")
def sshd():
    """The session's sshd: see SshServer."""
    if not os.path.exists(SSHD):
        need("%s is not installed (openssh-server): tests/run installs it" % SSHD)
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        need("the ssh client is not installed (openssh-client)")
    if os.geteuid() != 0:
        need("the sshd fixture needs root (it logs in as root)")
    # Not under pytest's tmp dir (mode 0700): sshd reads a user's authorized_keys as that
    # user, and the tests log in as other local users too.
    import tempfile
    directory = tempfile.mkdtemp(prefix="osync-sshd-", dir="/tmp")
    server = SshServer(directory).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def pyenv_root():
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        r = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, universal_newlines=True)
        root = r.stdout.strip() if r.returncode == 0 else None
    return root or os.path.expanduser("~/.pyenv")


def _version_key(path):
    m = re.search(r"/versions/(\d+)\.(\d+)\.?(\d*)", path)
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


def pyenv_python(which):
    """The python binary of a pyenv version: which="3.6" (the oldest supported) or
    "newest" (the highest 3.x installed).  None when there is none."""
    pattern = "3.6*" if which == "3.6" else "3.*"
    found = [p for p in glob.glob(os.path.join(pyenv_root(), "versions", pattern, "bin", "python"))
             if os.access(p, os.X_OK) and re.search(r"/versions/\d+\.\d+\.\d+/", p)]
    if not found:
        return None
    return sorted(found, key=_version_key)[-1]


def this_and_oldest_python():
    """[(label, python)]: this Python, and the oldest supported one (3.6) when pyenv has it."""
    found = [("current", sys.executable)]
    oldest = pyenv_python("3.6")
    if oldest:
        found.append(("3.6", oldest))
    return found


def ssh_filter_key(server, name, token):
    """A key of `server` authorized for root only through ssh_filter.py with `token`
    (made once per session under `name`)."""
    key = server.dir / name
    if not key.exists():
        public = keygen(key, "osync-test-" + name)
        server.authorize('command="%s %s %s",restrict %s' % (sys.executable, REPO / "ssh_filter.py", token, public))
    return key


# --------------------------------------------------------------------------------------
# Remote pairs
# --------------------------------------------------------------------------------------

class RemotePair(Pair):
    """A pair whose target is ssh://root@127.0.0.1:PORT//<abs path> on the sshd fixture.

    Quicksync runs get --rsakey and, through the environment, SSH_OPTIONAL_ARGS (the
    fixture's known_hosts, StrictHostKeyChecking=yes) and REMOTE_PYTHON; config-mode runs
    get the same three settings from the config file only (conf_keys)."""

    def __init__(self, base, kind, server, python):
        super().__init__(base)
        self.kind = kind
        self.sshd = server
        self.python = python
        self.key = server.key
        self.quick_env = {"SSH_OPTIONAL_ARGS": server.ssh_optional_args(),
                          "REMOTE_PYTHON": python}

    def spec_for(self, path):
        path = str(path)
        assert path.startswith("/"), path
        return self.sshd.spec(path)

    def extra_args(self):
        return ["--rsakey=%s" % self.key]

    def conf_keys(self, initiator=None, target=None):
        keys = super().conf_keys(initiator, target)
        keys.update({"SSH_RSA_PRIVATE_KEY": str(self.key),
                     "SSH_OPTIONAL_ARGS": self.sshd.ssh_optional_args(),
                     "REMOTE_PYTHON": self.python})
        return keys

    def _with_quick_env(self, env):
        merged = dict(self.quick_env)
        merged.update(env or {})
        return merged

    def run(self, *args, env=None, **kw):
        return super().run(*args, env=self._with_quick_env(env), **kw)

    def popen(self, *args, env=None, **kw):
        return super().popen(*args, env=self._with_quick_env(env), **kw)

    def run_raw(self, *argv, env=None, **kw):
        return super().run_raw(*argv, env=self._with_quick_env(env), **kw)


# --------------------------------------------------------------------------------------
# Pair kinds
# --------------------------------------------------------------------------------------

# local-oldest runs osync.py itself under the oldest supported Python (3.6) on a local
# pair, on the same representative subset as remote-newest.
ALL_PAIR_KINDS = ["local", "local-oldest", "remote", "remote-newest"]
SUBSET_KINDS = ("remote-newest", "local-oldest")
LOCAL_KINDS = ("local", "local-oldest")
REMOTE_PYTHONS = {"remote": "3.6", "remote-newest": "newest"}


def _pair_kinds():
    wanted = os.environ.get("OSYNC_PAIR_KINDS", "").strip()
    if not wanted:
        return list(ALL_PAIR_KINDS)
    kinds = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_PAIR_KINDS]
    if unknown:
        raise pytest.UsageError("OSYNC_PAIR_KINDS: unknown kind(s) %s (known: %s)"
                                % (", ".join(unknown), ", ".join(ALL_PAIR_KINDS)))
    return kinds


PAIR_KINDS = _pair_kinds()

# Tests (or some of their parameter sets) that only make sense on a local target; they
# are deselected for the remote kinds.  name -> (predicate on callspec.params or None,
# why).  Keep this short: everything else must work on a remote target exactly as locally.
LOCAL_ONLY = {
    # A dead lock of *another* instance is taken over on a local replica, but on a remote
    # target the stranger-instance rule applies (reference §5.2: refused unless
    # FORCE_STRANGER_LOCK_RESUME); test_remote.py tests that rule.
    "test_dead_lock_is_taken_over": (
        lambda p: p.get("side") == "target" and p.get("content") != "65536@quicksync_task",
        "remote target locks follow the stranger-instance rule"),
    # For the suite's time (under 20 minutes on 2 cores): every awkward name crosses ssh in
    # test_all_names_together; one at a time, over ssh, only the NAMES_SUBSET below.
    "test_name_as_file": (lambda p: p.get("name") not in NAMES_SUBSET, "time: see test_all_names_together"),
    "test_name_as_directory": (lambda p: p.get("name") not in NAMES_SUBSET, "time: see test_all_names_together"),
    "test_name_as_symlink": (lambda p: p.get("name") not in NAMES_SUBSET, "time: see test_all_names_together"),
}


# The scenario suites take about 4 minutes per remote kind on a 2-core machine, so
# remote-newest (the agent under the newest Python; "remote" already runs everything
# under 3.6, the oldest) runs this representative subset: at least one case of every rule
# and option group.  OSYNC_REMOTE_NEWEST=all runs everything on it.  A test can also opt
# in with @pytest.mark.remote_newest.  name -> predicate on callspec.params or None (all).
REMOTE_NEWEST_SUBSET = {
    # test_scenarios.py
    "test_workdir_layout_on_both_replicas": None,
    "test_lock_holds_pid_and_instance_during_run": None,
    "test_first_run_merges_and_deletes_nothing": None,
    "test_new_changed_deleted_propagate": lambda p: p["backup"] is None and
    p["side"] == "initiator",
    "test_edit_beats_deletion": lambda p: p["deleting_side"] == "target",
    "test_conflict_resolution": lambda p: (p["i_off"], p["t_off"], p["prevalance"],
                                           p["first_run"]) in
    ((20, 10, None, False), (10, 10, "target", True)),
    "test_multiple_conflict_backups": None,
    "test_one_way_sync": lambda p: (p["sync_type"], p["form"]) == ("initiator2target", "env"),
    "test_type_change_propagates": lambda p: (p["case"], p["side"]) == ("file-to-dir", "target"),
    "test_empty_directories_created_and_deleted": None,
    "test_symlinks_synced_as_links": None,
    "test_dry_run_on_fresh_replicas_creates_nothing": None,
    "test_dry_run_changes_nothing_and_predicts_real_run": None,
    "test_exclusions_in_config_mode": None,
    "test_live_lock_refuses": lambda p: p["side"] == "target",
    "test_dead_lock_is_taken_over": lambda p: p["side"] == "target",
    "test_missing_replica_dir_is_an_error": lambda p: p["missing"] == "target",
    "test_create_dirs": lambda p: p["form"] == "conf",
    "test_unmounted_replica_guard": lambda p: p["lost"] == "target",
    "test_custom_state_dirs": lambda p: p["form"] == "conf",
    "test_mixed_scenario_converges": None,
    "test_deletion_failure_is_retried": None,
    "test_fresh_backups_and_deletions_survive_cleanup": lambda p: p["days"] == "1",
    "test_summary_output": None,
    # test_cli_config.py
    "test_space_separated_values": None,
    "test_config_syntax": lambda p: p["variant"] == "comments-sections",
    "test_sync_conf_example_runs": None,
    "test_silent_on_error": None,
    "test_precedence_instance_id": lambda p: p["cli_v"] == "fromcli" and p["env_v"],
    # test_names.py: every name at once, and one at a time those that a shell, a pattern,
    # a decoder (Python 3.6 under C locales) or the protocol's framing would trip over
    "test_all_names_together": None,
    "test_name_as_file": lambda p: p["name"] in NAMES_SUBSET,
    "test_name_as_directory": lambda p: p["name"] in NAMES_SUBSET,
    "test_name_as_symlink": lambda p: p["name"] in NAMES_SUBSET,
}
NAMES_SUBSET = (b"new\nline", b"-rf", b"x*?[ab]", b"$(touch pwned)", b"\xff\xfe-latin1-\xe9",
                "\u00e9".encode() * 127 + b"x", "cafe\u0301".encode(),
                b"/".join(b"level%02d" % i for i in range(60)) + b"/leaf")


def _in_newest_subset(item):
    if os.environ.get("OSYNC_REMOTE_NEWEST", "").strip().lower() == "all":
        return True
    if item.get_closest_marker("remote_newest"):
        return True
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    if name not in REMOTE_NEWEST_SUBSET:
        return False
    pred = REMOTE_NEWEST_SUBSET[name]
    return pred is None or bool(pred(item.callspec.params))


def pytest_configure(config):
    config.addinivalue_line("markers", "local_only: run only on the local pair kind")
    config.addinivalue_line("markers", "remote_newest: also run on the remote-newest pair kind "
                                       "(when it is limited to a subset)")


def _local_only(item):
    if item.get_closest_marker("local_only"):
        return True
    entry = LOCAL_ONLY.get(getattr(item, "originalname", None) or item.name.split("[")[0])
    if entry is None:
        return False
    pred = entry[0]
    params = getattr(getattr(item, "callspec", None), "params", {})
    return pred is None or bool(pred(params))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("pair_kind")
        if kind is not None and kind not in LOCAL_KINDS and _local_only(item):
            drop.append(item)
        elif kind in SUBSET_KINDS and not _in_newest_subset(item):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def make_pair(kind, base, request=None):
    if kind == "local":
        return Pair(base)
    if kind == "local-oldest":
        python = pyenv_python("3.6")
        if python is None:
            need("pair kind local-oldest needs Python 3.6 from pyenv")
        local = Pair(base)
        local.interpreter = python
        return local
    if kind in REMOTE_PYTHONS:
        python = pyenv_python(REMOTE_PYTHONS[kind])
        if python is None:
            need("pair kind %s needs Python %s from pyenv (none under %s/versions)"
                 % (kind, REMOTE_PYTHONS[kind], pyenv_root()))
        assert request is not None, "a remote pair needs the pytest request (for sshd)"
        server = request.getfixturevalue("sshd")
        return RemotePair(base, kind, server, python)
    raise ValueError("unknown pair kind %r" % kind)


@pytest.fixture(params=PAIR_KINDS)
def pair_kind(request):
    return request.param


@pytest.fixture
def pair(pair_kind, tmp_path, request):
    return make_pair(pair_kind, tmp_path / "p", request)


@pytest.fixture
def pair_factory(pair_kind, tmp_path, request):
    """Call it to get further, independent pairs of the same kind."""
    count = [0]

    def factory():
        count[0] += 1
        return make_pair(pair_kind, tmp_path / ("p%d" % count[0]), request)
    return factory


# --------------------------------------------------------------------------------------
# Processes and rsync
# --------------------------------------------------------------------------------------

def pid_is_dead(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@pytest.fixture
def rsync_spy(tmp_path):
    """An RSYNC_EXECUTABLE wrapper that, on every call, records the content of the
    files listed in `watch` (e.g. both lock files) and then runs the real rsync.

    spy = rsync_spy([lock1, lock2]); run with env=spy.env; spy.calls() ->
    [ {path: content or None}, … ] one dict per rsync call.
    """
    real = shutil.which("rsync")
    assert real, "rsync is not installed"

    class Spy:
        def __init__(self, watch):
            self.watch = [str(w) for w in watch]
            self.dir = tmp_path / "spy"
            self.dir.mkdir(exist_ok=True)
            self.log = self.dir / "calls"
            script = self.dir / "rsync"
            lines = ["#!/bin/sh", 'n=$(date +%s%N)']
            for i, w in enumerate(self.watch):
                q = "'" + w.replace("'", "'\\''") + "'"
                lines.append('if [ -e %s ]; then cat %s > "%s/$n.%d" 2>/dev/null; fi'
                             % (q, q, self.dir, i))
            lines.append('echo "$n" >> "%s"' % self.log)
            lines.append('exec %s "$@"' % real)
            script.write_text("\n".join(lines) + "\n")
            script.chmod(0o755)
            self.env = {"RSYNC_EXECUTABLE": str(script)}

        def calls(self):
            if not self.log.exists():
                return []
            out = []
            for n in self.log.read_text().split():
                d = {}
                for i, w in enumerate(self.watch):
                    f = self.dir / ("%s.%d" % (n, i))
                    d[w] = f.read_text() if f.exists() else None
                out.append(d)
            return out

    return Spy


# -- rsync wrappers --------------------------------------------------------------------------

def shell_quote(path):
    return "'" + str(path).replace("'", "'\\''") + "'"


def rsync_wrapper(tmp_path, before_rsync):
    """An RSYNC_EXECUTABLE that runs the shell lines `before_rsync` and then the real rsync:
    whatever it does happens after osync.py checked the destination and before rsync
    replaces anything, the window a racing editor hits."""
    real = shutil.which("rsync")
    script = tmp_path / "rsync-wrapper"
    script.write_text("#!/bin/sh\n%s\nexec %s \"$@\"\n" % (before_rsync, real))
    script.chmod(0o755)
    return {"RSYNC_EXECUTABLE": str(script)}


def copy_of_children_list(children, seen):
    """Shell lines for rsync_wrapper: copy the run's list of children (beside the lock) to
    `seen`.  osync.py records a child once it has started, so the child waits for it."""
    return ("for i in $(seq 100); do [ -s %s ] && break; sleep 0.05; done; cat %s > %s"
            % (shell_quote(children), shell_quote(children), shell_quote(seen)))


def plant_dead_run(workdir, pid, started, boot=None):
    """Leave in `workdir` what a run killed with -9 leaves: its lock (a pid that is gone)
    and its list of children naming `pid` (with `boot`, the boot id, when given)."""
    (workdir / "lock").write_text("999999@quicksync_task")
    line = "%d %s" % (pid, started) + (" " + boot if boot else "")
    (workdir / "lock.children").write_text(line + "\n")
