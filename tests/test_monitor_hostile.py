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

from conftest import rsync_wrapper, shell_quote
from treeutil import file_map
from test_monitor import (HOSTILE_WRAPPER, arrives, child_pids, is_remote, locks, rss_kib,
                          start_monitor_and_target_helper, wait_until, watchers_of)
from test_monitor import monitors  # noqa: F401  (the fixture that starts and kills monitors)


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
    before = file_map(pair.initiator)
    away = pair.base / "target-unmounted"
    os.rename(str(pair.target), str(away))
    try:
        (pair.initiator / "new").write_text("made while the target was away\n")
        wait_until(lambda: failed_syncs(monitor), 15, "the sync to refuse" + monitor.describe())
        time.sleep(1)
        now = file_map(pair.initiator)
        assert now == dict(before, new=b"made while the target was away\n"), "the initiator changed"
        assert not pair.target.exists(), "the sync recreated the missing target"
        assert monitor.process.poll() is None, monitor.describe()
    finally:
        os.rename(str(away), str(pair.target))
    arrives(pair.target / "new", "made while the target was away\n", timeout=20)
    assert file_map(pair.initiator) == file_map(pair.target)
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
    time.sleep(1)
    baseline = rss_kib(monitor.pid)
    time.sleep(4)
    grown = rss_kib(monitor.pid) - baseline
    assert grown < 8 * 1024, "RSS grew by %d KiB in 4 s of flooded replies%s" % (grown, monitor.describe())
    monitor.stop(within=5)


# -- resources -----------------------------------------------------------------------------------------

def descendants(pid):
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(child_pids(current))
    return found


def cpu_seconds(pids):
    """User plus system CPU time of the processes that still run."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / float(ticks)


def watcher_parents(root):
    """Parents of the inotifywait processes watching `root` (the agent for a remote target)."""
    parents = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    argv = handle.read().split(b"\0")
                with open("/proc/%s/stat" % entry) as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if argv[:1] == [b"inotifywait"] and str(root).encode() in argv:
                parents.append(parent)
    return parents


def count_entries(path):
    return len(os.listdir(path))


def test_idle_cpu_and_no_leak_over_many_syncs(pair, monitors):
    """An idle monitor (and a remote target's agent) costs almost no CPU, and eight
    change-and-sync cycles leave its file descriptors and threads where they were."""
    monitor = monitors(pair, "--on-changes", env={"MIN_WAIT": 0})
    monitor.wait_synced(1)
    watched = lambda: (descendants(monitor.pid)
                       + [pid for pid in watcher_parents(pair.target) if pid != monitor.pid])
    time.sleep(1)
    processes = watched()
    assert len(processes) >= 2, processes
    used = cpu_seconds(processes)
    time.sleep(4)
    used = cpu_seconds(processes) - used
    assert used < 0.2, "an idle monitor used %.2f s of CPU in 4 s%s" % (used, monitor.describe())

    fds = threads = None
    for cycle in range(8):
        done = len(monitor.finished())
        (pair.initiator / ("cycle%d" % (cycle % 3))).write_text("cycle %d\n" % cycle)
        monitor.wait_synced(done + 1, timeout=15)
        if cycle == 2:
            time.sleep(0.5)
            fds = count_entries("/proc/%d/fd" % monitor.pid)
            threads = count_entries("/proc/%d/task" % monitor.pid)
    time.sleep(0.5)
    assert count_entries("/proc/%d/fd" % monitor.pid) <= fds, "file descriptors leak" + monitor.describe()
    assert count_entries("/proc/%d/task" % monitor.pid) <= threads, "threads pile up" + monitor.describe()
    monitor.stop()


# -- users at work -----------------------------------------------------------------------------------

def settled(monitor, quiet=2.0, timeout=20):
    """Wait until no sync has started for `quiet` seconds and none is running."""
    deadline = time.time() + timeout
    seen, since = None, time.time()
    while time.time() < deadline:
        now = (len(monitor.started()), len(monitor.finished()))
        if now != seen:
            seen, since = now, time.time()
        elif now[0] == now[1] and time.time() - since >= quiet:
            return now[0]
        time.sleep(0.1)
    raise AssertionError("the syncs never settled" + monitor.describe())


@pytest.mark.local_only
def test_log_appended_during_syncs_arrives_whole_and_settles(pair, monitors):
    """A log appended every 0.2 s while the monitor syncs at every look (MIN_WAIT=0): once
    the writer stops, the whole log arrives, the syncs settle, and no sync failed."""
    monitor = monitors(pair, "--on-changes", env={"MIN_WAIT": 0})
    monitor.wait_synced(1)
    log = pair.initiator / "app.log"
    lines = []
    for number in range(20):
        lines.append("line %03d %s\n" % (number, "x" * 2000))
        with open(str(log), "a") as handle:
            handle.write(lines[-1])
        time.sleep(0.2)
    arrives(pair.target / "app.log", "".join(lines), timeout=15)
    syncs = settled(monitor)
    assert syncs >= 3, "the log was not synced while it grew" + monitor.describe()
    assert not failed_syncs(monitor), monitor.describe()
    time.sleep(1.5)
    assert len(monitor.started()) == syncs, "the syncs did not settle" + monitor.describe()
    monitor.stop()


def test_editor_saves_and_a_deep_new_tree_arrive(pair, monitors):
    """vim's save (the file renamed to a backup, a new one written), an atomic save (a
    temp file renamed over it) and a deep tree made at once all arrive; a file created
    later in the deepest new directory arrives too (its directory is watched)."""
    for name in ("vim.txt", "atomic.txt"):
        (pair.target / name).write_text("first\n")
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    arrives(pair.initiator / "atomic.txt", "first\n")
    here = pair.target
    os.rename(str(here / "vim.txt"), str(here / "vim.txt~"))
    (here / "vim.txt").write_text("saved by vim\n")
    os.unlink(str(here / "vim.txt~"))
    (here / ".atomic.txt.tmp").write_text("saved atomically\n")
    os.rename(str(here / ".atomic.txt.tmp"), str(here / "atomic.txt"))
    deep = here.joinpath(*["level%d" % depth for depth in range(12)])
    os.makedirs(str(deep))
    (deep / "at-once").write_text("deep\n")
    there = pair.initiator
    arrives(there / "vim.txt", "saved by vim\n")
    arrives(there / "atomic.txt", "saved atomically\n")
    arrives(there.joinpath(*deep.relative_to(here).parts) / "at-once", "deep\n")
    settled(monitor)
    (deep / "later").write_text("in a new directory\n")
    arrives(there.joinpath(*deep.relative_to(here).parts) / "later", "in a new directory\n")
    assert not (there / "vim.txt~").exists() and not (there / ".atomic.txt.tmp").exists()
    monitor.stop()


# -- signals -------------------------------------------------------------------------------------------

def agents_of(pair):
    """Pids of the osync agents watching this pair's target (a remote target): the
    parents of its inotifywait that are named osync-agent."""
    found = []
    for pid in watcher_parents(pair.target):
        try:
            with open("/proc/%d/comm" % pid) as handle:
                if handle.read().strip() == "osync-agent":
                    found.append(pid)
        except OSError:
            continue
    return found


def running(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def nothing_left(pair, agents=()):
    """No inotifywait watches a replica of the pair any more, and none of `agents` runs."""
    left = lambda: watchers_of(pair) + [pid for pid in agents if running(pid)]
    wait_until(lambda: not left(), 5, "the watchers and agents to end: %s" % left())


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)])
def test_stop_during_the_first_sync(pair, monitors, tmp_path, signals):
    """SIGTERM (or SIGHUP, SIGINT and SIGTERM at once) while the first sync's rsync runs: the
    monitor ends within seconds, exit code 0, no lock, no watcher or agent left."""
    calls = tmp_path / "rsync-calls"
    env = rsync_wrapper(tmp_path, "echo call >> %s; sleep 30" % shell_quote(calls))
    (pair.initiator / "first").write_text("x\n")
    monitor = monitors(pair, "--on-changes", env=env)
    wait_until(calls.exists, 20, "the first sync to run rsync" + monitor.describe())
    agents = agents_of(pair)
    assert not is_remote(pair) or agents, "no agent found for the target"
    for sig in signals[:-1]:
        monitor.process.send_signal(sig)
    monitor.stop(signals[-1], within=5)
    assert locks(pair) == []
    assert not (pair.target / "first").exists()
    nothing_left(pair, agents)


def test_stop_during_the_reconnect_backoff(pair, monitors):
    """The remote link cut and the target host refusing connections: SIGTERM while the
    monitor waits to try again ends it at once, exit code 0, nothing left behind."""
    if not is_remote(pair):
        pytest.skip("only a remote target has a link to cut")
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    agents = agents_of(pair)
    assert agents, "no agent found for the target"
    for pid in agents:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "trying again in" in monitor.log(), 10, "the monitor to see the link go" + monitor.describe())
    monitor.stop(within=3)
    assert locks(pair) == []
    nothing_left(pair)


# -- a burst that overflows the kernel's event queue ------------------------------------------------

def watcher_pids(root):
    """Pids of the inotifywait processes watching exactly `root`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if argv[:1] == [b"inotifywait"] and str(root).encode() in argv:
                found.append(int(entry))
    return found


@pytest.mark.local_only
def test_overflowed_event_queue_is_not_taken_for_own_writes(pair, monitors):
    """A burst of 6,500 files overflows the kernel's inotify queue (16,384 events) while
    the initiator's watcher lags behind; a sync meanwhile copies the burst, and a file is
    created while the queue is still full.  When the watcher catches up, the old events
    it delivers are the last sync's own writes, but the overflow means more changed than
    they say: the late file must arrive."""
    try:
        with open("/proc/sys/fs/inotify/max_queued_events") as handle:
            queue = int(handle.read())
    except OSError:
        pytest.skip("no inotify on this host")
    count = queue // 3 + 1000   # create, modify, close_write per file
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    lagging = watcher_pids(pair.initiator)
    assert len(lagging) == 1, lagging
    os.kill(lagging[0], signal.SIGSTOP)
    try:
        for number in range(count):
            with open(str(pair.initiator / ("burst%05d" % number)), "w") as handle:
                handle.write("b")
        (pair.target / "trigger").write_text("sync now\n")
        arrives(pair.target / ("burst%05d" % (count - 1)), "b", timeout=30)
        settled(monitor, quiet=1.0)
        (pair.initiator / "late").write_text("created while the queue was full\n")
    finally:
        os.kill(lagging[0], signal.SIGCONT)
    arrives(pair.target / "late", "created while the queue was full\n", timeout=15)
    monitor.stop()


# Appended to the agent's source: take_changes answers at once, with nothing, instead of
# waiting for a change.
HASTY_CHANGES = '''
def _hasty_take_changes(self, wait_seconds):
    return [[], False]
LocalReplica.take_changes = _hasty_take_changes
'''


def test_agent_answering_at_once_does_not_spin_the_monitor(pair, monitors):
    """A target agent that answers every take_changes at once, without waiting for a
    change: the monitor still looks only every half second, so it stays almost idle."""
    if not is_remote(pair):
        pytest.skip("the hasty agent needs a remote target")
    python = pair.base / "hasty-python"
    python.write_text(HOSTILE_WRAPPER.format(python=pair.python, patch=HASTY_CHANGES))
    python.chmod(0o755)
    monitor = monitors(pair, "--on-changes", env={"REMOTE_PYTHON": str(python)})
    monitor.wait_synced(1)
    time.sleep(0.5)
    processes = descendants(monitor.pid)
    used = cpu_seconds(processes)
    time.sleep(4)
    used = cpu_seconds(processes) - used
    assert used < 0.4, "the monitor used %.2f s of CPU in 4 s against a hasty agent%s" % (used, monitor.describe())
    (pair.initiator / "still-works").write_text("x\n")
    arrives(pair.target / "still-works", "x\n")
    monitor.stop()


# -- a replica directory swapped --------------------------------------------------------------------

def test_replica_directory_swapped_for_a_copy_is_still_watched(pair, monitors):
    """The admin swaps the target directory for a copy of it (mv target target.old; mv
    target.new target, as a restore or a deployment does): the monitor watches the
    directory at the target's path, not the one moved away, so later edits there arrive."""
    (pair.target / "doc").write_text("first\n")
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    arrives(pair.initiator / "doc", "first\n")
    settled(monitor, quiet=1.0)
    copy = pair.base / "target.new"
    subprocess.check_call(["cp", "-a", str(pair.target), str(copy)])
    os.rename(str(pair.target), str(pair.base / "target.old"))
    os.rename(str(copy), str(pair.target))
    settled(monitor, quiet=1.5)
    (pair.target / "doc").write_text("edited in the new directory\n")
    arrives(pair.initiator / "doc", "edited in the new directory\n", timeout=15)
    (pair.base / "target.old" / "doc").write_text("edited in the old one\n")
    time.sleep(2)
    assert (pair.initiator / "doc").read_text() == "edited in the new directory\n"
    monitor.stop()


# -- the target helper ------------------------------------------------------------------------------

@pytest.mark.local_only
def test_target_helper_and_monitor_do_not_ping_pong(pair, monitors):
    """The target helper beside the initiator's monitor: a change on the initiator is
    copied to the target, which the helper reports back, and the syncs then settle
    instead of feeding each other (osync's issue #155)."""
    monitor, helper, push = start_monitor_and_target_helper(pair, monitors)
    wait_until(push.exists, 15, "the helper's first line" + helper.describe())
    before = settled(monitor, quiet=2.5, timeout=30)
    for number in range(3):
        (pair.initiator / ("edit%d" % number)).write_text("edit %d\n" % number)
    arrives(pair.target / "edit2", "edit 2\n")
    after = settled(monitor, quiet=3.5, timeout=30)
    assert after - before <= 3, "the helper and the monitor fed each other" + monitor.describe()
    helper.stop()
    monitor.stop()


def test_frozen_agent_is_hung_up_on(pair, monitors):
    """The target's agent stops answering (its host frozen, a hung mount there) while the
    connection stays up: the monitor gives up on it within seconds, says so, connects
    again, and a change made meanwhile on the initiator arrives."""
    if not is_remote(pair):
        pytest.skip("only a remote target has an agent")
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    frozen = agents_of(pair)
    assert len(frozen) == 1, frozen
    os.kill(frozen[0], signal.SIGSTOP)
    try:
        (pair.initiator / "meanwhile").write_text("made while the agent was frozen\n")
        wait_until(lambda: "did not answer" in monitor.log(), 25, "the monitor to give up on the agent"
                   + monitor.describe())
        arrives(pair.target / "meanwhile", "made while the agent was frozen\n", timeout=20)
    finally:
        os.kill(frozen[0], signal.SIGCONT)
    monitor.stop()
    assert locks(pair) == []
