"""install.py and the service files of packaging/: an install into a prefix for each init
system, the installed programs syncing (osync.py as a launcher of the byte-compiled module
in /usr/local/lib/osync, locally and to an ssh target, with less peak memory than the
script), --remove, the refusals, the SysV script around real monitors, the systemd units
checked by systemd-analyze and their command lines run the way systemd runs them
(Type=notify, the watchdog, the exit codes it counts as success)."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, Pair, build, clean_env, describe, expected, make_pair, need, pyenv_python, snapshot
from test_unreadable import SYSTEM_PYTHON, USER, ensure_plain_user

INSTALL = REPO / "install.py"
# installed path -> the file of the repository it is a copy of
PROGRAMS = {"usr/local/bin/osync.py": REPO / "packaging/osync-launcher.py",
            "usr/local/bin/osync-batch.py": REPO / "osync-batch.py",
            "usr/local/bin/ssh_filter.py": REPO / "ssh_filter.py"}
LAUNCHER = "usr/local/bin/osync.py"
MODULE = "usr/local/lib/osync/osync.py"
EXAMPLES = {"etc/osync/sync.conf.example": REPO / "sync.conf",
            "etc/osync/exclude.list.example": REPO / "packaging/exclude.list.example"}
SYSTEM_UNITS = ["osync-srv@.service", "osync-target-helper-srv@.service", "osync@.service", "osync@.timer"]
USER_UNITS = ["osync-srv@.service", "osync-target-helper-srv@.service"]
SERVICE_FILES = {
    "systemd": {**{"lib/systemd/system/" + name: REPO / "packaging/systemd" / name for name in SYSTEM_UNITS},
                **{"etc/systemd/user/" + name: REPO / "packaging/systemd/user" / name for name in USER_UNITS}},
    "sysv": {"etc/init.d/osync-srv": REPO / "packaging/sysv/osync-srv"},
    "openrc": {"etc/init.d/osync-srv": REPO / "packaging/openrc/osync-srv"},
    "none": {},
}
NEXT_STEP = {"systemd": "systemctl enable --now osync-srv@NAME.conf",
             "sysv": "update-rc.d osync-srv defaults",
             "openrc": "ln -s osync-srv /etc/init.d/osync-srv.NAME",
             "none": "/usr/local/bin/osync-batch.py --path=/etc/osync --silent"}
TIMEOUT = 60


def run_install(*args, script=INSTALL, prefix=(), python=None, expect=0):
    r = subprocess.run(list(prefix) + [python or sys.executable, str(script)] + [str(a) for a in args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=TIMEOUT)
    r.output = r.stdout + r.stderr
    assert "Traceback" not in r.output, r.output
    assert r.returncode == expect, "exit code %s, expected %s:\n%s" % (r.returncode, expect, r.output)
    return r


def files_below(root):
    """Every file and link below `root`, relative, with its permission bits."""
    found = {}
    for directory, dirs, files in os.walk(str(root)):
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, str(root))] = os.lstat(path).st_mode & 0o7777
    return found


def cache_tags(python):
    """The .pyc tags an install by `python` compiles for: its own, and that of the
    python3 that `/usr/bin/env python3` finds, when that one can run osync.py."""
    program = "import sys; print(sys.implementation.cache_tag if sys.version_info >= (3, 6) else '')"
    tags = set()
    for interpreter in (python, shutil.which("python3")):
        if interpreter:
            found = subprocess.run([interpreter, "-c", program], stdout=subprocess.PIPE,
                                   universal_newlines=True).stdout.strip()
            tags.update([found] if found else [])
    return tags


def compiled_module(tag):
    return "usr/local/lib/osync/__pycache__/osync.%s.pyc" % tag


def expected_files(init, python=None):
    files = {path: 0o755 for path in PROGRAMS}
    files[MODULE] = 0o644
    files.update({compiled_module(tag): 0o644 for tag in cache_tags(python or sys.executable)})
    files.update({path: 0o644 for path in EXAMPLES})
    for path in SERVICE_FILES[init]:
        files[path] = 0o755 if path.startswith("etc/init.d/") else 0o644
    return files


def in_prefix(prefix, word):
    """A path of a service file as it is below the prefix (the files name the real root)."""
    if word.startswith(("/usr/local/bin/", "/etc/osync/")):
        return str(prefix) + word
    return word


# ======================================================================================
# install and remove
# ======================================================================================

@pytest.mark.parametrize("init", ["systemd", "sysv", "openrc", "none"])
def test_install_into_a_prefix(tmp_path, init):
    prefix = tmp_path / "root"
    r = run_install("--prefix=%s" % prefix, "--init=%s" % init)
    assert files_below(prefix) == expected_files(init)
    assert (prefix / MODULE).read_bytes() == (REPO / "osync.py").read_bytes()
    for path, source in list(PROGRAMS.items()) + list(EXAMPLES.items()) + list(SERVICE_FILES[init].items()):
        assert (prefix / path).read_bytes() == source.read_bytes(), path
    for path in expected_files(init):
        verb = "Compiled" if path.endswith(".pyc") else "Installed"
        assert "%s %s" % (verb, prefix / path) in r.stdout
    assert NEXT_STEP[init] in r.stdout
    assert "ssh_filter.py" in r.stdout.split("Next steps:")[1]
    if init == "none":
        assert r.stderr.count("WARNING") == 1 and "no service files installed" in r.stderr
    else:
        assert r.stderr == ""
    # the user units under names systemd loads, not osync.sh's .service.user
    assert not [path for path in files_below(prefix) if path.endswith(".user")]


def test_silent_prints_nothing(tmp_path):
    r = run_install("--prefix=%s" % (tmp_path / "root"), "--init=none", "--silent")
    assert r.output == ""
    assert files_below(tmp_path / "root") == expected_files("none")


def test_a_changed_example_is_kept_and_the_new_one_written_beside_it(tmp_path):
    prefix = tmp_path / "root"
    mine = prefix / "etc/osync/sync.conf.example"
    mine.parent.mkdir(parents=True)
    mine.write_text("# my own notes\nINSTANCE_ID=mine\n")
    r = run_install("--prefix=%s" % prefix, "--init=none")
    assert mine.read_text() == "# my own notes\nINSTANCE_ID=mine\n"
    assert Path(str(mine) + ".new").read_bytes() == (REPO / "sync.conf").read_bytes()
    assert "Kept %s" % mine in r.stdout and "%s.new" % mine in r.stdout
    # an example that is this version's is simply rewritten: no .new beside it
    assert not (prefix / "etc/osync/exclude.list.example.new").exists()
    run_install("--prefix=%s" % prefix, "--init=none")
    assert not (prefix / "etc/osync/exclude.list.example.new").exists()


def test_installed_programs_sync_a_local_pair(tmp_path):
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none")
    pair = Pair(tmp_path / "pair")
    entries = {"docs/a.txt": "alpha", "b": "beta", "docs/draft.swp": "editor's swap file"}
    build(pair.initiator, entries)
    exclude_list = prefix / "etc/osync/exclude.list.example"
    # the installed osync.py, run as a program (its #! line), with the installed exclude list
    r = subprocess.run([str(prefix / "usr/local/bin/osync.py"), "--initiator=%s" % pair.initiator,
                        "--target=%s" % pair.target, "--non-interactive"],
                       env=clean_env(pair.logfile, {"RSYNC_EXCLUDE_FROM": exclude_list}), cwd=str(tmp_path),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout
    assert snapshot(pair.target) == expected({"docs/a.txt": "alpha", "b": "beta"})
    # the installed osync-batch.py finds the osync.py installed beside it
    build(pair.initiator, {"c": "gamma"})
    conf = pair.write_conf(directory=tmp_path / "conf")
    r = subprocess.run([str(prefix / "usr/local/bin/osync-batch.py"), "--path=%s" % conf, "--silent",
                        "--log-file=%s" % (tmp_path / "batch.log")],
                       env=clean_env(pair.logfile), cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + (tmp_path / "batch.log").read_text()
    assert (pair.target / "c").read_text() == "gamma"


def test_remove_keeps_etc_osync(tmp_path):
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=systemd")
    conf = prefix / "etc/osync/home.conf"
    conf.write_text("INSTANCE_ID=home\n")
    r = run_install("--prefix=%s" % prefix, "--remove")
    assert files_below(prefix) == {"etc/osync/home.conf": 0o644, "etc/osync/sync.conf.example": 0o644,
                                   "etc/osync/exclude.list.example": 0o644}
    assert conf.read_text() == "INSTANCE_ID=home\n"
    assert "Removed %s" % (prefix / "usr/local/bin/osync.py") in r.stdout
    assert "Removed %s" % (prefix / "usr/local/lib/osync") in r.stdout
    assert not (prefix / "usr/local/lib/osync").exists()
    assert "Kept %s" % (prefix / "etc/osync") in r.stdout


# ======================================================================================
# osync.py as a launcher of the byte-compiled module
# ======================================================================================

# Runs a command as a child and prints the child's peak resident set in KiB.
PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_installed(prefix, *args, python=None, env=None, cwd=None, expect=0):
    """The installed osync.py run by `python` (by its #! line when None)."""
    command = ([str(python)] if python else []) + [str(prefix / LAUNCHER)] + [str(a) for a in args]
    r = subprocess.run(command, env=env or clean_env(os.devnull), cwd=str(cwd) if cwd else None,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=TIMEOUT)
    r.output = r.stdout + r.stderr
    r.logfile = None
    assert "Traceback" not in r.output, r.output
    assert r.returncode == expect, "exit code %s, expected %s:\n%s" % (r.returncode, expect, r.output)
    return r


def pyc_matches_source(pyc, source):
    """Whether a timestamp-checked .pyc is the one Python uses for `source` (its header
    holds the source's modification time and size)."""
    header = pyc.read_bytes()[:16]
    stat = os.stat(str(source))
    flags = int.from_bytes(header[4:8], "little")
    if flags:   # hash-based: checked against the source at each import (SOURCE_DATE_EPOCH)
        return True
    return (int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF)


def test_module_is_compiled_for_install_pys_python_and_the_one_of_the_launchers_line(tmp_path):
    """install.py run by Python 3.6 compiles for 3.6 and for the python3 of PATH, which
    the launcher's `#!/usr/bin/env python3` starts; the launcher runs under both."""
    oldest = pyenv_python("3.6")
    if oldest is None:
        need("Python 3.6 from pyenv")
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none", python=oldest)
    assert files_below(prefix) == expected_files("none", oldest)
    compiled = sorted((prefix / "usr/local/lib/osync/__pycache__").iterdir())
    assert "osync.cpython-36.pyc" in [path.name for path in compiled]
    assert len(compiled) == len(cache_tags(oldest)) >= 1
    for pyc in compiled:
        assert pyc_matches_source(pyc, prefix / MODULE), pyc
    version = "osync.py %s" % osync_version()
    for python in (oldest, None):
        assert run_installed(prefix, "--version", python=python).stdout.strip() == version
    help_text = run_installed(prefix, "--help").stdout
    assert "usage: osync.py " in help_text


def osync_version():
    for line in (REPO / "osync.py").read_text().splitlines():
        if line.startswith("VERSION = "):
            return line.split('"')[1]
    raise AssertionError("no VERSION line in osync.py")


def test_a_source_changed_after_install_is_what_runs(tmp_path):
    """The .pyc is checked against the source at every start: an edit of the installed
    module, even one that keeps its size, runs, never the old byte code."""
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none")
    module = prefix / MODULE
    old = 'VERSION = "%s"' % osync_version()
    new = 'VERSION = "%s"' % "".join("9" if c.isdigit() else c for c in osync_version())
    assert len(new) == len(old) and new != old
    text = module.read_text()
    assert text.count(old) == 1
    before = os.stat(str(module))
    module.write_text(text.replace(old, new))
    os.utime(str(module), (before.st_atime, before.st_mtime + 10))   # a later edit, whatever the clock's grain
    for python in this_and_oldest():
        r = run_installed(prefix, "--version", python=python)
        assert r.stdout.strip() == "osync.py %s" % new.split('"')[1], r.output


def this_and_oldest():
    return [sys.executable] + [python for python in [pyenv_python("3.6")] if python]


def test_old_single_file_install_is_replaced_and_remove_leaves_nothing_of_it(tmp_path):
    """An osync.py of the earlier layout (the whole program in /usr/local/bin) becomes the
    launcher; --remove then takes the launcher, the module and every .pyc."""
    prefix = tmp_path / "root"
    old = prefix / LAUNCHER
    old.parent.mkdir(parents=True)
    shutil.copy2(str(REPO / "osync.py"), str(old))
    oldest = pyenv_python("3.6")
    run_install("--prefix=%s" % prefix, "--init=systemd")
    if oldest:
        run_install("--prefix=%s" % prefix, "--init=systemd", python=oldest)   # .pyc files of two Pythons
    assert (prefix / LAUNCHER).read_bytes() == (REPO / "packaging/osync-launcher.py").read_bytes()
    assert files_below(prefix) == dict(expected_files("systemd"), **expected_files("systemd", oldest))
    run_install("--prefix=%s" % prefix, "--remove")
    assert files_below(prefix) == {"etc/osync/sync.conf.example": 0o644, "etc/osync/exclude.list.example": 0o644}
    assert not (prefix / "usr/local/lib/osync").exists()


def test_a_missing_or_damaged_module_is_one_sentence(tmp_path):
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none")
    module = prefix / MODULE
    module.write_text("def broken(:\n")
    r = run_installed(prefix, "--version", expect=1)
    assert r.stdout == ""
    assert r.stderr.startswith("ERROR: osync.py cannot load its module %s (SyntaxError: " % module), r.stderr
    assert r.stderr.strip().endswith("; reinstall with install.py.") and len(r.stderr.strip().splitlines()) == 1
    shutil.rmtree(str(module.parent))
    r = run_installed(prefix, "--version", expect=1)
    assert r.stderr == ("ERROR: osync.py is not installed completely: %s is missing; reinstall with install.py.\n"
                        % module)


def test_installed_osync_syncs_to_an_ssh_target(tmp_path, request):
    """The agent on the target runs the installed module (own_source() and the bytecode
    the loader may be sent come from the module's file, not the launcher): the module,
    edited after install, leaves a mark on the target when it runs there as the agent."""
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none")
    module = prefix / MODULE
    mark = tmp_path / "ran-as-agent"
    module.write_text(module.read_text() + "\nif __name__ == 'osync_agent':\n    open(%r, 'w').write('edited')\n"
                      % str(mark))
    pair = make_pair("remote", tmp_path / "pair", request)
    build(pair.initiator, {"from_initiator": "i", "dir/deep": "d"})
    build(pair.target, {"from_target": "t"})
    env = pair.env(pair.quick_env)
    r = run_installed(prefix, *(pair.quick_args() + ["--verbose"]), env=env, cwd=tmp_path)
    assert "Unexpected internal error" not in r.output, describe(r)
    synced = expected({"from_initiator": "i", "dir/deep": "d", "from_target": "t"})
    assert snapshot(pair.initiator) == synced and snapshot(pair.target) == synced
    assert "is sent to the agent on" in r.output, describe(r)
    assert mark.read_text() == "edited"


def peak_kib(command, env, cwd):
    r = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD] + [str(word) for word in command], env=env,
                       cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.parametrize("which", ["current", "3.6"])
def test_installed_osync_peaks_lower_than_the_script(tmp_path, which):
    """A no-change run of the installed osync.py imports its byte code; the script compiles
    its source first, which is most of its peak resident memory."""
    python = sys.executable if which == "current" else pyenv_python("3.6")
    if python is None:
        need("Python 3.6 from pyenv")
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=none", python=python)
    pair = Pair(tmp_path / "pair")
    build(pair.initiator, {"d%02d/f%03d" % (number // 100, number): str(number) for number in range(2000)})
    arguments = pair.quick_args() + ["--silent"]
    env = pair.env()
    peak_kib([python, REPO / "osync.py"] + arguments, env, tmp_path)   # the first sync
    script = min(peak_kib([python, REPO / "osync.py"] + arguments, env, tmp_path) for _ in range(2))
    installed = max(peak_kib([python, prefix / LAUNCHER] + arguments, env, tmp_path) for _ in range(2))
    assert installed + 10 * 1024 < script, "peak KiB: installed %d, script %d" % (installed, script)


# ======================================================================================
# refusals: one sentence, exit code 1, nothing written
# ======================================================================================

def test_not_root_without_prefix_is_refused(tmp_path):
    user = ensure_plain_user()
    as_user = ["runuser", "-u", USER, "--"]
    r = run_install(prefix=as_user, python=SYSTEM_PYTHON, expect=1)
    assert r.stdout == ""
    assert r.stderr.strip() == ("ERROR: install.py must run as root to write to /usr/local/bin and /etc/osync: "
                                "run it with sudo, or give --prefix=DIR to install below DIR.")
    # with --prefix the same user installs below a directory of its own
    own = Path(tempfile.mkdtemp(prefix="osync-install-"))
    try:
        os.chown(str(own), user.pw_uid, user.pw_gid)
        os.chmod(str(own), 0o755)
        run_install("--prefix=%s" % (own / "root"), "--init=sysv", "--silent", prefix=as_user,
                    python=SYSTEM_PYTHON)
        assert files_below(own / "root") == expected_files("sysv", SYSTEM_PYTHON)
        assert (own / "root/usr/local/bin/osync.py").stat().st_uid == user.pw_uid
    finally:
        shutil.rmtree(str(own))


def test_missing_source_file_is_refused_before_anything_is_written(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("install.py", "osync.py", "osync-batch.py", "sync.conf"):
        shutil.copy2(str(REPO / name), str(source / name))
    shutil.copytree(str(REPO / "packaging"), str(source / "packaging"))
    prefix = tmp_path / "root"
    r = run_install("--prefix=%s" % prefix, "--init=systemd", script=source / "install.py", expect=1)
    assert r.stderr.strip() == ("ERROR: ssh_filter.py is missing in %s: run install.py from a complete "
                                "osync.py source directory." % source)
    assert not prefix.exists()


def test_unknown_option_is_one_sentence(tmp_path):
    r = run_install("--prefix=%s" % (tmp_path / "root"), "--init=upstart", expect=1)
    assert r.stderr.startswith("ERROR: install.py: argument --init: invalid choice: 'upstart'")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "root").exists()


# ======================================================================================
# the SysV script around real monitors
# ======================================================================================

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie whose parent has not reaped it yet is dead too
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for %s" % what)


def test_sysv_script_runs_one_monitor_per_config(tmp_path):
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=sysv")
    script = prefix / "etc/init.d/osync-srv"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pairs = {}
    for name in ("alpha", "beta"):
        pair = Pair(tmp_path / name)
        build(pair.initiator, {"%s/file" % name: name})
        pair.write_conf("%s.conf" % name, directory=prefix / "etc/osync",
                        keys={"INSTANCE_ID": name, "LOGFILE": pair.logfile, "MIN_WAIT": "1"})
        pairs[name] = pair
    env = clean_env(tmp_path / "unused.log", {"OSYNC_BIN": prefix / "usr/local/bin/osync.py",
                                              "OSYNC_CONF_DIR": prefix / "etc/osync", "OSYNC_RUN_DIR": run_dir})
    env.pop("LOGFILE")

    def service(action, expect):
        r = subprocess.run([str(script), action], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=TIMEOUT + 30)
        assert r.returncode == expect, "%s: exit code %s\n%s" % (action, r.returncode, r.stdout)
        return r.stdout

    started = []
    try:
        out = service("start", 0)
        pid_files = sorted(p.name for p in run_dir.iterdir())
        assert pid_files == ["osync-srv-alpha.pid", "osync-srv-beta.pid"], out
        pids = [int((run_dir / name).read_text()) for name in pid_files]
        started.extend(pids)
        for pid, name in zip(pids, ("alpha", "beta")):
            assert pid_alive(pid)
            cmdline = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
            assert str(prefix / "etc/osync" / ("%s.conf" % name)).encode() in cmdline
            assert b"--on-changes" in cmdline and b"--errors-only" in cmdline
            if shutil.which("setsid"):
                assert os.getsid(pid) == pid, "a session of its own: no terminal hangup reaches it"
        for name, pair in pairs.items():
            wait_for(lambda: (pair.target / name / "file").exists(), "the first sync of %s" % name)
        # a monitor, not one sync: a later change arrives too
        build(pairs["alpha"].initiator, {"later": "after the first sync"})
        wait_for(lambda: (pairs["alpha"].target / "later").exists(), "a change to reach the target")

        out = service("status", 0)
        assert out.count(": running (pid ") == 2, out
        out = service("start", 0)
        assert out.count("already running") == 2, out
        assert [int((run_dir / name).read_text()) for name in pid_files] == pids

        old_pids = pids
        out = service("restart", 0)
        pids = [int((run_dir / name).read_text()) for name in pid_files]
        started.extend(pids)
        assert not set(pids) & set(old_pids), out
        assert not [pid for pid in old_pids if pid_alive(pid)] and all(pid_alive(pid) for pid in pids), out

        out = service("stop", 0)
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), "pid %d to end" % pid, timeout=10)
        assert list(run_dir.iterdir()) == []
        out = service("status", 3)
        assert out.count(": not running.") == 2, out
        # condrestart starts nothing that was not running
        service("condrestart", 0)
        assert list(run_dir.iterdir()) == []
        for pair in pairs.values():
            log = pair.logfile.read_text()
            assert "Monitor stopped by signal SIGTERM" in log and "Traceback" not in log
    finally:
        for pid in started:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sysv_script_says_when_a_monitor_cannot_start(tmp_path):
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=sysv")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    conf = Pair(tmp_path / "p").write_conf("broken.conf", directory=prefix / "etc/osync",
                                           keys={"LOGFILE": tmp_path / "osync.log",
                                                 "INITIATOR_SYNC_DIR": tmp_path / "does-not-exist"})
    env = clean_env(tmp_path / "unused.log", {"OSYNC_BIN": prefix / "usr/local/bin/osync.py",
                                              "OSYNC_CONF_DIR": prefix / "etc/osync", "OSYNC_RUN_DIR": run_dir})
    r = subprocess.run([str(prefix / "etc/init.d/osync-srv"), "start"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=TIMEOUT)
    assert r.returncode == 1, r.stdout
    assert ("the monitor of %s stopped at once: run '%s %s --dry' to see why."
            % (conf, prefix / "usr/local/bin/osync.py", conf)) in r.stdout
    assert list(run_dir.iterdir()) == []


# ======================================================================================
# systemd units
# ======================================================================================

def units_below(prefix, directory, names, destination):
    """Copies of the installed units whose programs and configs are those below the prefix."""
    destination.mkdir(parents=True)
    for name in names:
        text = (prefix / directory / name).read_text()
        text = text.replace("/usr/local/bin/", "%s/usr/local/bin/" % prefix)
        (destination / name).write_text(text.replace("/etc/osync/", "%s/etc/osync/" % prefix))
    return destination


def test_systemd_analyze_verifies_every_unit(tmp_path):
    if not shutil.which("systemd-analyze"):
        need("systemd-analyze is missing (package systemd): tests/run installs it")
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=systemd")
    system = units_below(prefix, "lib/systemd/system", SYSTEM_UNITS, tmp_path / "system")
    r = subprocess.run(["systemd-analyze", "verify", "osync-srv@home.conf.service",
                        "osync-target-helper-srv@home.conf.service", "osync@home.conf.service",
                        "osync@home.conf.timer"], cwd=str(system), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, ""), r.stdout
    user = units_below(prefix, "etc/systemd/user", USER_UNITS, tmp_path / "user")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    r = subprocess.run(["systemd-analyze", "--user", "verify", "osync-srv@home.conf.service",
                        "osync-target-helper-srv@home.conf.service"], cwd=str(user), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                       timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, ""), r.stdout


def unit_settings(path):
    """The [Service] settings of a unit file: name -> list of values."""
    settings = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value):
    units = {"min": 60, "s": 1, "h": 3600}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * factor
    return float(value)


class NotifySocket(object):
    """The socket systemd gives a Type=notify service in NOTIFY_SOCKET."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="osync-notify-")   # short: a socket path is short
        self.path = os.path.join(self.directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages = []

    def wait_for(self, message, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while message not in self.messages and time.time() < deadline:
            try:
                self.messages.extend(self.socket.recv(4096).decode().splitlines())
            except socket.timeout:
                pass
        assert message in self.messages, "no %s in %s" % (message, self.messages)

    def close(self):
        self.socket.close()
        shutil.rmtree(self.directory)


@pytest.mark.parametrize("unit", ["lib/systemd/system/osync-srv@.service", "etc/systemd/user/osync-srv@.service",
                                  "lib/systemd/system/osync-target-helper-srv@.service",
                                  "lib/systemd/system/osync@.service"])
def test_unit_runs_as_systemd_would_run_it(tmp_path, unit):
    """ExecStart= of each unit, started with what systemd gives its service (NOTIFY_SOCKET,
    WATCHDOG_USEC from WatchdogSec=), does what the unit's Type= and SuccessExitStatus= expect."""
    prefix = tmp_path / "root"
    run_install("--prefix=%s" % prefix, "--init=systemd")
    settings = unit_settings(prefix / unit)
    pair = Pair(tmp_path / "pair")
    build(pair.initiator, {"file": "content"})
    pair.write_conf("home.conf", directory=prefix / "etc/osync",
                    keys={"LOGFILE": pair.logfile, "MIN_WAIT": "1", "MAX_WAIT": "3600"})
    command = [in_prefix(prefix, word.replace("%i", "home.conf"))
               for word in shlex.split(settings["ExecStart"][0])]
    success = [0] + [int(code) for value in settings.get("SuccessExitStatus", []) for code in value.split()]
    assert 2 in success, "exit code 2 (warnings only) is a success"
    env = clean_env(pair.logfile)
    env.pop("LOGFILE")
    output = tmp_path / "output"
    if settings["Type"] == ["oneshot"]:
        with output.open("w") as handle:
            code = subprocess.call(command, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT, timeout=TIMEOUT)
        assert code in success, output.read_text()
        assert (pair.target / "file").read_text() == "content"
        return
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    notify = NotifySocket()
    env["NOTIFY_SOCKET"] = notify.path
    watchdog = seconds(settings["WatchdogSec"][0])
    env["WATCHDOG_USEC"] = str(int(watchdog * 1000000))
    process = None
    try:
        with output.open("w") as handle:
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                       stderr=subprocess.STDOUT)
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("READY=1")
        if "--on-changes-target" in command:
            assert (pair.initiator / ".osync-update.push").read_text().startswith("conftask#")
        else:
            assert (pair.target / "file").read_text() == "content"
        # KillMode=mixed: SIGTERM to the main process alone
        assert settings["KillMode"] == ["mixed"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) in success, output.read_text()
        notify.wait_for("STOPPING=1", timeout=5)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    text = output.read_text()
    assert "Traceback" not in text, text
    if "--silent" in command:
        assert text == ""
