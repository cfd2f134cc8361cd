"""Shared fixtures and helpers for the osync.py black-box tests.

Every test runs osync.py in a subprocess.  A test that needs two replicas asks for
the ``pair`` fixture and talks to the replicas only through it:

    pair.initiator      Path of the initiator replica (always local)
    pair.target         Path where the target's files can be inspected
    pair.target_spec    the string given to --target / TARGET_SYNC_DIR
    pair.run(*args, env=None, expect=None)          quicksync mode
    pair.run_conf(conf, *args, env=None, expect=None)  config mode
    pair.conf_keys()    the keys a config file needs to reach this pair

Only the "local" kind exists today.  A remote kind (``ssh://…`` target served by an
sshd on 127.0.0.1) is added by subclassing ``Pair`` (override ``spec_for``,
``extra_args`` and ``conf_keys``) and adding its name to ``PAIR_KINDS`` /
``make_pair``; every scenario then runs on both kinds.
"""

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OSYNC = REPO / "osync.py"
WORKDIR = ".osync_workdir"
RUN_TIMEOUT = 120

# A fixed base for file mtimes, well in the past (whole seconds), so that tests
# never depend on the clock or on sub-second mtime resolution.
T0 = int(time.time()) - 6 * 3600

# Every config key (and old key name, and debugging variable) that must not leak
# from the caller's environment into a test run.
CONFIG_KEYS = frozenset("""
CONFIG_FILE_REVISION INSTANCE_ID INITIATOR_SYNC_DIR TARGET_SYNC_DIR SSH_RSA_PRIVATE_KEY
SSH_PASSWORD_FILE KRB5 _REMOTE_TOKEN CREATE_DIRS LOGFILE MINIMUM_SPACE BANDWIDTH SUDO_EXEC
RSYNC_EXECUTABLE RSYNC_REMOTE_PATH RSYNC_PATTERN_FIRST RSYNC_INCLUDE_PATTERN
RSYNC_EXCLUDE_PATTERN RSYNC_INCLUDE_FROM RSYNC_EXCLUDE_FROM PATH_SEPARATOR_CHAR
INITIATOR_CUSTOM_STATE_DIR TARGET_CUSTOM_STATE_DIR SSH_COMPRESSION SSH_OPTIONAL_ARGS
SSH_IGNORE_KNOWN_HOSTS SSH_CONTROLMASTER REMOTE_HOST_PING REMOTE_3RD_PARTY_HOSTS
RSYNC_OPTIONAL_ARGS PRESERVE_PERMISSIONS PRESERVE_OWNER PRESERVE_GROUP
PRESERVE_EXECUTABILITY PRESERVE_ACL PRESERVE_XATTR COPY_SYMLINKS KEEP_DIRLINKS
PRESERVE_HARDLINKS CHECKSUM RSYNC_COMPRESS SOFT_MAX_EXEC_TIME HARD_MAX_EXEC_TIME
KEEP_LOGGING MIN_WAIT MAX_WAIT LOG_CONFLICTS ALERT_CONFLICTS CONFLICT_BACKUP
CONFLICT_BACKUP_MULTIPLE CONFLICT_BACKUP_DAYS CONFLICT_PREVALANCE SOFT_DELETE
SOFT_DELETE_DAYS SKIP_DELETION SYNC_TYPE RESUME_SYNC RESUME_TRY FORCE_STRANGER_LOCK_RESUME
PARTIAL DELTA_COPIES DESTINATION_MAILS ALWAYS_SEND_MAILS MAIL_BODY_CHARSET SENDER_MAIL
SMTP_SERVER SMTP_PORT SMTP_ENCRYPTION SMTP_USER SMTP_PASSWORD LOCAL_RUN_BEFORE_CMD
LOCAL_RUN_AFTER_CMD REMOTE_RUN_BEFORE_CMD REMOTE_RUN_AFTER_CMD MAX_EXEC_TIME_PER_CMD_BEFORE
MAX_EXEC_TIME_PER_CMD_AFTER STOP_ON_CMD_ERROR RUN_AFTER_CMD_ON_ERROR COMPRESSION_LEVEL
OSYNC_DIR MASTER_SYNC_DIR SLAVE_SYNC_DIR SYNC_ID _DEBUG _PARANOIA_DEBUG SLEEP_TIME
IGNORE_OS_TYPE _LOGGER_SILENT _LOGGER_VERBOSE _LOGGER_ERR_ONLY _LOGGER_PREFIX
""".split())


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


def run_osync(argv, env, cwd, expect=None, timeout=RUN_TIMEOUT, logfile=None):
    """Run osync.py with exactly `argv`; returns the CompletedProcess (text, surrogateescape)."""
    assert OSYNC.exists(), "%s does not exist" % OSYNC
    cmd = [sys.executable, str(OSYNC)] + [str(a) for a in argv]
    r = subprocess.run(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, errors="surrogateescape", timeout=timeout)
    r.output = (r.stdout or "") + (r.stderr or "")
    r.logfile = logfile
    check_exit(r, expect)
    return r


def popen_osync(argv, env, cwd):
    cmd = [sys.executable, str(OSYNC)] + [str(a) for a in argv]
    return subprocess.Popen(cmd, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, errors="surrogateescape")


# --------------------------------------------------------------------------------------
# Replica pairs
# --------------------------------------------------------------------------------------

class Pair:
    """Two replicas and a way to run osync.py on them (local target)."""

    kind = "local"

    def __init__(self, base, name="pair"):
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
        return run_osync(argv, self.env(env), self.cwd, expect, timeout, self.logfile)

    def popen(self, *args, env=None, instance_id=None):
        argv = self.quick_args(instance_id=instance_id) + list(args)
        return popen_osync(argv, self.env(env), self.cwd)

    def run_conf(self, conf, *args, env=None, expect=None, timeout=RUN_TIMEOUT):
        """Config-mode run: osync.py CONF --non-interactive args."""
        argv = [str(conf), "--non-interactive"] + list(args)
        return run_osync(argv, self.env(env), self.cwd, expect, timeout, self.logfile)

    def run_raw(self, *argv, env=None, expect=None, timeout=RUN_TIMEOUT):
        """osync.py with exactly these arguments (no replica options added)."""
        return run_osync(list(argv), self.env(env), self.cwd, expect, timeout, self.logfile)

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


PAIR_KINDS = ["local"]


def make_pair(kind, base):
    if kind == "local":
        return Pair(base)
    raise ValueError("unknown pair kind %r" % kind)


@pytest.fixture(params=PAIR_KINDS)
def pair_kind(request):
    return request.param


@pytest.fixture
def pair(pair_kind, tmp_path):
    return make_pair(pair_kind, tmp_path / "p")


@pytest.fixture
def pair_factory(pair_kind, tmp_path):
    """Call it to get further, independent pairs of the same kind."""
    count = [0]

    def factory():
        count[0] += 1
        return make_pair(pair_kind, tmp_path / ("p%d" % count[0]))
    return factory


# --------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------

def _b(content):
    if isinstance(content, str):
        return content.encode("utf-8", "surrogateescape")
    return content


def put(root, rel, content=b"x", mtime=T0):
    """Write a file (parents created) with `content` and mtime (None: leave as is)."""
    p = Path(root) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink()
    p.write_bytes(_b(content))
    if mtime is not None:
        os.utime(str(p), (mtime, mtime))
    return p


def mkdir(root, rel, mtime=None):
    p = Path(root) / rel
    p.mkdir(parents=True, exist_ok=True)
    if mtime is not None:
        os.utime(str(p), (mtime, mtime))
    return p


def link(root, rel, target):
    p = Path(root) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or p.exists():
        p.unlink()
    os.symlink(str(target), str(p))
    return p


def remove(root, rel):
    p = Path(root) / rel
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(str(p))
    else:
        raise FileNotFoundError(str(p))


def build(root, entries, mtime=T0):
    """Create entries: {relpath: bytes|str (file), None (dir), ("l", target) (link)}."""
    for rel, v in entries.items():
        if v is None:
            mkdir(root, rel)
        elif isinstance(v, tuple) and v[0] == "l":
            link(root, rel, v[1])
        else:
            put(root, rel, v, mtime)


def expected(entries):
    """The snapshot() a tree built from `entries` has (parent dirs added)."""
    out = {}
    for rel, v in entries.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = ("d",)
        if v is None:
            out[rel] = ("d",)
        elif isinstance(v, tuple) and v[0] == "l":
            out[rel] = ("l", str(v[1]))
        else:
            out[rel] = ("f", _b(v))
    return out


def snapshot(root, mtimes=False, exclude_workdir=True):
    """{relpath: ("f", bytes) | ("d",) | ("l", target)} of a tree; the top-level
    .osync_workdir is left out.  With mtimes, files are ("f", bytes, mtime_ns)."""
    root = Path(root)
    out = {}

    def walk(d, prefix):
        with os.scandir(str(d)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = prefix + e.name
            if exclude_workdir and rel == WORKDIR:
                continue
            if e.is_symlink():
                out[rel] = ("l", os.readlink(e.path))
            elif e.is_dir():
                out[rel] = ("d",)
                walk(e.path, rel + "/")
            elif e.is_file():
                with open(e.path, "rb") as f:
                    data = f.read()
                if mtimes:
                    out[rel] = ("f", data, e.stat(follow_symlinks=False).st_mtime_ns)
                else:
                    out[rel] = ("f", data)
            else:
                out[rel] = ("other", stat.S_IFMT(e.stat(follow_symlinks=False).st_mode))

    if root.is_dir():
        walk(root, "")
    return out


def snapshot_workdir(root, mtimes=False):
    """snapshot() of <root>/.osync_workdir ({} when it does not exist)."""
    return snapshot(Path(root) / WORKDIR, mtimes=mtimes, exclude_workdir=False)


def files_only(snap):
    return {k: v for k, v in snap.items() if v[0] != "d"}


def find_content(root, content):
    """Relative paths of the regular files under `root` whose content is `content`."""
    root = Path(root)
    content = _b(content)
    hits = []
    if not root.is_dir():
        return hits
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.read_bytes() == content:
            hits.append(p.relative_to(root).as_posix())
    return hits


def dir_files(d):
    """Names of the non-directory entries anywhere under d (relative paths)."""
    d = Path(d)
    if not d.is_dir():
        return []
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                  if p.is_symlink() or not p.is_dir())


def strip_prefix(line):
    return re.sub(r"^\s*(R?TIME: [0-9.]+ - |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - )", "", line)


def pid_is_dead(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def chattr_supported(directory):
    """True if `chattr +i` works on files in `directory`."""
    if not shutil.which("chattr"):
        return False
    probe = Path(directory) / ".chattr_probe"
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).returncode == 0
        if ok:
            try:
                probe.unlink()
                ok = False          # immutable flag did not stop the unlink
            except OSError:
                pass
    finally:
        subprocess.run(["chattr", "-i", str(probe)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        if probe.exists():
            probe.unlink()
    return ok


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
