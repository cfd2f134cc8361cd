"""Monitor mode (--on-changes) and the target helper (--on-changes-target).

The monitor runs as a service would run it, in the background; the tests edit either
replica and wait, with a deadline, for the change to arrive on the other one.  MIN_WAIT
is 1 second so each change is due within a few seconds; syncs are counted in the log
("#### Monitor: sync N starts")."""

import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import check_no_internal_error, free_port, need, popen_osync, rsync_wrapper, shell_quote

REMOTE_KINDS = ("remote", "remote-newest")
SYNC_STARTS = re.compile(r"#### Monitor: sync (\d+) starts \((.*)\)\.")
SYNC_ENDS = re.compile(r"#### Monitor: sync (\d+) (succeeded|failed|finished with warnings)\.")
ARRIVAL_SECONDS = 1 + 6        # MIN_WAIT plus a few seconds (ssh and Python 3.6 on a busy machine)


def wait_until(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


def child_pids(pid):
    """The pids of the processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/status" % entry) as status:
                for line in status:
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == pid:
                            found.append(int(entry))
                        break
        except OSError:
            continue
    return found


def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return []


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


class Background:
    """An osync.py monitor (or target helper) running in the background, its output in a file."""

    def __init__(self, pair, argv, env, logfile, prefix=()):
        self.pair = pair
        self.logfile = Path(logfile)
        self.output_path = self.logfile.with_name(self.logfile.name + ".out")
        self.output = open(str(self.output_path), "wb")
        self.process = popen_osync(argv, env, pair.cwd, pair.interpreter, prefix=prefix, stdout=self.output,
                                   stderr=subprocess.STDOUT, universal_newlines=False)

    @property
    def pid(self):
        return self.process.pid

    def log(self):
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def started(self):
        return [(int(number), reason) for number, reason in SYNC_STARTS.findall(self.log())]

    def finished(self):
        return [(int(number), result) for number, result in SYNC_ENDS.findall(self.log())]

    def wait_synced(self, count, timeout=30):
        """Wait until `count` syncs have finished."""
        wait_until(lambda: len(self.finished()) >= count or self.process.poll() is not None, timeout,
                   "sync %d to finish%s" % (count, self.describe()))
        assert self.process.poll() is None, "the monitor ended" + self.describe()

    def describe(self):
        out = self.output_path.read_text(errors="replace") if self.output_path.exists() else ""
        return "\n--- monitor output ---\n%s\n--- log ---\n%s" % (out[-3000:], self.log()[-3000:])

    def stop(self, sig=signal.SIGTERM, within=3.0):
        """Send `sig`; the monitor must end within `within` seconds with exit code 0."""
        if self.process.poll() is not None:
            raise AssertionError("the monitor had already ended" + self.describe())
        children = child_pids(self.pid)
        started = time.time()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=within + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the monitor did not stop" + self.describe())
        took = time.time() - started
        self.output.close()
        text = self.output_path.read_text(errors="replace") + self.log()
        assert "Traceback" not in text and "Unexpected internal error" not in text, self.describe()
        assert code == 0, "exit code %s%s" % (code, self.describe())
        assert took <= within, "took %.1fs to stop%s" % (took, self.describe())
        left = [pid for pid in children if os.path.exists("/proc/%d" % pid)
                and not open("/proc/%d/stat" % pid).read().split(")")[-1].split()[0] == "Z"]
        assert not left, "children left running: %s" % [command_line(pid) for pid in left]
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.output.close()


@pytest.fixture
def monitors():
    """Start monitors with start(...); whatever is still running at the end is killed."""
    started = []

    def start(pair, *args, env=None, conf=None, logfile=None, instance_id="conftask", prefix=()):
        keys = {"MIN_WAIT": 1, "MAX_WAIT": 0}
        keys.update(env or {})
        if logfile is not None:
            keys["LOGFILE"] = logfile
        if hasattr(pair, "_with_quick_env") and conf is None:
            keys = pair._with_quick_env(keys)
        environment = pair.env(keys)
        if conf is not None:
            argv = [str(conf), "--non-interactive"] + list(args)
        else:
            argv = pair.quick_args(instance_id=instance_id) + list(args)
        monitor = Background(pair, argv, environment, environment["LOGFILE"], prefix=prefix)
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        monitor.kill()


def locks(pair):
    return [path for path in (pair.lock("initiator"), pair.lock("target")) if path.exists()]


def arrives(path, content=None, timeout=ARRIVAL_SECONDS):
    """Wait until `path` holds `content` (None: until it is gone)."""
    def there():
        if content is None:
            return not os.path.lexists(str(path))
        return path.is_file() and path.read_text() == content
    wait_until(there, timeout, "%s to %s" % (path, "go" if content is None else "hold %r" % content))


def is_remote(pair):
    return pair.kind in REMOTE_KINDS


# -- changes on each side ----------------------------------------------------------------------

@pytest.mark.remote_newest
def test_changes_on_each_side_arrive(pair, monitors):
    """Create, edit, rename and delete on either replica: each change reaches the other
    within MIN_WAIT plus a few seconds, the syncs' own writes start no further sync, and
    a remote target is reached over one ssh connection for the whole session."""
    for side in pair.roots:
        (side / ("old-" + side.name)).write_text("old\n")
    mark = pair.sshd.mark() if is_remote(pair) else None
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    for side in ("initiator", "target"):
        here, there = pair.root(side), pair.root(pair.other(side))
        old = "old-" + here.name
        arrives(there / old, "old\n")
        (here / "new.txt").write_text("created on the %s\n" % side)
        (here / side).mkdir()
        (here / side / "deep").write_text("deep\n")
        arrives(there / "new.txt", "created on the %s\n" % side)
        arrives(there / side / "deep", "deep\n")
        (here / "new.txt").write_text("edited on the %s, longer\n" % side)
        arrives(there / "new.txt", "edited on the %s, longer\n" % side)
        os.rename(str(here / "new.txt"), str(here / "renamed.txt"))
        (here / old).unlink()
        arrives(there / "renamed.txt", "edited on the %s, longer\n" % side)
        arrives(there / "new.txt", None)
        arrives(there / old, None)
        assert (pair.deleted(pair.other(side)) / old).read_text() == "old\n", "a deletion is a soft deletion"
        (here / "renamed.txt").unlink()
        arrives(there / "renamed.txt", None)

    syncs = len(monitor.started())
    time.sleep(2.5)   # the syncs' own writes on both replicas
    assert len(monitor.started()) == syncs, "the monitor synced its own writes again" + monitor.describe()
    if mark is not None:
        assert pair.sshd.connections(mark) == 1, "a new ssh connection per sync" + monitor.describe()
    monitor.stop()
    assert locks(pair) == []


def test_edit_during_a_sync_is_synced_by_the_next(pair, monitors, tmp_path):
    """A file edited while a sync is going on (after its scan) is synced by the next sync."""
    calls = tmp_path / "rsync-calls"
    slow = tmp_path / "slow"
    env = rsync_wrapper(tmp_path, "[ -e %s ] && { echo call >> %s; sleep 1.5; }"
                        % (shell_quote(slow), shell_quote(calls)))
    (pair.initiator / "during").write_text("before\n")
    monitor = monitors(pair, "--on-changes", env=env)
    monitor.wait_synced(1)
    arrives(pair.target / "during", "before\n")
    syncs = len(monitor.finished())

    slow.write_text("")
    (pair.initiator / "trigger").write_text("go\n")
    wait_until(calls.exists, 15, "the next sync to run rsync")
    assert len(monitor.finished()) == syncs, "the sync ended before the edit"
    (pair.initiator / "during").write_text("edited during the sync\n")
    slow.unlink()
    arrives(pair.target / "trigger", "go\n", timeout=15)
    arrives(pair.target / "during", "edited during the sync\n", timeout=15)
    monitor.stop()


def test_excluded_paths_and_own_writes_start_no_sync(pair, monitors):
    """A change of an excluded path, on either replica, never starts a sync; a real change
    starts exactly one."""
    monitor = monitors(pair, "--on-changes", env={"RSYNC_EXCLUDE_PATTERN": "*.tmp;cache"})
    monitor.wait_synced(1)
    for root in pair.roots:
        (root / "scratch.tmp").write_text("x\n")
        (root / "cache").mkdir()
        (root / "cache" / "blob").write_text("x\n")
        (root / "cache" / "blob").write_text("xy\n")
    time.sleep(2.5)
    assert len(monitor.started()) == 1, "an excluded path started a sync" + monitor.describe()

    (pair.initiator / "real").write_text("real\n")
    arrives(pair.target / "real", "real\n")
    time.sleep(2.5)
    assert len(monitor.started()) == 2, "one change, one sync" + monitor.describe()
    monitor.stop()


@pytest.mark.local_only
def test_max_wait_forces_a_sync(pair, monitors):
    """With no change at all, MAX_WAIT seconds after the last sync the monitor syncs anyway."""
    monitor = monitors(pair, "--on-changes", env={"MAX_WAIT": 2})
    monitor.wait_synced(1)
    monitor.wait_synced(2, timeout=8)
    assert "MAX_WAIT (2 seconds) passed without changes" in monitor.started()[1][1]
    monitor.stop()


# -- stopping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["idle", "during-sync"])
def test_stop_signal_ends_cleanly(pair, monitors, tmp_path, when):
    """SIGTERM (idle) or SIGINT (in the middle of a sync) ends the monitor within 3 seconds
    with exit code 0, no lock on either replica and no child left."""
    calls = tmp_path / "rsync-calls"
    env = {}
    if when == "during-sync":
        env = rsync_wrapper(tmp_path, "[ -e %s ] && { echo call >> %s; sleep 30; }"
                            % (shell_quote(tmp_path / "slow"), shell_quote(calls)))
    monitor = monitors(pair, "--on-changes", env=env)
    monitor.wait_synced(1)
    assert len(watchers_of(pair)) == 2, "an inotifywait for each replica: %s" % watchers_of(pair)
    if when == "during-sync":
        (tmp_path / "slow").write_text("")
        (pair.initiator / "big").write_text("x\n")
        wait_until(calls.exists, 15, "a sync to run rsync")
        assert locks(pair), "the test means to stop a sync holding its locks"
        monitor.stop(signal.SIGINT)
    else:
        monitor.stop(signal.SIGTERM)
    assert locks(pair) == []
    assert "monitor stopped by signal" in monitor.log().lower()
    # Nothing watches either replica any more, on this host or (the same host) the target's.
    wait_until(lambda: not watchers_of(pair), 3, "the watchers to end: %s" % watchers_of(pair))


def watchers_of(pair):
    """Command lines of the inotifywait processes watching a replica of the pair."""
    roots = [str(root).encode() for root in pair.roots]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = command_line(int(entry))
            if argv[:1] == [b"inotifywait"] and any(root in argv for root in roots):
                found.append(argv)
    return found


# -- watchers ------------------------------------------------------------------------------------

def test_polling_fallback_without_inotifywait(pair, monitors, tmp_path):
    """With neither inotifywait nor fswatch on PATH (of this host and of a remote target's
    agent) the monitor polls both replicas, says so in one warning, and changes still
    arrive both ways."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name in ("inotifywait", "fswatch") or (bin_dir / name).exists():
                continue
            (bin_dir / name).symlink_to(os.path.join(directory, name))
    assert shutil.which("inotifywait", path=str(bin_dir)) is None
    env = {"PATH": str(bin_dir)}
    if is_remote(pair):   # the agent's host too: its Python runs with the same PATH
        wrapper = tmp_path / "python-without-inotifywait"
        wrapper.write_text("#!/bin/sh\nPATH=%s exec %s \"$@\"\n" % (shell_quote(bin_dir), shell_quote(pair.python)))
        wrapper.chmod(0o755)
        env["REMOTE_PYTHON"] = str(wrapper)
    monitor = monitors(pair, "--on-changes", env=env)
    monitor.wait_synced(1)
    warnings = [line for line in monitor.log().splitlines() if "watched by polling" in line]
    assert len(warnings) == 1, monitor.describe()
    assert "inotifywait" in warnings[0] and "initiator replica" in warnings[0] and "target replica" in warnings[0]
    (pair.initiator / "polled").write_text("seen by polling\n")
    arrives(pair.target / "polled", "seen by polling\n")
    (pair.target / "polled").write_text("and back\n")
    arrives(pair.initiator / "polled", "and back\n")
    monitor.stop()


def inotify_limited(watches):
    """A command prefix that runs a program in a user namespace of its own whose inotify
    watch limit is `watches` (the limit is per user namespace since Linux 4.9), so the
    test hits the real limit without lowering the host's."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                            "echo %d > /proc/sys/user/max_inotify_watches" % watches],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
    if probe.returncode != 0:
        need("cannot lower the inotify watch limit in a user namespace (unshare --user): %s"
             % probe.stderr.strip())
    return ["unshare", "--user", "--map-root-user", "sh", "-c",
            'echo %d > /proc/sys/user/max_inotify_watches && exec "$@"' % watches, "sh"]


def test_inotify_watch_limit_falls_back_to_polling(pair, monitors, tmp_path):
    """A tree with more directories than inotify may watch: inotifywait fails on the limit,
    the monitor says so in one warning (naming the sysctl to raise) and polls that replica,
    and its changes still arrive."""
    limited = inotify_limited(3)
    for root in pair.roots:
        for number in range(8):
            (root / ("dir%d" % number)).mkdir()
    env, prefix, polled = {}, limited, "initiator replica"
    if is_remote(pair):   # the target's host is the limited one: its agent runs in the namespace
        wrapper = tmp_path / "python-limited"
        wrapper.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (" ".join(shell_quote(word) for word in limited),
                                                                shell_quote(pair.python)))
        wrapper.chmod(0o755)
        env["REMOTE_PYTHON"] = str(wrapper)
        prefix, polled = (), "target replica"
    monitor = monitors(pair, "--on-changes", env=env, prefix=prefix)
    monitor.wait_synced(1)
    warnings = [line for line in monitor.log().splitlines() if "watched by polling" in line]
    assert len(warnings) == 1, monitor.describe()
    assert polled in warnings[0] and "inotify watch limit" in warnings[0] \
        and "fs.inotify.max_user_watches" in warnings[0], warnings[0]
    (pair.initiator / "dir7" / "from-initiator").write_text("one\n")
    arrives(pair.target / "dir7" / "from-initiator", "one\n")
    (pair.target / "dir6" / "from-target").write_text("two\n")
    arrives(pair.initiator / "dir6" / "from-target", "two\n")
    monitor.stop()


# -- the remote link -------------------------------------------------------------------------------

def test_remote_link_cut_and_restored(pair, monitors):
    """The ssh connection to the target dies: the monitor says so, connects again, and the
    target's changes arrive as before."""
    if not is_remote(pair):
        pytest.skip("only a remote target has a link to cut")
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    ssh = [pid for pid in child_pids(monitor.pid) if command_line(pid)[:1] == [b"ssh"]]
    assert ssh, "no ssh process under the monitor"
    for pid in ssh:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass   # the agent's session ended with the master connection killed just before
    wait_until(lambda: "was dropped" in monitor.log(), 10, "the monitor to see the link go" + monitor.describe())
    wait_until(lambda: "connected to 127.0.0.1 again" in monitor.log(), 15,
               "the monitor to connect again" + monitor.describe())
    (pair.target / "after-the-cut").write_text("still synced\n")
    arrives(pair.initiator / "after-the-cut", "still synced\n")
    monitor.stop()
    assert locks(pair) == []


# -- the target helper -------------------------------------------------------------------------------

def start_monitor_and_target_helper(pair, monitors):
    """The initiator's monitor (after its first sync) and, beside it, --on-changes-target
    with a config as the target host has it; returns (monitor, helper, push file)."""
    keys = pair.conf_keys()
    keys["INITIATOR_SYNC_DIR"] = pair.spec_for(pair.initiator)   # seen from the target host
    keys["TARGET_SYNC_DIR"] = str(pair.target)
    keys["MIN_WAIT"] = "1"
    keys["MAX_WAIT"] = "0"
    conf = pair.write_conf("helper.conf", keys=keys)
    monitor = monitors(pair, "--on-changes")
    monitor.wait_synced(1)
    helper = monitors(pair, "--on-changes-target", conf=conf, logfile=pair.base / "helper.log")
    return monitor, helper, pair.initiator / ".osync-update.push"


def test_target_helper_notifies_the_initiator_monitor(pair, monitors):
    """--on-changes-target on the target host appends INSTANCE_ID#time lines to the
    initiator's push file (over ssh for a remote initiator); the initiator's monitor syncs
    on it, and the push file itself is never synced."""
    monitor, helper, push = start_monitor_and_target_helper(pair, monitors)
    wait_until(lambda: push.exists() and push.read_text().count("\n") >= 1, 15, "the helper's first line"
               + helper.describe())
    assert re.match(r"^conftask#\d{8}T\d{6}\.\d{9}\n$", push.read_text()), push.read_text()
    wait_until(lambda: any("push file" in reason for _, reason in monitor.started()), ARRIVAL_SECONDS,
               "a sync started by the push file" + monitor.describe())

    (pair.target / "from-target").write_text("helped\n")
    wait_until(lambda: push.read_text().count("\n") >= 2, ARRIVAL_SECONDS, "the helper's second line"
               + helper.describe())
    arrives(pair.initiator / "from-target", "helped\n")
    assert "should be notified of file changes now" in helper.log()
    helper.stop()
    monitor.stop()
    assert not (pair.target / ".osync-update.push").exists(), "the push file was synced"


# -- a failed sync --------------------------------------------------------------------------------------

class Inbox:
    def __init__(self):
        self.mails = []

    async def handle_DATA(self, server, session, envelope):
        self.mails.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture
def inbox():
    """A plain SMTP server on loopback; yields (inbox, port)."""
    try:
        import aiosmtpd.controller
    except ImportError:
        need("aiosmtpd is not installed: tests/run installs it (pip install aiosmtpd)")
    box = Inbox()
    port = free_port()
    controller = aiosmtpd.controller.Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.mark.local_only
def test_failed_sync_is_mailed_and_the_monitor_goes_on(pair, monitors, inbox, tmp_path):
    """A sync whose rsync fails is logged and mailed with that sync's log lines, and the
    monitor syncs the next change as usual."""
    box, port = inbox
    broken = tmp_path / "broken"
    env = rsync_wrapper(tmp_path, "[ -e %s ] && exit 12" % shell_quote(broken))
    env.update({"DESTINATION_MAILS": "ops@example.test", "SENDER_MAIL": "osync@example.test",
                "SMTP_SERVER": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_ENCRYPTION": "none"})
    monitor = monitors(pair, "--on-changes", env=env)
    monitor.wait_synced(1)
    broken.write_text("")
    (pair.initiator / "fails").write_text("x\n")
    monitor.wait_synced(2, timeout=15)
    assert monitor.finished()[1] == (2, "failed"), monitor.describe()
    wait_until(lambda: box.mails, 10, "the alert mail")
    assert [str(mail["Subject"]) for mail in box.mails] == ["Finished run - Error alert for conftask"]
    body = box.mails[0].get_body(("plain",)).get_content()
    assert "sync 2 starts" in body and "sync 1 starts" not in body, body

    broken.unlink()
    (pair.initiator / "works").write_text("y\n")
    arrives(pair.target / "works", "y\n")
    arrives(pair.target / "fails", "x\n")
    wait_until(lambda: any(number > 2 and result == "succeeded" for number, result in monitor.finished()), 10,
               "a later sync to succeed" + monitor.describe())
    monitor.stop()


# -- service manager ---------------------------------------------------------------------------------

@pytest.mark.local_only
def test_notify_socket_messages(pair, monitors):
    """With NOTIFY_SOCKET (an abstract name) and WATCHDOG_USEC the monitor sends READY=1
    after the first sync, STATUS= after each sync, and WATCHDOG=1 at half the interval."""
    name = "osync-test-%s" % uuid.uuid4().hex
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(0.2)
    messages = []

    def received(text):
        def check():
            try:
                while True:
                    messages.append(receiver.recv(4096).decode())
            except socket.timeout:
                pass
            return any(text in message for message in messages)
        return check
    try:
        monitor = monitors(pair, "--on-changes", env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        wait_until(received("READY=1"), 20, "READY=1")
        assert any(message.startswith("STATUS=Sync 1 succeeded") for message in messages), messages
        wait_until(lambda: received("WATCHDOG=1")() and sum("WATCHDOG=1" in m for m in messages) >= 3, 5,
                   "three WATCHDOG=1")
        (pair.initiator / "more").write_text("x\n")
        wait_until(received("STATUS=Sync 2 succeeded"), ARRIVAL_SECONDS, "the status of sync 2")
        assert sum(message == "READY=1" for message in messages) == 1
        monitor.stop()
    finally:
        receiver.close()


# -- long running -----------------------------------------------------------------------------------

@pytest.mark.local_only
def test_memory_stays_flat_over_many_syncs(pair, monitors):
    """35 change-and-sync cycles: the monitor's resident memory does not grow by more than
    a few MiB after the first ones."""
    monitor = monitors(pair, "--on-changes", env={"MIN_WAIT": 0})
    monitor.wait_synced(1)
    baseline = None
    for cycle in range(35):
        done = len(monitor.finished())
        (pair.initiator / ("file%02d" % (cycle % 5))).write_text("cycle %d\n" % cycle)
        monitor.wait_synced(done + 1, timeout=15)
        if cycle == 5:
            baseline = rss_kib(monitor.pid)
    grown = rss_kib(monitor.pid) - baseline
    assert grown < 3 * 1024, "RSS grew by %d KiB over 30 syncs" % grown
    monitor.stop()


# -- configs that cannot work ---------------------------------------------------------------------------

def test_config_that_cannot_work_ends_at_start(pair, tmp_path):
    """A replica that does not exist ends the monitor at once: exit 1, one sentence naming it."""
    missing = tmp_path / "no-such-dir"
    keys = {"MIN_WAIT": 1}
    if hasattr(pair, "_with_quick_env"):
        keys = pair._with_quick_env(keys)
    argv = pair.quick_args(target_spec=pair.spec_for(missing)) + ["--on-changes"]
    process = popen_osync(argv, pair.env(keys), pair.cwd, pair.interpreter)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    result.output = stdout + stderr
    check_no_internal_error(result)
    assert process.returncode == 1, result.output
    assert str(missing) in result.output and "does not exist" in result.output, result.output
    assert not missing.exists()


# -- a hostile target host ------------------------------------------------------------------------------

HOSTILE_WRAPPER = '''#!{python}
import sys
size = int(sys.argv[-1])
source = sys.stdin.buffer.read(size) + b"\\n" + {patch!r}.encode("utf-8")
namespace = {{"__name__": "osync_agent"}}
exec(compile(source, "osync.py", "exec"), namespace)
namespace["agent_main"]()
'''

# Appended to the agent's source: every answer to take_changes names a path outside the replica.
LYING_CHANGES = '''
_real_take_changes = LocalReplica.take_changes
def _lying_take_changes(self, wait_seconds):
    paths, overflow = _real_take_changes(self, wait_seconds)
    return [["../outside"] + paths, overflow]
LocalReplica.take_changes = _lying_take_changes
'''


def test_hostile_agent_changes_are_refused(pair, monitors):
    """A target agent that answers take_changes with a path outside its replica is
    refused with a sentence naming the host and its connection dropped; the monitor tries
    again, waiting longer each time, and stops cleanly."""
    if not is_remote(pair):
        pytest.skip("the hostile agent needs a remote target")
    python = pair.base / "hostile-python"
    python.write_text(HOSTILE_WRAPPER.format(python=pair.python, patch=LYING_CHANGES))
    python.chmod(0o755)
    monitor = monitors(pair, "--on-changes", env={"REMOTE_PYTHON": str(python)})
    monitor.wait_synced(1)
    wait_until(lambda: "sent an invalid path" in monitor.log(), 10, "the lie to be refused" + monitor.describe())
    line = [text for text in monitor.log().splitlines() if "sent an invalid path" in text][0]
    assert "127.0.0.1" in line and "take_changes" in line and "../outside" in line, line
    assert "trying again in 1 second." in line, "the connection is dropped and tried again: " + line
    wait_until(lambda: "trying again in 2 seconds." in monitor.log(), 15, "the wait to double" + monitor.describe())
    monitor.stop()
