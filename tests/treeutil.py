"""The one module of tree helpers for the black-box tests of osync.py: build trees, snapshot them,
stop runs.  conftest.py imports these and the tests take them from either module.

Every function accepts a path as ``str``, ``Path`` or ``bytes`` (turned into bytes with
``os.fsencode``), so names that are not UTF-8 work everywhere.  Two families of snapshots exist,
for two kinds of test:

- ``snapshot``/``expected``/``build`` (str relative paths, ``("f", content)`` entries): the scenario
  tests, which describe small trees as dicts;
- ``tree_snapshot``/``full_snapshot``/``walk`` (bytes relative paths, with modes, mtimes, inodes):
  the name and property tests, whose names are any bytes.  Relative paths there are ``bytes`` with
  ``b"/"`` as separator and no leading ``./``.
"""

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

OSYNC = Path(__file__).resolve().parent.parent / "osync.py"
WORKDIR = b".osync_workdir"
WORKDIR_NAME = WORKDIR.decode()
# parts of the work dir that hold user data (everything else there is osync.py's own business)
DATA_PARTS = (b"backup", b"deleted")

# A fixed base for file mtimes, well in the past (whole seconds), so that tests
# never depend on the clock or on sub-second mtime resolution.
T0 = int(time.time()) - 6 * 3600


def b(path):
    """Any path-like (str, bytes, Path) as bytes."""
    return os.fsencode(path)


def as_path(path):
    """Any path-like (str, bytes, Path) as a Path (undecodable bytes as surrogates)."""
    return Path(os.fsdecode(path))


def as_bytes(content):
    """File content given as bytes or str (str as UTF-8, surrogates as their bytes)."""
    if isinstance(content, str):
        return content.encode("utf-8", "surrogateescape")
    return content


# --------------------------------------------------------------------------------------------------
# stopping runs
# --------------------------------------------------------------------------------------------------

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
    content = as_bytes(content)
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


def remove(root, rel=None):
    """Remove a file, a symlink or a whole directory tree: `root` itself, or `rel` inside it.
    FileNotFoundError when there is nothing there."""
    path = join(root, rel) if rel is not None else b(root)
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


def file_map(root):
    """{relative path: bytes} of every file of a replica outside its work dir."""
    found = {}
    for directory, subdirs, names in os.walk(str(root)):
        subdirs[:] = [name for name in subdirs if name != WORKDIR_NAME]
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, str(root))] = handle.read()
    return found


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


# --------------------------------------------------------------------------------------------------
# small trees described as dicts (str relative paths)
# --------------------------------------------------------------------------------------------------

def put(root, rel, content=b"x", mtime=T0):
    """Write a file (parents created, a file or link there replaced) with `content` and mtime
    (None: leave as is); returns its Path."""
    path = join(root, rel)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    write_file(path, content, mtime=mtime)
    return as_path(path)


def mkdir(root, rel, mtime=None):
    path = join(root, rel)
    os.makedirs(path, exist_ok=True)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return as_path(path)


def link(root, rel, target):
    """A symlink at rel pointing to `target` (whatever was there replaced); returns its Path."""
    path = join(root, rel)
    if os.path.lexists(path):
        os.unlink(path)
    make_symlink(path, target)
    return as_path(path)


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
            out[rel] = ("f", as_bytes(v))
    return out


RUN_REPORT_NAME = re.compile(r"^run-report-.*\.json$")


def snapshot(root, mtimes=False, exclude_workdir=True):
    """{relpath: ("f", bytes) | ("d",) | ("l", target) | ("other", type)} of a tree, str
    relative paths; the top-level .osync_workdir is left out unless exclude_workdir is false.
    With mtimes, files are ("f", bytes, mtime_ns).  The run report osync.py leaves in a
    state dir after every run, dry and refused runs too (tests/test_reports.py), is left out:
    it is the one file such runs write."""
    root = as_path(root)
    out = {}

    def visit(directory, prefix):
        with os.scandir(str(directory)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = prefix + e.name
            if exclude_workdir and rel == WORKDIR_NAME:
                continue
            if RUN_REPORT_NAME.match(e.name) and e.is_file(follow_symlinks=False):
                continue
            if e.is_symlink():
                out[rel] = ("l", os.readlink(e.path))
            elif e.is_dir():
                out[rel] = ("d",)
                visit(e.path, rel + "/")
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
        visit(root, "")
    return out


def snapshot_workdir(root, mtimes=False):
    """snapshot() of <root>/.osync_workdir ({} when it does not exist)."""
    return snapshot(as_path(root) / WORKDIR_NAME, mtimes=mtimes, exclude_workdir=False)


def files_only(snap):
    return {k: v for k, v in snap.items() if v[0] != "d"}


def find_content(root, content):
    """Relative paths (str) of the regular files anywhere under `root`, work dir included,
    whose content is `content`."""
    root = as_path(root)
    content = as_bytes(content)
    hits = []
    if not root.is_dir():
        return hits
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.read_bytes() == content:
            hits.append(p.relative_to(root).as_posix())
    return hits


def dir_files(d):
    """Names of the non-directory entries anywhere under d (relative paths)."""
    d = as_path(d)
    if not d.is_dir():
        return []
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                  if p.is_symlink() or not p.is_dir())


def strip_prefix(line):
    return re.sub(r"^\s*(R?TIME: [0-9.]+ - |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - )", "", line)


def chattr_supported(directory):
    """True if `chattr +i` works on files in `directory`."""
    if not shutil.which("chattr"):
        return False
    probe = as_path(directory) / ".chattr_probe"
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


def process_start_time(pid):
    """When a process started (field 22 of /proc/PID/stat), as osync.py records it beside the lock."""
    with open("/proc/%d/stat" % pid, "rb") as handle:
        return handle.read().rpartition(b")")[2].split()[19].decode()
