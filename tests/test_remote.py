"""Remote targets (issue 3, DESIGN §2 items 5–7): ssh:// URIs, authentication, ssh_filter.py,
one ssh connection per run, failures that are sentences, connectivity checks, remote locks,
and the remote side of the core features.

Everything talks to the session's sshd (conftest.py `sshd`) on 127.0.0.1, so the target
directory is also a local path the test can inspect.  Most tests log in as root with the
fixture's key; password authentication and permission tests use a local user `osynctest`
(created when missing), and the `rm -rf ~` injection test a throwaway user `osyncfilter`,
so that a filter that lets it through can only wipe that user's home.

The scenario suites (test_scenarios.py, test_cli_config.py) also run on the remote pair
kinds; this file covers what is specific to a remote target.
"""

import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (PAIR_KINDS, REPO, T0, WORKDIR, build, clean_env, dir_files, expected,
                      keygen, make_pair, need, pid_is_dead, put, pyenv_root, remove, run_osync,
                      snapshot)

pytestmark = pytest.mark.skipif(
    not any(k.startswith("remote") for k in PAIR_KINDS),
    reason="no remote pair kind selected (OSYNC_PAIR_KINDS=%s)" % ",".join(PAIR_KINDS))

FILTER = REPO / "ssh_filter.py"
TOKEN = "osyncTestToken_" + secrets.token_hex(6)
SYSTEM_PYTHON = "/usr/bin/python3"      # for users that cannot reach root's pyenv
# The test users' passwords are fixed, not random: two test sessions running at once
# (two developers on one machine) must not change them under each other's feet.  These
# users can only log in through the test sshd (127.0.0.1, a random port, for the
# length of a session).
TEST_USER_PASSWORD = "osync-test-Pw-7c1e"


# ======================================================================================
# Helpers
# ======================================================================================

def no_traceback(r):
    assert "Traceback (most recent call last)" not in r.output, r.output


def nonempty(text):
    return [l for l in (text or "").splitlines() if l.strip()]


def assert_sentence(r, host="127.0.0.1", words=()):
    """Exit 1, no traceback, one error line on stderr that names the host (and contains
    each of `words`, case-insensitive)."""
    assert r.returncode == 1, "expected exit code 1" + describe_run(r)
    no_traceback(r)
    lines = nonempty(r.stderr)
    assert len(lines) == 1, "expected one sentence on stderr" + describe_run(r)
    naming = [l for l in lines if host in l]
    assert naming, "no error line names the host %s" % host + describe_run(r)
    for w in words:
        assert any(w.lower() in l.lower() for l in naming), \
            "the error does not say %r" % w + describe_run(r)


def describe_run(r):
    from conftest import describe
    return describe(r)


def osync(pair, target_spec, *args, env=None, expect=None, key=True, timeout=120,
          initiator=None):
    """A quicksync run of `pair`'s initiator (or `initiator`) against any target spec,
    with the sshd fixture's known_hosts and the pair's REMOTE_PYTHON (both overridable
    through env; None removes a key); --rsakey=<fixture key> unless key=False."""
    merged = dict(pair.quick_env)
    merged.update(env or {})
    argv = ["--initiator=%s" % (initiator or pair.initiator), "--target=%s" % target_spec,
            "--non-interactive"]
    if key:
        argv.append("--rsakey=%s" % pair.key)
    argv += list(args)
    return run_osync(argv, clean_env(pair.logfile, merged), pair.cwd, expect, timeout,
                     pair.logfile)


def ssh_processes(port):
    """pids of ssh client processes whose command line mentions `port` (e.g. a
    ControlMaster left behind)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) in (b"ssh", b"sshpass") and \
                any(str(port).encode() in a for a in argv):
            out.append(int(pid))
    return out


def wait_no_ssh_left(port, seconds=5.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not ssh_processes(port):
            return []
        time.sleep(0.1)
    return ssh_processes(port)


def free_tcp_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def ping_answers(host):
    return subprocess.run(["ping", "-c", "1", "-W", "1", host], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def shared_tmpdir(prefix, owner=None, mode=0o755):
    """A directory under /tmp that other local users can reach (pytest's tmp_path is
    private to root)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(str(d), mode)
    if owner is not None:
        os.chown(str(d), owner.pw_uid, owner.pw_gid)
    return d


def ensure_user(name, password, home=None):
    """A local user with a login shell and this password (created when missing)."""
    if not shutil.which("useradd") or not shutil.which("chpasswd"):
        need("useradd/chpasswd are not installed (passwd): tests/run installs them")
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "-m", "-s", "/bin/sh"]
        if home:
            argv += ["-d", home]
        r = subprocess.run(argv + [name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           universal_newlines=True)
        try:
            pwd.getpwnam(name)          # (another session may have created it meanwhile)
        except KeyError:
            raise AssertionError("useradd %s failed: %s" % (name, r.stderr))
    subprocess.run(["chpasswd"], input="%s:%s\n" % (name, password), check=True,
                   universal_newlines=True)
    user = pwd.getpwnam(name)
    Path(user.pw_dir).mkdir(parents=True, exist_ok=True)
    os.chown(user.pw_dir, user.pw_uid, user.pw_gid)
    return user


def ensure_ssh_dir(user):
    """~/.ssh of `user` (where ssh_filter.py logs); our sshd reads authorized_keys from
    its own dir, so it may not exist yet."""
    d = Path(user.pw_dir) / ".ssh"
    if not d.is_dir():
        d.mkdir(mode=0o700)
        os.chown(str(d), user.pw_uid, user.pw_gid)
    return d


def need_system_python():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        need("%s is missing: a non-root remote user cannot run root's pyenv Pythons"
             % SYSTEM_PYTHON)


class FilterLog:
    """~/.ssh/ssh_filter.log of a remote user: what was appended since creation."""

    def __init__(self, user):
        self.path = ensure_ssh_dir(user) / "ssh_filter.log"
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def new(self):
        if not self.path.exists():
            return ""
        with open(str(self.path), "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")


# ======================================================================================
# Fixtures
# ======================================================================================

REMOTE_KINDS = [k for k in PAIR_KINDS if k.startswith("remote")]
# the agent under the oldest supported Python (3.6) unless that kind was left out
MAIN_KIND = "remote" if "remote" in REMOTE_KINDS else (REMOTE_KINDS or ["remote"])[0]


@pytest.fixture
def rpair(request, tmp_path):
    """A remote pair (kind MAIN_KIND: its agent runs under Python 3.6)."""
    return make_pair(MAIN_KIND, tmp_path / "p", request)


@pytest.fixture(params=REMOTE_KINDS)
def any_rpair(request, tmp_path):
    return make_pair(request.param, tmp_path / "p", request)


@pytest.fixture(scope="module")
def root_user():
    return pwd.getpwnam("root")


@pytest.fixture(scope="module")
def pw_user(sshd, tmp_path_factory):
    """(user, password, password file) of `osynctest`, whose authorized_keys is empty:
    only its password lets it in."""
    need_system_python()
    password = TEST_USER_PASSWORD
    user = ensure_user("osynctest", password)
    sshd.authorized_keys_for("osynctest").write_text("")
    pwfile = tmp_path_factory.mktemp("pw") / "password"
    pwfile.write_text(password + "\n")
    os.chmod(str(pwfile), 0o600)
    return user, password, pwfile


@pytest.fixture
def pw_target(pw_user):
    """A target dir owned by osynctest (under /tmp, reachable by it), removed after."""
    user = pw_user[0]
    base = shared_tmpdir("osync-pw-")
    target = base / "target"
    target.mkdir()
    os.chown(str(target), user.pw_uid, user.pw_gid)
    yield target
    shutil.rmtree(str(base), ignore_errors=True)


def pw_env(sshd, pwfile=None, **extra):
    env = {"SSH_RSA_PRIVATE_KEY": "/nonexistent/osync-test/id_rsa",
           "SSH_OPTIONAL_ARGS": sshd.ssh_optional_args(),
           "REMOTE_PYTHON": SYSTEM_PYTHON}
    if pwfile is not None:
        env["SSH_PASSWORD_FILE"] = str(pwfile)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def filter_keys(sshd, root_user):
    """Keys authorized for root only through ssh_filter.py: "plain" (no sudo) and "sudo"
    (--allow-sudo).  The filter runs under this test's Python."""
    keys = {}
    for name, extra in (("plain", ""), ("sudo", " --allow-sudo")):
        key = sshd.dir / ("id_filter_" + name)
        pub = keygen(key, "osync-test-filter-" + name)
        sshd.authorize('command="%s %s %s%s",restrict %s'
                       % (sys.executable, FILTER, TOKEN, extra, pub), user="root")
        keys[name] = key
    ensure_ssh_dir(root_user)
    return keys


@pytest.fixture(scope="module")
def filter_user(sshd):
    """A throwaway user whose only key goes through ssh_filter.py (with /usr/bin/python3),
    for commands that would do harm if the filter let them through."""
    need_system_python()
    user = ensure_user("osyncfilter", TEST_USER_PASSWORD)
    key = sshd.dir / "id_filter_user"
    pub = keygen(key, "osync-test-filter-user")
    sshd.authorized_keys_for("osyncfilter").write_text(
        'command="%s %s %s",restrict %s\n' % (SYSTEM_PYTHON, FILTER, TOKEN, pub))
    ensure_ssh_dir(user)
    return user, key


def simple(pair, target=None):
    target = target or pair.target
    build(pair.initiator, {"from_i": "i", "d/x": "x"})
    build(target, {"from_t": "t"})
    return expected({"from_i": "i", "d/x": "x", "from_t": "t"})


# ======================================================================================
# URI forms
# ======================================================================================

def test_uri_absolute_user_host_port(rpair, sshd):
    exp = simple(rpair)
    spec = "ssh://root@127.0.0.1:%d/%s" % (sshd.port, rpair.target)
    assert spec.startswith("ssh://root@127.0.0.1:%d//" % sshd.port)
    osync(rpair, spec, expect=0)
    assert snapshot(rpair.initiator) == exp
    assert snapshot(rpair.target) == exp
    assert (rpair.target / WORKDIR / "state").is_dir()


def test_uri_default_user_is_the_local_user(rpair, sshd):
    assert pwd.getpwuid(os.geteuid()).pw_name == "root"
    exp = simple(rpair)
    mark = sshd.mark()
    osync(rpair, "ssh://127.0.0.1:%d/%s" % (sshd.port, rpair.target), expect=0)
    assert snapshot(rpair.target) == exp
    assert re.search(r"Accepted publickey for root ", sshd.log_since(mark)), sshd.log_since(mark)


def test_uri_ipv6(rpair, sshd):
    if not sshd.ipv6:
        pytest.skip("sshd could not listen on [::1]")
    exp = simple(rpair)
    mark = sshd.mark()
    osync(rpair, "ssh://root@[::1]:%d/%s" % (sshd.port, rpair.target), expect=0)
    assert snapshot(rpair.initiator) == exp
    assert snapshot(rpair.target) == exp
    assert re.search(r"Connection from ::1 ", sshd.log_since(mark)), sshd.log_since(mark)


def test_uri_relative_to_remote_home(rpair, sshd, root_user):
    name = "osync-test-rel-%s" % secrets.token_hex(4)
    home_dir = Path(root_user.pw_dir) / name
    target = home_dir / "sub" / "target"
    target.mkdir(parents=True)
    try:
        exp = simple(rpair, target)
        spec = "ssh://root@127.0.0.1:%d/%s/sub/target" % (sshd.port, name)
        osync(rpair, spec, expect=0)
        assert snapshot(rpair.initiator) == exp
        assert snapshot(target) == exp
        assert (target / WORKDIR).is_dir()
        # nothing was created relative to the local working directory
        assert not (rpair.cwd / name).exists()
    finally:
        shutil.rmtree(str(home_dir), ignore_errors=True)


@pytest.mark.parametrize("rel", ["we@ird:dir", "a:22/b@c:d", "user@host:22",
                                 "with space/and 'quote'"])
def test_uri_at_and_colon_in_path(rpair, sshd, rel):
    target = rpair.base / rel
    target.mkdir(parents=True)
    exp = simple(rpair, target)
    osync(rpair, "ssh://root@127.0.0.1:%d/%s" % (sshd.port, target), expect=0)
    assert snapshot(rpair.initiator) == exp
    assert snapshot(target) == exp
    assert (target / WORKDIR).is_dir()
    assert snapshot(rpair.target) == {}, "synced into the wrong directory"


MALFORMED = [
    "ssh://",
    "ssh://127.0.0.1",
    "ssh://root@127.0.0.1:{port}",
    "ssh://127.0.0.1:notaport//tmp/x",
    "ssh://127.0.0.1:70000//tmp/x",
    "ssh://root@[::1//tmp/x",
]


@pytest.mark.parametrize("uri", MALFORMED)
def test_malformed_uri(rpair, sshd, uri):
    uri = uri.format(port=sshd.port)
    build(rpair.initiator, {"a": "a"})
    mark = sshd.mark()
    r = osync(rpair, uri)
    assert r.returncode == 1, describe_run(r)
    no_traceback(r)
    assert len(nonempty(r.stderr)) == 1, "expected one sentence on stderr" + describe_run(r)
    assert snapshot(rpair.initiator, exclude_workdir=False) == expected({"a": "a"})
    assert sshd.connections(mark) == 0, "a malformed URI reached sshd"


def test_malformed_uri_in_config(rpair, sshd):
    conf = rpair.write_conf(keys={"TARGET_SYNC_DIR": "ssh://127.0.0.1:notaport//tmp/x"})
    build(rpair.initiator, {"a": "a"})
    r = rpair.run_conf(conf)
    assert r.returncode == 1, describe_run(r)
    no_traceback(r)
    assert len(nonempty(r.stderr)) == 1, describe_run(r)


# ======================================================================================
# Authentication
# ======================================================================================

@pytest.fixture
def sshpass_spy(tmp_path):
    """A `sshpass` first in PATH that records its argv, then runs the real one."""
    real = shutil.which("sshpass")
    if not real:
        need("sshpass is not installed: tests/run installs it")
    d = tmp_path / "spybin"
    d.mkdir()
    log = d / "argv.log"
    script = d / "sshpass"
    script.write_text('#!/bin/sh\nfor a in "$@"; do printf "%%s\\n" "$a"; done >> "%s"\n'
                      'echo ---- >> "%s"\nexec %s "$@"\n' % (log, log, real))
    script.chmod(0o755)
    return {"PATH": "%s:%s" % (d, os.environ.get("PATH", "/usr/bin:/bin"))}, log


@pytest.mark.parametrize("form", ["cli", "env"])
def test_password_file_auth(rpair, sshd, pw_user, pw_target, sshpass_spy, form):
    user, password, pwfile = pw_user
    spy_env, spy_log = sshpass_spy
    env = pw_env(sshd, pwfile if form == "env" else None, **spy_env)
    args = ["--password-file=%s" % pwfile] if form == "cli" else []
    spec = "ssh://osynctest@127.0.0.1:%d/%s" % (sshd.port, pw_target)
    build(rpair.initiator, {"a": "a", "m": "old m", "d/b": "b"})
    mark = sshd.mark()
    r = osync(rpair, spec, *args, env=env, key=False, expect=0)
    exp = expected({"a": "a", "m": "old m", "d/b": "b"})
    assert snapshot(pw_target) == exp
    log = sshd.log_since(mark)
    assert re.search(r"Accepted password for osynctest ", log), log
    assert not re.search(r"Accepted publickey for osynctest ", log), log
    # the files were written by the remote user, not by the local root
    assert os.stat(str(pw_target / "a")).st_uid == user.pw_uid
    assert os.stat(str(pw_target / WORKDIR)).st_uid == user.pw_uid
    # the password never travels on a command line, nor reaches the log or the screen
    argvs = spy_log.read_text() if spy_log.exists() else ""
    assert argvs, "sshpass was not used"
    assert password not in argvs, "the password was on sshpass's command line"
    assert password not in r.output
    assert password not in rpair.logfile.read_text(errors="replace")

    # deletions and overwrites land in the remote user's work dir
    remove(rpair.initiator, "d/b")
    put(rpair.initiator, "m", "new m", T0 + 10)
    osync(rpair, spec, *args, env=env, key=False, expect=0)
    assert (pw_target / WORKDIR / "deleted" / "d" / "b").read_text() == "b"
    assert (pw_target / WORKDIR / "backup" / "m").read_text() == "old m"
    assert os.stat(str(pw_target / WORKDIR / "deleted" / "d" / "b")).st_uid == user.pw_uid
    assert (pw_target / "m").read_text() == "new m"


def test_wrong_password_is_an_authentication_failure(rpair, sshd, pw_user, pw_target, tmp_path):
    bad = tmp_path / "bad_password"
    bad.write_text("certainly-not-the-password\n")
    os.chmod(str(bad), 0o600)
    build(rpair.initiator, {"a": "a"})
    spec = "ssh://osynctest@127.0.0.1:%d/%s" % (sshd.port, pw_target)
    t = time.time()
    r = osync(rpair, spec, "--password-file=%s" % bad, env=pw_env(sshd), key=False, timeout=90)
    assert_sentence(r)
    assert time.time() - t < 60
    assert os.listdir(str(pw_target)) == []


def test_unauthorized_key_is_an_authentication_failure(rpair, sshd, tmp_path):
    stranger = tmp_path / "id_stranger"
    keygen(stranger, "not-authorized")
    build(rpair.initiator, {"a": "a"})
    t = time.time()
    r = osync(rpair, rpair.target_spec, "--rsakey=%s" % stranger, key=False, timeout=90)
    assert_sentence(r)
    assert time.time() - t < 60, "an authentication failure must not wait for a prompt"
    assert snapshot(rpair.target, exclude_workdir=False) == {}
    assert snapshot(rpair.initiator, exclude_workdir=False) == expected({"a": "a"})


def test_rsa_private_key_from_env(rpair, sshd):
    exp = simple(rpair)
    osync(rpair, rpair.target_spec, env={"SSH_RSA_PRIVATE_KEY": str(rpair.key)}, key=False,
          expect=0)
    assert snapshot(rpair.target) == exp


def test_unknown_host_key_refused_unless_ignored(rpair, sshd, tmp_path):
    empty_kh = tmp_path / "empty_known_hosts"
    empty_kh.write_text("")
    build(rpair.initiator, {"a": "a"})
    strict = {"SSH_OPTIONAL_ARGS": "-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes"
                                   % empty_kh}
    r = osync(rpair, rpair.target_spec, env=strict)
    assert_sentence(r)
    assert snapshot(rpair.target, exclude_workdir=False) == {}
    # SSH_IGNORE_KNOWN_HOSTS=yes: no known_hosts check at all
    osync(rpair, rpair.target_spec, env={"SSH_IGNORE_KNOWN_HOSTS": "yes",
                                         "SSH_OPTIONAL_ARGS": None}, expect=0)
    assert snapshot(rpair.target) == expected({"a": "a"})
    assert empty_kh.read_text() == ""


# ======================================================================================
# One ssh connection per run
# ======================================================================================

def test_one_ssh_connection_per_run(any_rpair, sshd):
    p = any_rpair

    def one_run(*args):
        mark = sshd.mark()
        r = p.run(*args, expect=0)
        left = wait_no_ssh_left(sshd.port)
        end = sshd.mark()
        n = sshd.connections(mark, end)
        assert n == 1, "%d ssh connections (want 1)\n%s%s" % (n, sshd.log_since(mark, end),
                                                            describe_run(r))
        assert sshd.accepted(mark, end) == 1, sshd.log_since(mark, end)
        assert not left, "ssh processes still running after the run: %s" % left

    # first run: transfers both ways
    build(p.initiator, {"a": "a", "b": "b", "d/c": "c", "e/f": "f"})
    build(p.target, {"t1": "t1", "d/t2": "t2"})
    one_run()
    # updates, deletions and new files both ways
    put(p.initiator, "a", "a2", T0 + 10)
    put(p.target, "b", "b2", T0 + 10)
    remove(p.initiator, "d/c")
    remove(p.target, "t1")
    put(p.target, "new_t", "nt", T0 + 10)
    put(p.initiator, "new_i", "ni", T0 + 10)
    one_run()
    exp = expected({"a": "a2", "b": "b2", "d/t2": "t2", "e/f": "f", "new_t": "nt", "new_i": "ni"})
    assert snapshot(p.initiator) == exp and snapshot(p.target) == exp
    # a dry run and a run with nothing to do
    put(p.initiator, "dry_only", "x", T0 + 20)
    one_run("--dry")
    assert not (p.target / "dry_only").exists()
    remove(p.initiator, "dry_only")
    one_run()


# ======================================================================================
# Failures are sentences that name the host
# ======================================================================================

def test_connection_refused(rpair, sshd):
    port = free_tcp_port()
    build(rpair.initiator, {"a": "a"})
    t = time.time()
    r = osync(rpair, "ssh://root@127.0.0.1:%d/%s" % (port, rpair.target), timeout=90)
    assert_sentence(r)
    assert time.time() - t < 60
    assert snapshot(rpair.initiator, exclude_workdir=False) == expected({"a": "a"})


@pytest.mark.parametrize("which", ["missing", "python2"])
def test_no_suitable_python(rpair, sshd, which):
    if which == "missing":
        python = "/nonexistent/python"
    else:
        found = sorted(glob.glob(os.path.join(pyenv_root(), "versions", "2.*", "bin", "python")))
        if not found:
            pytest.skip("no Python 2 in pyenv")
        python = found[-1]
    build(rpair.initiator, {"a": "a"})
    mark = sshd.mark()
    r = osync(rpair, rpair.target_spec, env={"REMOTE_PYTHON": python})
    assert_sentence(r, words=["python"])
    assert snapshot(rpair.target, exclude_workdir=False) == {}
    assert snapshot(rpair.initiator, exclude_workdir=False) == expected({"a": "a"})
    assert sshd.connections(mark) == 1


def test_default_remote_python(rpair, sshd):
    """Without REMOTE_PYTHON the agent runs under the remote `python3`."""
    exp = simple(rpair)
    osync(rpair, rpair.target_spec, env={"REMOTE_PYTHON": None}, expect=0)
    assert snapshot(rpair.target) == exp
    assert snapshot(rpair.initiator) == exp


@pytest.mark.parametrize("variant", ["compression-yes", "compression-no", "controlmaster-option"])
def test_ssh_option_variants(rpair, sshd, variant):
    env, args = {}, []
    if variant == "compression-yes":
        env["SSH_COMPRESSION"] = "yes"
    elif variant == "compression-no":
        env["SSH_COMPRESSION"] = "no"
    else:
        args.append("--ssh-controlmaster")
    exp = simple(rpair)
    mark = sshd.mark()
    rpair.run(*args, env=env, expect=0)
    assert snapshot(rpair.target) == exp
    assert sshd.connections(mark) == 1


def test_minimum_space_on_remote_replica_warns(rpair, sshd):
    exp = simple(rpair)
    r = rpair.run(env={"MINIMUM_SPACE": "999999999999"}, expect=2)
    no_traceback(r)
    assert snapshot(rpair.target) == exp, "MINIMUM_SPACE must only warn"
    space = [l for l in r.output.splitlines() if "space" in l.lower()]
    assert any(str(rpair.target) in l or "127.0.0.1" in l or "target" in l.lower()
               for l in space), "no warning about the target's free space:\n" + r.output


def replicas_area(pair):
    """Snapshot of the pair's base dir (both replicas with their work dirs), without the
    log and config files."""
    snap = snapshot(pair.base, mtimes=True, exclude_workdir=False)
    return {k: v for k, v in snap.items()
            if not (k == "osync.log" or k == "conf" or k.startswith("conf/"))}


def test_remote_replica_missing(rpair, sshd):
    build(rpair.initiator, {"a": "a"})
    missing = rpair.base / "no" / "such" / "target"
    before = replicas_area(rpair)
    r = osync(rpair, rpair.spec_for(missing))
    assert_sentence(r)
    assert not (rpair.base / "no").exists()
    assert replicas_area(rpair) == before


def test_create_dirs_on_remote_target(rpair, sshd):
    build(rpair.initiator, {"a": "a", "d/b": "b"})
    deep = rpair.base / "new dir" / "deeper" / "target"
    osync(rpair, rpair.spec_for(deep), env={"CREATE_DIRS": "yes"}, expect=0)
    assert snapshot(deep) == expected({"a": "a", "d/b": "b"})
    assert (deep / WORKDIR / "state").is_dir()
    osync(rpair, rpair.spec_for(deep), env={"CREATE_DIRS": "yes"}, expect=0)


def test_permission_denied(rpair, sshd, pw_user):
    user, password, pwfile = pw_user
    base = shared_tmpdir("osync-perm-")
    try:
        target = base / "rootowned"
        target.mkdir()
        os.chmod(str(target), 0o755)          # readable by osynctest, not writable
        put(target, "existing", "e")
        build(rpair.initiator, {"a": "a"})
        before = snapshot(target, mtimes=True, exclude_workdir=False)
        r = osync(rpair, "ssh://osynctest@127.0.0.1:%d/%s" % (sshd.port, target),
                  "--password-file=%s" % pwfile, env=pw_env(sshd), key=False)
        assert_sentence(r)
        assert snapshot(target, mtimes=True, exclude_workdir=False) == before
    finally:
        shutil.rmtree(str(base), ignore_errors=True)


# ======================================================================================
# Connectivity checks
# ======================================================================================

def need_ping():
    if not shutil.which("ping"):
        need("ping is not installed (iputils-ping): tests/run installs it")


def silent_host():
    for h in ("198.51.100.7", "203.0.113.9", "192.0.2.254"):
        if not ping_answers(h):
            return h
    pytest.skip("every documentation address answers ping on this network")


def test_remote_host_ping_ok(rpair, sshd):
    need_ping()
    exp = simple(rpair)
    rpair.run(env={"REMOTE_HOST_PING": "yes"}, expect=0)
    assert snapshot(rpair.target) == exp


def test_remote_host_ping_no_answer_skips_the_task(rpair, sshd):
    need_ping()
    host = silent_host()
    build(rpair.initiator, {"a": "a"})
    t = time.time()
    r = osync(rpair, "ssh://root@%s:%d/%s" % (host, sshd.port, rpair.target),
              env={"REMOTE_HOST_PING": "yes"}, timeout=90)
    assert_sentence(r, host=host)
    assert "ping" in r.output.lower(), r.output
    assert time.time() - t < 60
    assert snapshot(rpair.initiator, exclude_workdir=False) == expected({"a": "a"})


def test_third_party_hosts_answering(rpair, sshd):
    need_ping()
    hosts = "127.0.0.2"
    exp = simple(rpair)
    want = 0 if ping_answers("127.0.0.2") else 2
    r = rpair.run(env={"REMOTE_3RD_PARTY_HOSTS": hosts}, expect=want)
    no_traceback(r)
    assert snapshot(rpair.target) == exp


def test_third_party_hosts_none_answering_warns(rpair, sshd):
    need_ping()
    host = silent_host()
    exp = simple(rpair)
    r = rpair.run(env={"REMOTE_3RD_PARTY_HOSTS": host}, expect=2)
    no_traceback(r)
    assert snapshot(rpair.target) == exp, "a third-party ping failure must only warn"
    assert host in r.output or "3rd" in r.output or "third" in r.output.lower(), r.output


# ======================================================================================
# Remote target locks (reference §5.2)
# ======================================================================================

def _locked(pair, content):
    build(pair.initiator, {"a": "a"})
    pair.run(expect=0)
    put(pair.initiator, "new_i", "ni")
    put(pair.target, "new_t", "nt")
    lock = pair.lock("target")
    lock.write_text(content)
    return lock


def test_remote_dead_lock_same_instance_is_taken_over(rpair):
    if not pid_is_dead(65536):
        pytest.skip("pid 65536 is alive on this host")
    lock = _locked(rpair, "65536@quicksync_task")
    rpair.run(expect=0)
    assert not lock.exists()
    exp = expected({"a": "a", "new_i": "ni", "new_t": "nt"})
    assert snapshot(rpair.initiator) == exp and snapshot(rpair.target) == exp


def test_remote_dead_lock_of_stranger_instance_refuses(rpair):
    if not pid_is_dead(65536):
        pytest.skip("pid 65536 is alive on this host")
    lock = _locked(rpair, "65536@bogusinstance")
    before = [snapshot(r) for r in rpair.roots]
    r = rpair.run()
    assert r.returncode == 1, describe_run(r)
    no_traceback(r)
    assert lock.read_text() == "65536@bogusinstance"
    assert [snapshot(x) for x in rpair.roots] == before
    assert not rpair.lock("initiator").exists()


@pytest.mark.parametrize("value", ["yes", "true"])
def test_force_stranger_lock_resume(rpair, value):
    if not pid_is_dead(65536):
        pytest.skip("pid 65536 is alive on this host")
    lock = _locked(rpair, "65536@bogusinstance")
    rpair.run(env={"FORCE_STRANGER_LOCK_RESUME": value}, expect=0)
    assert not lock.exists()
    exp = expected({"a": "a", "new_i": "ni", "new_t": "nt"})
    assert snapshot(rpair.initiator) == exp and snapshot(rpair.target) == exp


def test_remote_lock_of_live_local_pid_refuses(rpair):
    content = "%d@quicksync_task" % os.getpid()
    lock = _locked(rpair, content)
    before = [snapshot(r) for r in rpair.roots]
    r = rpair.run()
    assert r.returncode == 1, describe_run(r)
    no_traceback(r)
    assert lock.read_text() == content
    assert [snapshot(x) for x in rpair.roots] == before
    # even FORCE_STRANGER_LOCK_RESUME does not take over a live lock
    r = rpair.run(env={"FORCE_STRANGER_LOCK_RESUME": "yes"})
    assert r.returncode == 1, describe_run(r)
    assert lock.read_text() == content


# ======================================================================================
# Remote side of the core: custom state dir, --dry, awkward names, sudo
# ======================================================================================

def test_target_custom_state_dir_is_on_the_target_host(rpair, sshd, pw_user, pw_target):
    """The remote user is osynctest, so whatever the agent writes is owned by it:
    TARGET_CUSTOM_STATE_DIR is written on the target side, by the agent."""
    user, password, pwfile = pw_user
    st = pw_target.parent / "target_state"
    st.mkdir()
    os.chown(str(st), user.pw_uid, user.pw_gid)
    spec = "ssh://osynctest@127.0.0.1:%d/%s" % (sshd.port, pw_target)
    env = pw_env(sshd, pwfile, TARGET_CUSTOM_STATE_DIR=str(st))
    build(rpair.initiator, {"a": "a", "b": "b"})
    osync(rpair, spec, env=env, key=False, expect=0)
    remove(rpair.initiator, "b")
    osync(rpair, spec, env=env, key=False, expect=0)
    assert snapshot(pw_target) == expected({"a": "a"})
    assert dir_files(pw_target / WORKDIR / "deleted") == ["b"]
    assert dir_files(pw_target / WORKDIR / "state") == [], "state written in the target's work dir"
    names = dir_files(st)
    assert names, "nothing written in the target's custom state dir"
    for n in names:
        assert os.lstat(str(st / n)).st_uid == user.pw_uid, "%s not written by the agent" % n
    osync(rpair, spec, env=env, key=False, expect=0)


def test_dry_run_changes_nothing_remotely(rpair, sshd):
    build(rpair.initiator, {"keep": "k", "mod": "m", "del_i": "d1"})
    build(rpair.target, {"t": "t"})
    rpair.run(expect=0)
    put(rpair.initiator, "mod", "m changed", T0 + 10)
    put(rpair.initiator, "new_i", "ni", T0 + 10)
    remove(rpair.initiator, "del_i")
    put(rpair.target, "new_t", "nt", T0 + 10)
    put(rpair.target, "t", "t changed", T0 + 10)
    parent_before = replicas_area(rpair)
    target_before = snapshot(rpair.target, mtimes=True, exclude_workdir=False)
    r = rpair.run("--dry", "--summary", expect=0)
    assert snapshot(rpair.target, mtimes=True, exclude_workdir=False) == target_before
    assert replicas_area(rpair) == parent_before, "a dry run changed something" + describe_run(r)
    assert re.search(r"^\s*UPDATE >> .*new_i$", r.stdout, re.M), r.stdout
    # fresh replicas: the dry run does not even create the remote work dir
    fresh_i, fresh_t = rpair.base / "fresh_initiator", rpair.base / "fresh_target"
    build(fresh_i, {"x": "x"})
    build(fresh_t, {"y": "y"})
    osync(rpair, rpair.spec_for(fresh_t), "--dry", initiator=fresh_i, expect=0)
    assert snapshot(fresh_t, exclude_workdir=False) == expected({"y": "y"})
    assert snapshot(fresh_i, exclude_workdir=False) == expected({"x": "x"})


AWKWARD = [
    b"new\nline", b" leading space", b"-rf", b"--help", b"x*?[ab]", b"it's", b'say "hi"',
    b"`id`", b"$(touch pwned)", b"semi;colon", b"back\\slash", b"host:path", b"~",
    b"\xff\xfe-latin1-\xe9", "caf\u00e9 \u65e5\u672c".encode(), b"L" * 255, b"Icon\r",
    b"#hash", b"tab\there",
]


def _bp(root, name):
    return os.fsencode(str(root)) + b"/" + name


def _write(path, data, mtime):
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_awkward_names_on_remote_target(any_rpair, sshd):
    p = any_rpair
    ini, tgt = p.initiator, p.target
    for i, n in enumerate(AWKWARD):
        _write(_bp(ini, n), b"v1 %d" % i, T0)
        os.mkdir(_bp(ini, b"dir " + n[:200]))
        _write(_bp(ini, b"dir " + n[:200]) + b"/inner", b"inner %d" % i, T0)
    p.run(expect=0)
    for i, n in enumerate(AWKWARD):
        assert _read(_bp(tgt, n)) == b"v1 %d" % i, n
        assert _read(_bp(tgt, b"dir " + n[:200]) + b"/inner") == b"inner %d" % i, n
    # edit on the target -> back to the initiator, its old copy backed up there
    for i, n in enumerate(AWKWARD):
        _write(_bp(tgt, n), b"v2 from target %d" % i, T0 + 50)
    p.run(expect=0)
    for i, n in enumerate(AWKWARD):
        assert _read(_bp(ini, n)) == b"v2 from target %d" % i, n
        assert _read(_bp(ini, WORKDIR.encode() + b"/backup/" + n)) == b"v1 %d" % i, n
    # delete on the initiator -> soft-deleted on the remote target under the same name
    for n in AWKWARD:
        os.unlink(_bp(ini, n))
    p.run(expect=0)
    for i, n in enumerate(AWKWARD):
        assert not os.path.lexists(_bp(tgt, n)), n
        assert _read(_bp(tgt, WORKDIR.encode() + b"/deleted/" + n)) == b"v2 from target %d" % i, n
    assert snapshot(ini) == snapshot(tgt)
    for where in (ini, tgt, p.base, Path(pwd.getpwnam("root").pw_dir)):
        assert not (Path(where) / "pwned").exists(), "a name was run by a shell"
    p.assert_converged()


def need_sudo():
    if not shutil.which("sudo"):
        need("sudo is not installed: tests/run installs it")


def test_sudo_exec_as_root(rpair, sshd):
    need_sudo()
    exp = simple(rpair)
    rpair.run(env={"SUDO_EXEC": "yes"}, expect=0)
    assert snapshot(rpair.target) == exp


def test_sudo_exec_reaches_what_the_user_cannot(rpair, sshd, pw_user):
    """osynctest may run anything through `sudo -n` (a sudoers.d rule for the test's
    length); the target is root's, mode 0700: only the sudo'ed agent and rsync reach it."""
    need_sudo()
    user, password, pwfile = pw_user
    rule = Path("/etc/sudoers.d/osync-test-osynctest-%d" % os.getpid())
    base = shared_tmpdir("osync-sudo-")
    rule.write_text("osynctest ALL=(ALL) NOPASSWD: ALL\n")
    os.chmod(str(rule), 0o440)
    try:
        target = base / "private"
        target.mkdir(mode=0o700)
        os.chmod(str(target), 0o700)
        put(target, "from_t", "t")
        build(rpair.initiator, {"from_i": "i"})
        spec = "ssh://osynctest@127.0.0.1:%d/%s" % (sshd.port, target)
        r = osync(rpair, spec, "--password-file=%s" % pwfile, env=pw_env(sshd), key=False)
        assert r.returncode == 1, "osynctest reached a 0700 root dir without sudo" + describe_run(r)
        r = osync(rpair, spec, "--password-file=%s" % pwfile,
                  env=pw_env(sshd, SUDO_EXEC="yes"), key=False, expect=0)
        exp = expected({"from_i": "i", "from_t": "t"})
        assert snapshot(target) == exp
        assert snapshot(rpair.initiator) == exp
        assert os.stat(str(target / "from_i")).st_uid == 0
    finally:
        rule.unlink()
        shutil.rmtree(str(base), ignore_errors=True)


# ======================================================================================
# ssh_filter.py
# ======================================================================================

def need_filter():
    assert FILTER.exists(), "%s does not exist" % FILTER


@pytest.mark.parametrize("form", ["cli", "env", "conf"])
def test_filter_allows_osync_with_token(rpair, sshd, filter_keys, root_user, form):
    need_filter()
    key = filter_keys["plain"]
    build(rpair.initiator, {"a": "a", "m": "old m", "d/b": "b"})
    build(rpair.target, {"t": "t"})
    if form == "conf":
        conf = rpair.write_conf(keys={"SSH_RSA_PRIVATE_KEY": str(key), "_REMOTE_TOKEN": TOKEN})

        def run():
            return rpair.run_conf(conf, expect=0)
    else:
        env = {"_REMOTE_TOKEN": TOKEN} if form == "env" else {}
        args = ["--remote-token=%s" % TOKEN] if form == "cli" else []

        def run():
            return osync(rpair, rpair.target_spec, "--rsakey=%s" % key, *args, env=env,
                         key=False, expect=0)
    mark = sshd.mark()
    run()
    exp = expected({"a": "a", "m": "old m", "d/b": "b", "t": "t"})
    assert snapshot(rpair.target) == exp and snapshot(rpair.initiator) == exp
    assert sshd.connections(mark) == 1
    remove(rpair.initiator, "d/b")
    put(rpair.initiator, "m", "new m", T0 + 10)
    run()
    assert (rpair.deleted("target") / "d" / "b").read_text() == "b"
    assert (rpair.backup("target") / "m").read_text() == "old m"
    assert snapshot(rpair.target) == snapshot(rpair.initiator)


@pytest.mark.parametrize("token", ["wrong", "none", "prefix"])
def test_filter_refuses_osync_without_the_token(rpair, sshd, filter_keys, root_user, token):
    need_filter()
    flog = FilterLog(root_user)
    build(rpair.initiator, {"a": "a"})
    args = ["--rsakey=%s" % filter_keys["plain"]]
    if token == "wrong":
        args.append("--remote-token=not-%s" % TOKEN)
    elif token == "prefix":
        args.append("--remote-token=%s" % TOKEN[:-1])
    r = osync(rpair, rpair.target_spec, *args, key=False)
    assert_sentence(r)
    assert snapshot(rpair.target, exclude_workdir=False) == {}
    assert flog.new().strip(), "the refusal was not logged in %s" % flog.path


def test_filter_sudo_only_with_allow_sudo(rpair, sshd, filter_keys, root_user):
    need_filter()
    need_sudo()
    build(rpair.initiator, {"a": "a"})
    flog = FilterLog(root_user)
    r = osync(rpair, rpair.target_spec, "--rsakey=%s" % filter_keys["plain"],
              "--remote-token=%s" % TOKEN, env={"SUDO_EXEC": "yes"}, key=False)
    assert r.returncode == 1, "sudo went through a filter without --allow-sudo" + describe_run(r)
    no_traceback(r)
    assert flog.new().strip(), "the refused sudo was not logged"
    assert snapshot(rpair.target, exclude_workdir=False) == {}
    osync(rpair, rpair.target_spec, "--rsakey=%s" % filter_keys["sudo"],
          "--remote-token=%s" % TOKEN, env={"SUDO_EXEC": "yes"}, key=False, expect=0)
    assert snapshot(rpair.target) == expected({"a": "a"})


def _refused(r, flog, what):
    assert r.returncode not in (0, 255), \
        "%s: exit %s (0 = allowed; 255 = ssh itself failed)\nstdout: %s\nstderr: %s" % (
            what, r.returncode, r.stdout, r.stderr)
    assert flog.new().strip(), "%s: the refusal was not logged" % what


DIRECT = [
    ("no-token", "touch {marker}"),
    ("no-token-rsync", "rsync --server -logDtpre.iLsfxC . {dir}"),
    ("token-ls", "env _REMOTE_TOKEN={token} ls {dir}"),
    ("token-python-c", "env _REMOTE_TOKEN={token} python3 -c 'import os; open(\"{marker}\", \"w\")'"),
    ("token-sh", "env _REMOTE_TOKEN={token} sh -c 'touch {marker}'"),
    ("token-then-command", "env _REMOTE_TOKEN={token}; touch {marker}"),
    ("wrong-token", "env _REMOTE_TOKEN=x{token} rsync --server -logDtpre.iLsfxC . {dir}"),
    ("sudo-without-allow", "env _REMOTE_TOKEN={token} sudo -n rsync --server -logDtpre.iLsfxC . {dir}"),
    ("token-in-argument", "touch {marker} env _REMOTE_TOKEN={token}"),
]


@pytest.mark.parametrize("name,command", DIRECT, ids=[d[0] for d in DIRECT])
def test_filter_refuses_direct_commands(sshd, filter_keys, root_user, tmp_path, name, command):
    need_filter()
    d = shared_tmpdir("osync-filter-")
    try:
        put(d, "unique-listing-name-%s" % TOKEN, "x")
        marker = d / "MARKER"
        flog = FilterLog(root_user)
        r = sshd.ssh(filter_keys["plain"], command.format(token=TOKEN, marker=marker, dir=d))
        _refused(r, flog, name)
        assert str(d) in flog.new(), "%s: the refusal was not logged:\n%s" % (name, flog.new())
        assert not marker.exists(), "%s: the command ran" % name
        assert "unique-listing-name" not in r.stdout, "%s: the command ran" % name
        assert os.listdir(str(d)) == ["unique-listing-name-%s" % TOKEN]
    finally:
        shutil.rmtree(str(d), ignore_errors=True)


def test_filter_refuses_interactive_shell(sshd, filter_keys, root_user):
    need_filter()
    d = shared_tmpdir("osync-filter-")
    try:
        marker = d / "MARKER"
        flog = FilterLog(root_user)
        r = sshd.ssh(filter_keys["plain"], None,
                     input="env _REMOTE_TOKEN=%s touch %s\ntouch %s\n" % (TOKEN, marker, marker))
        _refused(r, flog, "no command")
        assert not marker.exists(), "the plain shell ran its input"
    finally:
        shutil.rmtree(str(d), ignore_errors=True)


@pytest.mark.parametrize("command", [
    "env _REMOTE_TOKEN={token}; rm -rf ~",
    "env _REMOTE_TOKEN={token} ; rm -rf ~",
    "env _REMOTE_TOKEN={token} && rm -rf ~",
    "env _REMOTE_TOKEN={token} rm -rf ~",
    "env _REMOTE_TOKEN={token} rsync --server -logDtpre.iLsfxC . /tmp/x; rm -rf ~",
    "env _REMOTE_TOKEN={token} rsync --server -logDtpre.iLsfxC . \"$(rm -rf ~)\"",
    "env _REMOTE_TOKEN={token} rsync --server -logDtpre.iLsfxC . `rm -rf ~`",
], ids=["semicolon", "space-semicolon", "and", "rm-directly", "rsync-then-rm", "dollar-paren",
        "backticks"])
def test_filter_injection_is_refused(sshd, filter_user, command):
    """As the throwaway user `osyncfilter`: a filter that lets this through wipes only
    that user's home, where the marker lives."""
    need_filter()
    user, key = filter_user
    home = Path(user.pw_dir)
    if not home.is_dir():          # wiped by an earlier case that got through
        home.mkdir(parents=True)
        os.chown(str(home), user.pw_uid, user.pw_gid)
    marker = home / "MARKER-must-survive"
    marker.write_text("still here")
    os.chown(str(marker), user.pw_uid, user.pw_gid)
    flog = FilterLog(user)
    cmd = command.format(token=TOKEN)
    r = sshd.ssh(key, cmd, user="osyncfilter")
    assert marker.exists() and marker.read_text() == "still here", \
        "%r removed the home directory\n%s" % (cmd, r.stderr)
    assert r.returncode not in (0, 255), (cmd, r.returncode, r.stdout, r.stderr)
    if "rsync --server" not in cmd:
        # the plain refusals must be logged (an rsync --server with junk arguments may
        # also be stopped by rsync itself)
        assert flog.new().strip(), "%r: the refusal was not logged" % cmd
