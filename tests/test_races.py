"""The user wins races (DESIGN §4.2, §4.11): an editor saving on the destination while the
run transfers, a source appended to during its own transfer, a file rewritten in the same
second as the last sync, osync.py killed with -9 while rsync runs, a mount point inside a
replica that fills up.  Local and over ssh (the ``pair`` fixture runs both)."""
import os
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (T0, chattr_supported, copy_of_children_list, dir_files, need, plant_dead_run, put,
                      rsync_wrapper, shell_quote)
from treeutil import process_start_time

CONTENT_EDIT = b"the initiator's edit\n"
CONTENT_SAVE = b"saved by the user's editor while the run transferred\n"


def test_editor_save_during_the_transfer_is_never_lost(pair, tmp_path):
    put(pair.initiator, "doc.txt", b"first version\n")
    pair.run(expect=0)
    put(pair.initiator, "doc.txt", CONTENT_EDIT, mtime=T0 + 100)
    doc = pair.target / "doc.txt"
    saved = tmp_path / "saved"
    saved.write_bytes(CONTENT_SAVE)
    done = tmp_path / "saved.done"
    # An editor's save: write a temp file, rename it over the document (new inode).
    env = rsync_wrapper(tmp_path, "[ -e {done} ] || {{ cp {saved} {doc}.swp && mv {doc}.swp {doc} && touch {done}; }}".format(
        done=shell_quote(done), saved=shell_quote(saved), doc=shell_quote(doc)))
    r = pair.run(env=env, expect=0)
    assert doc.read_bytes() == CONTENT_SAVE, "the editor's save was overwritten" + r.output
    assert "was saved on the target while the run transferred it" in r.output
    done.unlink()
    # The next run sees both sides changed: the save is newer and wins, the initiator's edit is kept.
    r = pair.run(expect=0)
    assert doc.read_bytes() == CONTENT_SAVE
    assert (pair.initiator / "doc.txt").read_bytes() == CONTENT_SAVE
    kept = [p for p in pair.backup("initiator").rglob("*") if p.is_file() and p.read_bytes() == CONTENT_EDIT]
    assert kept, "the initiator's edit is not kept in its backup dir" + r.output
    pair.assert_converged()


def test_overwritten_versions_are_kept_by_the_transfer_itself(pair):
    """The backup of an overwritten file is the very version rsync replaced."""
    put(pair.initiator, "f", b"one\n")
    pair.run(expect=0)
    put(pair.initiator, "f", b"two\n", mtime=T0 + 10)
    pair.run("--summary", expect=0)
    assert (pair.target / "f").read_bytes() == b"two\n"
    assert (pair.backup("target") / "f").read_bytes() == b"one\n"
    assert not [p for p in pair.backup("target").iterdir() if p.name.startswith(".transfer-")]
    pair.assert_converged()


def test_source_appended_during_its_transfer_is_a_retry_not_a_conflict(pair, tmp_path):
    put(pair.initiator, "app.log", b"line 1\n")
    pair.run(expect=0)
    put(pair.initiator, "app.log", b"line 1\nline 2\n", mtime=T0 + 10)
    log = pair.initiator / "app.log"
    env = rsync_wrapper(tmp_path, "[ -e %s.done ] || { echo 'line 3' >> %s; touch %s.done; }" % (
        shell_quote(tmp_path / "append"), shell_quote(log), shell_quote(tmp_path / "append")))
    r = pair.run(env=env, expect=0)
    assert "changed on the initiator during its transfer" in r.output
    assert "Could not copy" not in r.output
    r = pair.run(expect=0)
    assert "Conflict" not in r.output, "a false conflict" + r.output
    assert (pair.target / "app.log").read_bytes() == b"line 1\nline 2\nline 3\n"
    assert log.read_bytes() == b"line 1\nline 2\nline 3\n"
    assert not dir_files(pair.backup("initiator")), "the initiator's own log was taken for a conflict loser"
    pair.assert_converged()


@pytest.mark.parametrize("afterwards", ["deleted", "kept"])
def test_new_file_saved_during_its_transfer_then_deleted_or_kept_converges(pair, tmp_path, afterwards):
    """A new file on the target, saved again by an editor while the run copies it, then
    deleted by the user (or left alone) before the next run: the next run carries the
    deletion over (soft, the copy kept in deleted/) or sends the save, and the replicas
    end alike.  The state used to record the copy alone, so after the deletion both runs
    saw nothing to do and the initiator kept the file for good."""
    doc = pair.target / "new.txt"
    put(pair.target, "new.txt", b"first save\n")
    saved = tmp_path / "saved"
    saved.write_bytes(b"second save, longer\n")
    done = tmp_path / "saved.done"
    env = rsync_wrapper(tmp_path, "[ -e {done} ] || {{ cp {saved} {doc}.swp && mv {doc}.swp {doc} && touch {done}; }}".format(
        done=shell_quote(done), saved=shell_quote(saved), doc=shell_quote(doc)))
    r = pair.run(env=env, expect=0)
    assert "changed on the target during its transfer" in r.output, r.output
    if afterwards == "deleted":
        doc.unlink()
    pair.run(expect=0)
    if afterwards == "deleted":
        assert not (pair.initiator / "new.txt").exists(), "the target's deletion was not carried over"
        assert (pair.deleted("initiator") / "new.txt").read_bytes() == b"second save, longer\n"
    else:
        assert (pair.initiator / "new.txt").read_bytes() == b"second save, longer\n"
    pair.run(expect=0)
    pair.assert_converged()


def test_same_size_rewrite_in_the_same_second_syncs(pair):
    put(pair.initiator, "f", b"aaaa\n")
    pair.run(expect=0)
    target_file = pair.target / "f"
    before = os.stat(str(target_file)).st_mtime_ns
    path = pair.initiator / "f"
    path.write_bytes(b"bbbb\n")
    # same size, same second, other nanoseconds: osync.py sees a change, rsync's quick check does not
    os.utime(str(path), ns=(before, before - before % 10 ** 9 + (before % 10 ** 9 + 1) % 10 ** 9))
    r = pair.run("--summary", env={"CONFLICT_BACKUP_MULTIPLE": "yes"}, expect=0)
    assert target_file.read_bytes() == b"bbbb\n", r.output
    assert len(dir_files(pair.backup("target"))) == 1
    pair.assert_converged(env={"CONFLICT_BACKUP_MULTIPLE": "yes"})


def test_a_failed_copy_leaves_no_backup_behind(pair, tmp_path):
    if not chattr_supported(tmp_path):
        need("chattr +i is not supported here")
    put(pair.initiator, "f", b"one\n")
    pair.run(expect=0)
    put(pair.initiator, "f", b"two\n", mtime=T0 + 10)
    stuck = pair.target / "f"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        for _ in range(2):
            r = pair.run(env={"CONFLICT_BACKUP_MULTIPLE": "yes", "RESUME_TRY": "5"}, expect=1)
            assert "Could not copy f" in r.output or "Cannot" in r.output, r.output
            assert stuck.read_bytes() == b"one\n"
            assert dir_files(pair.backup("target")) == [], "a failed copy left a backup" + r.output
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    pair.run(env={"CONFLICT_BACKUP_MULTIPLE": "yes", "RESUME_TRY": "5"}, expect=0)
    assert stuck.read_bytes() == b"two\n"
    assert len(dir_files(pair.backup("target"))) == 1


def descendants(pid):
    """Every process started by pid, directly or not."""
    found = []
    todo = [pid]
    while todo:
        r = subprocess.run(["pgrep", "-P", str(todo.pop())], stdout=subprocess.PIPE, universal_newlines=True)
        children = [int(child) for child in r.stdout.split()]
        found += children
        todo += children
    return found


def alive(pids):
    """The pids of `pids` still running (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                if handle.read().rpartition(")")[2].split()[0] != "Z":
                    running.append(pid)
        except OSError:
            pass
    return running


def kill_osync_while_rsync_runs(pair, env):
    """Start a slow run, kill -9 it once rsync is going; returns the pids it had started."""
    process = pair.popen(env=env)
    deadline = time.time() + 60
    while True:
        started = descendants(process.pid)
        commands = []
        for pid in started:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as handle:
                    commands.append(handle.read())
            except OSError:
                pass
        if any(b"osync-files-" in command and b"rsync" in command for command in commands):
            break
        assert time.time() < deadline and process.poll() is None, "rsync never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    return started


def test_children_die_with_osync_killed_by_sigkill(pair):
    for number in range(3):
        put(pair.initiator, "big%d" % number, os.urandom(400000))
    put(pair.target, "edited-later", b"old\n")
    put(pair.initiator, "edited-later", b"from the initiator\n", mtime=T0 + 50)
    started = kill_osync_while_rsync_runs(pair, {"BANDWIDTH": "100"})
    deadline = time.time() + 10
    while alive(started):
        assert time.time() < deadline, "rsync or ssh still run after osync.py was killed"
        time.sleep(0.1)
    # The user edits after the kill; nothing started by the dead run may overwrite that.
    put(pair.target, "edited-later", b"the user's edit after the kill\n", mtime=None)
    time.sleep(2)
    assert (pair.target / "edited-later").read_bytes() == b"the user's edit after the kill\n"
    pair.run(expect=(0, 2))
    assert (pair.target / "edited-later").read_bytes() == b"the user's edit after the kill\n"


def test_children_die_with_osync_through_the_lifeline(pair):
    """Where the kernel cannot tie a child's life to its parent, a watcher process does."""
    for number in range(3):
        put(pair.initiator, "big%d" % number, os.urandom(400000))
    started = kill_osync_while_rsync_runs(pair, {"BANDWIDTH": "40", "_OSYNC_LIFELINE": "1"})
    deadline = time.time() + 15
    while alive([pid for pid in started]):
        assert time.time() < deadline, "children still run after osync.py was killed"
        time.sleep(0.1)


@pytest.fixture
def sub_mount(pair, tmp_path):
    """A 1 MiB tmpfs mounted at target/mnt: a directory of the replica on another filesystem."""
    mount_point = pair.target / "mnt"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      stderr=subprocess.DEVNULL).returncode != 0:
        need("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)])


def test_full_sub_mount_keeps_the_old_file_whole(pair, sub_mount):
    good = os.urandom(300000)
    put(pair.initiator, "mnt/data", good)
    put(pair.initiator, "small", b"small\n")
    pair.run(env={"MINIMUM_SPACE": "0", "RESUME_TRY": "5"}, expect=0)
    assert (sub_mount / "data").read_bytes() == good
    inode = os.stat(str(sub_mount / "data")).st_ino
    bigger = os.urandom(1600000)
    put(pair.initiator, "mnt/data", bigger, mtime=T0 + 100)
    for _ in range(2):
        r = pair.run(env={"MINIMUM_SPACE": "0", "RESUME_TRY": "5"}, expect=1)
        assert "Traceback" not in r.output
        # original or final: the old content, whole, never a truncated new one
        assert (sub_mount / "data").read_bytes() == good, r.output
        assert (pair.initiator / "mnt" / "data").read_bytes() == bigger
    subprocess.run(["mount", "-o", "remount,size=8m", str(sub_mount)], check=True)
    pair.run(env={"MINIMUM_SPACE": "0", "RESUME_TRY": "5"}, expect=0)
    assert (sub_mount / "data").read_bytes() == bigger
    assert os.stat(str(sub_mount / "data")).st_ino != inode, "not replaced by a rename"
    assert (pair.initiator / "mnt" / "data").read_bytes() == bigger


def test_a_copy_that_left_a_broken_destination_is_remembered(pair, tmp_path):
    """rsync fails after it replaced the destination with something that is not what was sent
    (a torn file): the next run copies the source again and never takes the torn file for an
    edit that would replace the good source."""
    good = b"the good version, whole\n" * 100
    put(pair.initiator, "f", b"old\n")
    pair.run(expect=0)
    put(pair.initiator, "f", good, mtime=T0 + 10)
    dest = pair.target / "f"
    real = shutil.which("rsync")
    script = tmp_path / "rsync-tearing"
    script.write_text("#!/bin/sh\n%s \"$@\"\nhead -c 100 %s > %s.torn && mv %s.torn %s\nexit 11\n" % (
        real, shell_quote(dest), shell_quote(dest), shell_quote(dest), shell_quote(dest)))
    script.chmod(0o755)
    r = pair.run(env={"RSYNC_EXECUTABLE": str(script), "RESUME_TRY": "5"}, expect=1)
    assert dest.read_bytes() == good[:100], r.output
    r = pair.run(env={"RESUME_TRY": "5"}, expect=0)
    assert (pair.initiator / "f").read_bytes() == good, "the torn file replaced the good source" + r.output
    assert dest.read_bytes() == good
    pair.assert_converged()


def test_a_takeover_waits_for_the_children_of_the_dead_run(pair):
    """A run that died without cleaning up recorded its children beside the lock: the run that
    takes the dead lock over stops any of them still running before it touches anything."""
    put(pair.initiator, "f", b"data\n")
    pair.run(expect=0)
    orphan = subprocess.Popen(["sleep", "300"])
    try:
        started = process_start_time(orphan.pid)
        workdir = pair.workdir("initiator")
        plant_dead_run(workdir, orphan.pid, started)
        r = pair.run(expect=0)
        assert "of an earlier run are still running" in r.output, r.output
        assert orphan.wait(timeout=5) is not None
        assert not (workdir / "lock.children").exists()
        assert not (workdir / "lock").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_the_lock_names_the_children_of_the_run(pair, tmp_path):
    put(pair.initiator, "f", b"data\n")
    children = pair.workdir("initiator") / "lock.children"
    seen = tmp_path / "seen"
    env = rsync_wrapper(tmp_path, copy_of_children_list(children, seen))
    pair.run(env=env, expect=0)
    recorded = [int(line.split()[0]) for line in seen.read_text().splitlines()]
    assert recorded, "no child was recorded beside the lock while rsync ran"
    assert not children.exists()
