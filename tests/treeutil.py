"""Small helpers for the black-box tests of osync.py: build trees, snapshot them, run osync.py.

Every path handled here is ``bytes`` (or a ``str``/``Path`` that is turned into bytes with
``os.fsencode``), so names that are not UTF-8 work everywhere.  Relative paths inside a replica are
``bytes`` too, with ``b"/"`` as separator and no leading ``./``.
"""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

OSYNC = Path(__file__).resolve().parent.parent / "osync.py"
WORKDIR = b".osync_workdir"
# parts of the work dir that hold user data (everything else there is osync.py's own business)
DATA_PARTS = (b"backup", b"deleted")


# --------------------------------------------------------------------------------------------------
# running osync.py
# --------------------------------------------------------------------------------------------------

def b(path):
    """Any path-like (str, bytes, Path) as bytes."""
    return os.fsencode(path)


def osync_env(logfile, settings=None):
    """A copy of os.environ with LOGFILE set and `settings` (bools become yes/no) added."""
    env = dict(os.environ)
    env["LOGFILE"] = os.fsdecode(b(logfile))
    for key, value in (settings or {}).items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        env[key] = str(value)
    return env


def osync_argv(initiator, target, instance_id="test", extra=(), command=None):
    """argv of a run; `command` replaces "python osync.py" (e.g. to run as another user)."""
    return (command or [sys.executable, str(OSYNC)]) + [
        "--initiator=" + os.fsdecode(b(initiator)),
        "--target=" + os.fsdecode(b(target)),
        "--instance-id=" + instance_id,
        "--non-interactive",
    ] + list(extra)


class RunResult:
    def __init__(self, argv, returncode, output, logfile):
        self.argv = argv
        self.returncode = returncode
        self.output = output
        self.logfile = logfile

    def describe(self):
        """Exit code, output and log tail, for assertion messages."""
        log = ""
        try:
            with open(self.logfile, "rb") as f:
                data = f.read()
            log = data[-6000:].decode("utf-8", "replace")
        except OSError:
            pass
        return "argv: %r\nexit code: %s\n--- output ---\n%s\n--- log (tail) ---\n%s" % (
            self.argv, self.returncode, self.output[-6000:], log)


def run_osync(initiator, target, logfile, settings=None, extra=(), instance_id="test", timeout=300, command=None):
    """Run osync.py to completion; returns a RunResult (stdout and stderr merged)."""
    argv = osync_argv(initiator, target, instance_id, extra, command)
    proc = subprocess.run(argv, env=osync_env(logfile, settings), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return RunResult(argv, proc.returncode, proc.stdout.decode("utf-8", "replace"), logfile)


def start_osync(initiator, target, logfile, settings=None, extra=(), instance_id="test", command=None):
    """Start osync.py in its own process group (so that the whole run, rsync included, can be killed)."""
    argv = osync_argv(initiator, target, instance_id, extra, command)
    return subprocess.Popen(argv, env=osync_env(logfile, settings), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_run(proc, sig=signal.SIGKILL):
    """Kill osync.py and every child of it (its process group), then reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait()
    # children in the group may outlive the leader for a moment: make sure they are gone too
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------
# building trees
# --------------------------------------------------------------------------------------------------

def join(root, rel):
    rel = b(rel)
    return b(root) + b"/" + rel if rel else b(root)


def write_file(path, content, mtime=None, mode=None):
    """Write `content` (bytes or str) to path, creating parent dirs; optionally set mtime and mode."""
    path = b(path)
    if isinstance(content, str):
        content = content.encode()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    if mode is not None:
        os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def read_file(path):
    with open(b(path), "rb") as f:
        return f.read()


def make_symlink(path, target, mtime=None):
    path = b(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    os.symlink(b(target), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def remove(path):
    """Remove a file, a symlink or a whole directory tree."""
    import shutil
    path = b(path)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def lexists(path):
    return os.path.lexists(b(path))


def ltype(path):
    """'file', 'dir', 'link', 'other' or None (absent)."""
    try:
        st = os.lstat(b(path))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    return kind(st.st_mode)


def kind(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


# --------------------------------------------------------------------------------------------------
# snapshots
# --------------------------------------------------------------------------------------------------

def walk(root, rel=b""):
    """Yield (relpath, lstat) for everything below root/rel, parents before children, never following
    symlinks.  The work dir of the replica root is not entered."""
    top = join(root, rel)
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return
    for name in names:
        if not rel and name == WORKDIR:
            continue
        sub = rel + b"/" + name if rel else name
        st = os.lstat(join(root, sub))
        yield sub, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(root, sub)


def entry(path, st, detail=False):
    """What we compare about one entry.  detail=True adds mtime and inode (to see rewrites)."""
    k = kind(st.st_mode)
    if k == "file":
        e = ("file", st.st_mode & 0o7777, read_file(path))
    elif k == "dir":
        e = ("dir", st.st_mode & 0o7777)
    elif k == "link":
        e = ("link", os.readlink(path))
    else:
        e = ("other", st.st_mode)
    if detail:
        if k == "dir":
            e = e + (st.st_mtime_ns,)
        else:
            e = e + (st.st_mtime_ns, st.st_ino)
    return e


def tree_snapshot(root, detail=False):
    """{relpath: entry} for the replica tree, the work dir left out."""
    return {rel: entry(join(root, rel), st, detail) for rel, st in walk(root)}


def workdir_snapshot(root, detail=True):
    """{b'.osync_workdir/backup/...': entry, ...} for backup/ and deleted/ (the dirs themselves
    included when they exist)."""
    out = {}
    for part in DATA_PARTS:
        base = WORKDIR + b"/" + part
        path = join(root, base)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        out[base] = entry(path, st, detail)
        if stat.S_ISDIR(st.st_mode):
            for rel, sub_st in walk(path):
                out[base + b"/" + rel] = entry(join(path, rel), sub_st, detail)
    return out


def full_snapshot(root):
    """Tree and backup/ + deleted/, with mtimes and inodes: what a no-change run must not touch."""
    snap = tree_snapshot(root, detail=True)
    snap.update(workdir_snapshot(root, detail=True))
    return snap


def file_contents(root):
    """Set of the contents of every regular file in the tree, in backup/ and in deleted/."""
    found = set()
    for rel, st in walk(root):
        if stat.S_ISREG(st.st_mode):
            found.add(read_file(join(root, rel)))
    for part in DATA_PARTS:
        base = join(root, WORKDIR + b"/" + part)
        for rel, st in walk(base):
            if stat.S_ISREG(st.st_mode):
                found.add(read_file(join(base, rel)))
    return found


def find_content(root, content):
    """Where (relative paths, work dir included) a file with exactly this content lives."""
    where = []
    for rel, st in walk(root):
        if stat.S_ISREG(st.st_mode) and read_file(join(root, rel)) == content:
            where.append(rel)
    for part in DATA_PARTS:
        base_rel = WORKDIR + b"/" + part
        base = join(root, base_rel)
        for rel, st in walk(base):
            if stat.S_ISREG(st.st_mode) and read_file(join(base, rel)) == content:
                where.append(base_rel + b"/" + rel)
    return where


def short(value, limit=120):
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def diff_snapshots(a, b, name_a="a", name_b="b", limit=40):
    """Human-readable list of differences between two snapshots ({} if equal)."""
    lines = []
    for rel in sorted(set(a) | set(b)):
        ea, eb = a.get(rel), b.get(rel)
        if ea == eb:
            continue
        lines.append("  %s: %s=%s  %s=%s" % (short(rel, 200), name_a, short(ea), name_b, short(eb)))
        if len(lines) >= limit:
            lines.append("  ...")
            break
    return lines


def dump_tree(root, detail=False):
    """Printable listing of a replica: tree, backup/ and deleted/."""
    snap = tree_snapshot(root, detail)
    snap.update(workdir_snapshot(root, detail))
    return "\n".join("  %s %s" % (short(rel, 200), short(e)) for rel, e in sorted(snap.items()))
