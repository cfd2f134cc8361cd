"""Faults a run must survive with one sentence, a non-zero exit and nothing lost:
a full disk, a missing rsync, a stop signal, the hard time limit."""
import os
import signal
import subprocess
import time

import pytest

from conftest import clean_env, finish_osync, need, popen_osync
from treeutil import file_map


def start(tmp_path, initiator, target, *args, **env):
    argv = ["--initiator=%s" % initiator, "--target=%s" % target, "--no-prefix"] + list(args)
    return popen_osync(argv, clean_env(tmp_path / "log", env), tmp_path)


def run(tmp_path, initiator, target, *args, **env):
    r = finish_osync(start(tmp_path, initiator, target, *args, **env), logfile=tmp_path / "log")
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, so a sync runs out of space half way."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                      stderr=subprocess.DEVNULL).returncode != 0:
        need("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)])


def test_full_disk_is_an_error_then_the_next_run_finishes(tmp_path, small_disk):
    initiator = tmp_path / "a"
    initiator.mkdir()
    for number in range(5):
        (initiator / ("f%d" % number)).write_bytes(os.urandom(700000))
    target = small_disk / "b"
    target.mkdir()
    before = file_map(initiator)
    code, out, err = run(tmp_path, initiator, target, MINIMUM_SPACE="0")
    assert code == 1
    assert "No space left on device" in err and "Traceback" not in err + out
    assert file_map(initiator) == before
    for name, content in file_map(target).items():  # what arrived is whole, never a torn file
        assert content == before[name]
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    code, out, err = run(tmp_path, initiator, target, MINIMUM_SPACE="0")
    assert code == 0, err
    assert file_map(target) == before == file_map(initiator)


def test_missing_rsync_is_one_sentence(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    code, out, err = run(tmp_path, tmp_path / "a", tmp_path / "b", RSYNC_EXECUTABLE="/nonexistent/rsync")
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "rsync" in lines[0] and "not installed" in lines[0]
    assert not (tmp_path / "b" / "f").exists()


def slow_pair(tmp_path, files=20):
    initiator, target = tmp_path / "a", tmp_path / "b"
    initiator.mkdir()
    target.mkdir()
    for number in range(files):
        (initiator / ("big%02d" % number)).write_bytes(os.urandom(1 << 20))
    return initiator, target


def wait_for_transfer(target, timeout=20):
    """Until rsync has started writing into the target."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        temp = target / ".osync_workdir" / "_tmp"
        if (temp.is_dir() and os.listdir(str(temp))) or any(p.name.startswith("big") for p in target.iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError("the transfer never started")


def test_sigterm_stops_cleanly_and_the_next_run_finishes(tmp_path):
    initiator, target = slow_pair(tmp_path)
    process = start(tmp_path, initiator, target, BANDWIDTH="2000")
    wait_for_transfer(target)
    process.send_signal(signal.SIGTERM)
    r = finish_osync(process, timeout=60, logfile=tmp_path / "log")
    out, err = r.stdout, r.stderr
    assert process.returncode == 2, err
    assert "Stopped by signal SIGTERM" in err and "Traceback" not in err
    assert not (initiator / ".osync_workdir" / "lock").exists()
    assert not (target / ".osync_workdir" / "lock").exists()
    deadline = time.time() + 5
    while subprocess.run(["pgrep", "-f", "rsync.*%s" % target], stdout=subprocess.DEVNULL).returncode == 0:
        assert time.time() < deadline, "rsync still runs after osync.py stopped"
        time.sleep(0.1)
    code, out, err = run(tmp_path, initiator, target)
    assert code == 0, err
    assert file_map(target) == file_map(initiator)
    assert os.listdir(str(target / ".osync_workdir" / "_tmp")) == []


def test_signals_arriving_together_stop_the_run_once_without_a_traceback(tmp_path):
    """SIGHUP, SIGINT and SIGTERM at once (a session closing, a service stopped): one clean
    stop, and the signals that were already on their way pass quietly (with SIG_IGN set
    under them Python printed "Signal N ignored due to race condition" with a traceback)."""
    initiator, target = slow_pair(tmp_path)
    process = start(tmp_path, initiator, target, BANDWIDTH="2000")
    wait_for_transfer(target)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        process.send_signal(sig)
    r = finish_osync(process, timeout=60, logfile=tmp_path / "log")
    assert process.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "race condition" not in r.stderr, r.stderr
    assert r.stderr.count("Stopped by signal") == 1, r.stderr
    assert not (initiator / ".osync_workdir" / "lock").exists()


def test_hard_time_limit_stops_the_run_with_an_error(tmp_path):
    initiator, target = slow_pair(tmp_path)
    code, out, err = run(tmp_path, initiator, target, "--summary", BANDWIDTH="2000", HARD_MAX_EXEC_TIME="2",
                         SOFT_MAX_EXEC_TIME="1")
    assert code == 1
    assert "Max hard execution time [2] exceeded" in err and "Max soft execution time [1] exceeded" in err
    assert not (target / ".osync_workdir" / "lock").exists()
    code, out, err = run(tmp_path, initiator, target)
    assert code == 0, err
    assert file_map(target) == file_map(initiator)
