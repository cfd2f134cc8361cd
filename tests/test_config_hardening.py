"""Every bad value is one sentence at load time, before anything is written; any name
reaches the screen and the log; old osync configs keep their meaning."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (OSYNC, WORKDIR, Pair, T0, build, clean_env, expected, make_pair, put,
                      pyenv_python, snapshot)

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture
def lpair(tmp_path):
    """A local pair with a file on each side, for errors that must stop a run early."""
    pair = Pair(tmp_path / "p")
    build(pair.initiator, {"from_i": "i"})
    build(pair.target, {"from_t": "t"})
    return pair


@pytest.fixture
def rpair(request, tmp_path):
    """A remote pair (the agent under Python 3.6, through the sshd fixture)."""
    return make_pair("remote", tmp_path / "r", request)


def assert_refused(pair, r, *words):
    """Exit 1, one sentence on stderr naming `words`, no traceback, both replicas untouched."""
    assert r.returncode == 1, r.output
    assert TRACEBACK not in r.output and "Logging error" not in r.output, r.output
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, "expected one sentence on stderr:\n" + r.stderr
    assert "Unexpected internal error" not in errors[0], errors[0]
    for word in words:
        assert word in errors[0], "%r not in %r" % (word, errors[0])
    assert snapshot(pair.initiator, exclude_workdir=False) == expected({"from_i": "i"})
    assert snapshot(pair.target, exclude_workdir=False) == expected({"from_t": "t"})
    return errors[0]


def spy_ssh(tmp_path):
    """An `ssh` first in PATH that only records that it was run: (PATH value, marker)."""
    bin_dir = tmp_path / "spy-bin"
    bin_dir.mkdir()
    marker = tmp_path / "ssh-was-run"
    script = bin_dir / "ssh"
    script.write_text("#!/bin/sh\necho \"$@\" >> %s\nexit 255\n" % marker)
    script.chmod(0o755)
    return "%s:%s" % (bin_dir, os.environ.get("PATH", "")), marker


# ======================================================================================
# Item: every bad value is a sentence at load time
# ======================================================================================

@pytest.mark.parametrize("key,value", [
    ("RSYNC_OPTIONAL_ARGS", "--exclude='unclosed"),
    ("SSH_OPTIONAL_ARGS", '-o "ProxyCommand=none'),
    ("RSYNC_OPTIONAL_ARGS", "--modify-window=2 \\"),
])
@pytest.mark.parametrize("form", ["conf", "env"])
def test_unbalanced_quote_in_optional_args(lpair, key, value, form):
    """A value that cannot be split into arguments is refused before any change, naming
    where it came from (it used to stop the run after the deletions were done)."""
    remove = lpair.initiator / "from_i"
    lpair.run()   # synced once, so the next run would delete
    remove.unlink()
    before_i = snapshot(lpair.initiator, exclude_workdir=False)
    before_t = snapshot(lpair.target, exclude_workdir=False)
    if form == "conf":
        conf = lpair.write_conf(lines=["%s='%s'" % (key, value.replace("'", "'\\''"))])
        r = lpair.run_conf(conf)
        where = "task.conf:"
    else:
        r = lpair.run(env={key: value})
        where = "environment variable %s" % key
    assert r.returncode == 1, r.output
    assert TRACEBACK not in r.output
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and key in errors[0] and where in errors[0], r.stderr
    assert "quote" in errors[0] and "Unexpected internal error" not in errors[0]
    assert snapshot(lpair.initiator, exclude_workdir=False) == before_i
    assert snapshot(lpair.target, exclude_workdir=False) == before_t, "the run deleted before refusing"


def test_nul_byte_in_config_file(lpair):
    conf = lpair.write_conf()
    conf.write_bytes(conf.read_bytes() + b'RSYNC_EXCLUDE_PATTERN="a\x00b"\n')
    r = lpair.run_conf(conf)
    assert_refused(lpair, r, "task.conf:", "NUL")


@pytest.mark.parametrize("key,value,bound", [
    ("SMTP_PORT", "70000", "65535"),
    ("SMTP_PORT", "0", "1"),
    ("SOFT_MAX_EXEC_TIME", "99999999999999999999", "2147483647"),
    ("BANDWIDTH", "1" + "0" * 5000, "2147483647"),
    ("RESUME_TRY", "4294967296", "2147483647"),
])
def test_numbers_beyond_their_bound(lpair, key, value, bound):
    """Too large a number is one sentence saying the bound (no Python limit, no overflow mid-run)."""
    conf = lpair.write_conf(keys={key: value})
    r = lpair.run_conf(conf)
    assert_refused(lpair, r, "task.conf:", key, bound)
    r = lpair.run(env={key: value})
    assert_refused(lpair, r, "environment variable %s" % key, bound)
    r = lpair.run(env={key: bound})
    assert r.returncode == 0, "the bound itself is refused" + r.output


@pytest.mark.parametrize("form", ["env", "cli", "conf-variable"])
def test_instance_id_with_a_line_break(lpair, form):
    """An INSTANCE_ID ending in a newline used to pass: its lock was then never released."""
    if form == "env":
        r = lpair.run_raw("--initiator=%s" % lpair.initiator, "--target=%s" % lpair.target,
                          env={"INSTANCE_ID": "job\n"})
        where = "environment variable INSTANCE_ID"
    elif form == "cli":
        r = lpair.run(instance_id="job\n")
        where = "command line --instance-id"
    else:
        conf = lpair.write_conf(keys={"INSTANCE_ID": "$JOB_NAME"})
        r = lpair.run_conf(conf, env={"JOB_NAME": "job\n"})
        where = "task.conf:"
    assert_refused(lpair, r, "INSTANCE_ID", where)


def test_byte_order_mark_is_ignored(lpair):
    conf = lpair.write_conf()
    conf.write_bytes(b"\xef\xbb\xbf" + conf.read_bytes())
    r = lpair.run_conf(conf)
    assert r.returncode == 0, r.output
    assert snapshot(lpair.target) == expected({"from_i": "i", "from_t": "t"})


@pytest.mark.parametrize("spec", [
    "ssh:/127.0.0.1//srv/data",
    "SSH://127.0.0.1//srv/data",
    "Ssh://root@127.0.0.1:22//srv/data",
    "sftp://127.0.0.1//srv/data",
    "rsync://127.0.0.1/module/data",
    "scp://127.0.0.1//srv/data",
])
@pytest.mark.parametrize("form", ["cli", "conf"])
def test_url_that_is_not_ssh_is_refused(lpair, tmp_path, spec, form):
    """Such a target used to become a local directory named like the URL."""
    if form == "cli":
        r = lpair.run(target_spec=spec)
    else:
        r = lpair.run_conf(lpair.write_conf(keys={"TARGET_SYNC_DIR": spec}))
    assert_refused(lpair, r, spec, "ssh://user@host:port//absolute/path")
    assert not os.path.exists(os.path.join(str(lpair.cwd), spec.split(":")[0] + ":")), "a local dir was made"


@pytest.mark.parametrize("spec", [
    "ssh://-oProxyCommand=touch${IFS}pwned//srv/data",
    "ssh://-oProxyCommand=touch pwned@127.0.0.1:22//srv/data",
])
def test_host_or_user_starting_with_dash_never_reaches_ssh(lpair, tmp_path, spec):
    """ssh would read such a host or user as an option (ProxyCommand runs a command)."""
    path, marker = spy_ssh(tmp_path)
    r = lpair.run(target_spec=spec, env={"PATH": path})
    assert_refused(lpair, r, "'-'")
    assert not marker.exists(), "ssh was run with: " + marker.read_text()


@pytest.mark.parametrize("form", ["cli", "env", "conf"])
def test_missing_explicit_key_is_named(lpair, tmp_path, form):
    """A key file that does not exist used to be dropped and reported as an authentication failure."""
    path, marker = spy_ssh(tmp_path)
    missing = tmp_path / "keys" / "id_backup"
    spec = "ssh://root@127.0.0.1:22//srv/data"
    if form == "cli":
        r = lpair.run("--rsakey=%s" % missing, target_spec=spec, env={"PATH": path})
    elif form == "env":
        r = lpair.run(target_spec=spec, env={"PATH": path, "SSH_RSA_PRIVATE_KEY": str(missing)})
    else:
        conf = lpair.write_conf(keys={"TARGET_SYNC_DIR": spec, "SSH_RSA_PRIVATE_KEY": str(missing)})
        r = lpair.run_conf(conf, env={"PATH": path})
    assert_refused(lpair, r, str(missing), "SSH_RSA_PRIVATE_KEY")
    assert not marker.exists(), "ssh was run although the key is missing"
    # Without SSH_RSA_PRIVATE_KEY set, a missing ~/.ssh/id_rsa leaves ssh to its agent and
    # other keys: the run goes on to ssh (here the spy, which fails).
    home = tmp_path / "home"
    home.mkdir()
    r = lpair.run(target_spec=spec, env={"PATH": path, "HOME": str(home)})
    assert r.returncode == 1 and TRACEBACK not in r.output, r.output
    assert marker.exists(), "ssh was not tried" + r.output
    assert "id_rsa" not in r.stderr, r.stderr


@pytest.fixture
def stranger():
    """A running process that is not osync.py, and one whose command line is osync.py's."""
    processes = [subprocess.Popen(["sleep", "300"]),
                 subprocess.Popen(["bash", "-c", "exec -a osync.py sleep 301"])]
    yield processes
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_lock_held_by_another_program(lpair, stranger, side):
    root = lpair.initiator if side == "initiator" else lpair.target
    (root / WORKDIR).mkdir()
    lock = root / WORKDIR / "lock"
    sleeper, look_alike = stranger
    lock.write_text("%d@quicksync_task" % sleeper.pid)
    r = lpair.run()
    assert r.returncode == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, r.stderr
    for word in (str(lock), str(sleeper.pid), "sleep 300", "not osync.py", "--force-unlock"):
        assert word in errors[0], (word, errors[0])
    assert lock.read_text() == "%d@quicksync_task" % sleeper.pid
    assert snapshot(lpair.initiator) == expected({"from_i": "i"})
    assert snapshot(lpair.target) == expected({"from_t": "t"})
    # A live osync.py keeps the message it had: no advice to break its lock.
    lock.write_text("%d@quicksync_task" % look_alike.pid)
    r = lpair.run()
    assert r.returncode == 1, r.output
    assert "already a running instance" in r.stderr and "--force-unlock" not in r.stderr, r.stderr


def test_huge_pid_in_lock_is_a_dead_lock(lpair):
    """A pid no process can have is taken over like a dead one (it used to overflow)."""
    (lpair.initiator / WORKDIR).mkdir()
    (lpair.initiator / WORKDIR / "lock").write_text("99999999999999999999@quicksync_task")
    r = lpair.run()
    assert r.returncode == 0 and TRACEBACK not in r.output, r.output
    assert snapshot(lpair.target) == expected({"from_i": "i", "from_t": "t"})
