"""The work dir is never followed through a link, nor used when another user owns or can
write it; nothing reached through a link (COPY_SYMLINKS) is deleted or backed up; dated
backup names fit the name limit; runs started at once on a fresh pair take turns.

Each test runs the real osync.py on the pair fixture (a local and an ssh target)."""
import os
import subprocess
import sys
import time

import pytest

from conftest import (OSYNC, T0, WORKDIR, describe, dir_files, find_content, finish_osync, popen_osync, put,
                      remove, snapshot)

PARTS = ["_tmp", "backup", "deleted", "state", "_partial", WORKDIR]
CANARY = b"belongs to someone else"


def outside_dir(pair, name="outside"):
    """A directory outside both replicas holding a canary file."""
    directory = pair.base / name
    directory.mkdir()
    (directory / "canary").write_bytes(CANARY)
    return directory


def synced_pair_with_pending_work(pair):
    """A synced pair, then edits and deletions on both sides, so that the next run
    would back up, soft-delete, transfer and write the state on both replicas."""
    for name in ("a", "b", "c", "d"):
        put(pair.initiator, name, name * 3)
    pair.run(expect=0)
    put(pair.initiator, "a", "a edited", mtime=T0 + 100)
    remove(pair.initiator, "b")
    put(pair.target, "c", "c edited", mtime=T0 + 100)
    remove(pair.target, "d")


def part_path(pair, side, part):
    root = pair.root(side)
    return root / WORKDIR if part == WORKDIR else root / WORKDIR / part


def both_replicas(pair):
    """Everything in both replicas, work dirs included, with file mtimes."""
    return {side: snapshot(pair.root(side), mtimes=True, exclude_workdir=False)
            for side in ("initiator", "target")}


def error_lines(result, word):
    return [line for line in result.output.splitlines() if word in line]


def assert_refused_in_one_sentence(result, word, path):
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.output and "internal error" not in result.output, describe(result)
    lines = error_lines(result, word)
    assert len(lines) == 1, describe(result)
    assert str(path) in lines[0], describe(result)


def replace_with_link(path, destination):
    if path.is_dir() and not path.is_symlink():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    os.symlink(str(destination), str(path))


@pytest.mark.parametrize("side", ["initiator", "target"])
@pytest.mark.parametrize("part", PARTS)
def test_a_linked_work_dir_part_is_refused_before_any_write(pair, side, part):
    synced_pair_with_pending_work(pair)
    outside = outside_dir(pair)
    path = part_path(pair, side, part)
    replace_with_link(path, outside)
    before = both_replicas(pair)
    result = pair.run()
    assert_refused_in_one_sentence(result, "symbolic link", path)
    assert dir_files(outside) == ["canary"] and (outside / "canary").read_bytes() == CANARY
    assert both_replicas(pair) == before, describe(result)


@pytest.mark.parametrize("part", PARTS)
def test_a_linked_work_dir_part_is_refused_in_a_dry_run_too(pair, part):
    synced_pair_with_pending_work(pair)
    outside = outside_dir(pair)
    path = part_path(pair, "target", part)
    replace_with_link(path, outside)
    before = both_replicas(pair)
    result = pair.run("--dry")
    assert_refused_in_one_sentence(result, "symbolic link", path)
    assert dir_files(outside) == ["canary"]
    assert both_replicas(pair) == before, describe(result)


@pytest.mark.parametrize("side", ["initiator", "target"])
@pytest.mark.parametrize("part", PARTS)
def test_a_work_dir_part_that_is_a_file_is_refused_with_what_to_do(pair, side, part):
    synced_pair_with_pending_work(pair)
    path = part_path(pair, side, part)
    subprocess.run(["rm", "-rf", str(path)], check=True)
    path.write_bytes(CANARY)
    before = both_replicas(pair)
    result = pair.run()
    assert_refused_in_one_sentence(result, "is not a directory", path)
    assert "move it away" in error_lines(result, "is not a directory")[0]
    assert path.read_bytes() == CANARY
    assert both_replicas(pair) == before, describe(result)


def another_user():
    """The uid of a user other than the one running the tests: nobody's, else an unused uid."""
    import pwd
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        uid = 54321
    assert uid != os.geteuid()
    return uid


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_a_work_dir_of_another_user_is_refused(pair, side):
    synced_pair_with_pending_work(pair)
    path = part_path(pair, side, WORKDIR)
    stranger = another_user()
    os.chown(str(path), stranger, stranger)
    before = both_replicas(pair)
    result = pair.run()
    assert_refused_in_one_sentence(result, "belongs to uid %d" % stranger, path)
    assert both_replicas(pair) == before, describe(result)


@pytest.mark.parametrize("side", ["initiator", "target"])
@pytest.mark.parametrize("part", [WORKDIR, "deleted"])
def test_a_work_dir_others_can_write_is_refused(pair, side, part):
    synced_pair_with_pending_work(pair)
    path = part_path(pair, side, part)
    os.chmod(str(path), 0o777)
    before = both_replicas(pair)
    result = pair.run()
    assert_refused_in_one_sentence(result, "can be written by other users", path)
    assert "chmod go-w" in result.output
    assert both_replicas(pair) == before, describe(result)


@pytest.mark.parametrize("side", ["initiator", "target"])
@pytest.mark.parametrize("problem", ["link", "writable by others"])
def test_a_custom_state_dir_must_be_a_real_dir_nobody_else_writes(pair, side, problem):
    """A custom state dir may lie anywhere (the admin's choice), but is never followed
    through a link nor used when others can write it."""
    put(pair.initiator, "f", "data")
    outside = outside_dir(pair)
    state_dir = pair.base / ("state-" + side)
    if problem == "link":
        os.symlink(str(outside), str(state_dir))
    else:
        state_dir.mkdir()
        os.chmod(str(state_dir), 0o777)
    key = "INITIATOR_CUSTOM_STATE_DIR" if side == "initiator" else "TARGET_CUSTOM_STATE_DIR"
    result = pair.run(env={key: str(state_dir)})
    word = "symbolic link" if problem == "link" else "can be written by other users"
    assert_refused_in_one_sentence(result, word, state_dir)
    assert "custom state dir" in error_lines(result, word)[0]
    assert dir_files(outside) == ["canary"]
    assert not (pair.target / "f").exists()


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_a_linked_lock_is_refused_and_never_read_through(pair, side):
    synced_pair_with_pending_work(pair)
    outside = outside_dir(pair)
    lock = pair.lock(side)
    os.symlink(str(outside / "canary"), str(lock))
    before = both_replicas(pair)
    result = pair.run()
    assert_refused_in_one_sentence(result, "The lock", lock)
    assert "symbolic link" in error_lines(result, "The lock")[0]
    assert (outside / "canary").read_bytes() == CANARY
    assert both_replicas(pair) == before, describe(result)


def test_a_first_run_with_a_linked_work_dir_syncs_nothing_of_it(pair):
    """The root's .osync_workdir is never user data, whatever it is: here a link to a
    directory of someone else, on the initiator of a pair that never synced."""
    put(pair.initiator, "f", "data")
    outside = outside_dir(pair)
    os.symlink(str(outside), str(pair.initiator / WORKDIR))
    result = pair.run()
    assert_refused_in_one_sentence(result, "symbolic link", pair.initiator / WORKDIR)
    assert dir_files(outside) == ["canary"]
    assert not (pair.target / WORKDIR).is_symlink()
    assert find_content(pair.target, CANARY) == []


@pytest.mark.parametrize("kind", ["link", "file"])
def test_the_scan_never_lists_the_roots_work_dir(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    if kind == "link":
        (tmp_path / "elsewhere").mkdir()
        os.symlink(str(tmp_path / "elsewhere"), str(root / WORKDIR))
    else:
        (root / WORKDIR).write_text("not a dir")
    code = ("import sys; sys.path.insert(0, %r); import osync\n"
            "for options in ({}, {'copy_links': True}, {'dir_links': True}):\n"
            "    print(sorted(e.path for e in osync.walk_tree(%r, osync.PathFilter([]), options)))\n"
            % (str(OSYNC.parent), str(root)))
    listed = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, universal_newlines=True,
                            check=True).stdout.split("\n")
    assert listed[:3] == ["['f']"] * 3


# -- COPY_SYMLINKS never reaches outside the root ---------------------------------------

def linked_pair(pair, side, option):
    """COPY_SYMLINKS or KEEP_DIRLINKS on, `side` holds x -> a directory outside with
    `passwd`; synced (the other side has a real directory x)."""
    outside = pair.base / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(CANARY)
    os.utime(str(outside / "passwd"), (T0, T0))
    os.symlink(str(outside), str(pair.root(side) / "x"))
    env = {option: "yes"}
    pair.run(env=env, expect=0)
    other = pair.root(pair.other(side))
    assert (other / "x" / "passwd").read_bytes() == CANARY
    return outside, other, env


def assert_left_alone(result, outside, pair, side):
    """The file behind the link is where it was, as it was, and nowhere in the work dir;
    the run says so in one sentence naming the path."""
    assert (outside / "passwd").read_bytes() == CANARY, describe(result)
    assert os.stat(str(outside / "passwd")).st_nlink == 1, "the outside file was hard-linked" + describe(result)
    assert find_content(pair.workdir(side), CANARY) == []
    assert dir_files(pair.deleted(side)) == [] and dir_files(pair.backup(side)) == []
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.output and "internal error" not in result.output, describe(result)
    lines = error_lines(result, "x/passwd")
    assert len(lines) == 1 and "symbolic link" in lines[0], describe(result)


@pytest.mark.parametrize("option", ["COPY_SYMLINKS", "KEEP_DIRLINKS"])
@pytest.mark.parametrize("side", ["initiator", "target"])
def test_a_deletion_never_moves_a_file_reached_through_a_link(pair, side, option):
    outside, other, env = linked_pair(pair, side, option)
    (other / "x" / "passwd").unlink()
    result = pair.run(env=env)
    assert_left_alone(result, outside, pair, side)


@pytest.mark.parametrize("option", ["COPY_SYMLINKS", "KEEP_DIRLINKS"])
@pytest.mark.parametrize("side", ["initiator", "target"])
def test_an_overwrite_never_backs_up_a_file_reached_through_a_link(pair, side, option):
    outside, other, env = linked_pair(pair, side, option)
    put(other, "x/passwd", "replaced", mtime=T0 + 100)
    result = pair.run(env=env)
    assert_left_alone(result, outside, pair, side)


# -- dated backup names fit the name limit ---------------------------------------------

def test_a_250_byte_name_is_updated_with_dated_backups(pair):
    name = "\u00e9" * 125    # 250 bytes in UTF-8
    assert len(name.encode("utf-8")) == 250
    env = {"CONFLICT_BACKUP_MULTIPLE": "yes"}
    put(pair.initiator, name, "version 0")
    pair.run(env=env, expect=0)
    for version in (1, 2, 3):
        put(pair.initiator, name, "version %d" % version, mtime=T0 + 100 * version)
        result = pair.run(env=env)
        assert result.returncode == 0, describe(result)
        assert (pair.target / name).read_text() == "version %d" % version
    kept = sorted(path for path in pair.backup("target").iterdir())
    assert sorted(path.read_text() for path in kept) == ["version 0", "version 1", "version 2"]
    for path in kept:
        raw = os.fsencode(path.name)
        assert len(raw) <= 255
        raw.decode("utf-8")   # shortened at a character boundary
        assert path.name.startswith("\u00e9" * 100)


# -- concurrent first runs ---------------------------------------------------------------

# Imports osync.py, then waits for a byte on stdin before it runs: the eight runs start
# within a fraction of a millisecond of each other, not spread by interpreter start-up.
STARTER = ("import sys; sys.path.insert(0, sys.argv[1]); import osync; sys.stdin.read(1); "
           "sys.exit(osync.main(sys.argv[2:]))")


def start_together(pair, count, env):
    environment = pair.env(dict(getattr(pair, "quick_env", {}), **env))
    runs = [popen_osync(pair.quick_args(), environment, pair.cwd, python=pair.interpreter, code=STARTER,
                        stdin=subprocess.PIPE) for _ in range(count)]
    time.sleep(1.5)   # every one of them imported and waiting
    for process in runs:
        process.stdin.write("g")
        process.stdin.flush()
    return runs


def test_eight_first_runs_at_once_one_syncs_the_others_refuse_on_the_lock(pair_factory):
    for attempt in range(5):
        pair = pair_factory()
        # One slow transfer, so the run that takes the locks holds them while the others start.
        put(pair.initiator, "big", os.urandom(3 << 20))
        runs = start_together(pair, 8, {"BANDWIDTH": "1000"})
        results = []
        for process in runs:
            r = finish_osync(process, timeout=180, logfile=pair.logfile)
            results.append((r.returncode, r.output))
        report = "\n".join("exit %s: %s" % (code, text.strip()[-600:]) for code, text in results)
        assert "Cannot prepare" not in report, report
        assert sorted(code for code, text in results) == [0] + [1] * 7, report
        for code, text in results:
            if code == 1:
                assert "There is already a running instance" in text, report
        assert (pair.target / "big").read_bytes() == (pair.initiator / "big").read_bytes()
