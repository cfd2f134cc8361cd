"""A hostile target host (DESIGN §4.12): whatever the agent sends, the initiator writes
nothing outside its replica and work dir, keeps its memory bounded, and ends the run with
one sentence naming the host before it uses what it refuses.

The hostile agent is the initiator's own osync.py, streamed to a REMOTE_PYTHON wrapper
that reads the source as the bootstrap stub does, appends code that makes the agent lie
(its scan, its stat replies, its replies to open and probe, raw frames on the stream)
and then runs it like AGENT_STUB does, under the remote pair kind's Python.
"""

import os
import resource
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import WORKDIR, build, check_no_internal_error, popen_osync, put, snapshot

HOST = "127.0.0.1"
MEMORY_LIMIT = 1024 * 1024 * 1024     # address space of the initiator in the memory tests
PEAK_RSS_LIMIT_KB = 256 * 1024        # what "stays small" means: far below the payloads sent

WRAPPER = '''#!{python}
import sys
size = int(sys.argv[-1])
source = sys.stdin.buffer.read(size)
{prelude}
source += b"\\n" + {patch!r}.encode("utf-8")
namespace = {{"__name__": "osync_agent"}}
exec(compile(source, "osync.py", "exec"), namespace)
namespace["agent_main"]()
'''

# Appended to the agent's source: its scan goes through lie(entries), defined per test.
SCAN_LIE = '''
_real_scan = LocalReplica.scan
def _lying_scan(self, filter_spec, options):
    return iter(lie(list(_real_scan(self, filter_spec, options))))
LocalReplica.scan = _lying_scan
def in_order(entries):
    return sorted(entries, key=lambda entry: path_key(entry.path))
def renamed(entry, path):
    return Entry(*((path,) + tuple(entry[1:])))
def find(entries, path):
    return [entry for entry in entries if entry.path == path][0]
'''

# Appended to the agent's source: the first thing its scan sends is FRAME, raw.
RAW_FRAME = '''
import struct as _struct, zlib as _zlib
_real_scan = LocalReplica.scan
def _framed_scan(self, filter_spec, options):
    stream = sys.__stdout__.buffer
    stream.write(frame())
    stream.flush()
    return _real_scan(self, filter_spec, options)
LocalReplica.scan = _framed_scan
'''


@pytest.fixture
def rpair(pair):
    if not pair.kind.startswith("remote"):
        pytest.skip("the hostile agent needs a remote target")
    return pair


def hostile_python(pair, patch="", prelude=""):
    """A REMOTE_PYTHON that runs the agent with `patch` appended to its source, after
    running `prelude` (before the agent's banner)."""
    path = pair.base / "hostile-python"
    path.write_text(WRAPPER.format(python=pair.python, prelude=prelude, patch=patch))
    path.chmod(0o755)
    return str(path)


def synced_pair(rpair):
    """Both replicas hold the same files after a first, honest run."""
    build(rpair.initiator, {"a.txt": "a", "docs/report": "precious", "docs/notes": "n"})
    rpair.run(expect=0)


def canary(rpair):
    """A directory outside both replicas, which nothing may change."""
    place = rpair.base / "canary"
    put(place, "keep", "canary")
    return place


def lines(text):
    return [line for line in (text or "").splitlines() if line.strip()]


def assert_refused(r, words=()):
    """Exit 1, one sentence on stderr naming the host (and each of `words`), no traceback."""
    from conftest import describe
    assert r.returncode == 1, "expected exit code 1" + describe(r)
    assert "Traceback" not in r.output and "Unexpected internal error" not in r.output, describe(r)
    errors = lines(r.stderr)
    assert len(errors) == 1, "expected one sentence on stderr" + describe(r)
    assert HOST in errors[0], "the error does not name the host" + describe(r)
    for word in words:
        assert word.lower() in errors[0].lower(), "the error does not say %r" % word + describe(r)


def run_bounded(rpair, env, timeout=120):
    """A quicksync run of the pair with at most MEMORY_LIMIT of address space; returns
    the finished run and the peak resident size (KiB) of osync.py and its children."""
    merged = dict(rpair.quick_env)
    merged.update(env)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = popen_osync(rpair.quick_args(), rpair.env(merged), rpair.cwd, stdout=out, stderr=err,
                              universal_newlines=False, preexec_fn=limit_memory)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        process.returncode = code
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(process.args, code, out.read().decode("utf-8", "surrogateescape"),
                                             err.read().decode("utf-8", "surrogateescape"))
    result.output = result.stdout + result.stderr
    result.logfile = rpair.logfile
    check_no_internal_error(result)
    return result, usage.ru_maxrss


# ======================================================================================
# Paths in the scan
# ======================================================================================

SCAN_LIES = {
    # The work dir's backup/ as a link: rsync would put the link in place of the
    # initiator's backup/ and the next backup would go through it.
    "workdir-backup-link": ('return in_order(entries + [Entry(".osync_workdir", "d", mode=0o700), '
                            'Entry(".osync_workdir/backup", "l", link=CANARY)])', ".osync_workdir"),
    # An alias of docs/report: a "new" file that overwrites it with no backup.
    "alias": ('return in_order(entries + [renamed(find(entries, "docs/report"), "docs//report")])',
              "docs//report"),
    "dot": ('return in_order(entries + [renamed(find(entries, "docs/report"), "docs/./report")])',
            "docs/./report"),
    "dotdot": ('return in_order(entries + [renamed(find(entries, "docs/report"), "docs/../../canary/keep")])',
               "docs/../../canary/keep"),
    "absolute": ('return in_order(entries + [renamed(find(entries, "docs/report"), CANARY + "/keep")])',
                 "/canary/keep"),
    "nul": ('return in_order(entries + [renamed(find(entries, "docs/report"), "docs/rep\\0ort")])',
            "docs/rep\\x00ort"),
    "empty": ('return [renamed(find(entries, "a.txt"), "")] + entries', "invalid path"),
    "out-of-order": ('return [entry for entry in entries if entry.path != "a.txt"] + [find(entries, "a.txt")]',
                     "out of order"),
    "duplicate": ('return in_order(entries + [find(entries, "docs/notes")])', "twice"),
    "wrong-kind": ('return [Entry(*(entry[:1] + ("x",) + entry[2:])) if entry.path == "a.txt" else entry'
                   ' for entry in entries]', "kind"),
    "size-not-a-number": ('return [Entry(*(tuple(entry[:2]) + ("huge",) + tuple(entry[3:])))'
                          ' if entry.path == "a.txt" else entry for entry in entries]', "size"),
    "short-entry": ('return [list(entry)[:3] if entry.path == "a.txt" else entry for entry in entries]',
                    "a.txt"),
    # A file below a path that is no listed directory (here a link): rsync would write
    # through the link.
    "child-of-link": ('return in_order(entries + [Entry("zlink", "l", link=CANARY), '
                      'renamed(find(entries, "docs/report"), "zlink/keep")])', "zlink/keep"),
    "child-without-parent": ('return in_order(entries + [renamed(find(entries, "docs/report"), "nodir/keep")])',
                             "nodir/keep"),
}


@pytest.mark.parametrize("case", sorted(SCAN_LIES))
def test_scan_lies_end_the_run_before_any_write(rpair, case):
    synced_pair(rpair)
    outside = canary(rpair)
    if case == "workdir-backup-link":
        # The target host really holds the link, so rsync would send it.
        backup = rpair.target / WORKDIR / "backup"
        os.rmdir(str(backup))
        os.symlink(str(outside), str(backup))
    body, word = SCAN_LIES[case]
    patch = SCAN_LIE + "CANARY = %r\ndef lie(entries):\n    %s\n" % (str(outside), body)
    before = rpair.full_snapshot()
    outside_before = snapshot(outside, mtimes=True)
    r = rpair.run(env={"REMOTE_PYTHON": hostile_python(rpair, patch)})
    assert_refused(r, words=[word])
    assert rpair.full_snapshot() == before, "a replica or work dir changed"
    assert not (rpair.initiator / WORKDIR / "backup").is_symlink()
    assert snapshot(outside, mtimes=True) == outside_before, "something outside the replicas changed"
    if case == "workdir-backup-link":
        os.unlink(str(backup))            # a linked work dir part is refused by any run
        os.mkdir(str(backup), 0o700)
    # The honest agent still syncs: nothing was left half done.
    rpair.run(expect=0)


def test_scan_with_an_excluded_path_ends_the_run(rpair):
    """A path the run excludes is not scanned on the initiator, so a target that reports
    it would have the initiator's own excluded file overwritten, with no backup."""
    excluding = {"RSYNC_EXCLUDE_PATTERN": "*.key"}
    build(rpair.initiator, {"a.txt": "a", "secret.key": "mine"})
    rpair.run(env=excluding, expect=0)
    put(rpair.target, "secret.key", "theirs")
    patch = ("_real_scan = LocalReplica.scan\n"
             "LocalReplica.scan = lambda self, filter_spec, options: _real_scan(self, [], options)\n")
    before = rpair.full_snapshot()
    env = dict(excluding, REMOTE_PYTHON=hostile_python(rpair, patch))
    r = rpair.run(env=env)
    assert_refused(r, words=["secret.key", "excludes"])
    assert rpair.full_snapshot() == before
    assert (rpair.initiator / "secret.key").read_text() == "mine"


# ======================================================================================
# Stat replies, open and other replies
# ======================================================================================

STAT_LIES = {
    "one-too-many": ("return result + [None]", "2 stat replies"),
    "one-too-few": ("return result[:-1]", "0 stat replies"),
    "other-path": ('return [renamed(entry, "docs/notes") if entry is not None and entry.path == "new.txt" '
                   'else entry for entry in result]', "new.txt"),
    "bad-path": ('return [renamed(entry, "new.txt/../docs/notes") if entry is not None else entry '
                 'for entry in result]', "invalid path"),
}


@pytest.mark.parametrize("case", sorted(STAT_LIES))
def test_stat_reply_lies_end_the_run(rpair, case):
    synced_pair(rpair)
    body, word = STAT_LIES[case]
    patch = (SCAN_LIE + "def lie(entries):\n    return entries\n"
             "_real_stat_paths = LocalReplica.stat_paths\n"
             "def _lying_stat_paths(self, paths, options):\n"
             "    result = _real_stat_paths(self, paths, options)\n"
             "    %s\n"
             "LocalReplica.stat_paths = _lying_stat_paths\n" % body)
    put(rpair.initiator, "new.txt", "new")
    r = rpair.run(env={"REMOTE_PYTHON": hostile_python(rpair, patch)})
    assert_refused(r, words=[word])
    # Nothing was recorded as synced: the honest run after it verifies and records it.
    r = rpair.run(expect=0)
    assert (rpair.target / "new.txt").read_text() == "new"


OPEN_LIES = {
    "work-dir-elsewhere": "self.work_dir = ELSEWHERE",
    "state-dir-elsewhere": "self.state_dir = ELSEWHERE",
    "root-elsewhere": "self.root = ELSEWHERE",
}


@pytest.mark.parametrize("case", sorted(OPEN_LIES))
def test_open_reply_lies_end_the_run(rpair, case):
    build(rpair.initiator, {"a.txt": "a"})
    elsewhere = rpair.base / "elsewhere"
    elsewhere.mkdir()
    patch = ("ELSEWHERE = %r\n_real_init = LocalReplica.__init__\n"
             "def _lying_init(self, *args):\n    _real_init(self, *args)\n    %s\n"
             "LocalReplica.__init__ = _lying_init\n" % (str(elsewhere), OPEN_LIES[case]))
    r = rpair.run(env={"REMOTE_PYTHON": hostile_python(rpair, patch)})
    assert_refused(r)
    assert list(elsewhere.iterdir()) == []
    assert not (rpair.target / "a.txt").exists()
    assert not (rpair.target / WORKDIR).exists()


def test_reply_of_the_wrong_shape_ends_the_run(rpair):
    build(rpair.initiator, {"a.txt": "a"})
    patch = "LocalReplica.probe = lambda self, create: ['not', 'facts']\n"
    r = rpair.run(env={"REMOTE_PYTHON": hostile_python(rpair, patch)})
    assert_refused(r, words=["probe"])
    assert not (rpair.target / "a.txt").exists()


# ======================================================================================
# Bounded memory
# ======================================================================================

FRAMES = {
    # 4 GiB announced: the initiator must not try to allocate it.
    "huge-length": ('def frame():\n    return b"J" + _struct.pack(">I", 0xFFFFFFFF)\n', "limit"),
    # 512 MiB of zeros in half a MiB of zlib.
    "zip-bomb": ('def frame():\n'
                 '    packer = _zlib.compressobj(9)\n'
                 '    data = b"".join(packer.compress(bytes(1 << 20)) for _ in range(512)) + packer.flush()\n'
                 '    return b"Z" + _struct.pack(">I", len(data)) + data\n', "limit"),
    "not-an-object": ('def frame():\n    return b"J" + _struct.pack(">I", 5) + b"[1,2]"\n', "JSON object"),
    "not-json": ('def frame():\n    return b"J" + _struct.pack(">I", 5) + b"\\xff{}\\x00x"\n', "JSON"),
    "bad-type-byte": ('def frame():\n    return b"Q" + _struct.pack(">I", 5) + b"{}{}{"\n', "unexpected data"),
}


@pytest.mark.remote_newest
@pytest.mark.parametrize("case", sorted(FRAMES))
def test_hostile_frames_end_the_run_with_bounded_memory(rpair, case):
    synced_pair(rpair)
    body, word = FRAMES[case]
    before = rpair.full_snapshot()
    r, peak_kb = run_bounded(rpair, {"REMOTE_PYTHON": hostile_python(rpair, RAW_FRAME + body)})
    assert_refused(r, words=[word])
    assert peak_kb < PEAK_RSS_LIMIT_KB, "the initiator grew to %d KiB" % peak_kb
    assert rpair.full_snapshot() == before


BANNERS = {
    "100-MB-line": 'sys.stdout.buffer.write(b"x" * 100000000 + b"\\n")\nsys.stdout.buffer.flush()\n',
    "endless-noise": 'sys.stdout.buffer.write(b"Welcome!\\n" * 5000)\nsys.stdout.buffer.flush()\n',
}


@pytest.mark.parametrize("case", sorted(BANNERS))
def test_login_noise_is_bounded(rpair, case):
    """Login noise before the banner is skipped, but only so much of it."""
    build(rpair.initiator, {"a.txt": "a"})
    r, peak_kb = run_bounded(rpair, {"REMOTE_PYTHON": hostile_python(rpair, prelude=BANNERS[case])}, timeout=60)
    assert_refused(r, words=["banner"])
    assert peak_kb < PEAK_RSS_LIMIT_KB, "the initiator grew to %d KiB" % peak_kb
    assert not (rpair.target / "a.txt").exists()


# ======================================================================================
# Agent text reaches the log as one printable line
# ======================================================================================

ESCAPING = {
    "error-reply": ("def _failing_probe(self, create):\n"
                    "    raise ReplicaError('bad\\nthing \\x1b[31mred\\x9b\\u202e')\n"
                    "LocalReplica.probe = _failing_probe\n", ""),
    "stderr-tail": ("", "sys.stderr.write('bad\\nthing \\x1b[31mred\\n')\nsys.stderr.flush()\nsys.exit(3)\n"),
}


@pytest.mark.remote_newest
@pytest.mark.parametrize("case", sorted(ESCAPING))
def test_agent_text_is_one_line_without_escapes(rpair, case):
    build(rpair.initiator, {"a.txt": "a"})
    patch, prelude = ESCAPING[case]
    r = rpair.run(env={"REMOTE_PYTHON": hostile_python(rpair, patch, prelude)})
    assert_refused(r)
    log = Path(str(rpair.logfile)).read_bytes()
    for text in (r.stderr.encode("utf-8", "surrogateescape"), log):
        assert b"\x1b" not in text and b"\xc2\x9b" not in text and "\u202e".encode() not in text
    said = [line for line in log.decode("utf-8", "replace").splitlines() if "bad" in line]
    assert len(said) == 1 and "thing" in said[0] and "red" in said[0], log
