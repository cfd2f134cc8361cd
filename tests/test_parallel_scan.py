"""The scans of a local pair walked by forked children while the parent merges: the same
entries as a walk in the parent, the same sentence when a replica cannot be read, and no
child left behind by a stop signal, a SIGKILL of the parent or a monitor's many syncs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, Pair, clean_env, finish_osync, make_pair, osync, popen_osync, run_osync
from test_monitor import child_pids, command_line, wait_until
from test_unreadable import SYSTEM_PYTHON, USER, chown_tree, ensure_plain_user
from treeutil import build, expected, snapshot

if not hasattr(os, "fork") or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("scans run in children only where fork exists and more than one CPU is usable",
                allow_module_level=True)

OPTION_SETS = {
    "plain": {},
    "copy_links": {"copy_links": True},
    "dir_links": {"dir_links": True},
    "checksum": {"checksum": True},
    "acl_xattr": {"acl": True, "xattr": True, "xattr_all": True},
}

# Compares walk_tree() here with the same walk in a forked child (sys.argv: repository,
# tree, options as JSON); prints both lists and how many children the walk had running.
COMPARE_WALKS = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import osync
root, options = sys.argv[2], json.loads(sys.argv[3])

def children():
    found = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as handle:
                    if int(handle.read().rpartition(b")")[2].split()[1]) == os.getpid():
                        found += 1
            except OSError:
                pass
    return found

here = list(osync.walk_tree(root, osync.PathFilter([["-", "*.skipped"]]), options))
forked, running = [], 0
for entry in osync.scan_in_child(root, osync.PathFilter([["-", "*.skipped"]]), options):
    if not forked:
        running = children()
    forked.append(entry)
print(json.dumps({"here": [list(entry) for entry in here], "forked": [list(entry) for entry in forked],
                  "types": sorted(set(type(entry).__name__ for entry in forked)), "running": running,
                  "left": children()}))
"""

# osync.main, with the pid of every scan child written to the file $_TEST_SCAN_CHILDREN;
# with $_TEST_EUID_USER, run with that user's effective uid and gid but a real uid of 0,
# so that os.access() (which checks the real uid) finds a replica readable that the scan,
# done with the effective uid, cannot list.
RECORDING_RUN = r"""
import os, pwd, sys
sys.path.insert(0, sys.argv[1])
import osync
record = os.environ["_TEST_SCAN_CHILDREN"]
forked = getattr(osync, "ForkedScan", None)
if forked is not None:
    started = forked.__init__
    def recorded(self, *args):
        started(self, *args)
        with open(record, "a") as handle:
            handle.write("%d\n" % self.pid)
    forked.__init__ = recorded
if os.environ.get("_TEST_BREAK_PLANNER"):
    # a bug in the parent half way through the merge (put in on purpose: none is known)
    planned = osync.plan_merged
    def broken_plan(rows, *args):
        def counted(rows):
            for number, row in enumerate(rows):
                if number == 5000:
                    raise KeyError("a bug in the planner")
                yield row
        return planned(counted(rows), *args)
    osync.plan_merged = broken_plan
user = os.environ.get("_TEST_EUID_USER")
if user:
    account = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(0, account.pw_gid, 0)
    os.setresuid(0, account.pw_uid, 0)
sys.exit(osync.main(sys.argv[2:]))
"""


def awkward_tree(root):
    """Names that sort differently as bytes and as text, bytes that are not UTF-8, links of
    every kind, a hard link, a fifo, an excluded file, empty and nested directories."""
    root = os.fsencode(str(root))
    os.makedirs(root, exist_ok=True)
    names = [b"plain", b" leading space", b"-dash", b"caf\xc3\xa9", b"caf\xe9 latin1", b"new\nline",
             b"\xe6\x97\xa5\xe6\x9c\xac", b"\xf0\x9f\x98\x80 emoji", b"Z upper", b"a*?[b", b"tab\there",
             b"x.skipped", b"back\\slash", b"$dollar;&#%"]
    for depth, directory in enumerate([b"", b"d", b"d/sub dir", b"d/sub dir/\xff\xfe", b"d-", b"d.x"]):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
        for number, name in enumerate(names):
            with open(os.path.join(root, directory, name), "wb") as handle:
                handle.write(b"content %d %d %s" % (depth, number, name))
    os.makedirs(os.path.join(root, b"empty"))
    os.symlink(b"plain", os.path.join(root, b"link to file"))
    os.symlink(b"d", os.path.join(root, b"link to dir"))
    os.symlink(b"nowhere", os.path.join(root, b"broken link"))
    os.symlink(b"/etc/hostname", os.path.join(root, b"absolute link"))
    os.link(os.path.join(root, b"plain"), os.path.join(root, b"d", b"hard link"))
    os.mkfifo(os.path.join(root, b"fifo"))
    try:
        os.setxattr(os.path.join(root, b"plain"), b"user.note", b"kept")
    except OSError:
        pass
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:nobody:r", os.path.join(root, b"d", b"plain")],
                       stderr=subprocess.DEVNULL)
    return root


def compare_walks(python, root, options, prefix=()):
    result = subprocess.run(list(prefix) + [python, "-c", COMPARE_WALKS, str(REPO), os.fsdecode(root),
                                            json.dumps(options)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            errors="surrogateescape", timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return json.loads(result.stdout)


def assert_same_walks(found):
    assert found["types"] == ["Entry"]
    assert found["here"] == found["forked"]
    assert found["running"] >= 1, "the entries did not come from a child"
    assert found["left"] == 0, "the child was not reaped"


@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_a_scan_in_a_child_gives_the_entries_of_a_walk_here(tmp_path, options):
    root = awkward_tree(tmp_path / "tree")
    found = compare_walks(sys.executable, root, OPTION_SETS[options])
    assert len(found["here"]) > 80
    assert any(entry[11] for entry in found["here"]), "the fifo has its note"
    assert_same_walks(found)


@pytest.fixture
def user_base():
    """A directory below /tmp that the plain user can reach (pytest's are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="osync-parallel-scan-", dir="/tmp"))
    os.chmod(str(base), 0o755)
    yield base
    subprocess.run(["chmod", "-R", "u+rwx", str(base)])
    shutil.rmtree(str(base), ignore_errors=True)


def test_a_scan_in_a_child_gives_the_entries_of_a_walk_here_with_unreadable_items(user_base):
    """As a user that permission bits apply to: a directory that cannot be listed, one whose
    items cannot be stat'ed, a file CHECKSUM cannot read."""
    user = ensure_plain_user()
    base = user_base
    root = awkward_tree(base / "tree")
    chown_tree(base, user)
    os.chmod(os.path.join(root, b"d"), 0o000)
    os.chmod(os.path.join(root, b"d-"), 0o644)
    os.chmod(os.path.join(root, b"plain"), 0o000)
    prefix = ["runuser", "-u", USER, "--"]
    for options in ({}, {"checksum": True}, {"acl": True, "xattr": True}):
        found = compare_walks(SYSTEM_PYTHON, root, options, prefix)
        errors = [entry[11] for entry in found["here"] if entry[11]]
        assert any("cannot list directory" in error for error in errors), errors
        assert any("in it" in error for error in errors), errors
        if options.get("checksum"):
            assert any(error.startswith("cannot read") for error in errors), errors
        assert_same_walks(found)


@pytest.mark.parametrize("root", ["missing", "a file"])
def test_a_scan_in_a_child_raises_the_oserror_of_a_walk_here(tmp_path, root):
    path = tmp_path / root
    if root == "a file":
        path.write_text("not a directory")
    raised = []
    for scan in (osync.walk_tree, osync.scan_in_child):
        with pytest.raises(OSError) as caught:
            list(scan(str(path), osync.PathFilter([]), {}))
        error = caught.value
        raised.append((type(error), error.errno, error.strerror, error.filename, str(error)))
    assert raised[0] == raised[1]
    assert not osync.ForkedScan.running


def scan_children_recorded(path):
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def test_an_unreadable_replica_gives_the_same_sentence(tmp_path, user_base):
    """A root that os.access() finds readable but the scan cannot list: the run stops with
    the sentence it gave when the scan ran in the parent."""
    user = ensure_plain_user()
    base = user_base
    initiator, target = base / "initiator", base / "target"
    initiator.mkdir()
    target.mkdir()
    (initiator / "f").write_text("f")
    (target / "g").write_text("g")
    chown_tree(base, user)
    os.chmod(str(initiator), 0o300)   # the owner may enter and write, not list
    record = base / "children"
    env = clean_env(base / "log", {"_TEST_SCAN_CHILDREN": record, "_TEST_EUID_USER": USER})
    r = run_osync(["--initiator=%s" % initiator, "--target=%s" % target, "--non-interactive", "--no-prefix"],
                  env, tmp_path, expect=1, python=SYSTEM_PYTHON, code=RECORDING_RUN)
    assert ("Stopped: Permission denied (%s). Nothing was lost; the next run continues where this one "
            "stopped." % initiator) in r.stderr, r.output
    assert len(scan_children_recorded(record)) == 2, "both scans ran in children"
    assert sorted(os.listdir(str(target))) == [".osync_workdir", "g"]


# -- stops -----------------------------------------------------------------------------------

def large_tree(root, files=40000, per_directory=100):
    """Empty files: their scan still takes seconds, which is all these tests need."""
    root.mkdir(parents=True)
    for number in range(files):
        if number % per_directory == 0:
            directory = root / ("dir%05d" % (number // per_directory))
            directory.mkdir()
        (directory / ("file %d" % number)).touch()


# ACLs and xattrs read for every item make the scans of the large tree last long enough
SLOW_SCAN = {"PRESERVE_ACL": "yes", "PRESERVE_XATTR": "yes"}


@pytest.fixture(scope="module")
def large_replicas(tmp_path_factory):
    base = tmp_path_factory.mktemp("large")
    large_tree(base / "initiator")
    large_tree(base / "target")
    # both recorded as they are: the runs of the tests are no-change runs, changing nothing
    run_osync(["--initialize"] + large_run_arguments(base), clean_env(base / "log", SLOW_SCAN), base, expect=0)
    return base


def large_run_arguments(base):
    return ["--initiator=%s" % (base / "initiator"), "--target=%s" % (base / "target"), "--non-interactive",
            "--no-prefix", "--instance-id=large"]


def alive(pid):
    """Is pid a running process (a zombie, or nothing, is not)?"""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def listed_by_ps(pids):
    output = subprocess.run(["ps", "-eo", "pid=,stat="], stdout=subprocess.PIPE, universal_newlines=True).stdout
    running = set()
    for line in output.splitlines():
        pid, state = line.split()
        if not state.startswith("Z"):
            running.add(int(pid))
    return sorted(set(pids) & running)


def start_large_run(tmp_path, large_replicas, **env):
    record = tmp_path / "children"
    environment = clean_env(tmp_path / "log", dict(SLOW_SCAN, _TEST_SCAN_CHILDREN=record, **env))
    process = popen_osync(large_run_arguments(large_replicas), environment, tmp_path, code=RECORDING_RUN,
                          start_new_session=True)
    wait_until(lambda: len(scan_children_recorded(record)) == 2 or process.poll() is not None, 60,
               "both scans to start")
    scans = scan_children_recorded(record)
    assert len(scans) == 2 and process.poll() is None, "the run ended before its scans started"
    assert any(alive(pid) for pid in scans), "the scans ended before the test could stop them"
    return process, scans


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT to the process group"])
def test_a_stop_signal_during_the_scans_leaves_no_child(tmp_path, large_replicas, sig):
    hook_output = tmp_path / "after-hook"
    process, scans = start_large_run(
        tmp_path, large_replicas, RUN_AFTER_CMD_ON_ERROR="yes",
        LOCAL_RUN_AFTER_CMD="ps -o pid= --ppid $PPID > %s" % hook_output)
    if sig == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    else:   # as a terminal's Ctrl-C: to every process of the group, the scan children too
        os.killpg(process.pid, signal.SIGINT)
    r = finish_osync(process, logfile=tmp_path / "log")
    assert "Stopped by signal %s" % sig.split()[0] in r.output, r.output
    assert not [pid for pid in scans if alive(pid)], "scan children left running"
    assert listed_by_ps(scans) == []
    seen_by_hook = [int(word) for word in hook_output.read_text().split()]
    assert not set(seen_by_hook) & set(scans), "the after-hook ran while scans were running"


def test_the_hard_time_limit_during_the_scans_leaves_no_child(tmp_path, large_replicas):
    process, scans = start_large_run(tmp_path, large_replicas, HARD_MAX_EXEC_TIME=1)
    r = finish_osync(process, logfile=tmp_path / "log", expect=1)
    assert "Max hard execution time [1] exceeded" in r.output, r.output
    assert not [pid for pid in scans if alive(pid)], "scan children left running"
    assert listed_by_ps(scans) == []


def test_a_bug_in_the_parent_during_the_scans_leaves_no_child(tmp_path, large_replicas):
    process, scans = start_large_run(tmp_path, large_replicas, _TEST_BREAK_PLANNER=1)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "KeyError" in stderr and "Traceback" not in stdout + stderr, stderr
    assert not [pid for pid in scans if alive(pid)], "scan children left running"
    assert listed_by_ps(scans) == []


def test_a_scan_child_killed_by_someone_else_stops_the_run_with_a_sentence(tmp_path, large_replicas):
    process, scans = start_large_run(tmp_path, large_replicas)
    for pid in scans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r = finish_osync(process, logfile=tmp_path / "log", expect=1)
    assert "the process scanning this replica ended before its scan did (killed by signal 9)" in r.stderr, r.output
    assert "Nothing was lost; the next run continues where this one stopped." in r.stderr, r.output


def test_sigkill_of_the_parent_ends_the_scan_children(tmp_path, large_replicas):
    process, scans = start_large_run(tmp_path, large_replicas)
    process.kill()
    process.communicate(timeout=30)
    wait_until(lambda: not [pid for pid in scans if alive(pid)], 20, "the scan children to end")
    assert listed_by_ps(scans) == []


# -- the monitor -----------------------------------------------------------------------------

def descriptors(pid):
    return sorted(int(name) for name in os.listdir("/proc/%d/fd" % pid))


def test_a_monitor_leaks_no_descriptor_nor_child_over_its_syncs(tmp_path):
    pair = Pair(tmp_path / "p")
    (pair.initiator / "first").write_text("first")
    record = tmp_path / "children"
    env = pair.env({"MIN_WAIT": 0, "MAX_WAIT": 0, "_TEST_SCAN_CHILDREN": record})
    output = open(str(tmp_path / "monitor.out"), "wb")
    process = popen_osync(pair.quick_args() + ["--on-changes"], env, pair.cwd, code=RECORDING_RUN,
                          stdout=output, stderr=subprocess.STDOUT, universal_newlines=False)
    log = Path(env["LOGFILE"])

    def finished():
        return log.read_text(errors="replace").count("#### Monitor: sync") // 2 if log.exists() else 0

    def synced(count):
        wait_until(lambda: (finished() >= count and (pair.target / ("file%d" % (count - 1))).exists())
                   or process.poll() is not None, 30, "sync %d" % count)
        assert process.poll() is None, (tmp_path / "monitor.out").read_text(errors="replace")

    try:
        wait_until(lambda: (pair.target / "first").exists() or process.poll() is not None, 30, "the first sync")
        (pair.initiator / "file1").write_text("1")
        synced(2)
        time.sleep(0.5)
        before = descriptors(process.pid)
        for count in range(3, 9):
            (pair.initiator / ("file%d" % (count - 1))).write_text(str(count))
            synced(count)
        time.sleep(0.5)
        after = descriptors(process.pid)
        assert after == before, "descriptors before %s, after %s" % (before, after)
        scans = scan_children_recorded(record)
        assert len(scans) >= 2 * 8, "the syncs scanned in children"
        forked = [pid for pid in child_pids(process.pid) if command_line(pid) == command_line(process.pid)]
        assert not forked, "scan children left running"
        assert listed_by_ps(scans) == []
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        output.close()


def test_with_a_remote_target_the_initiators_scan_runs_in_a_child(tmp_path, request):
    """The target's agent scans on its host; the initiator's own walk goes to a child, so
    the run checks and merges what the agent sends while the initiator is walked."""
    pair = make_pair("remote", tmp_path / "pair", request)
    build(pair.initiator, {"from_initiator": "i", "dir/deep": "d"})
    build(pair.target, {"from_target": "t"})
    record = tmp_path / "children"
    env = pair.env(dict(pair.quick_env, _TEST_SCAN_CHILDREN=str(record)))
    run_osync(pair.quick_args(), env, tmp_path, expect=0, code=RECORDING_RUN)
    scans = scan_children_recorded(record)
    assert len(scans) == 1, "the initiator's scan did not run in a child: %s" % scans
    assert not any(alive(pid) for pid in scans)
    synced = expected({"from_initiator": "i", "dir/deep": "d", "from_target": "t"})
    assert snapshot(pair.initiator) == synced and snapshot(pair.target) == synced


# scan_in_child() where fork() fails (EAGAIN: a process limit reached) or does not exist:
# prints whether the walk here and the fallback gave the same entries, and the children.
FORK_REFUSED = r"""
import errno, json, os, sys
sys.path.insert(0, sys.argv[1])
import osync
root, how = sys.argv[2], sys.argv[3]
def refused():
    raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
if how == "fails":
    os.fork = refused
else:
    del os.fork
spec = osync.PathFilter([])
here = [list(entry) for entry in osync.walk_tree(root, spec, {})]
fallback = [list(entry) for entry in osync.scan_in_child(root, spec, {})]
print(json.dumps({"same": here == fallback, "count": len(here), "scans_left": len(osync.ForkedScan.running)}))
"""


@pytest.mark.parametrize("how", ["fails", "missing"])
def test_without_fork_the_scan_runs_in_the_process(tmp_path, how):
    """Where fork() fails or does not exist, the scan is the walk of the one process."""
    root = awkward_tree(tmp_path / "tree")
    result = subprocess.run([sys.executable, "-c", FORK_REFUSED, str(REPO), os.fsdecode(root), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr
    found = json.loads(result.stdout)
    assert found["same"] and found["count"] > 50 and found["scans_left"] == 0, found
