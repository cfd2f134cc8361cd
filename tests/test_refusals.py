"""Every guard refuses in one shape: one line "<reason>, so nothing was changed. <way out>."
that names the replica, path or host, exit code 1, both replicas and their work dirs
(state included) exactly as they were, and a way out that works when it is followed as
written.  The guards' own behaviour is tested in test_guards.py and beside their options;
this file checks what they have in common, guard by guard."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import WORKDIR, build, describe, expected, osync, remove, snapshot, snapshot_workdir
from test_guards import follow_advice

QUICK_INSTANCE = "quicksync_task"
REFUSAL_SHAPE = re.compile(r", so nothing was changed\. [A-Z(].*\.$")


def files(names):
    return {name: name for name in names}


def synced(pair, names=("a", "b")):
    build(pair.initiator, files(names))
    pair.run(expect=0)


def both_replicas(pair):
    """What the refusal must leave as it was: each replica's tree (contents and mtimes) and
    the contents of its work dir (state, backup, deleted, lock), or what stands in the
    replica's place."""
    seen = {}
    for side in ("initiator", "target"):
        root = pair.root(side)
        if root.is_dir() and not root.is_symlink():
            seen[side] = (snapshot(root, mtimes=True), snapshot_workdir(root))
        elif os.path.lexists(str(root)):
            seen[side] = ("not a directory", root.read_bytes())
        else:
            seen[side] = None
    return seen


def write_lock(pair, side, content):
    lock = pair.lock(side)
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(content)


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# -- how each guard is provoked (returns the words its line must hold and the extra run
# -- arguments) and how its way out is followed (None: the way out is not a command) --------

def missing_root(side):
    def provoke(pair, held):
        build(pair.root(pair.other(side)), files(["kept"]))
        shutil.rmtree(str(pair.root(side)))
        return {"names": [str(pair.root(side))]}

    def follow(pair, held, context):
        pair.root(side).mkdir()                       # "Create it"
        pair.run(expect=0)
        assert snapshot(pair.root(side)) == expected(files(["kept"]))
    return provoke, follow


def root_is_a_file(pair, held):
    shutil.rmtree(str(pair.target))
    pair.target.write_text("not a directory")
    return {"names": [str(pair.target)]}


def lost_work_dir(pair, held):
    synced(pair)
    for name in os.listdir(str(pair.target)):        # an empty mount point where the disk was
        remove(pair.target, name)
    return {"names": [str(pair.target), WORKDIR], "files": ["a", "b"]}


def follow_the_deletion_advice(pair, held, context):
    follow_advice(context["output"])
    pair.run(expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected(files(context["files"]))


def older_disk(pair, held):
    synced(pair)
    old_disk = pair.base / "old-disk"
    shutil.copytree(str(pair.target), str(old_disk), symlinks=True)
    build(pair.initiator, files(["c"]))
    pair.run(expect=0)
    shutil.rmtree(str(pair.target))
    shutil.copytree(str(old_disk), str(pair.target), symlinks=True)
    return {"names": [str(pair.target), "older sync"], "files": ["a", "b", "c"]}


def disk_without_marker(pair, held):
    synced(pair)
    for marker in (pair.workdir("target") / "state").glob("osync.py-marker-*"):
        marker.unlink()
    return {"names": [str(pair.target), "no marker"], "files": ["a", "b"]}


def live_lock(program):
    def provoke(pair, held):
        synced(pair)
        holder = subprocess.Popen(["bash", "-c", "exec -a %s sleep 300" % program])
        held.append(holder)
        write_lock(pair, "target", "%d@%s" % (holder.pid, QUICK_INSTANCE))
        return {"names": [str(pair.target), str(holder.pid)], "holder": holder}
    return provoke


def let_it_finish(pair, held, context):
    context["holder"].kill()                          # the other run ends, leaving its lock
    context["holder"].wait()
    pair.run(expect=0)


def force_unlock(pair, held, context):
    pair.run("--force-unlock", expect=0)
    assert context["holder"] is None or context["holder"].poll() is None, "--force-unlock stopped the holder"


def damaged_lock(pair, held):
    synced(pair)
    write_lock(pair, "target", "not a lock")
    return {"names": [str(pair.target), "not a lock"], "holder": None}


def stranger_lock(pair, held):
    if pair.kind == "local":
        pytest.skip("a dead lock of another instance is taken over on a local replica")
    synced(pair)
    write_lock(pair, "target", "%d@another_instance" % dead_pid())
    return {"names": [str(pair.target), "another_instance"]}


def allow_stranger_lock(pair, held, context):
    pair.run(env={"FORCE_STRANGER_LOCK_RESUME": "yes"}, expect=0)


def same_directory(pair, held):
    build(pair.initiator, files(["a"]))
    return {"names": [str(pair.initiator)], "args": {"target_spec": pair.spec_for(pair.initiator)}}


def nested_directory(pair, held):
    build(pair.initiator, files(["a", "sub/b"]))
    inner = pair.initiator / "sub"
    return {"names": [str(pair.initiator), str(inner)], "args": {"target_spec": pair.spec_for(inner)}}


def mass_deletion(pair, held):
    names = ["f%02d" % number for number in range(16)]
    synced(pair, names)
    for name in names[:11]:
        remove(pair.initiator, name)
    return {"names": [str(pair.target), "MAX_DELETION_SHARE"], "files": names[11:]}


def allow_mass_deletion(pair, held, context):
    pair.run("--allow-mass-deletion", expect=0)
    assert snapshot(pair.target) == expected(files(context["files"]))


MISSING_RSYNC = "/nonexistent/bin/rsync"


def missing_rsync(pair, held):
    build(pair.initiator, files(["a"]))
    # the way out names the command that installs rsync on this host ("apt install rsync")
    return {"names": [MISSING_RSYNC, osync.install_hint("rsync")], "env": {"RSYNC_EXECUTABLE": MISSING_RSYNC}}


def set_rsync_path(pair, held, context):
    pair.run(env={"RSYNC_EXECUTABLE": shutil.which("rsync")}, expect=0)   # "set RSYNC_EXECUTABLE to the path"
    assert snapshot(pair.target) == expected(files(["a"]))


GUARDS = [
    ("missing-initiator",) + missing_root("initiator"),
    ("missing-target",) + missing_root("target"),
    ("target-not-a-directory", root_is_a_file, None),
    ("missing-work-dir", lost_work_dir, follow_the_deletion_advice),
    ("older-disk", older_disk, follow_the_deletion_advice),
    ("unknown-disk", disk_without_marker, follow_the_deletion_advice),
    ("locked", live_lock("osync.py"), let_it_finish),
    ("foreign-lock", live_lock("sleep"), force_unlock),
    ("damaged-lock", damaged_lock, force_unlock),
    ("stranger-lock", stranger_lock, allow_stranger_lock),
    ("same-replica", same_directory, None),
    ("nested-replicas", nested_directory, None),
    ("mass-deletion", mass_deletion, allow_mass_deletion),
    ("missing-rsync", missing_rsync, set_rsync_path),
]


@pytest.fixture
def held():
    """Processes a test starts to hold a lock; stopped at the end whatever happened."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def log_size(pair):
    return pair.logfile.stat().st_size if pair.logfile.exists() else 0


def refusal_lines(text):
    return [line for line in text.splitlines() if "nothing was changed" in line]


@pytest.mark.parametrize("guard, provoke, follow", GUARDS, ids=[guard[0] for guard in GUARDS])
def test_every_guard_refuses_in_one_shape_and_changes_nothing(pair, held, guard, provoke, follow):
    context = provoke(pair, held)
    before = both_replicas(pair)
    log_start = log_size(pair)
    refused = pair.run(env=context.get("env"), expect=1, **context.get("args", {}))
    with open(str(pair.logfile), "rb") as log:
        log.seek(log_start)
        logged = log.read().decode("utf-8", "replace")

    for where, text in (("the output", refused.output), ("the log", logged)):
        lines = refusal_lines(text)
        assert len(lines) == 1, "%s holds %d refusal lines, not one%s" % (where, len(lines), describe(refused))
        line = lines[0]
        assert line.count("nothing was changed") == 1, line
        assert REFUSAL_SHAPE.search(line), "not '<reason>, so nothing was changed. <way out>.': " + line
        for name in context["names"]:
            assert name in line, (name, line)
    assert both_replicas(pair) == before, "the %s guard let the run change something%s" % (guard, describe(refused))

    if follow is not None:
        context["output"] = refused.output
        follow(pair, held, context)
