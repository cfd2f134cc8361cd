#!/usr/bin/env python3
"""Time osync.py against a one-way `rsync -a` and `unison` on the same trees, in the same run.

Cases (each local, or over ssh to a throwaway sshd on 127.0.0.1 that this script starts):
  initial   the initiator holds the tree, the target is empty, no sync state;
  nochange  both replicas in sync, the state of the previous sync at hand (the cron case);
  changed   1% of the files edited on each side since the last sync (make_tree.apply_edits);
  deleted   every top-level directory of the initiator deleted since the last sync (nearly
            the whole tree: the memory of a run that deletes a million paths); one round,
            last, and only when asked (--scenario deleted), since it uses the trees up.
The tools take turns inside every round (the order rotates from round to round), each
case runs --rounds times and the table shows medians, ratios to rsync and peak memory.

    nice -n 10 python3 bench/run.py --files 10k                  # all default cases
    nice -n 10 python3 bench/run.py --files 100k --json out.json
    nice -n 10 python3 bench/run.py --files 1M --scale 0.05 --tools osync --scenario nochange-local
    nice -n 10 python3 bench/run.py --files 100k --profile       # cProfile of the no-change run
    nice -n 10 python3 bench/run.py --files 100k --compare-osync ../osync-old   # an older checkout beside

Python 3 standard library only; see bench/README.md for what exactly is measured.
"""

import argparse
import getpass
import io
import json
import os
import platform
import pstats
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_tree  # noqa: E402  (the sibling module, found through the line above)

OSYNC = os.path.normpath(os.path.join(HERE, "..", "osync.py"))
ALL_TOOLS = ("rsync", "unison", "osync")
COMPARED_OSYNC = "osync-before"      # --compare-osync: another osync.py, timed in the same run
TOOL_TITLES = {"rsync": "rsync -a", "unison": "unison", "osync": "osync.py", COMPARED_OSYNC: "osync.py before"}
ALL_CASES = ("initial-local", "initial-ssh", "nochange-local", "nochange-ssh", "changed-local", "changed-ssh",
             "deleted-local", "deleted-ssh")
DEFAULT_CASES = ("initial-local", "nochange-local", "nochange-ssh", "changed-local", "changed-ssh")
CASE_TITLES = {"initial": "initial sync", "nochange": "no change", "changed": "1% changed on each side",
               "deleted": "the whole tree deleted on one side"}
# Entries at a replica's root that are a tool's own state, not data.
TOOL_STATE = (".osync_workdir",)
POLL_SECONDS = 0.05

# GNU time runs a command and appends the peak resident memory of it (or of the largest
# of its descendants) in KiB, as wait4 reports it, to a file.  It is small, so it adds
# little to the figure: a child's peak starts from what its parent held when it forked.
GNU_TIME = "/usr/bin/time"
# The same in Python, where GNU time is missing (its floor is Python's own size, ~8 MiB).
RSS_WRAPPER = r"""
import os, sys
out_file, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out_file, "a") as handle:
    handle.write("%d\n" % usage.ru_maxrss)
if os.WIFSIGNALED(status):
    sys.exit(128 + os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def log(message):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), message), file=sys.stderr, flush=True)


def parse_count(text):
    """'10k' -> 10000, '1M' -> 1000000, '2500' -> 2500."""
    text = text.strip().lower()
    factor = 1
    if text.endswith("k"):
        text, factor = text[:-1], 1000
    elif text.endswith("m"):
        text, factor = text[:-1], 1000000
    return int(float(text) * factor)


def parse_cases(text):
    """'nochange' means both of its modes; 'all' every case; 'changed-ssh' just that one."""
    cases = []
    for word in text.split(","):
        word = word.strip()
        if word == "all":
            names = list(ALL_CASES)
        elif word in ALL_CASES:
            names = [word]
        elif word + "-local" in ALL_CASES:
            names = [word + "-local", word + "-ssh"]
        else:
            raise argparse.ArgumentTypeError("unknown scenario %r (choose from all, initial, nochange, changed, "
                                             "or one of %s)" % (word, ", ".join(ALL_CASES)))
        cases += [name for name in names if name not in cases]
    return [name for name in ALL_CASES if name in cases]     # the order runs need


def parse_tools(text):
    tools = [word.strip() for word in text.split(",") if word.strip()]
    for tool in tools:
        if tool not in ALL_TOOLS:
            raise argparse.ArgumentTypeError("unknown tool %r (choose from %s)" % (tool, ", ".join(ALL_TOOLS)))
    return tools


def first_line(argv):
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else None


def remove_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def delete_directories(root):
    """The "deleted" case's edit: every top-level directory of root (tool state kept),
    so that nearly the whole tree goes while the replica is not empty."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name not in TOOL_STATE and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)


def snapshot(root):
    """{relative path: size} of the regular files under root, tool state left out."""
    found = {}
    for directory, subdirectories, files in os.walk(root):
        if directory == root:
            subdirectories[:] = [name for name in subdirectories if name not in TOOL_STATE]
        for name in files:
            full = os.path.join(directory, name)
            found[os.path.relpath(full, root)] = os.lstat(full).st_size
    return found


# --------------------------------------------------------------------------------------
# Running one command: wall time, and peak memory of the processes that matter
# --------------------------------------------------------------------------------------

def read_hwm_kib(pid):
    """VmHWM (peak resident set) of a live process in KiB, None once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def child_pids(pid):
    pids = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return pids
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as handle:
                pids += [int(word) for word in handle.read().split()]
        except (OSError, ValueError):
            pass
    return pids


def process_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as handle:
            return handle.read().strip()
    except OSError:
        return None


class PeakWatcher(threading.Thread):
    """Reads VmHWM of the measured command (the child of the memory launcher) and of any
    osync-agent below it while it runs.  VmHWM only grows, so the last reading before
    the end is the peak, give or take what is allocated in the last POLL_SECONDS."""

    def __init__(self, launcher_pid):
        threading.Thread.__init__(self, daemon=True)
        self.launcher_pid = launcher_pid
        self.pid = None
        self.peak_kib = None
        self.agent_peak_kib = None
        self.finished = threading.Event()

    def run(self):
        while not self.finished.is_set():
            if self.pid is None:
                children = child_pids(self.launcher_pid)
                self.pid = children[0] if children else None
            if self.pid is not None:
                value = read_hwm_kib(self.pid)
                if value is not None:
                    self.peak_kib = max(self.peak_kib or 0, value)
                pending = child_pids(self.pid)
                while pending:
                    pid = pending.pop()
                    if process_name(pid) == "osync-agent":
                        value = read_hwm_kib(pid)
                        if value is not None:
                            self.agent_peak_kib = max(self.agent_peak_kib or 0, value)
                    pending += child_pids(pid)
            self.finished.wait(POLL_SECONDS)


def read_peaks(path):
    """The peaks (MiB) a memory launcher appended to path, which is then removed."""
    peaks = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                if line.strip().isdigit():
                    peaks.append(int(line) / 1024.0)
        os.unlink(path)
    return peaks


def run_measured(launcher, argv, env, log_path, peak_file, watch=False):
    """Run argv to its end behind the memory launcher: {"seconds", "rc", "tree_mib" (the
    largest peak of the command and its descendants), and with watch "own_mib" (the
    command alone) and "local_agent_mib" (an osync-agent child process, if any)}."""
    with open(log_path, "ab") as log_file:
        log_file.write(("$ %s\n" % " ".join(shlex.quote(arg) for arg in argv)).encode("utf-8", "replace"))
        log_file.flush()
        started = time.perf_counter()
        process = subprocess.Popen(launcher(peak_file) + argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        watcher = None
        if watch:
            watcher = PeakWatcher(process.pid)
            watcher.start()
        process.wait()
        seconds = time.perf_counter() - started
        if watcher:
            watcher.finished.set()
            watcher.join()
    peaks = read_peaks(peak_file)
    result = {"seconds": seconds, "rc": process.returncode, "tree_mib": max(peaks) if peaks else None}
    if watcher:
        result["own_mib"] = watcher.peak_kib / 1024.0 if watcher.peak_kib else None
        result["local_agent_mib"] = watcher.agent_peak_kib / 1024.0 if watcher.agent_peak_kib else None
    return result


# --------------------------------------------------------------------------------------
# A throwaway sshd on 127.0.0.1
# --------------------------------------------------------------------------------------

def free_port(preferred=0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as sshd does; TIME_WAIT is fine
    try:
        sock.bind(("127.0.0.1", preferred))
        return sock.getsockname()[1]
    finally:
        sock.close()


class ThrowawaySshd:
    """sshd -D on a free loopback port with its own host key, one user key authorized
    for the current user, and a known_hosts file; stopped (and its dir removed) at the end."""

    def __init__(self, directory, port=0):
        self.dir = directory
        remove_tree(directory)           # keys left by a run kept with --keep
        os.makedirs(directory)
        self.port = free_port(port)
        self.user = getpass.getuser()
        self.host_key = os.path.join(directory, "host_key")
        self.key = os.path.join(directory, "user_key")
        for path in (self.host_key, self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "osync-bench", "-f", path],
                           check=True, stdin=subprocess.DEVNULL)
        authorized = os.path.join(directory, "authorized_keys")
        shutil.copyfile(self.key + ".pub", authorized)
        with open(self.host_key + ".pub") as handle:
            key_type, key_blob = handle.read().split()[:2]
        self.known_hosts = os.path.join(directory, "known_hosts")
        with open(self.known_hosts, "w") as handle:
            handle.write("[127.0.0.1]:%d %s %s\n" % (self.port, key_type, key_blob))
        self.config = os.path.join(directory, "sshd_config")
        with open(self.config, "w") as handle:
            handle.write("\n".join([
                "ListenAddress 127.0.0.1:%d" % self.port,
                "HostKey %s" % self.host_key,
                "AuthorizedKeysFile %s" % authorized,
                "PidFile %s" % os.path.join(directory, "sshd.pid"),
                "StrictModes no", "UsePAM no", "PermitRootLogin yes", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PrintMotd no", "UseDNS no",
                "MaxSessions 50", "MaxStartups 100", "LogLevel ERROR", ""]))
        self.process = None

    def start(self):
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.log = open(os.path.join(self.dir, "sshd.log"), "ab")
        self.process = subprocess.Popen([sshd, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=self.log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit("sshd exited at once (code %s); see %s/sshd.log" % (self.process.returncode, self.dir))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise SystemExit("sshd did not listen on 127.0.0.1:%d within 20 s" % self.port)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.process:
            self.log.close()

    def trust_options(self):
        """Trust this sshd's host key, and nothing else; never ask for a password."""
        return ["-o", "BatchMode=yes", "-o", "UserKnownHostsFile=%s" % self.known_hosts,
                "-o", "StrictHostKeyChecking=yes"]

    def ssh_options(self):
        return ["-F", "/dev/null", "-i", self.key, "-o", "IdentitiesOnly=yes"] + self.trust_options()

    def ssh_command(self):
        return ["ssh", "-p", str(self.port)] + self.ssh_options()


# --------------------------------------------------------------------------------------
# The tools: each syncs the pair INITIATOR ("a") and TARGET ("b") of its own directory
# --------------------------------------------------------------------------------------

class Tool:
    name = "?"

    def __init__(self, bench, home):
        self.bench = bench
        self.home = home
        self.a = os.path.join(home, "a")
        self.b = os.path.join(home, "b")
        self.synced_mode = None      # the mode of the last sync, None before the first

    def forget_state(self):
        """Remove every trace of earlier syncs (before an initial sync)."""

    def command(self, mode):
        raise NotImplementedError

    # What the tool needs to propagate the deletion of nearly a whole tree ("deleted").
    deletion_args = ()
    extra_args = ()

    def environment(self, mode):
        return dict(os.environ)

    def memory(self, result, mode):
        """{"local": MiB, "remote": MiB or absent} from a run_measured result."""
        memory = {"local": result["tree_mib"]}
        if mode == "ssh":
            # unison's client does not wait for its server to end
            memory["remote"] = self.bench.remote_peak(self.name, wait=5.0 if self.name == "unison" else 0.0)
        return memory


class Rsync(Tool):
    name = "rsync"

    deletion_args = ("--delete",)

    def command(self, mode):
        if mode == "local":
            return ["rsync", "-a"] + list(self.extra_args) + [self.a + "/", self.b + "/"]
        sshd = self.bench.sshd
        wrapped = " ".join(shlex.quote(arg) for arg in self.bench.remote_launcher(self.name) + ["rsync"])
        return ["rsync", "-a"] + list(self.extra_args) + [
            "-e", " ".join(shlex.quote(arg) for arg in sshd.ssh_command()),
            "--rsync-path=" + wrapped, self.a + "/", "%s@127.0.0.1:%s/" % (sshd.user, self.b)]


class Unison(Tool):
    name = "unison"

    def forget_state(self):
        remove_tree(os.path.join(self.home, "unison-home"))
        remove_tree(os.path.join(self.home, "unison-remote-home"))

    def command(self, mode):
        argv = ["unison", self.a, self.b, "-batch", "-auto", "-silent", "-times", "-confirmbigdel=false"]
        if mode == "ssh":
            sshd = self.bench.sshd
            argv[2] = "ssh://%s@127.0.0.1:%d/%s" % (sshd.user, sshd.port, self.b)
            # The remote unison gets a host name of its own, as a real remote host has: its
            # archives then never mix with those of the local runs on this same machine.
            server = self.bench.remote_script("unison-server", self.name, [
                "env", "UNISON=" + os.path.join(self.home, "unison-remote-home"),
                "UNISONLOCALHOSTNAME=osync-bench-remote", "unison"])
            argv += ["-sshargs", " ".join(sshd.ssh_options()), "-servercmd", server]
        return argv

    def environment(self, mode):
        environment = dict(os.environ)
        environment["UNISON"] = os.path.join(self.home, "unison-home")
        return environment


class Osync(Tool):
    name = "osync"
    deletion_args = ("--allow-mass-deletion",)

    def __init__(self, bench, home, source=None):
        super().__init__(bench, home)
        # REMOTE_PYTHON: the agent's Python behind this tool's own memory launcher.
        self.agent_python = bench.remote_script("agent-python-" + self.name, self.name, [bench.args.remote_python])
        self.script = bench.osync_script(self.name, source or bench.args.osync)

    def forget_state(self):
        remove_tree(os.path.join(self.a, ".osync_workdir"))
        remove_tree(os.path.join(self.b, ".osync_workdir"))

    def command(self, mode, python_prefix=()):
        args = self.bench.args
        target = self.b
        if mode == "ssh":
            target = "ssh://%s@127.0.0.1:%d/%s" % (self.bench.sshd.user, self.bench.sshd.port, self.b)
        return ([args.python] + list(python_prefix) + [self.script, "--initiator=" + self.a, "--target=" + target,
                "--instance-id=bench-" + mode, "--non-interactive", "--silent"] + shlex.split(args.osync_args)
                + list(self.extra_args))

    def environment(self, mode):
        environment = dict(os.environ)
        environment["LOGFILE"] = os.path.join(self.home, "osync-%s.log" % mode)
        if mode == "ssh":
            sshd = self.bench.sshd
            environment["SSH_RSA_PRIVATE_KEY"] = sshd.key
            environment["SSH_OPTIONAL_ARGS"] = " ".join(shlex.quote(option) for option in sshd.trust_options())
            environment["REMOTE_PYTHON"] = self.agent_python
        return environment

    def memory(self, result, mode):
        memory = {"local": result.get("own_mib"), "largest_local_process": result["tree_mib"]}
        if mode == "ssh":
            memory["remote"] = self.bench.remote_peak(self.name)
        elif result.get("local_agent_mib"):
            memory["remote"] = result["local_agent_mib"]
        return memory


class OsyncBefore(Osync):
    """--compare-osync: another osync.py (an older checkout), timed beside this one."""
    name = COMPARED_OSYNC

    def __init__(self, bench, home):
        super().__init__(bench, home, bench.args.compare_osync)


TOOL_CLASSES = {"rsync": Rsync, "unison": Unison, "osync": Osync, COMPARED_OSYNC: OsyncBefore}


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        os.makedirs(self.work, exist_ok=True)
        self.rss_dir = os.path.join(self.work, "rss")
        os.makedirs(self.rss_dir, exist_ok=True)
        self.wrapper = os.path.join(self.work, "rss_wrapper.py")
        with open(self.wrapper, "w") as handle:
            handle.write(RSS_WRAPPER)
        self.gnu_time = os.access(GNU_TIME, os.X_OK)
        if not self.gnu_time:
            log("GNU time (%s) is missing (apt-get install -y time): memory is measured by a Python "
                "wrapper whose floor is ~8 MiB" % GNU_TIME)
        self.sshd = None
        self.runs = []
        self.log_path = os.path.join(self.work, "commands.log")
        self.edit_rounds = {}

    def launcher(self, peak_file):
        """The argv prefix that runs a command and appends its peak memory to peak_file."""
        if self.gnu_time:
            return [GNU_TIME, "-a", "-o", peak_file, "-f", "%M"]
        return [sys.executable, "-S", "-E", self.wrapper, peak_file]

    def remote_launcher(self, tool_name):
        """The launcher for what ssh starts on the "remote" side for this tool."""
        return self.launcher(os.path.join(self.rss_dir, tool_name + "-remote"))

    def remote_script(self, name, tool_name, argv):
        """A script that runs argv (and its own arguments) behind the remote launcher:
        for the settings that take one program name (REMOTE_PYTHON, -servercmd)."""
        path = os.path.join(self.work, name)
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(
                shlex.quote(arg) for arg in self.remote_launcher(tool_name) + argv))
        os.chmod(path, 0o755)
        return path

    def osync_script(self, tool_name, source):
        """The osync.py a tool runs.  `source` is an osync.py file or a checkout holding
        one; with --layout installed (the default) and an install.py beside it, that
        checkout is installed below the scratch dir (install.py --prefix) and the
        installed command is what runs, as a user runs it; else the file itself."""
        directory = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        script = os.path.join(directory, "osync.py") if os.path.isdir(source) else os.path.abspath(source)
        installer = os.path.join(directory, "install.py")
        if self.args.layout == "script" or not os.path.isfile(installer):
            if self.args.layout == "installed":
                log("%s: no install.py beside %s, so it runs as the bare script" % (tool_name, script))
            return script
        prefix = os.path.join(self.work, "install-" + tool_name)
        remove_tree(prefix)
        subprocess.run([self.args.python, installer, "--prefix=" + prefix, "--init=none", "--silent"], check=True)
        installed = os.path.join(prefix, "usr", "local", "bin", "osync.py")
        log("%s: installed from %s, runs as %s" % (tool_name, directory, installed))
        return installed

    def remote_peak(self, tool_name, wait=0.0):
        """The remote side's peak; `wait` seconds for a server that outlives its client."""
        path = os.path.join(self.rss_dir, tool_name + "-remote")
        deadline = time.time() + wait
        while time.time() < deadline and not (os.path.exists(path) and os.path.getsize(path)):
            time.sleep(0.05)        # GNU time creates its file at the start, fills it at the end
        peaks = read_peaks(path)
        return max(peaks) if peaks else None

    def start_sshd(self):
        if self.sshd is None:
            self.sshd = ThrowawaySshd(os.path.join(self.work, "sshd"), self.args.ssh_port).start()
            log("sshd listening on 127.0.0.1:%d" % self.sshd.port)

    def stop(self):
        if self.sshd:
            self.sshd.stop()

    def prepare(self, tool_names):
        self.tree, self.spec = make_tree.cached_tree(self.args.files, self.args.seed, self.args.scale, log=log)
        self.tools = []
        for name in tool_names:
            home = os.path.join(self.work, name)
            remove_tree(home)
            os.makedirs(home)
            tool = TOOL_CLASSES[name](self, home)
            log("copying the tree for %s" % name)
            subprocess.run(["cp", "-a", self.tree, tool.a], check=True)
            os.mkdir(tool.b)
            self.tools.append(tool)
            self.edit_rounds[name] = 0

    def sync(self, tool, mode, case=None, round_number=None):
        """One run of the tool; timed and recorded when case is given."""
        if mode == "ssh":
            self.start_sshd()
        os.sync()              # the preparation's write-back is not charged to the run
        self.remote_peak(tool.name)
        result = run_measured(self.launcher, tool.command(mode), tool.environment(mode), self.log_path,
                              os.path.join(self.rss_dir, tool.name), watch=tool.name.startswith("osync"))
        result["memory"] = tool.memory(result, mode)
        if result["rc"] != 0:
            log("%s %s exited with %s: see %s" % (tool.name, mode, result["rc"], self.log_path))
        tool.synced_mode = mode
        if case is not None:
            result.update(tool=tool.name, case=case, round=round_number)
            self.runs.append(result)
            log("%-14s round %d  %-6s %7.2f s  rc %s  %s" % (case, round_number, tool.name, result["seconds"],
                                                           result["rc"], format_memory(result["memory"])))
        return result

    def run_case(self, case):
        scenario, mode = case.split("-")
        if scenario == "deleted":
            self.run_deletion_case(case, mode)
            return
        for round_number in range(self.args.rounds):
            turn = round_number % len(self.tools)
            for tool in self.tools[turn:] + self.tools[:turn]:
                if scenario == "initial":
                    if tool.synced_mode is not None:
                        remove_tree(tool.b)
                        os.mkdir(tool.b)
                        tool.forget_state()
                else:
                    if tool.synced_mode != mode:
                        self.sync(tool, mode)     # a first sync in this mode, not timed
                    if scenario == "changed":
                        make_tree.apply_edits(self.spec, self.edit_rounds[tool.name], tool.a, tool.b)
                        self.edit_rounds[tool.name] += 1
                self.sync(tool, mode, case, round_number)
        for tool in self.tools:
            self.verify(tool, case)

    def run_deletion_case(self, case, mode):
        """One timed run per tool of a sync that propagates the deletion of nearly the
        whole tree; a tree deleted by an earlier case (the other mode) is put back first."""
        for tool in self.tools:
            if not any(os.path.isdir(os.path.join(tool.a, name)) for name in os.listdir(tool.a)
                       if name not in TOOL_STATE):
                log("putting the tree back for %s" % tool.name)
                subprocess.run(["cp", "-a", self.tree + "/.", tool.a], check=True)
            tool.extra_args = tool.deletion_args
            self.sync(tool, mode)        # in step, in this mode, before the deletion (not timed)
            delete_directories(tool.a)
            self.sync(tool, mode, case, 0)
            tool.extra_args = ()
            self.verify(tool, case)

    def verify(self, tool, case):
        """Two-way tools must leave equal replicas; one-way rsync a target holding the source."""
        a, b = snapshot(tool.a), snapshot(tool.b)
        if tool.name == "rsync":
            wrong = [path for path, size in a.items() if b.get(path) != size]
        else:
            wrong = sorted(set(a.items()) ^ set(b.items()))
        if wrong:
            log("WARNING: after %s, %s left %d differing paths, e.g. %r" % (case, tool.name, len(wrong), wrong[:3]))
        for run in self.runs:
            if run["tool"] == tool.name and run["case"] == case:
                run["replicas_differ"] = len(wrong)

    def profile(self, output_path):
        """The no-change local run of osync.py under cProfile; prints the top functions."""
        tool = [tool for tool in self.tools if tool.name == "osync"][0]
        self.sync(tool, "local")          # the initial sync
        self.sync(tool, "local")          # converged: the next run has nothing to do
        profile_data = os.path.join(self.work, "osync-nochange.prof")
        result = run_measured(self.launcher, tool.command("local", ["-m", "cProfile", "-o", profile_data]),
                              tool.environment("local"), self.log_path, os.path.join(self.rss_dir, "profile"))
        lines = ["osync.py no-change local run under cProfile, %d files: %.2f s (with profiling), rc %s"
                 % (self.args.files, result["seconds"], result["rc"])]
        for order, title in (("cumulative", "cumulative time"), ("tottime", "own time (tottime)")):
            text = io.StringIO()
            stats = pstats.Stats(profile_data, stream=text)
            stats.strip_dirs().sort_stats(order).print_stats(30)
            lines += ["", "=== top 30 by %s ===" % title, text.getvalue()]
        report = "\n".join(lines)
        print(report)
        if output_path:
            with open(output_path, "w") as handle:
                handle.write(report + "\n")


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

def format_memory(memory):
    parts = []
    for key in ("local", "remote"):
        if memory.get(key) is not None:
            parts.append("%s %.1f MiB" % (key, memory[key]))
    return ", ".join(parts)


def median_of(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarize(runs, cases, tool_names):
    """{case: {tool: {"seconds", "local_mib", "remote_mib", "rounds"}}} of medians."""
    summary = {}
    for case in cases:
        summary[case] = {}
        for name in tool_names:
            mine = [run for run in runs if run["case"] == case and run["tool"] == name]
            if not mine:
                continue
            summary[case][name] = {
                "seconds": median_of([run["seconds"] for run in mine]),
                "local_mib": median_of([run["memory"].get("local") for run in mine]),
                "remote_mib": median_of([run["memory"].get("remote") for run in mine]),
                "rounds": len(mine),
                "failed_rounds": sum(1 for run in mine if run["rc"] != 0),
            }
    return summary


def case_title(case):
    scenario, mode = case.split("-")
    return "%s, %s" % (CASE_TITLES[scenario], "local" if mode == "local" else "over ssh")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(summary, tool_names):
    time_rows, memory_rows = [], []
    for case, cells in summary.items():
        reference = cells.get("rsync", {}).get("seconds")
        time_row, memory_row = [case_title(case)], [case_title(case)]
        for name in tool_names:
            cell = cells.get(name)
            if cell is None:
                time_row.append("-")
                memory_row.append("-")
                continue
            seconds = cell["seconds"]
            if name == "rsync" or not reference:
                text = "%.2f s" % seconds + (" (1×)" if name == "rsync" else "")
            else:
                text = "%.2f s (%.1f×)" % (seconds, seconds / reference)
            if cell["failed_rounds"]:
                text += " [%d failed]" % cell["failed_rounds"]
            time_row.append(text)
            memory = "%.0f" % cell["local_mib"] if cell["local_mib"] is not None else "?"
            if cell["remote_mib"] is not None:
                memory += " / %.0f" % cell["remote_mib"]
            memory_row.append(memory)
        time_rows.append(time_row)
        memory_rows.append(memory_row)
    titles = [TOOL_TITLES[name] for name in tool_names]
    return ("Wall time, median (ratio to rsync -a):\n\n" + markdown_table(["case"] + titles, time_rows)
            + "\n\nPeak resident memory, MiB, median (local process / remote side):\n\n"
            + markdown_table(["case"] + titles, memory_rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--files", type=parse_count, default=100000, help="files in the tree: 10k, 100k, 1M")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every file size (keep 1M small: 0.05)")
    parser.add_argument("--seed", type=int, default=make_tree.DEFAULT_SEED)
    parser.add_argument("--scenario", type=parse_cases, default=list(DEFAULT_CASES),
                        help="comma list: initial, nochange, changed (both modes), all, or e.g. nochange-ssh "
                             "(default: %s)" % ",".join(DEFAULT_CASES))
    parser.add_argument("--tools", type=parse_tools, default=list(ALL_TOOLS), help="comma list of rsync,unison,osync")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool in each case (median shown)")
    parser.add_argument("--json", help="write every run and the medians to this file")
    parser.add_argument("--profile", action="store_true",
                        help="instead: osync.py's no-change local run under cProfile, top 30 functions")
    parser.add_argument("--profile-out", help="also write the profile report to this file")
    parser.add_argument("--workdir", help="scratch dir (default /tmp/osync-bench/run-FILES)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--osync", default=OSYNC, help="osync.py to time (default: this checkout's)")
    parser.add_argument("--compare-osync", metavar="PATH",
                        help="also time this osync.py (a file, or a checkout holding osync.py and install.py) in "
                             "the same run, as 'osync.py before'")
    parser.add_argument("--layout", choices=("installed", "script"), default="installed",
                        help="run osync.py as install.py installs it (default: byte-compiled, as users run it) or "
                             "as the bare script (python3 osync.py, compiled at every start)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs osync.py")
    parser.add_argument("--remote-python", default="python3", help="Python that runs the agent over ssh")
    parser.add_argument("--osync-args", default="", help="extra osync.py arguments")
    parser.add_argument("--ssh-port", type=int, default=0, help="port of the throwaway sshd (default: a free one)")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or os.path.join(make_tree.DEFAULT_CACHE, "run-%d" % args.files)
    tools = ["osync"] if args.profile else args.tools
    if args.compare_osync and not args.profile:
        tools = tools + [COMPARED_OSYNC]
    if "unison" in tools and not shutil.which("unison"):
        log("unison is not installed (apt-get install -y unison): left out")
        tools = [name for name in tools if name != "unison"]
    bench = Bench(args)
    try:
        bench.prepare(tools)
        if args.profile:
            bench.profile(args.profile_out)
        else:
            for case in args.scenario:
                bench.run_case(case)
            report(args, bench, tools)
    finally:
        bench.stop()
        if not args.keep:
            log("removing %s" % args.workdir)
            remove_tree(args.workdir)
    return 0


def report(args, bench, tools):
    """Print the tables (and write the JSON) of the runs made."""
    summary = summarize(bench.runs, args.scenario, tools)
    machine = "%s, %d cores, Python %s" % (platform.machine(), os.cpu_count() or 0, platform.python_version())
    versions = {"rsync": first_line(["rsync", "--version"]), "unison": first_line(["unison", "-version"]),
                "osync": args.osync}
    print("\n%d files, %.2f GB, %d directories; %d rounds; %s\n" % (
        len(bench.spec.files), bench.spec.total_bytes() / 1e9, len(bench.spec.directories) + 1, args.rounds, machine))
    print(render(summary, tools), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"files": args.files, "scale": args.scale, "seed": args.seed, "rounds": args.rounds,
                       "machine": machine, "versions": versions, "summary": summary, "runs": bench.runs},
                      handle, indent=1)

if __name__ == "__main__":
    sys.exit(main())
