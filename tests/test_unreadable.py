"""What cannot be read is never deleted (DESIGN §4.10), directory modes without owner x
are not spread, and CONFLICT_BACKUP=no keeps no loser (DESIGN §3)."""

import fcntl
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import (OSYNC, T0, WORKDIR, build, clean_env, dir_files,
                      expected, need, put, run_osync, snapshot)

SIDES = ["initiator", "target"]
USER = "osyncperm"
# root's pyenv Pythons are out of reach of another user: runs as USER use the system one
SYSTEM_PYTHON = "/usr/bin/python3"


def synced(pair, entries, env=None):
    """Build `entries` on the initiator, sync once, check both trees equal them."""
    build(pair.initiator, entries)
    pair.run(env=env, expect=0)
    exp = expected(entries)
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    return exp


# ======================================================================================
# CONFLICT_BACKUP=no
# ======================================================================================

@pytest.mark.parametrize("backup", ["yes", "no"])
def test_conflict_loser_is_kept_only_with_conflict_backup(pair, backup):
    env = {"CONFLICT_BACKUP": backup}
    synced(pair, {"dir/x": "base", "other": "o"}, env)
    put(pair.initiator, "dir/x", "initiator's newer edit", T0 + 20)
    put(pair.target, "dir/x", "target's older edit", T0 + 10)
    r = pair.run(env=env, expect=0)
    exp = expected({"dir/x": "initiator's newer edit", "other": "o"})
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    assert "Conflict on dir/x" in r.output, "the conflict is still logged"
    if backup == "no":
        assert dir_files(pair.backup("target")) == []
        assert "the target's version is replaced (CONFLICT_BACKUP=no)" in r.output
    else:
        assert snapshot(pair.backup("target")) == expected({"dir/x": "target's older edit"})
        assert "the target's version is kept in its backup dir" in r.output
    assert dir_files(pair.backup("initiator")) == []
    pair.assert_converged(env=env)


# ======================================================================================
# Runs as a user that permission bits apply to (root ignores them)
# ======================================================================================

def ensure_plain_user():
    """The local user USER, with a home (ssh wants one), created when missing.  Test files
    on parallel workers share the user, so one of them at a time sets it up."""
    if not shutil.which("useradd") or not shutil.which("runuser"):
        need("useradd/runuser are not installed (passwd, util-linux): tests/run installs them")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        need("%s is missing: a non-root user cannot run root's pyenv Pythons" % SYSTEM_PYTHON)
    with open("/tmp/osync-test-user.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _set_up_plain_user()


def _set_up_plain_user():
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, universal_newlines=True)
    # sshd refuses even a key to a locked account ("!" as password): set one no one knows
    subprocess.run(["chpasswd"], input="%s:%s\n" % (USER, secrets.token_hex(16)), check=True,
                   universal_newlines=True)
    user = pwd.getpwnam(USER)
    Path(user.pw_dir).mkdir(parents=True, exist_ok=True)
    os.chown(user.pw_dir, user.pw_uid, user.pw_gid)
    return user


def chown_tree(path, user):
    for directory, dirs, files in os.walk(str(path)):
        os.chown(directory, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(directory, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def make_searchable(path):
    """What the user does to fix `chmod -R 644` or `chmod 000`: directories 0755, files 0644."""
    os.chmod(str(path), 0o755)
    for directory, dirs, files in os.walk(str(path)):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


class UserPair(object):
    """Two replicas owned by USER, synced by osync.py running as USER: locally, or with
    an ssh:// target reached as USER on the sshd fixture (the agent runs as USER too)."""

    def __init__(self, kind, request):
        self.user = ensure_plain_user()
        self.base = Path(tempfile.mkdtemp(prefix="osync-unreadable-", dir="/tmp"))
        os.chmod(str(self.base), 0o755)
        self.initiator = self.base / "initiator"
        self.target = self.base / "target"
        self.initiator.mkdir()
        self.target.mkdir()
        self.logfile = self.base / "osync.log"
        self.env = {"HOME": self.user.pw_dir, "USER": USER, "LOGNAME": USER}
        self.target_spec = str(self.target)
        self.extra_args = []
        if kind not in ("local", "local-oldest"):
            server = request.getfixturevalue("sshd")
            key = self.base / "id_user"
            shutil.copy(str(server.key), str(key))
            os.chmod(str(key), 0o600)
            server.authorize(server.pubkey, user=USER)
            self.target_spec = server.spec(str(self.target), user=USER)
            self.extra_args = ["--rsakey=%s" % key]
            self.env.update({"SSH_OPTIONAL_ARGS": server.ssh_optional_args(), "REMOTE_PYTHON": SYSTEM_PYTHON})
        # a copy the user can read wherever the checkout lives (it may be under /root)
        self.osync = self.base / "osync.py"
        shutil.copy(str(OSYNC), str(self.osync))
        chown_tree(self.base, self.user)

    def root(self, side):
        return self.initiator if side == "initiator" else self.target

    def workdir(self, side):
        return self.root(side) / WORKDIR

    def run(self, env=None, expect=None):
        chown_tree(self.base, self.user)   # what the test built as root
        merged = dict(self.env)
        merged.update(env or {})
        argv = ["--initiator=%s" % self.initiator, "--target=%s" % self.target_spec,
                "--non-interactive"] + self.extra_args
        return run_osync(argv, clean_env(self.logfile, merged), self.base, expect, logfile=self.logfile,
                         python=SYSTEM_PYTHON, prefix=["runuser", "-u", USER, "--"], script=self.osync)

    def close(self):
        make_searchable(self.base)
        shutil.rmtree(str(self.base), ignore_errors=True)


@pytest.fixture
def upair(pair_kind, request):
    if os.geteuid() != 0:
        need("needs root, to create the user that the runs are made as")
    user_pair = UserPair(pair_kind, request)
    yield user_pair
    user_pair.close()


def other(side):
    return "target" if side == "initiator" else "initiator"


def upair_synced(upair, entries):
    build(upair.initiator, entries)
    upair.run(expect=0)
    exp = expected(entries)
    assert snapshot(upair.initiator) == exp
    assert snapshot(upair.target) == exp
    return exp


def nothing_deleted_or_replaced_below(upair, *directories):
    for side in SIDES:
        assert dir_files(upair.workdir(side) / "deleted") == [], "something was deleted on the %s" % side
        replaced = [path for path in dir_files(upair.workdir(side) / "backup")
                    if path.split("/")[0] in directories]
        assert replaced == [], "overwritten on the %s" % side


# ======================================================================================
# Unreadable is never deleted
# ======================================================================================

@pytest.mark.parametrize("side", SIDES)
def test_items_that_cannot_be_stated_leave_their_directory_alone(upair, side):
    """chmod -R 644 dir: dir can be listed but nothing in it stat'ed.  Nothing of dir is
    deleted or changed on the other side, its mode 0644 is not copied; the rest syncs; once
    the user restores the modes, the next run syncs everything without loss."""
    upair_synced(upair, {"dir/a": "a", "dir/sub/b": "b", "top": "top"})
    broken, intact = upair.root(side), upair.root(other(side))
    put(intact, "dir/new", "made on the other side", T0 + 30)
    put(broken, "top", "top changed", T0 + 30)
    for directory, dirs, files in os.walk(str(broken / "dir"), topdown=False):
        for name in dirs + files:
            os.chmod(os.path.join(directory, name), 0o644)
    os.chmod(str(broken / "dir"), 0o644)
    r = upair.run(expect=1)
    assert "Left dir alone on both replicas: cannot read a in it: Permission denied" in r.output, r.output
    assert snapshot(intact) == expected({"dir/a": "a", "dir/sub/b": "b", "dir/new": "made on the other side",
                                         "top": "top changed"})
    assert stat.S_IMODE(os.stat(str(intact / "dir")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(str(intact / "dir" / "sub")).st_mode) == 0o755
    nothing_deleted_or_replaced_below(upair, "dir")

    make_searchable(broken)
    upair.run(expect=0)
    exp = expected({"dir/a": "a", "dir/sub/b": "b", "dir/new": "made on the other side", "top": "top changed"})
    assert snapshot(upair.initiator) == exp
    assert snapshot(upair.target) == exp
    assert dir_files(upair.workdir("initiator") / "deleted") == []
    assert dir_files(upair.workdir("target") / "deleted") == []
    before = (snapshot(upair.initiator, mtimes=True), snapshot(upair.target, mtimes=True))
    upair.run(expect=0)
    assert (snapshot(upair.initiator, mtimes=True), snapshot(upair.target, mtimes=True)) == before


@pytest.mark.parametrize("side", SIDES)
def test_unreadable_directory_is_left_alone_and_synced_once_readable(upair, side):
    """chmod 000 dir (and, one level down, a directory whose items cannot be stat'ed):
    what the other side holds below them is neither deleted nor replaced; a deletion made
    on the other side meanwhile is carried out once they are readable again."""
    upair_synced(upair, {"dir/a": "a", "dir/gone": "g", "deep/sub/c": "c", "deep/ok": "ok"})
    broken, intact = upair.root(side), upair.root(other(side))
    os.remove(str(intact / "dir" / "gone"))
    put(intact, "dir/a", "a edited on the other side", T0 + 30)
    put(intact, "deep/sub/new", "new", T0 + 30)
    os.chmod(str(broken / "deep" / "sub" / "c"), 0o644)
    os.chmod(str(broken / "deep" / "sub"), 0o644)
    os.chmod(str(broken / "dir"), 0o000)
    r = upair.run(expect=1)
    assert "Left dir alone on both replicas: cannot list directory: Permission denied" in r.output, r.output
    assert "Left deep/sub alone on both replicas" in r.output, r.output
    assert snapshot(intact) == expected({"dir/a": "a edited on the other side", "deep/sub/c": "c",
                                         "deep/sub/new": "new", "deep/ok": "ok"})
    assert stat.S_IMODE(os.stat(str(intact / "dir")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(str(intact / "deep" / "sub")).st_mode) == 0o755
    nothing_deleted_or_replaced_below(upair, "dir", "deep")

    make_searchable(broken)
    upair.run(expect=0)
    exp = expected({"dir/a": "a edited on the other side", "deep/sub/c": "c", "deep/sub/new": "new",
                    "deep/ok": "ok"})
    assert snapshot(upair.initiator) == exp
    assert snapshot(upair.target) == exp
    assert snapshot(upair.workdir(side) / "deleted") == expected({"dir/gone": "g"})


@pytest.mark.parametrize("side", SIDES)
def test_directory_deleted_on_the_other_side_while_unreadable_here(upair, side):
    """The other side deleted dir while its items cannot be stat'ed here: nothing here is
    deleted, nothing is recreated there; once readable, the deletion is carried out
    into deleted/, so nothing is lost."""
    upair_synced(upair, {"dir/a": "a", "dir/sub/b": "b", "top": "top"})
    broken, intact = upair.root(side), upair.root(other(side))
    shutil.rmtree(str(intact / "dir"))
    os.chmod(str(broken / "dir" / "sub"), 0o644)
    os.chmod(str(broken / "dir"), 0o644)
    r = upair.run(expect=1)
    assert snapshot(intact) == expected({"top": "top"})
    assert snapshot(broken) == expected({"dir/a": "a", "dir/sub/b": "b", "top": "top"})
    assert "Left dir alone on both replicas" in r.output, r.output
    make_searchable(broken)
    upair.run(expect=0)
    assert snapshot(broken) == expected({"top": "top"})
    assert snapshot(upair.workdir(side) / "deleted") == expected({"dir/a": "a", "dir/sub/b": "b"})


def test_unreadable_file_is_retried_until_it_can_be_read(upair):
    """A file the sync user cannot read (mode 000): rsync cannot send it, the other copy
    stays as it was, and the next run after the fix sends it."""
    upair_synced(upair, {"f": "old", "g": "g"})
    put(upair.initiator, "f", "new version", T0 + 30)
    put(upair.initiator, "g", "g changed", T0 + 30)
    os.chmod(str(upair.initiator / "f"), 0o000)
    r = upair.run(expect=1)
    assert "Could not copy f from the initiator to the target; the next run tries again." in r.output, r.output
    assert snapshot(upair.target) == expected({"f": "old", "g": "g changed"})
    os.chmod(str(upair.initiator / "f"), 0o644)
    upair.run(expect=0)
    assert snapshot(upair.target) == expected({"f": "new version", "g": "g changed"})


@pytest.mark.parametrize("mode", [0o000, 0o644])
def test_unreadable_initiator_root_changes_nothing(upair, mode):
    upair_synced(upair, {"f": "f", "d/g": "g"})
    before = snapshot(upair.target, mtimes=True)
    os.chmod(str(upair.initiator), mode)
    r = upair.run(expect=1)
    assert str(upair.initiator) in r.output, r.output
    assert "cannot be read by this user" in r.output, r.output
    assert snapshot(upair.target, mtimes=True) == before
    os.chmod(str(upair.initiator), 0o755)
    upair.run(expect=0)
    assert snapshot(upair.initiator) == expected({"f": "f", "d/g": "g"})
    assert snapshot(upair.target) == expected({"f": "f", "d/g": "g"})


# ======================================================================================
# A directory mode without owner x is not synced
# ======================================================================================

@pytest.mark.parametrize("side", SIDES)
def test_directory_mode_without_owner_x_is_not_synced(pair, side):
    """As root every item of a 0644 directory can be read, so the directory syncs, but its
    mode would lock its owner out of the other copy: it is kept there, with a warning."""
    synced(pair, {"dir/a": "a", "empty": None})
    changed, kept = pair.root(side), pair.root(other(side))
    put(changed, "dir/a", "a changed", T0 + 30)
    new_empty = changed / "new_empty"
    new_empty.mkdir()
    os.chmod(str(new_empty), 0o600)
    os.chmod(str(changed / "dir"), 0o644)
    os.chmod(str(changed / "empty"), 0o600)
    r = pair.run(expect=2)
    for path, mode in (("dir", "0644"), ("empty", "0600"), ("new_empty", "0600")):
        assert "%s on the %s has mode %s without owner x; its mode is not synced" % (path, side, mode) in r.output
    assert snapshot(kept) == expected({"dir/a": "a changed", "empty": None, "new_empty": None})
    for path in ("dir", "empty"):
        assert stat.S_IMODE(os.stat(str(kept / path)).st_mode) == 0o755, path
    assert stat.S_IMODE(os.stat(str(kept / "new_empty")).st_mode) & 0o700 == 0o700
    # nothing else is done about it on later runs
    r = pair.run(expect=2)
    assert "its mode is not synced" in r.output
    assert stat.S_IMODE(os.stat(str(kept / "dir")).st_mode) == 0o755
    # once the user gives it back owner x, the mode syncs again
    os.chmod(str(changed / "dir"), 0o750)
    for path in ("empty", "new_empty"):
        os.chmod(str(changed / path), 0o700)
    pair.run(expect=0)
    assert stat.S_IMODE(os.stat(str(kept / "dir")).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(str(kept / "empty")).st_mode) == 0o700
