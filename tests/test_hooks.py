"""Before and after commands (reference §8.1): LOCAL_RUN_BEFORE/AFTER_CMD on the initiator's
host, REMOTE_RUN_BEFORE/AFTER_CMD on the target host through the agent (and through a key
restricted by ssh_filter.py), their time limits, STOP_ON_CMD_ERROR, RUN_AFTER_CMD_ON_ERROR,
their output in the log, and --dry."""

import os
import secrets
import signal
import sys
import time

import pytest

from conftest import REPO, WORKDIR, build, ssh_filter_key

TOKEN = "osyncHookToken" + secrets.token_hex(6)
KEYS = ("LOCAL_RUN_BEFORE_CMD", "REMOTE_RUN_BEFORE_CMD", "REMOTE_RUN_AFTER_CMD", "LOCAL_RUN_AFTER_CMD")


def sides(pair):
    """The sides a command can run on for this pair: a local target has no remote host."""
    return ("local", "remote") if pair.kind.startswith("remote") else ("local",)


def key_of(side, phase):
    return "%s_RUN_%s_CMD" % (side.upper(), phase)


def need_side(pair, side):
    if side not in sides(pair):
        pytest.skip("remote commands need a remote target")


def log_text(pair):
    return pair.logfile.read_text(errors="surrogateescape") if pair.logfile.exists() else ""


def recorder(pair, name):
    """A command line that appends NAME, the name of the process that ran its shell (the
    agent is "osync-agent"), and what the replicas held at that moment to hooks.txt."""
    record = pair.base / "hooks.txt"
    state = pair.initiator / WORKDIR / "state"
    return ('{ echo "%s $(cat /proc/$PPID/comm)"; ls -A "%s" "%s" | tr "\\n" " "; echo; '
            'ls "%s" 2>/dev/null | tr "\\n" " "; echo; echo "hello-from-%s"; } >> "%s"; echo "hello-from-%s"'
            % (name, pair.initiator, pair.target, state, name, record, name))


def records(pair):
    """[(name, process name, replicas' listing, state dir listing)] in the order they ran."""
    path = pair.base / "hooks.txt"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    found = []
    for start in range(0, len(lines) - 3, 4):
        name, process = lines[start].split(" ", 1)
        found.append((name, process, lines[start + 1], lines[start + 2]))
    return found


@pytest.mark.remote_newest
def test_commands_run_around_the_sync_in_order(pair):
    """Before commands see neither the synced file nor a work dir; after commands see the
    state written; remote ones run in the agent on the target host."""
    build(pair.initiator, {"from_initiator": "i"})
    env = {key: recorder(pair, key) for key in KEYS if key.split("_")[0].lower() in sides(pair)}
    r = pair.run(env=env, expect=0)
    ran = records(pair)
    assert [name for name, _, _, _ in ran] == [key for key in KEYS if key in env], ran
    for name, process, replicas, state in ran:
        if name.startswith("REMOTE"):
            assert process == "osync-agent", (name, process)
        else:
            assert process != "osync-agent", (name, process)
        if "BEFORE" in name:
            assert "from_initiator" in replicas and WORKDIR not in replicas, (name, replicas)
            assert replicas.count("from_initiator") == 1, (name, replicas)   # not on the target yet
        else:
            assert replicas.count("from_initiator") == 2, (name, replicas)
            assert "quicksync_task" in state, (name, state)
    log = log_text(pair)
    assert "not available" not in log, log
    for key in env:
        assert "Running %s [" % key in log and "%s succeeded." % key in log, log
    # the output of a command that succeeded: only with --verbose
    assert "\n  hello-from-" not in log and "\n  hello-from-" not in r.output, log
    pair.run("--verbose", env=env, expect=0)
    for key in env:
        assert "  hello-from-%s" % key in log_text(pair), log_text(pair)


@pytest.mark.parametrize("side", ["local", "remote"])
@pytest.mark.parametrize("after_on_error", ["no", "yes"])
def test_a_failing_before_command_stops_the_run(pair, side, after_on_error):
    need_side(pair, side)
    build(pair.initiator, {"from_initiator": "i"})
    after = pair.base / "after-ran"
    env = {key_of(side, "BEFORE"): "echo why-it-failed; exit 4", "LOCAL_RUN_AFTER_CMD": "touch '%s'" % after,
           "RUN_AFTER_CMD_ON_ERROR": after_on_error}
    r = pair.run(env=env, expect=1)
    assert not (pair.target / "from_initiator").exists()
    assert not (pair.initiator / WORKDIR).exists() and not (pair.target / WORKDIR).exists()
    log = log_text(pair)
    assert "%s on " % key_of(side, "BEFORE") in log and "failed with exit code 4" in log, log
    assert "  why-it-failed" in log, log
    assert "Stopping on command execution error" in r.output and "STOP_ON_CMD_ERROR" in r.output, r.output
    assert after.exists() == (after_on_error == "yes"), log


@pytest.mark.parametrize("side", ["local", "remote"])
@pytest.mark.parametrize("after_on_error", ["no", "yes"])
def test_without_STOP_ON_CMD_ERROR_a_failing_before_command_is_an_error_and_the_sync_goes_on(
        pair, side, after_on_error):
    need_side(pair, side)
    build(pair.initiator, {"from_initiator": "i"})
    after = pair.base / "after-ran"
    env = {key_of(side, "BEFORE"): "false", "STOP_ON_CMD_ERROR": "no",
           key_of(side, "AFTER"): "touch '%s'" % after, "RUN_AFTER_CMD_ON_ERROR": after_on_error}
    pair.run(env=env, expect=1)
    assert (pair.target / "from_initiator").read_text() == "i"
    assert after.exists() == (after_on_error == "yes"), log_text(pair)
    if after_on_error == "no":
        assert "The after commands are not run: the run had errors" in log_text(pair)


@pytest.mark.local_only
@pytest.mark.parametrize("after_on_error", ["no", "yes"])
def test_after_commands_on_a_run_with_warnings_only_with_RUN_AFTER_CMD_ON_ERROR(pair, after_on_error):
    """osync issue #197: warnings count as errors for RUN_AFTER_CMD_ON_ERROR."""
    after = pair.base / "after-ran"
    env = {"LOCAL_RUN_AFTER_CMD": "touch '%s'" % after, "RUN_AFTER_CMD_ON_ERROR": after_on_error,
           "MINIMUM_SPACE": str(2 ** 40)}
    pair.run(env=env, expect=2)
    assert after.exists() == (after_on_error == "yes"), log_text(pair)
    skipped = "The after commands are not run: the run had warnings (RUN_AFTER_CMD_ON_ERROR=yes runs them anyway)."
    assert (skipped in log_text(pair)) == (after_on_error == "no"), log_text(pair)


def process_alive(pid):
    """A process that still runs (a zombie waiting for its parent's reaper is dead)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.remote_newest
@pytest.mark.parametrize("side", ["local", "remote"])
def test_a_command_past_its_time_limit_is_killed_with_its_children(pair, side):
    need_side(pair, side)
    build(pair.initiator, {"from_initiator": "i"})
    pid_file = pair.base / "background.pid"
    env = {key_of(side, "BEFORE"): "sleep 300 & echo $! > '%s'; echo started; sleep 300" % pid_file,
           "MAX_EXEC_TIME_PER_CMD_BEFORE": "2"}
    started = time.time()
    pair.run(env=env, expect=1)
    assert time.time() - started < 30
    log = log_text(pair)
    assert "ran past its time limit (MAX_EXEC_TIME_PER_CMD_BEFORE=2 seconds)" in log, log
    assert "  started" in log, log
    assert not (pair.target / "from_initiator").exists()
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while process_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not process_alive(pid), "the background child %d of the command is still running" % pid


def test_a_dry_run_runs_no_command(pair):
    build(pair.initiator, {"from_initiator": "i"})
    env = {key: "touch '%s'" % (pair.base / key) for key in KEYS if key.split("_")[0].lower() in sides(pair)}
    pair.run("--dry", env=env, expect=0)
    log = log_text(pair)
    for key in env:
        assert not (pair.base / key).exists(), key
        assert "Dry run: %s [" % key in log and "is not run" in log, log
    assert not (pair.target / "from_initiator").exists()


@pytest.mark.parametrize("side", ["local", "remote"])
def test_the_output_of_a_failing_command_is_logged_bounded_and_printable(pair, side):
    need_side(pair, side)
    command = "head -c 100000 /dev/zero | tr '\\0' x; printf '\\nwhy: \\033]0;title\\007 it failed\\n' >&2; exit 3"
    pair.run(env={key_of(side, "AFTER"): command}, expect=1)
    log = log_text(pair)
    assert "%s on " % key_of(side, "AFTER") in log and "failed with exit code 3." in log, log
    assert "  why: \\x1b]0;title\\x07 it failed" in log, log
    assert "\x1b" not in log and "\x07" not in log
    assert log.count("x") < 20000, "the output is not bounded in the log"


@pytest.fixture
def filter_key(pair):
    """A key authorized for root only through ssh_filter.py with TOKEN."""
    if not pair.kind.startswith("remote"):
        pytest.skip("ssh_filter.py guards a remote target")
    return ssh_filter_key(pair.sshd, "id_hooks_filter", TOKEN)


def test_remote_commands_run_through_ssh_filter(pair, filter_key):
    """The commands travel inside the agent's protocol: the filter lets them through, and
    they run with the environment the bootstrap gave the agent."""
    key = filter_key
    build(pair.initiator, {"from_initiator": "i"})
    env = {"REMOTE_RUN_BEFORE_CMD": "echo $_REMOTE_TOKEN > '%s'" % (pair.base / "before"),
           "REMOTE_RUN_AFTER_CMD": "touch '%s'" % (pair.base / "after")}
    pair.run("--rsakey=%s" % key, "--remote-token=%s" % TOKEN, env=env, expect=0)
    assert (pair.base / "before").read_text().strip() == TOKEN
    assert (pair.base / "after").exists()
    assert (pair.target / "from_initiator").read_text() == "i"


@pytest.mark.parametrize("reply", ["['not', 'a', 'result']", "[0, False, 'x' * 100000]", "[True, False, '']"])
def test_a_reply_of_the_wrong_shape_to_a_remote_command_ends_the_run(pair, reply):
    """The agent's reply is checked like every other: its output is bounded, its fields typed."""
    if not pair.kind.startswith("remote"):
        pytest.skip("the hostile agent needs a remote target")
    from test_hostile_agent import HOST, hostile_python
    build(pair.initiator, {"from_initiator": "i"})
    patch = "LocalReplica.run_hook = lambda self, command, timeout: %s\n" % reply
    env = {"REMOTE_PYTHON": hostile_python(pair, patch), "REMOTE_RUN_BEFORE_CMD": "true",
           "STOP_ON_CMD_ERROR": "no"}
    r = pair.run(env=env, expect=1)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and HOST in errors[0] and "run_hook" in errors[0], r.stderr
    assert "wrong shape" in errors[0], r.stderr
    assert not (pair.target / "from_initiator").exists()


@pytest.mark.local_only
def test_remote_commands_with_a_local_target_are_ignored_with_a_warning(pair):
    """As osync v1.3: "Ignoring remote command" (a warning, exit code 2), nothing run."""
    ran = pair.base / "remote-ran"
    env = {"REMOTE_RUN_BEFORE_CMD": "touch '%s'" % ran, "REMOTE_RUN_AFTER_CMD": "touch '%s'" % ran,
           "RUN_AFTER_CMD_ON_ERROR": "yes"}
    r = pair.run(env=env, expect=2)
    assert not ran.exists()
    for key in ("REMOTE_RUN_BEFORE_CMD", "REMOTE_RUN_AFTER_CMD"):
        assert "Ignoring %s: the target is a local directory, not a remote host." % key in r.output, r.output


@pytest.mark.parametrize("side", ["local", "remote"])
def test_a_stop_during_a_before_command_kills_it_and_runs_the_after_commands_when_asked(pair, side):
    """SIGTERM while a before command runs: the run stops cleanly (no traceback, nothing
    synced), and with RUN_AFTER_CMD_ON_ERROR this host's after command still runs."""
    need_side(pair, side)
    build(pair.initiator, {"from_initiator": "i"})
    after = pair.base / "after-ran"
    pause = "60.%d" % secrets.randbelow(10 ** 6)
    env = {key_of(side, "BEFORE"): "sleep %s" % pause, "LOCAL_RUN_AFTER_CMD": "touch '%s'" % after,
           "RUN_AFTER_CMD_ON_ERROR": "yes"}
    started = time.time()
    process = pair.popen(env=env)
    deadline = time.time() + 30
    while "Running %s" % key_of(side, "BEFORE") not in log_text(pair) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    output = stdout + stderr
    assert process.returncode in (1, 2), output
    assert "Traceback" not in output and "Unexpected internal error" not in output, output
    assert "Stopped by signal SIGTERM" in log_text(pair), log_text(pair)
    assert after.exists(), log_text(pair)
    assert not (pair.target / "from_initiator").exists()
    assert time.time() - started < 8, "the stopped run waited for the command"
    deadline = time.time() + 10
    while sleeping_commands(pause) and time.time() < deadline:
        time.sleep(0.1)
    assert not sleeping_commands(pause), "the command outlived the run"


def sleeping_commands(pause):
    """The pids of the running `sleep PAUSE` processes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_alive(int(entry)):
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                    words = cmdline.read().split(b"\0")
            except OSError:
                continue
            if words[:2] == [b"sleep", pause.encode()]:
                found.append(int(entry))
    return found


def test_the_agent_serves_run_hook_from_any_request_stream(tmp_path):
    """run_hook is an operation of the agent's table; a request stream that cannot be
    watched (no file descriptor) still gets the command's answer."""
    import io
    sys.path.insert(0, str(REPO))
    import osync
    reader, writer = io.BytesIO(), io.BytesIO()
    osync.send_message(reader, {"op": "open", "args": ["target", str(tmp_path), ""]})
    osync.send_message(reader, {"op": "run_hook", "args": ["echo out; echo err >&2; exit 3", 10]})
    reader.seek(0)
    osync.serve_agent(reader, writer)
    writer.seek(0)
    osync.read_message(writer)
    assert osync.read_message(writer) == {"ok": [3, False, "out\nerr\n"]}
