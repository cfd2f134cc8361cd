"""The rsync options of the settings, each shown to take effect locally and over ssh:
RSYNC_COMPRESS, BANDWIDTH, DELTA_COPIES, PARTIAL, RSYNC_OPTIONAL_ARGS (and what it
refuses at load time), RSYNC_EXECUTABLE and RSYNC_REMOTE_PATH.

Bytes on the wire are read from rsync's own --stats (osync.py --stats --verbose logs
rsync's output per direction); which rsync ran, with what, and for how long, from an
RSYNC_EXECUTABLE wrapper that logs each call and then runs the real rsync."""

import json
import os
import random
import re
import shutil
import signal
import sys
import time

import pytest

from conftest import LOCAL_KINDS, Pair, build, describe, expected, put, snapshot

REAL_RSYNC = shutil.which("rsync")
KIB = 1024


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

WRAPPER = """#!%(python)s
import json, os, subprocess, sys, time
start = time.time()
code = subprocess.call([%(real)r] + sys.argv[1:])
with open(%(log)r, "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "seconds": time.time() - start, "code": code}) + "\\n")
sys.exit(code)
"""


def rsync_wrapper(directory, name="rsync"):
    """An rsync program at directory/name that logs each call (argv, duration, exit code)
    to directory/calls and runs the real rsync.  Returns (path of the program, reader of
    the log: a list of calls)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(str(directory), 0o755)
    log = directory / "calls"
    program = directory / name
    program.write_text(WRAPPER % {"python": sys.executable, "real": REAL_RSYNC, "log": str(log)})
    program.chmod(0o755)

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]
    return program, calls


def client_calls(calls):
    """The rsync calls osync.py made itself (not the --server end of a remote transfer)."""
    return [call for call in calls if "--server" not in call["argv"]]


def server_calls(calls):
    return [call for call in calls if "--server" in call["argv"]]


def direction_of(call, pair):
    """'push' (initiator -> target) or 'pull' (target -> initiator) for a client call."""
    source, destination = call["argv"][-2:]
    assert destination.rstrip("/").endswith(str(pair.target)) or source.rstrip("/").endswith(str(pair.target)), call
    return "push" if source.rstrip("/") == str(pair.initiator) else "pull"


STATS_LINE = re.compile(r"^(Literal data|Matched data|Total bytes sent|Total bytes received): ([0-9,]+)")


def rsync_stats(output):
    """rsync's --stats numbers per direction, from a --stats --verbose run's output:
    {"push": {"Literal data": n, ...}, "pull": {...}}."""
    stats = {}
    direction = None
    for line in output.splitlines():
        if "rsync initiator -> target:" in line:
            direction = "push"
        elif "rsync target -> initiator:" in line:
            direction = "pull"
        match = STATS_LINE.match(line)
        if match and direction:
            stats.setdefault(direction, {})[match.group(1)] = int(match.group(2).replace(",", ""))
    return stats


def wire_bytes(stats):
    """What crossed between the two rsync processes, whichever end osync.py started."""
    return stats["Total bytes sent"] + stats["Total bytes received"]


def random_bytes(size, seed):
    """Incompressible content, the same for the same seed."""
    generator = random.Random(seed)
    return generator.getrandbits(8 * size).to_bytes(size, "little")


def write(path, data, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(str(path), (mtime, mtime))


@pytest.fixture
def lpair(tmp_path):
    """A local pair, for what is refused before any replica is reached."""
    return Pair(tmp_path / "lp")


def one_error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(r)
    return lines[0]


# --------------------------------------------------------------------------------------
# RSYNC_EXECUTABLE and RSYNC_REMOTE_PATH
# --------------------------------------------------------------------------------------

def test_rsync_executable_runs_both_directions(pair, tmp_path):
    """The rsync named by RSYNC_EXECUTABLE (a path) makes both transfers, and on a remote
    target it is also the rsync run on the remote host."""
    program, calls = rsync_wrapper(tmp_path / "tools")
    build(pair.initiator, {"from_i": "i"})
    build(pair.target, {"from_t": "t"})
    pair.run(env={"RSYNC_EXECUTABLE": str(program)}, expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected({"from_i": "i", "from_t": "t"})
    clients = client_calls(calls())
    assert sorted(direction_of(call, pair) for call in clients) == ["pull", "push"], calls()
    servers = server_calls(calls())
    if pair.kind in LOCAL_KINDS:
        assert servers == [], calls()
    else:
        assert len(servers) == 2 and sum("--sender" in call["argv"] for call in servers) == 1, calls()


def test_rsync_remote_path_names_the_remote_rsync_directory(pair, tmp_path):
    """RSYNC_REMOTE_PATH is the directory of rsync on the remote host: the remote end runs
    the program of that name there, even when RSYNC_EXECUTABLE is a (local) path.  A local
    target has no remote rsync: the setting changes nothing there."""
    local_program, local_calls = rsync_wrapper(tmp_path / "local-tools")
    remote_dir = tmp_path / "remote-tools"
    remote_program, remote_calls = rsync_wrapper(remote_dir)
    build(pair.initiator, {"from_i": "i"})
    build(pair.target, {"from_t": "t"})
    pair.run(env={"RSYNC_EXECUTABLE": str(local_program), "RSYNC_REMOTE_PATH": str(remote_dir)}, expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected({"from_i": "i", "from_t": "t"})
    assert len(client_calls(local_calls())) == 2, local_calls()
    assert server_calls(local_calls()) == [], "the remote side ran RSYNC_EXECUTABLE, not RSYNC_REMOTE_PATH's rsync"
    if pair.kind in LOCAL_KINDS:
        assert remote_calls() == []
    else:
        assert len(server_calls(remote_calls())) == 2 and client_calls(remote_calls()) == [], remote_calls()


@pytest.mark.parametrize("value,says", [
    ("", "RSYNC_EXECUTABLE is empty"),
    ("rsync --inplace", "put the rest in RSYNC_OPTIONAL_ARGS"),
])
def test_rsync_executable_that_names_no_program(lpair, value, says):
    """An empty RSYNC_EXECUTABLE, or one holding options, is one sentence at load time
    naming the file and line; nothing is written."""
    build(lpair.initiator, {"a": "a"})
    conf = lpair.write_conf(keys={"RSYNC_EXECUTABLE": value})
    before = snapshot(lpair.initiator, exclude_workdir=False), snapshot(lpair.target, exclude_workdir=False)
    r = lpair.run_conf(conf, expect=1)
    line = one_error_line(r)
    assert "task.conf:" in line and says in line, line
    assert (snapshot(lpair.initiator, exclude_workdir=False), snapshot(lpair.target, exclude_workdir=False)) == before


# --------------------------------------------------------------------------------------
# RSYNC_OPTIONAL_ARGS
# --------------------------------------------------------------------------------------

def test_optional_args_reach_both_transfers(pair, tmp_path):
    """Options osync.py leaves to the user go to both transfers, values given in the same
    word or in the next one (the log file rsync writes lists the files of both directions)."""
    rsync_log = tmp_path / "rsync.log"
    build(pair.initiator, {"from_i": "i"})
    build(pair.target, {"from_t": "t"})
    args = "--log-file=%s --modify-window 1 -@ 1 --timeout=120 --human-readable" % rsync_log
    pair.run(env={"RSYNC_OPTIONAL_ARGS": args}, expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected({"from_i": "i", "from_t": "t"})
    log = rsync_log.read_text()
    assert "from_i" in log and "from_t" in log, log


def synced_with_pending_deletion(pair):
    """A pair synced once whose next run would delete (and copy): a refused run must do neither."""
    build(pair.initiator, {"kept": "k", "gone": "g"})
    pair.run(expect=0)
    (pair.initiator / "gone").unlink()
    put(pair.initiator, "fresh", "f")
    return snapshot(pair.initiator, exclude_workdir=False), snapshot(pair.target, exclude_workdir=False)


@pytest.mark.parametrize("value,says", [
    ("--inplace", "--inplace makes rsync write into the file it replaces"),
    ("--append-verify", "--append-verify makes rsync write into the file it replaces"),
    ("--modify-window=1 --delete-after", "--delete-after lets rsync delete files"),
    ("-vaP", "-a (in -vaP)"),
    ("--partial", "set PARTIAL=yes instead"),
    ("--temp-dir /tmp", "--temp-dir is set by osync.py itself"),
    ("-vT/tmp", "-T (in -vT/tmp) is set by osync.py itself"),
    ("--backup-dir=old", "--backup-dir is set by osync.py itself"),
    ("--files-from=list --from0", "--files-from changes which files rsync transfers"),
    ("-0", "-0 changes which files rsync transfers"),
    ("--no-implied-dirs", "--no-implied-dirs changes which files rsync transfers"),
    ("--exclude=*.tmp", "use RSYNC_EXCLUDE_PATTERN"),
    ("--no-times", "--no-times turns off --times"),
    ("--bwlimit=10", "use BANDWIDTH instead"),
    ("--no-W", "use DELTA_COPIES instead"),
    ("--rsync-path=/opt/rsync", "use RSYNC_REMOTE_PATH or RSYNC_EXECUTABLE instead"),
    ("--human-readable --modify-window", "--modify-window needs a value"),
    ("--modify-window=1 backup", "'backup' is not an option"),
])
def test_optional_args_refused_at_load_time(lpair, value, says):
    """An option that osync.py manages, or that would break what it guarantees, is one
    sentence naming file, line and key and saying what to do; nothing is changed."""
    before = synced_with_pending_deletion(lpair)
    conf = lpair.write_conf(keys={"RSYNC_OPTIONAL_ARGS": value})
    line_number = conf.read_text().splitlines().index('RSYNC_OPTIONAL_ARGS="%s"' % value) + 1
    r = lpair.run_conf(conf, expect=1)
    line = one_error_line(r)
    assert "task.conf:%d: RSYNC_OPTIONAL_ARGS: " % line_number in line and says in line, line
    after = snapshot(lpair.initiator, exclude_workdir=False), snapshot(lpair.target, exclude_workdir=False)
    assert after == before, "a refused run changed a replica"


def test_optional_args_refused_from_the_environment(pair):
    """The same refusal for the environment (and on a remote target, before ssh is used)."""
    before = synced_with_pending_deletion(pair)
    r = pair.run(env={"RSYNC_OPTIONAL_ARGS": "--inplace"}, expect=1)
    line = one_error_line(r)
    assert "environment variable RSYNC_OPTIONAL_ARGS: RSYNC_OPTIONAL_ARGS: --inplace" in line, line
    after = snapshot(pair.initiator, exclude_workdir=False), snapshot(pair.target, exclude_workdir=False)
    assert after == before, "a refused run changed a replica"


# --------------------------------------------------------------------------------------
# RSYNC_COMPRESS, BANDWIDTH, DELTA_COPIES
# --------------------------------------------------------------------------------------

COMPRESSIBLE = 1000 * KIB


@pytest.mark.parametrize("compress", ["yes", "no"])
def test_rsync_compress(pair, compress):
    """RSYNC_COMPRESS=yes compresses what crosses to a remote target, in both directions,
    also files whose names say they are compressed already (rsync >= 3.2 compresses with
    zstd or lz4 and skips nothing by name); =no sends the data as it is.  A local copy is
    never compressed: nothing crosses a network."""
    write(pair.initiator / "zeros.gz", b"\0" * COMPRESSIBLE, 1500000000)
    write(pair.target / "zeros.txt", b"\0" * COMPRESSIBLE, 1500000000)
    r = pair.run("--stats", "--verbose", env={"RSYNC_COMPRESS": compress}, expect=0)
    assert (pair.target / "zeros.gz").read_bytes() == (pair.initiator / "zeros.txt").read_bytes() == b"\0" * COMPRESSIBLE
    stats = rsync_stats(r.stdout)
    assert sorted(stats) == ["pull", "push"], describe(r)
    for direction in ("push", "pull"):
        sent = wire_bytes(stats[direction])
        if compress == "yes" and pair.kind not in LOCAL_KINDS:
            assert sent < COMPRESSIBLE / 10, (direction, stats)
        else:
            assert sent >= COMPRESSIBLE, (direction, stats)


def test_bandwidth_limits_both_directions(pair, tmp_path):
    """BANDWIDTH (KiB/s) is rsync's --bwlimit: 250 KiB at 100 KiB/s take at least about
    2.5 s in each direction (a lower bound: a loaded machine only makes it slower), and
    the transfers complete."""
    program, calls = rsync_wrapper(tmp_path / "tools")
    size = 250 * KIB
    write(pair.initiator / "up", random_bytes(size, 1), 1500000000)
    write(pair.target / "down", random_bytes(size, 2), 1500000000)
    pair.run(env={"RSYNC_EXECUTABLE": str(program), "BANDWIDTH": "100"}, expect=0)
    assert (pair.target / "up").read_bytes() == random_bytes(size, 1)
    assert (pair.initiator / "down").read_bytes() == random_bytes(size, 2)
    clients = client_calls(calls())
    assert len(clients) == 2, calls()
    for call in clients:
        assert "--bwlimit=100" in call["argv"], call
        assert call["seconds"] >= 1.5, ("the transfer was not slowed down", call)


def edit_middle(path, data, mtime):
    """`data` with 1000 bytes in its middle replaced, written to path (same size)."""
    middle = len(data) // 2
    changed = data[:middle] + random_bytes(1000, mtime) + data[middle + 1000:]
    write(path, changed, mtime)
    return changed


@pytest.mark.parametrize("delta", ["yes", "no"])
def test_delta_copies(pair, delta):
    """DELTA_COPIES=yes sends only what changed in a file the destination already holds,
    also between local directories (where rsync would copy whole files by default);
    =no sends whole files.  In both directions."""
    size = 1000 * KIB
    up, down = random_bytes(size, 3), random_bytes(size, 4)
    write(pair.initiator / "up", up, 1500000000)
    write(pair.target / "down", down, 1500000000)
    pair.run(expect=0)
    up = edit_middle(pair.initiator / "up", up, 1500000100)
    down = edit_middle(pair.target / "down", down, 1500000100)
    r = pair.run("--stats", "--verbose", env={"DELTA_COPIES": delta}, expect=0)
    assert (pair.target / "up").read_bytes() == up and (pair.initiator / "down").read_bytes() == down
    stats = rsync_stats(r.stdout)
    assert sorted(stats) == ["pull", "push"], describe(r)
    for direction in ("push", "pull"):
        literal = stats[direction]["Literal data"]
        if delta == "yes":
            assert literal < size / 10, (direction, stats)
        else:
            assert literal == size, (direction, stats)


# --------------------------------------------------------------------------------------
# PARTIAL
# --------------------------------------------------------------------------------------

def wait_for(condition, what, timeout=60, process=None):
    """Poll until condition() is true; fail naming `what` (with the run's output when the
    run `process` ended first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail("the run ended before %s:\n%s\n%s" % (what, out, err))
        time.sleep(0.05)
    pytest.fail("timed out waiting for %s" % what)


def biggest_file(directory):
    sizes = [entry.stat().st_size for entry in directory.iterdir()] if directory.is_dir() else []
    return max(sizes) if sizes else 0


@pytest.mark.parametrize("source", ["initiator", "target"])
def test_partial_transfer_is_resumed(pair, source):
    """PARTIAL=yes: a run stopped (SIGTERM) in the middle of a large transfer keeps what
    arrived in the destination's .osync_workdir/_partial (never at the file's own name),
    and the next run sends only the rest."""
    size = 8 * 1024 * KIB
    data = random_bytes(size, 5)
    destination = pair.other(source)
    write(pair.root(source) / "big", data, 1500000000)
    temp_dir = pair.workdir(destination) / "_tmp"
    partial = pair.workdir(destination) / "_partial" / "big"
    # 512 KiB/s: the whole file would take 16 s; the run is stopped once 1 MiB arrived.
    process = pair.popen(env={"PARTIAL": "yes", "BANDWIDTH": "512"})
    wait_for(lambda: biggest_file(temp_dir) >= 1024 * KIB, "1 MiB in the destination's _tmp", process=process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "Stopped by signal SIGTERM" in out + err, out + err
    assert "Traceback" not in out + err and "Unexpected internal error" not in out + err
    wait_for(partial.exists, "the partial file in _partial", timeout=30)
    kept = partial.stat().st_size
    assert 1024 * KIB <= kept < size
    assert data.startswith(partial.read_bytes())
    assert not (pair.root(destination) / "big").exists(), "a partial file reached its final name"

    r = pair.run("--stats", "--verbose", env={"PARTIAL": "yes"}, expect=0)
    assert (pair.root(destination) / "big").read_bytes() == data
    stats = rsync_stats(r.stdout)["push" if source == "initiator" else "pull"]
    assert stats["Literal data"] <= size - kept + 16 * KIB, (kept, stats)
    assert not partial.exists(), "the partial file was left behind once used"


def test_partial_without_delta_copies_is_a_notice(lpair):
    """rsync discards a partial file when it copies whole files: PARTIAL=yes with
    DELTA_COPIES=no says so (and the run goes on)."""
    build(lpair.initiator, {"a": "a"})
    r = lpair.run("--partial", env={"DELTA_COPIES": "no"}, expect=0)
    assert "PARTIAL=yes keeps partly transferred files, but with DELTA_COPIES=no" in r.stdout, describe(r)
    assert "set DELTA_COPIES=yes" in r.stdout
    assert snapshot(lpair.target) == expected({"a": "a"})


def test_rsync_remote_path_naming_the_program_is_a_notice(pair, tmp_path):
    """RSYNC_REMOTE_PATH=.../rsync looks like the program, not its directory: the run says
    which program the remote host runs (here there is one, .../rsync/rsync)."""
    remote_dir = tmp_path / "tools" / "rsync"
    remote_program, remote_calls = rsync_wrapper(remote_dir)
    build(pair.initiator, {"from_i": "i"})
    r = pair.run(env={"RSYNC_REMOTE_PATH": str(remote_dir)}, expect=0)
    assert snapshot(pair.target) == expected({"from_i": "i"})
    notice = "so the remote host runs %s" % remote_program
    if pair.kind in LOCAL_KINDS:
        assert notice not in r.stdout and remote_calls() == [], describe(r)
    else:
        assert notice in r.stdout and "set RSYNC_REMOTE_PATH to %s" % remote_dir.parent in r.stdout, describe(r)
        assert len(server_calls(remote_calls())) == 1
