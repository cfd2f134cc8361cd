"""Attacks on the guarantees of DESIGN §4 from a hostile tester's chair: an editor saving
at the worst moment, kill -9 between steps, odd names and mounts, hostile lock files.
Every test runs the real osync.py (locally and over ssh through the ``pair`` fixture)."""
import os
import signal
import shutil
import subprocess
import time

import pytest

from conftest import T0, copy_of_children_list, dir_files, plant_dead_run, put, rsync_wrapper, shell_quote
from treeutil import process_start_time

CONTENT_EDIT = b"the initiator's edit\n"
CONTENT_SAVE = b"saved by the user's editor right after rsync wrote the file\n"


def rsync_then(tmp_path, after_rsync):
    """An RSYNC_EXECUTABLE that runs the real rsync, then the shell lines `after_rsync`, and
    exits with rsync's own code: whatever it does happens after rsync put its files in place
    and before osync.py looks at them again."""
    script = tmp_path / "rsync-then"
    script.write_text("#!/bin/sh\n%s \"$@\"\ncode=$?\n%s\nexit $code\n" % (shutil.which("rsync"), after_rsync))
    script.chmod(0o755)
    return {"RSYNC_EXECUTABLE": str(script)}


def editor_save(path, content_file, done):
    """Shell lines for an editor's save of `path` (temp file renamed over it), done once."""
    return "[ -e {done} ] || {{ cp {saved} {doc}.swp && mv {doc}.swp {doc} && touch {done}; }}".format(
        done=shell_quote(done), saved=shell_quote(content_file), doc=shell_quote(path))


def test_editor_save_right_after_rsync_wrote_the_file_is_not_overwritten(pair, tmp_path):
    """The editor saves on the destination after rsync renamed the new version in place and
    before the run verified it.  The save is newer than anything the run sent: the next run
    must see a conflict the save wins, not a copy the run still owes."""
    put(pair.initiator, "doc.txt", b"first version\n")
    pair.run(expect=0)
    put(pair.initiator, "doc.txt", CONTENT_EDIT, mtime=T0 + 100)
    doc = pair.target / "doc.txt"
    saved = tmp_path / "saved"
    saved.write_bytes(CONTENT_SAVE)
    done = tmp_path / "saved.done"
    r = pair.run(env=rsync_then(tmp_path, editor_save(doc, saved, done)), expect=(0, 1, 2))
    assert doc.read_bytes() == CONTENT_SAVE, r.output
    r = pair.run(expect=0)
    assert doc.read_bytes() == CONTENT_SAVE, "the next run overwrote the editor's save with older content" + r.output
    assert (pair.initiator / "doc.txt").read_bytes() == CONTENT_SAVE, r.output
    kept = [p for p in pair.backup("initiator").rglob("*") if p.is_file() and p.read_bytes() == CONTENT_EDIT]
    assert kept, "the initiator's edit is not kept in its backup dir" + r.output
    pair.assert_converged()



def rsync_after(tmp_path, before_rsync):
    """An RSYNC_EXECUTABLE that runs the shell lines `before_rsync`, then the real rsync: the
    window between osync.py's last check of the destination and rsync's write."""
    script = tmp_path / "rsync-after"
    script.write_text("#!/bin/sh\n%s\nexec %s \"$@\"\n" % (before_rsync, shutil.which("rsync")))
    script.chmod(0o755)
    return {"RSYNC_EXECUTABLE": str(script)}


@pytest.fixture
def target_sub_mount(pair):
    """A tmpfs mounted at target/mnt: a directory of the replica on another filesystem than
    its work dir (a careless admin's "bigger disk")."""
    mount_point = pair.target / "mnt"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                      stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)])


def test_editor_save_below_a_sub_mount_is_put_back_in_place(pair, tmp_path, target_sub_mount):
    """rsync keeps what it replaces in the work dir, on another filesystem than the file below
    the mount point: the editor's save made during the transfer must still come back."""
    put(pair.initiator, "mnt/doc.txt", b"first version\n")
    pair.run(expect=0)
    put(pair.initiator, "mnt/doc.txt", CONTENT_EDIT, mtime=T0 + 100)
    doc = target_sub_mount / "doc.txt"
    saved = tmp_path / "saved"
    saved.write_bytes(CONTENT_SAVE)
    done = tmp_path / "saved.done"
    r = pair.run(env=rsync_after(tmp_path, editor_save(doc, saved, done)), expect=0)
    assert doc.read_bytes() == CONTENT_SAVE, "the editor's save was overwritten" + r.output
    assert "was saved on the target while the run transferred it" in r.output, r.output
    r = pair.run(expect=0)
    assert doc.read_bytes() == CONTENT_SAVE, r.output
    assert (pair.initiator / "mnt" / "doc.txt").read_bytes() == CONTENT_SAVE, r.output
    pair.assert_converged()


def test_kill_9_between_rsync_and_settling_loses_no_save(pair, tmp_path):
    """The editor saves on the destination, rsync replaces the save (keeping it in the
    run's transfer dir), and osync.py is killed with -9 before it could put the save back.
    The next run must not take the older sent version for the synced one: the save comes
    back and wins the conflict (it is newer), the initiator's edit is kept in its backup."""
    put(pair.initiator, "doc.txt", b"first version\n")
    pair.run(expect=0)
    put(pair.initiator, "doc.txt", CONTENT_EDIT, mtime=T0 + 100)
    doc = pair.target / "doc.txt"
    saved = tmp_path / "saved"
    saved.write_bytes(CONTENT_SAVE)
    done = tmp_path / "saved.done"
    script = tmp_path / "rsync-killing"
    script.write_text("#!/bin/sh\n%s\n%s \"$@\"\nkill -9 $PPID\nsleep 1\n" % (
        editor_save(doc, saved, done), shutil.which("rsync")))
    script.chmod(0o755)
    pair.run(env={"RSYNC_EXECUTABLE": str(script)}, expect=-9)
    assert doc.read_bytes() == CONTENT_EDIT, "rsync did not replace the save: the attack missed its window"
    r = pair.run(expect=(0, 2))
    assert doc.read_bytes() == CONTENT_SAVE, "the editor's save stayed replaced by older content" + r.output
    assert (pair.initiator / "doc.txt").read_bytes() == CONTENT_SAVE, r.output
    kept = [p for p in pair.backup("initiator").rglob("*") if p.is_file() and p.read_bytes() == CONTENT_EDIT]
    assert kept, "the initiator's edit is not kept in its backup dir" + r.output
    pair.assert_converged()






def spawn_with_pid(wanted, attempts=200):
    """A `sleep` that got the pid `wanted` (a freed pid handed out again, as a busy host
    does), through the kernel's ns_last_pid; None when other processes kept taking it."""
    for _ in range(attempts):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
                handle.write(str(wanted - 1))
        except OSError:
            return None
        process = subprocess.Popen(["sleep", "300"])
        if process.pid == wanted:
            return process
        process.kill()
        process.wait()
    return None


def test_a_reused_pid_of_an_orphan_is_never_stopped(pair):
    """A child recorded by a dead run ends while the next run waits for it, and its pid is
    handed to an unrelated process: that process must not be sent SIGTERM or SIGKILL."""
    if pair.kind != "local":
        pytest.skip("the orphans are the initiator's processes: one kind is enough")
    put(pair.initiator, "f", b"data\n")
    pair.run(expect=0)
    orphan = subprocess.Popen(["sleep", "300"])
    impostor = None
    process = None
    try:
        workdir = pair.workdir("initiator")
        (workdir / "lock").write_text("999999@quicksync_task")        # a dead run's lock
        (workdir / "lock.children").write_text("%d %s\n" % (orphan.pid, process_start_time(orphan.pid)))
        process = pair.popen()
        deadline = time.time() + 20
        while not (workdir / "lock").read_text().startswith("%d@" % process.pid):
            assert time.time() < deadline and process.poll() is None, "the run never took the lock"
            time.sleep(0.02)
        time.sleep(0.5)                       # it is waiting for the orphan now
        os.kill(process.pid, signal.SIGSTOP)
        orphan.kill()
        orphan.wait()
        impostor = spawn_with_pid(orphan.pid)
        os.kill(process.pid, signal.SIGCONT)
        if impostor is None:
            pytest.skip("could not hand the orphan's pid to another process")
        process.communicate(timeout=60)
        assert impostor.poll() is None, "an unrelated process that got the orphan's pid was stopped"
    finally:
        for other in (orphan, impostor, process):
            if other is not None and other.poll() is None:
                other.kill()
                other.wait()


def test_a_child_recorded_before_the_host_booted_is_never_stopped(pair):
    """lock.children survives a reboot (power loss during a run).  Pids and start times
    count again from zero at boot: a process that now has a recorded pid and start time is
    not the dead run's child and must be left alone."""
    if pair.kind != "local":
        pytest.skip("the orphans are the initiator's processes: one kind is enough")
    put(pair.initiator, "f", b"data\n")
    pair.run(expect=0)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        workdir = pair.workdir("initiator")
        plant_dead_run(workdir, bystander.pid, process_start_time(bystander.pid),
                       boot="0f0e0d0c-0000-4000-8000-000000000000")
        r = pair.run(expect=0)
        assert bystander.poll() is None, "a process of this boot was stopped as an orphan of an earlier boot"
        assert "of an earlier run are still running" not in r.output, r.output
    finally:
        bystander.kill()
        bystander.wait()


def test_the_children_are_recorded_with_this_boot(pair, tmp_path):
    put(pair.initiator, "f", b"data\n")
    children = pair.workdir("initiator") / "lock.children"
    seen = tmp_path / "seen"
    pair.run(env=rsync_wrapper(tmp_path, copy_of_children_list(children, seen)), expect=0)
    with open("/proc/sys/kernel/random/boot_id") as handle:
        boot = handle.read().strip()
    lines = seen.read_text().splitlines()
    assert lines and all(line.split()[2:] == [boot] for line in lines), lines


def test_a_new_file_deleted_during_its_transfer_is_deleted_on_the_other_side(pair, tmp_path):
    """A new file (an editor's temp file, a download in progress) is copied, then deleted on
    its side while the run is still going.  The deletion is the user's last word: the next
    run carries it over (soft-deleted) instead of keeping the copy on one side forever."""
    put(pair.initiator, "keep.txt", b"kept\n")
    pair.run(expect=0)
    put(pair.initiator, "download.part", b"a file that lived for one run\n")
    gone = pair.initiator / "download.part"
    r = pair.run(env=rsync_then(tmp_path, "rm -f %s" % shell_quote(gone)), expect=(0, 2))
    assert (pair.target / "download.part").exists(), "the attack missed: rsync did not copy the file" + r.output
    assert "download.part was deleted on the initiator during its transfer" in r.output, r.output
    r = pair.run(expect=(0, 2))
    assert not (pair.initiator / "download.part").exists(), "the deleted file came back" + r.output
    assert not (pair.target / "download.part").exists(), "the deletion was never carried over" + r.output
    assert (pair.deleted("target") / "download.part").exists(), r.output
    pair.assert_converged()


def killing_rsync(tmp_path):
    """An RSYNC_EXECUTABLE that runs the real rsync, then kills osync.py with -9: the run dies
    after rsync replaced its files and before it settled them."""
    script = tmp_path / "rsync-then-kill"
    script.write_text("#!/bin/sh\n%s \"$@\"\nkill -9 $PPID\nsleep 1\n" % shutil.which("rsync"))
    script.chmod(0o755)
    return {"RSYNC_EXECUTABLE": str(script)}


@pytest.mark.parametrize("conflict_backup", ["yes", "no"])
def test_kill_9_after_rsync_leaves_backups_where_the_settings_say(pair, tmp_path, conflict_backup):
    """The version rsync replaced before the run was killed ends up where a finished run
    would have put it: in backup/<path> with CONFLICT_BACKUP=yes, nowhere with =no."""
    env = {"CONFLICT_BACKUP": conflict_backup}
    put(pair.initiator, "f", b"one\n")
    pair.run(env=env, expect=0)
    put(pair.initiator, "f", b"two\n", mtime=T0 + 10)
    pair.run(env=dict(env, **killing_rsync(tmp_path)), expect=-9)
    assert (pair.target / "f").read_bytes() == b"two\n"
    r = pair.run(env=env, expect=0)
    kept = dir_files(pair.backup("target"))
    if conflict_backup == "yes":
        assert kept == ["f"] and (pair.backup("target") / "f").read_bytes() == b"one\n", (kept, r.output)
    else:
        assert kept == [], "CONFLICT_BACKUP=no, yet a replaced version was kept: %s%s" % (kept, r.output)
    pair.assert_converged(env=env)
