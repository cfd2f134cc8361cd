"""Monitor mode under a careless admin and a hostile target: a lock held by a manual run,
a replica moved away, a target agent that floods its change replies, and the monitor's
own use of CPU, file descriptors and threads over many syncs.

The monitor is started, waited for and stopped as in test_monitor.py (whose helpers and
`monitors` fixture are used here); every wait has a deadline."""

import os
import signal
import subprocess
import sys
import time

import pytest

from test_monitor import (HOSTILE_WRAPPER, Background, arrives, child_pids, is_remote, locks,  # noqa: F401
                          monitors, rss_kib, wait_until)


def files_of(root):
    """relative path -> content of every file of a replica outside its work dir."""
    found = {}
    for directory, subdirs, names in os.walk(str(root)):
        subdirs[:] = [name for name in subdirs if name != ".osync_workdir"]
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, str(root))] = handle.read()
    return found


def failed_syncs(monitor):
    return [number for number, result in monitor.finished() if result == "failed"]


# -- a sync that is refused is tried again ---------------------------------------------------------

def test_sync_refused_on_a_held_lock_is_tried_again(pair, monitors):
    """A manual run holds the initiator's lock when a change comes: the monitor's sync is
    refused and logged, tried again later (not in a busy loop), and once the lock is gone
    the change arrives without any further edit."""
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "osync-manual-run"])
    try:
        lock = pair.lock("initiator")
        lock.write_text("%d@conftask\n" % holder.pid)
        (pair.initiator / "while-locked").write_text("wait for the lock\n")
        wait_until(lambda: failed_syncs(monitor), 15, "the sync to be refused on the lock" + monitor.describe())
        assert "already a running instance" in monitor.log(), monitor.describe()
        assert not (pair.target / "while-locked").exists()
        time.sleep(3)
        assert len(monitor.started()) <= 5, "a busy loop of refused syncs" + monitor.describe()
        assert monitor.process.poll() is None, monitor.describe()
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()   # the manual run ends and lets go of its lock
    arrives(pair.target / "while-locked", "wait for the lock\n", timeout=20)
    monitor.stop()
    assert locks(pair) == []


def test_target_moved_away_deletes_nothing_and_sync_resumes(pair, monitors):
    """The target directory is moved away (an unmounted disk) while the monitor runs and
    the initiator changes: the sync refuses, nothing is deleted on the initiator, the
    monitor goes on, and once the directory is back the change arrives by itself."""
    for number in range(5):
        (pair.initiator / ("kept%d" % number)).write_text("kept %d\n" % number)
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    arrives(pair.target / "kept4", "kept 4\n")
    before = files_of(pair.initiator)
    away = pair.base / "target-unmounted"
    os.rename(str(pair.target), str(away))
    try:
        (pair.initiator / "new").write_text("made while the target was away\n")
        wait_until(lambda: failed_syncs(monitor), 15, "the sync to refuse" + monitor.describe())
        time.sleep(1)
        now = files_of(pair.initiator)
        assert now == dict(before, new=b"made while the target was away\n"), "the initiator changed"
        assert not pair.target.exists(), "the sync recreated the missing target"
        assert monitor.process.poll() is None, monitor.describe()
    finally:
        os.rename(str(away), str(pair.target))
    arrives(pair.target / "new", "made while the target was away\n", timeout=20)
    assert files_of(pair.initiator) == files_of(pair.target)
    monitor.stop()
    assert locks(pair) == []


# -- a hostile target agent -------------------------------------------------------------------------

# Appended to the agent's source: every answer to take_changes names 10,000 new paths (valid
# ones, within the per-reply limit), as fast as the initiator asks.
FLOODING_CHANGES = '''
_flood_counter = [0]
def _flooding_take_changes(self, wait_seconds):
    start = _flood_counter[0]
    _flood_counter[0] += WATCH_PATHS_LIMIT
    return [["flood/%012d" % number for number in range(start, start + WATCH_PATHS_LIMIT)], False]
LocalReplica.take_changes = _flooding_take_changes
'''


def test_agent_flooding_changes_does_not_grow_the_monitor(pair, monitors):
    """A target agent that answers every take_changes with 10,000 new paths: the monitor
    keeps no more than it would for its own watcher (past the limit, "something changed"),
    so its memory stays flat while the flood goes on."""
    if not is_remote(pair):
        pytest.skip("the flooding agent needs a remote target")
    python = pair.base / "flooding-python"
    python.write_text(HOSTILE_WRAPPER.format(python=pair.python, patch=FLOODING_CHANGES))
    python.chmod(0o755)
    monitor = monitors(pair, "--on-changes", env={"REMOTE_PYTHON": str(python), "MIN_WAIT": 60})
    monitor.wait_synced(1)
    time.sleep(1.5)
    baseline = rss_kib(monitor.pid)
    time.sleep(5)
    grown = rss_kib(monitor.pid) - baseline
    assert grown < 8 * 1024, "RSS grew by %d KiB in 5 s of flooded replies%s" % (grown, monitor.describe())
    monitor.stop(within=5)
