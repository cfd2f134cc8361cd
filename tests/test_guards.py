"""Guards that guard: an older disk swapped in, osync.sh's lists read once, the same
directory reached another way, the mass-deletion breaker and a remote clock that is off.
Each test follows the advice the guard prints, literally, and checks nothing was deleted."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WORKDIR, build, describe, expected, files_only, need, put, remove, snapshot


def files(entries):
    return {name: name for name in entries}


def advised_paths(output):
    """The files a guard's message tells the user to delete, as local paths (the remote
    target of the tests is this very host, so host: prefixes are dropped)."""
    match = re.search(r"delete (.+?) \(the next run then merges", output)
    assert match, "the guard gives no advice:\n" + output
    paths = []
    for name in match.group(1).split(" and "):
        if not name.startswith("/"):
            name = name.split(":", 1)[1]
        paths.append(Path(name))
    return paths


def follow_advice(output):
    for path in advised_paths(output):
        if path.exists():
            path.unlink()


def copy_tree(source, destination):
    if os.path.lexists(str(destination)):
        shutil.rmtree(str(destination))
    shutil.copytree(str(source), str(destination), symlinks=True)


# --------------------------------------------------------------------------------------
# An older disk at the target's mount point
# --------------------------------------------------------------------------------------

SABOTAGE = """#!/bin/sh
# rsync, then (on the initiator's side only) make a state dir unwritable by putting a file
# in its place: the run stops after its transfers, before its state (the initiator's
# state dir) or between its state and the target's marker (the target's state dir).
for arg in "$@"; do [ "$arg" = "--server" ] && exec rsync "$@"; done
rsync "$@"
code=$?
if [ -d "{state}" ]; then mv "{state}" "{state}.away" && touch "{state}"; fi
exit $code
"""


def test_an_older_target_disk_is_refused_and_a_halfway_run_is_not(pair):
    build(pair.initiator, files(["a", "b"]))
    pair.run(expect=0)
    old_disk = pair.base / "old-disk"
    copy_tree(pair.target, old_disk)          # the disk that will be swapped back in later

    # Runs that stop halfway, after writing the state but before the target's marker, then
    # before writing the state, must not lock the user out.
    for name, stopped_side in (("c", "target"), ("c2", "initiator")):
        state_dir = pair.root(stopped_side) / WORKDIR / "state"
        wrapper = pair.base / ("rsync-sabotage-" + stopped_side)
        wrapper.write_text(SABOTAGE.replace("{state}", str(state_dir)))
        wrapper.chmod(0o755)
        put(pair.initiator, name, name)
        failed = pair.run(env={"RSYNC_EXECUTABLE": str(wrapper)})
        assert failed.returncode == 1, describe(failed)
        os.unlink(str(state_dir))
        os.rename(str(state_dir) + ".away", str(state_dir))
    resumed = pair.run(expect=(0, 2))         # 2: the warning that the last 2 runs did not finish
    assert "older sync" not in resumed.output and "marker" not in resumed.output, describe(resumed)
    assert snapshot(pair.target) == expected(files(["a", "b", "c", "c2"]))

    put(pair.initiator, "d", "d")
    pair.run(expect=0)
    put(pair.initiator, "e", "e")
    copy_tree(old_disk, pair.target)          # the older disk is back at the mount point
    before = [snapshot(pair.initiator, mtimes=True, exclude_workdir=False),
              snapshot(pair.target, mtimes=True, exclude_workdir=False)]
    refused = pair.run(expect=1)
    assert "older sync" in refused.output, describe(refused)
    assert [snapshot(pair.initiator, mtimes=True, exclude_workdir=False),
            snapshot(pair.target, mtimes=True, exclude_workdir=False)] == before, \
        "the guard let the run change a replica" + describe(refused)

    follow_advice(refused.output)
    pair.run(expect=0)
    every = expected(files(["a", "b", "c", "c2", "d", "e"]))
    assert snapshot(pair.initiator) == every, "following the advice deleted something"
    assert snapshot(pair.target) == every


def test_a_target_work_dir_without_its_marker_is_refused(pair):
    build(pair.initiator, files(["a", "b"]))
    pair.run(expect=0)
    old_disk = pair.base / "old-disk"
    copy_tree(pair.target, old_disk)
    put(pair.initiator, "c", "c")
    pair.run(expect=0)
    copy_tree(old_disk, pair.target)
    for marker in (pair.target / WORKDIR / "state").glob("osync.py-marker-*"):
        marker.unlink()                        # half-following the advice: only the marker
    before = snapshot(pair.initiator, mtimes=True)
    refused = pair.run(expect=1)
    assert snapshot(pair.initiator, mtimes=True) == before, describe(refused)
    follow_advice(refused.output)
    pair.run(expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected(files(["a", "b", "c"]))


# --------------------------------------------------------------------------------------
# osync.sh's lists are read once
# --------------------------------------------------------------------------------------

def osync_sh_replicas(pair, names):
    """Both replicas as osync.sh leaves them: the same files, a work dir on each, and its
    tree-after lists in the initiator's state dir."""
    for root in pair.roots:
        build(root, files(names), mtime=1000000000)
        (root / WORKDIR / "state").mkdir(parents=True, exist_ok=True)
    state_dir = pair.initiator / WORKDIR / "state"
    for side in ("initiator", "target"):
        (state_dir / ("%s-tree-after-quicksync_task" % side)).write_text("".join(n + "\n" for n in names))
    return state_dir


def unmount(root):
    """An empty mount point where the disk was."""
    shutil.rmtree(str(root))
    root.mkdir()


def test_osync_sh_lists_are_retired_after_the_first_state(pair):
    names = ["a", "b", "c"]
    state_dir = osync_sh_replicas(pair, names)
    pair.run(expect=0)
    assert not list(state_dir.glob("*-tree-after-quicksync_task"))
    assert sorted(p.name for p in state_dir.glob("*-tree-after-*.retired-by-osync.py")) == [
        "initiator-tree-after-quicksync_task.retired-by-osync.py",
        "target-tree-after-quicksync_task.retired-by-osync.py"]

    unmount(pair.target)                       # a fresh disk, meant to start over
    refused = pair.run(expect=1)
    assert "unmounted" in refused.output
    follow_advice(refused.output)
    pair.run(expect=0)
    assert snapshot(pair.initiator) == expected(files(names)), "following the advice deleted something"
    assert snapshot(pair.target) == expected(files(names))


def test_first_run_after_osync_sh_with_the_target_unmounted(pair):
    names = ["a", "b", "c"]
    osync_sh_replicas(pair, names)
    unmount(pair.target)
    before = snapshot(pair.initiator, mtimes=True, exclude_workdir=False)
    refused = pair.run(expect=1)
    assert "unmounted" in refused.output, describe(refused)
    assert snapshot(pair.initiator, mtimes=True, exclude_workdir=False) == before
    assert os.listdir(str(pair.target)) == []
    follow_advice(refused.output)
    pair.run(expect=0)
    assert snapshot(pair.initiator) == snapshot(pair.target) == expected(files(names))


# --------------------------------------------------------------------------------------
# The same directory, reached through a bind mount
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "nested"])
def test_a_bind_mount_of_the_initiator_is_refused(pair, where):
    build(pair.initiator, files(["a"]))
    (pair.initiator / "sub").mkdir()
    mount_point = pair.base / "bind"
    mount_point.mkdir()
    if subprocess.call(["mount", "--bind", str(pair.initiator), str(mount_point)]) != 0:
        need("mount --bind is not allowed here")
    try:
        target = mount_point if where == "same" else mount_point / "sub"
        before = snapshot(pair.initiator, exclude_workdir=False)
        r = pair.run(target_spec=pair.spec_for(target), expect=1)
        assert ("same directory" if where == "same" else "inside") in r.output, describe(r)
        assert snapshot(pair.initiator, exclude_workdir=False) == before
    finally:
        subprocess.call(["umount", str(mount_point)])


# --------------------------------------------------------------------------------------
# The mass-deletion breaker
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["initiator", "target"])
def test_mass_deletion_breaker(pair, side):
    names = ["f%02d" % number for number in range(40)]
    build(pair.initiator, files(names))
    pair.run(expect=0)                         # a first run never trips

    for name in names[:24]:                    # 60% deleted on both sides: forgotten, no trip
        remove(pair.initiator, name)
        remove(pair.target, name)
    pair.run(expect=0)
    names = names[24:]

    for name in names[:11]:                    # 11 of 16 on one side: the breaker trips
        remove(pair.root(side), name)
    before = pair.full_snapshot()
    tripped = pair.run(expect=1)
    assert "11 of the 16 items on the %s replica" % pair.other(side) in tripped.output, describe(tripped)
    assert "--allow-mass-deletion" in tripped.output
    assert pair.full_snapshot() == before, "the breaker let the run change something" + describe(tripped)

    off = pair.run("--dry", env={"MAX_DELETION_SHARE": "0"}, expect=0)   # 0 turns it off
    assert "MAX_DELETION_SHARE" not in off.output
    pair.run("--allow-mass-deletion", expect=0)
    assert snapshot(pair.root(pair.other(side))) == expected(files(names[11:]))
    assert len(files_only(snapshot(pair.deleted(pair.other(side))))) == 11

    for name in names[11:]:                    # a small replica can always be emptied
        remove(pair.root(side), name)
    pair.run(expect=0)
    assert snapshot(pair.root(pair.other(side))) == {}


# --------------------------------------------------------------------------------------
# The remote clock
# --------------------------------------------------------------------------------------

FAKE_CLOCK = """#!/bin/sh
# A Python whose clock is an hour ahead: it runs the agent bootstrap ($2) after moving
# time.time() forward.
exec "{python}" -c "import time as _clock; _real = _clock.time; _clock.time = lambda: _real() + 3600
$2" "$3"
"""


def test_a_remote_clock_an_hour_ahead_is_warned_about(pair):
    if pair.kind not in ("remote", "remote-newest"):
        pytest.skip("both replicas of a local pair share one clock")
    build(pair.initiator, files(["a"]))
    wrapper = pair.base / "python-ahead"
    wrapper.write_text(FAKE_CLOCK.replace("{python}", pair.python))
    wrapper.chmod(0o755)
    r = pair.run(env={"REMOTE_PYTHON": str(wrapper)}, expect=2)
    warnings = [line for line in r.output.splitlines() if "clock" in line]
    assert len(warnings) == 1, describe(r)
    assert "3600 seconds ahead" in warnings[0] and warnings[0].count(":") >= 4, warnings[0]
    assert snapshot(pair.target) == expected(files(["a"]))
    plain = pair.run(expect=0)
    assert "clock" not in plain.output


@pytest.mark.parametrize("marker", ["[]", '"text"', '{"target_entries": "many", "replicas": 3}', "{not json"])
def test_a_damaged_marker_is_a_sentence_and_changes_nothing(pair, marker):
    put(pair.initiator, "keep", b"data\n")
    pair.run(expect=0)
    for path in (pair.workdir("target") / "state").glob("osync.py-marker-*"):
        path.write_text(marker)
    before = pair.full_snapshot()
    r = pair.run(expect=(0, 1, 2))
    if r.returncode == 1:
        assert pair.full_snapshot() == before
    assert (pair.initiator / "keep").read_bytes() == b"data\n"
    assert (pair.target / "keep").read_bytes() == b"data\n"
