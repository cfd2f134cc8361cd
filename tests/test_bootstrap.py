"""The bootstrap as an interface (DESIGN §2.9): the remote command is `PYTHON -c AGENT_STUB N`
with N bytes of a program on stdin (AGENT_LOADER, which reads osync.py after it; the stub
runs a whole osync.py just as well).  Each way the remote start fails ends in its own exit
code (the stub's, ssh_filter.py's, the shell's) and the initiator turns that code into one
sentence naming the host and what to do, with nothing changed on either replica.  The
agent that starts names itself osync-agent, so `ps` on the target host says what it is.

Every case runs the real stub over the session's sshd (the remote pair kinds); the
REMOTE_PYTHON wrappers below change only what reaches the real stub, or which
interpreter runs it.
"""

import glob
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, build, describe, pyenv_root, snapshot, ssh_filter_key

HOST = "127.0.0.1"
TOKEN = "osyncBootToken" + secrets.token_hex(6)

sys.path.insert(0, str(REPO))
import osync  # noqa: E402

# A Python that takes itself for too old: the real stub, with the version it needs raised
# from (3,6) to (99,0), run by the pair's Python.
NEEDS_PYTHON_99 = """#!/bin/sh
stub=$(printf '%s' "$2" | sed 's/(3,6)/(99,0)/')
exec "{python}" -c "$stub" "$3"
"""

# The stream cut short: only the first {cut} bytes of what the initiator sends reach the
# real stub (dd with one-byte blocks passes each byte on at once, as a broken connection
# would: it does not wait for the rest of a buffer).
CUT_STREAM = """#!/bin/sh
dd bs=1 count={cut} status=none | "{python}" "$@"
"""

# A Python that exists and fails on its own, with words an old stderr grep took for a
# missing interpreter.
FAILING_PYTHON = """#!/bin/sh
echo "osync-test: /etc/osync-test/site.cfg not found" >&2
exit 1
"""


@pytest.fixture
def rpair(pair):
    if not pair.kind.startswith("remote"):
        pytest.skip("the bootstrap runs only for a remote target")
    return pair


def wrapper(pair, name, text):
    """An executable script in the pair's directory (a REMOTE_PYTHON on the same host)."""
    path = pair.base / name
    path.write_text(text.replace("{python}", pair.python))
    path.chmod(0o755)
    return str(path)


def trees(pair):
    """Both replicas, work dirs included."""
    return (snapshot(pair.initiator, mtimes=True, exclude_workdir=False),
            snapshot(pair.target, mtimes=True, exclude_workdir=False))


def start_fails(pair, *args, env=None):
    """A run that must stop before the agent serves: returns its one error sentence, after
    checking exit 1, no traceback, one line on stderr naming the host, nothing changed."""
    build(pair.initiator, {"a": "a", "d/b": "b"})
    before = trees(pair)
    r = pair.run(*args, env=env)
    assert r.returncode == 1, "expected exit code 1" + describe(r)
    assert "Traceback" not in r.output and "Unexpected internal error" not in r.output, describe(r)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, "expected one sentence on stderr" + describe(r)
    assert HOST in errors[0], "the sentence does not name the host" + describe(r)
    assert errors[0].rstrip().endswith("."), describe(r)
    assert trees(pair) == before, "a failed start changed a replica" + describe(r)
    return errors[0]


def python_version(python):
    out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True)
    return out.stdout.strip()


def python2():
    found = sorted(glob.glob(os.path.join(pyenv_root(), "versions", "2.*", "bin", "python")))
    return found[-1] if found else None


@pytest.mark.parametrize("which", ["needs-99", "python2"])
def test_a_python_too_old_is_named_with_its_version(rpair, which):
    if which == "python2":
        python = python2()
        if python is None:
            pytest.skip("no Python 2 in pyenv")
        version = python_version(python)
    else:
        python = wrapper(rpair, "python-needs-99", NEEDS_PYTHON_99)
        version = python_version(rpair.python)
    sentence = start_fails(rpair, env={"REMOTE_PYTHON": python})
    assert python in sentence and version in sentence, sentence
    assert "too old" in sentence and "REMOTE_PYTHON" in sentence and "3.6 or newer" in sentence, sentence


def test_a_missing_remote_python_names_the_setting(rpair):
    python = "/nonexistent/osync-test/python3"
    sentence = start_fails(rpair, env={"REMOTE_PYTHON": python})
    assert "REMOTE_PYTHON=%s was not found" % python in sentence, sentence


def test_a_failing_python_is_not_taken_for_a_missing_one(rpair):
    """Exit code 1 with "not found" on stderr is the interpreter failing, not missing."""
    python = wrapper(rpair, "python-failing", FAILING_PYTHON)
    sentence = start_fails(rpair, env={"REMOTE_PYTHON": python})
    assert "could not start" in sentence and "exit code 1" in sentence, sentence
    assert "site.cfg not found" in sentence, sentence


@pytest.mark.parametrize("cut", [500, 4096])
def test_a_stream_cut_short_is_a_broken_stream(rpair, cut):
    """Cut within the loader (the stub sees it short) or within osync.py (the loader does)."""
    assert 500 < len(osync.AGENT_LOADER) < 4096 - 100
    python = wrapper(rpair, "python-cut", CUT_STREAM.replace("{cut}", str(cut)))
    sentence = start_fails(rpair, env={"REMOTE_PYTHON": python})
    assert "broke" in sentence and "run again" in sentence, sentence


@pytest.fixture
def filter_key(rpair):
    """A key authorized for root only through ssh_filter.py with TOKEN."""
    return ssh_filter_key(rpair.sshd, "id_bootstrap_filter", TOKEN)


def ssh_argv(server, key, command):
    return (["ssh", "-F", "/dev/null", "-T", "-i", str(key), "-p", str(server.port), "-o", "BatchMode=yes",
             "-o", "IdentitiesOnly=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none"]
            + server.ssh_options() + ["root@%s" % server.host, command])


def stub_command(token, python, size):
    return " ".join(shlex.quote(word) for word in
                    ["env", "_REMOTE_TOKEN=" + token, python, "-c", osync.AGENT_STUB, str(size)])


def test_ssh_filter_refusing_says_what_to_check(rpair, filter_key):
    refused = subprocess.run(ssh_argv(rpair.sshd, filter_key, stub_command("wrong" + TOKEN, rpair.python, 10)),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=60)
    assert refused.returncode == osync.AGENT_EXIT_REFUSED, (refused.returncode, refused.stderr)
    sentence = start_fails(rpair, "--rsakey=%s" % filter_key, "--remote-token=wrong" + TOKEN)
    assert "ssh_filter.py" in sentence and "refused" in sentence, sentence
    assert "_REMOTE_TOKEN" in sentence and "authorized_keys" in sentence, sentence


def processes_with_environment(variable):
    """Pids whose environment holds `variable` (b"NAME=value")."""
    found = []
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(environ, "rb") as handle:
                if variable in handle.read().split(b"\0"):
                    found.append(int(environ.split("/")[2]))
        except OSError:
            pass
    return found


@pytest.mark.remote_newest
def test_the_agent_is_named_osync_agent(rpair):
    """The agent started through the stub, over ssh, shows as osync-agent in /proc and ps."""
    if not sys.platform.startswith("linux"):
        pytest.skip("process names are read from /proc")
    token = "osyncBootName" + secrets.token_hex(6)
    source = Path(osync.__file__).read_bytes()
    agent = subprocess.Popen(ssh_argv(rpair.sshd, rpair.key, stub_command(token, rpair.python, len(source))),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        agent.stdin.write(source)
        agent.stdin.flush()
        banner = agent.stdout.readline()
        assert banner.startswith(osync.AGENT_BANNER), (banner, agent.stderr.read(2000) if not banner else "")
        pids = processes_with_environment(b"_REMOTE_TOKEN=" + token.encode())
        assert len(pids) == 1, pids
        with open("/proc/%d/cmdline" % pids[0], "rb") as handle:
            assert osync.AGENT_STUB.encode() in handle.read().split(b"\0")
        with open("/proc/%d/comm" % pids[0]) as handle:
            assert handle.read().strip() == "osync-agent"
    finally:
        agent.stdin.close()
        agent.wait(timeout=30)
    assert agent.returncode == 0
