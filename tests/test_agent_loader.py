"""How the agent's code reaches the remote Python (DESIGN §2.9): the stub runs
AGENT_LOADER, whose hello names the remote Python's bytecode magic; the initiator answers
with osync.py as bytecode when it holds valid bytecode for that very magic (osync.py
imported, as install.py installs it: a byte-compiled module under a launcher), else as
source.  A remote Python given bytecode does not compile osync.py: its peak memory is far
lower.  A hello that is not understood gets the source; a hostile reply ends in one of
the start-failure sentences.

Every case runs the real stub over the session's sshd; the initiator is osync.py
installed in a temporary directory (INSTALL_LAUNCHER imports it), or run as a script.
"""

import importlib.util
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OSYNC, build, describe, pyenv_python, run_osync, snapshot, ssh_filter_key

HOST = "127.0.0.1"
TOKEN = "osyncLoaderToken" + secrets.token_hex(6)

sys.path.insert(0, str(OSYNC.parent))
import osync  # noqa: E402

# How install.py runs osync.py: a launcher that imports the byte-compiled module.
INSTALL_LAUNCHER = "import sys; sys.path.insert(0, %r); import osync; sys.exit(osync.main())\n"

SENT_AS = re.compile(r"osync\.py is sent to the agent on %s as (bytecode|source)\b[^\n]*" % re.escape(HOST))

# A REMOTE_PYTHON that writes a hello of its own before the real stub writes the real one.
HELLO_FIRST = """#!/bin/sh
{hello}
exec "{python}" "$@"
"""

HOSTILE_HELLOS = {
    "wrong-magic-format": "printf 'OSYNC-LOADER zz0d0d0a 3.11.7\\n'",
    "magic-too-long": "printf 'OSYNC-LOADER a70d0d0a0d0a 3.11.7\\n'",
    "garbage": "printf 'OSYNC-LOADER \\377\\001\\033[31m; rm -rf /\\t%s\\n' \"$(head -c 300 /dev/urandom | od -An -tx1)\"",
    "no-version": "printf 'OSYNC-LOADER a70d0d0a\\n'",
}

# A REMOTE_PYTHON that keeps the N bytes sent for the stub, then writes a hello line
# 100 kB long.
HUGE_HELLO = """#!/bin/sh
dd bs=1 count="$3" status=none > "{received}"
printf 'OSYNC-LOADER '
head -c 100000 /dev/zero | tr '\\0' 'a'
printf '\\n'
"""

# A REMOTE_PYTHON that claims the initiator's magic number: it is sent bytecode that its
# own Python cannot load.
LYING_MAGIC = """#!/bin/bash
set -o pipefail
"{python}" "$@" | sed -u 's/^OSYNC-LOADER [0-9a-f]*/OSYNC-LOADER {magic}/'
"""

# A REMOTE_PYTHON that records the peak resident set (KiB) of the real Python it runs.
MEASURED = """#!/bin/sh
exec "{python}" -c 'import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "a") as out:
    out.write("%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)' "{out}" "{python}" "$@"
"""


@pytest.fixture
def rpair(pair):
    """One remote pair kind is enough: each test names the Pythons it runs."""
    if pair.kind != "remote":
        pytest.skip("the loader runs for a remote target; one remote kind covers it")
    return pair


def python36():
    python = pyenv_python("3.6")
    if python is None:
        pytest.skip("no Python 3.6 in pyenv")
    return python


def install(base, python, source=None, invalidation="timestamp"):
    """osync.py (or `source`) installed under `base` as install.py does: lib/osync.py,
    byte-compiled for `python`, and the launcher bin/osync.py.  Returns the launcher."""
    lib, bin_dir = Path(base) / "lib", Path(base) / "bin"
    lib.mkdir(parents=True)
    bin_dir.mkdir()
    module = lib / "osync.py"
    module.write_bytes(source if source is not None else OSYNC.read_bytes())
    compile_code = ("import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True%s)"
                    % ("" if invalidation == "timestamp" else
                       ", invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH"))
    subprocess.run([python, "-c", compile_code, str(module)], check=True)
    launcher = bin_dir / "osync.py"
    launcher.write_text(INSTALL_LAUNCHER % str(lib))
    return launcher


def cached_pyc(launcher, python):
    """The .pyc that `python` keeps for the installed module."""
    module = launcher.parent.parent / "lib" / "osync.py"
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    return module.parent / "__pycache__" / ("osync.%s.pyc" % tag)


def run(pair, python, program, *args, env=None, expect=None):
    """A verbose quicksync run of `pair` by `python` running `program` (a launcher, or
    osync.py itself as a script)."""
    merged = dict(pair.quick_env)
    merged.update(env or {})
    argv = pair.quick_args() + ["--verbose"] + list(args)
    return run_osync(argv, pair.env(merged), pair.cwd, expect, logfile=pair.logfile, python=python,
                     script=program)


def sent_as(r):
    """How the verbose log says osync.py went to the agent: the one line."""
    found = SENT_AS.findall(r.output)
    lines = SENT_AS.finditer(r.output)
    assert len(found) == 1, "expected one line saying how osync.py was sent" + describe(r)
    return found[0], next(lines).group(0)


def syncs(pair, python, program, env=None):
    """A first run that copies the initiator's files to the target; returns how osync.py
    was sent (bytecode or source) and that line."""
    build(pair.initiator, {"a.txt": "a", "d/b.txt": "bb"})
    r = run(pair, python, program, env=env, expect=0)
    assert snapshot(pair.target) == snapshot(pair.initiator), describe(r)
    return sent_as(r)


def start_fails(pair, python, program, env):
    """A run that must stop before the agent serves: its one error sentence (exit 1, no
    traceback, naming the host, nothing copied)."""
    build(pair.initiator, {"a.txt": "a"})
    r = run(pair, python, program, env=env)
    assert r.returncode == 1, "expected exit code 1" + describe(r)
    assert "Traceback" not in r.output and "Unexpected internal error" not in r.output, describe(r)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, "expected one sentence on stderr" + describe(r)
    assert HOST in errors[0] and errors[0].rstrip().endswith("."), describe(r)
    assert not (pair.target / "a.txt").exists(), describe(r)
    return errors[0]


def wrapper(pair, name, text, **values):
    path = pair.base / name
    for key, value in values.items():
        text = text.replace("{%s}" % key, value)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("which", ["current", "3.6", "current-checked-hash"])
def test_an_installed_osync_sends_bytecode_to_the_same_python(rpair, tmp_path, which):
    python = python36() if which == "3.6" else sys.executable
    invalidation = "checked-hash" if which.endswith("checked-hash") else "timestamp"
    launcher = install(tmp_path / "install", python, invalidation=invalidation)
    how, line = syncs(rpair, python, launcher, env={"REMOTE_PYTHON": python})
    assert how == "bytecode", line
    assert str(cached_pyc(launcher, python)) in line, line
    again = run(rpair, python, launcher, env={"REMOTE_PYTHON": python}, expect=0)
    assert sent_as(again)[0] == "bytecode"


def test_an_agent_under_another_python_gets_source(rpair, tmp_path):
    """An initiator on this Python, its agent on 3.6: another magic number, the source."""
    oldest = python36()
    assert subprocess.run([oldest, "-c", "import importlib.util, sys; "
                           "sys.exit(importlib.util.MAGIC_NUMBER == %r)" % importlib.util.MAGIC_NUMBER]
                          ).returncode == 0, "3.6 must have another magic number than this Python"
    launcher = install(tmp_path / "install", sys.executable)
    how, line = syncs(rpair, sys.executable, launcher, env={"REMOTE_PYTHON": oldest})
    assert how == "source", line
    assert "3.6" in line, line


def test_osync_run_as_a_script_sends_source(rpair, tmp_path):
    """Even with a valid .pyc beside it: a script's code is not the cached module's."""
    launcher = install(tmp_path / "install", sys.executable)
    script = launcher.parent.parent / "lib" / "osync.py"
    assert cached_pyc(launcher, sys.executable).exists()
    how, line = syncs(rpair, sys.executable, script, env={"REMOTE_PYTHON": sys.executable})
    assert how == "source", line


@pytest.mark.parametrize("invalidation", ["timestamp", "checked-hash"])
def test_a_stale_pyc_is_never_sent(rpair, tmp_path, invalidation):
    """The .pyc was compiled from an older osync.py whose agent cannot serve (it exits 77);
    the source changed since, and PYTHONDONTWRITEBYTECODE keeps the stale .pyc on disk.
    The agent must run the current source's code."""
    current = OSYNC.read_bytes()
    older = current + b"\n\ndef agent_main():\n    sys.exit(77)\n"
    launcher = install(tmp_path / "install", sys.executable, source=older, invalidation=invalidation)
    module = launcher.parent.parent / "lib" / "osync.py"
    module.write_bytes(current)
    changed = module.stat().st_mtime + 10
    os.utime(str(module), (changed, changed))
    pyc = cached_pyc(launcher, sys.executable)
    stale = pyc.read_bytes()
    how, line = syncs(rpair, sys.executable, launcher,
                      env={"REMOTE_PYTHON": sys.executable, "PYTHONDONTWRITEBYTECODE": "1"})
    assert pyc.read_bytes() == stale, "the test needs the stale .pyc to stay"
    assert how == "bytecode" and str(pyc) not in line, line


@pytest.mark.parametrize("case", sorted(HOSTILE_HELLOS))
def test_a_hello_not_understood_gets_the_source(rpair, tmp_path, case):
    """The real stub runs after the odd line, reads the source sent in reply to it, and
    serves: nothing of the odd line reaches the log."""
    python = wrapper(rpair, "python-hello", HELLO_FIRST, hello=HOSTILE_HELLOS[case], python=sys.executable)
    launcher = install(tmp_path / "install", sys.executable)
    how, line = syncs(rpair, sys.executable, launcher, env={"REMOTE_PYTHON": python})
    assert how == "source" and "not understood" in line, line
    log = Path(str(rpair.logfile)).read_bytes()
    assert b"\x1b" not in log and b"zz0d0d0a" not in log and b"rm -rf" not in log


def test_a_huge_hello_is_refused_and_gets_nothing_but_the_loader(rpair, tmp_path):
    received = rpair.base / "received"
    python = wrapper(rpair, "python-huge", HUGE_HELLO, received=str(received))
    launcher = install(tmp_path / "install", sys.executable)
    sentence = start_fails(rpair, sys.executable, launcher, env={"REMOTE_PYTHON": python})
    assert "more than 65536 bytes" in sentence and "refuses" in sentence, sentence
    assert received.read_bytes() == osync.AGENT_LOADER.encode("ascii")


def test_a_python_that_lies_about_its_magic_is_a_broken_stream(rpair, tmp_path):
    """3.6 claiming this Python's magic gets this Python's bytecode, cannot load it, and
    ends with exit code 92: the broken-stream sentence, no traceback."""
    python = wrapper(rpair, "python-lying", LYING_MAGIC, python=python36(),
                     magic=importlib.util.MAGIC_NUMBER.hex())
    launcher = install(tmp_path / "install", sys.executable)
    sentence = start_fails(rpair, sys.executable, launcher, env={"REMOTE_PYTHON": python})
    expected = osync.AGENT_START_FAILURES[osync.AGENT_EXIT_SHORT_SOURCE].format(host=HOST, python=python)
    assert sentence.endswith(expected), sentence


@pytest.mark.parametrize("which", ["current", "3.6"])
def test_ssh_filter_lets_the_unchanged_stub_through(rpair, tmp_path, which):
    """A key restricted by ssh_filter.py: the loader, then bytecode (same Python) or
    source (3.6 agent), all through the stub ssh_filter.py knows."""
    key = ssh_filter_key(rpair.sshd, "id_loader_filter", TOKEN)
    remote = python36() if which == "3.6" else sys.executable
    launcher = install(tmp_path / "install", sys.executable)
    build(rpair.initiator, {"a.txt": "a"})
    r = run(rpair, sys.executable, launcher, "--rsakey=%s" % key, "--remote-token=" + TOKEN,
            env={"REMOTE_PYTHON": remote}, expect=0)
    assert snapshot(rpair.target) == snapshot(rpair.initiator), describe(r)
    assert sent_as(r)[0] == ("source" if which == "3.6" else "bytecode")


def agent_peak_kib(pair, python, program, name):
    """The agent's peak resident set in a no-change run (after a first run that copies)."""
    out = pair.base / (name + ".peak")
    measured = wrapper(pair, "python-" + name, MEASURED, python=python, out=str(out))
    env = {"REMOTE_PYTHON": measured}
    run(pair, python, program, env=env, expect=0)
    run(pair, python, program, env=env, expect=0)
    return int(out.read_text().split()[-1])


def test_an_agent_started_from_bytecode_needs_less_memory(rpair, tmp_path):
    """Compiling osync.py is most of the agent's peak memory (about 20 MiB of it)."""
    for number in range(500):
        (rpair.initiator / ("d%d" % (number // 100))).mkdir(exist_ok=True)
        (rpair.initiator / ("d%d" % (number // 100)) / ("f%d" % number)).write_text(str(number))
    launcher = install(tmp_path / "install", sys.executable)
    script = launcher.parent.parent / "lib" / "osync.py"
    from_source = agent_peak_kib(rpair, sys.executable, script, "source")
    from_bytecode = agent_peak_kib(rpair, sys.executable, launcher, "bytecode")
    print("agent peak: %d KiB from source, %d KiB from bytecode" % (from_source, from_bytecode))
    assert from_source - from_bytecode > 10 * 1024, (from_source, from_bytecode)
