"""Whole-run checks of behaviours that once went wrong."""
import os

from conftest import clean_env, need, pyenv_python, run_osync


def run(tmp_path, *args, target="b", python=None, **env):
    """A quicksync run of tmp_path/a with tmp_path/<target>; `env` adds settings."""
    argv = ["--initiator=%s" % (tmp_path / "a"), "--target=%s" % (tmp_path / target)] + list(args)
    return run_osync(argv, clean_env(tmp_path / "log", env), tmp_path, logfile=tmp_path / "log", python=python)


def test_replica_roots_keep_their_own_attributes(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "f").write_text("x")
    (tmp_path / "b").mkdir()
    os.chmod(str(tmp_path / "a"), 0o700)
    os.chmod(str(tmp_path / "b"), 0o755)
    os.utime(str(tmp_path / "a"), (1000000000, 1000000000))
    before = os.stat(str(tmp_path / "b"))
    assert run(tmp_path).returncode == 0
    after = os.stat(str(tmp_path / "b"))
    assert (tmp_path / "b" / "sub" / "f").read_text() == "x"
    assert oct(after.st_mode) == oct(before.st_mode)
    assert after.st_mtime != 1000000000


def test_names_starting_with_comment_characters_are_transferred(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("#hash", ";semi", "# space"):
        (tmp_path / "a" / name).write_text(name)
    assert run(tmp_path).returncode == 0
    for name in ("#hash", ";semi", "# space"):
        assert (tmp_path / "b" / name).read_text() == name


def test_pointing_a_job_at_another_target_merges_instead_of_deleting(tmp_path):
    """The state belongs to one pair of replicas: pointed at a new, empty target, the same
    job must not read the missing files as deletions to propagate to the initiator."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "keep").write_text("data")
    assert run(tmp_path).returncode == 0
    (tmp_path / "new").mkdir()
    result = run(tmp_path, target="new")
    assert result.returncode == 2, result.stderr
    assert "recorded for other replicas" in result.stderr
    assert (tmp_path / "a" / "keep").read_text() == "data"
    assert (tmp_path / "new" / "keep").read_text() == "data"


def test_state_is_shared_between_utf8_and_c_locale_pythons(tmp_path):
    """cron often runs with LC_ALL=C, where Python 3.6 decodes names as ASCII: a state
    written by an interactive run must still mean the same files there."""
    python36 = pyenv_python("3.6")
    if python36 is None:
        need("no Python 3.6 under pyenv")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    name = "caf\u00e9 \u65e5\u672c"
    (tmp_path / "a" / name).write_text("x")
    (tmp_path / "a" / "other").write_text("y")
    assert run(tmp_path).returncode == 0
    os.unlink(str(tmp_path / "a" / name))
    result = run(tmp_path, "--summary", python=python36, LC_ALL="C", LANG="C", PYTHONUTF8=None)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(os.path.join(str(tmp_path / "b"), name))
    assert os.path.exists(os.path.join(str(tmp_path / "b"), ".osync_workdir", "deleted", name))
    assert "Target has 0 updates." in result.stdout  # nothing else was taken for new


def test_new_files_follow_the_umask_when_permissions_are_not_synced(tmp_path):
    """osync.py keeps its own files private by their modes, not with a umask that would
    also make every file rsync creates private."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "shared").write_text("x")
    os.chmod(str(tmp_path / "a" / "shared"), 0o664)
    old_umask = os.umask(0o022)
    try:
        assert run(tmp_path, PRESERVE_PERMISSIONS="no", PRESERVE_EXECUTABILITY="no").returncode == 0
    finally:
        os.umask(old_umask)
    assert os.stat(str(tmp_path / "b" / "shared")).st_mode & 0o777 == 0o644
    for side in ("a", "b"):
        assert os.stat(str(tmp_path / side / ".osync_workdir")).st_mode & 0o777 == 0o700
    assert os.stat(str(tmp_path / "log")).st_mode & 0o777 == 0o600


def test_osync_sh_lists_are_the_baseline_of_the_first_run(tmp_path):
    """Switching from osync.sh: its tree-after lists say what both sides held, so a file
    deleted since then is a deletion to propagate, not a new file to copy back."""
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "kept").write_text("k")
        (tmp_path / side / "gone").write_text("g")
        os.utime(str(tmp_path / side / "kept"), (1000000000, 1000000000))
        os.utime(str(tmp_path / side / "gone"), (1000000000, 1000000000))
    state_dir = tmp_path / "a" / ".osync_workdir" / "state"
    state_dir.mkdir(parents=True)
    (tmp_path / "b" / ".osync_workdir" / "state").mkdir(parents=True)   # osync.sh makes it on both sides
    for side in ("initiator", "target"):
        (state_dir / ("%s-tree-after-quicksync_task" % side)).write_text("gone\nkept\n")
    os.unlink(str(tmp_path / "a" / "gone"))
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "osync.sh lists" in result.stdout
    assert not (tmp_path / "b" / "gone").exists()
    assert (tmp_path / "b" / ".osync_workdir" / "deleted" / "gone").read_text() == "g"
    assert (tmp_path / "a" / "kept").read_text() == (tmp_path / "b" / "kept").read_text() == "k"


def test_a_file_and_a_directory_of_the_same_name_are_resolved(tmp_path):
    """osync.sh could never finish this (its KNOWNISSUES #1): the directory, which holds
    files, wins; the file is kept in the backup dir."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "x").mkdir(parents=True)
    (tmp_path / "a" / "x").write_text("a file")
    (tmp_path / "b" / "x" / "inside").write_text("in")
    assert run(tmp_path).returncode == 0
    for side in ("a", "b"):
        assert (tmp_path / side / "x" / "inside").read_text() == "in"
    assert (tmp_path / "a" / ".osync_workdir" / "backup" / "x").read_text() == "a file"
    second = run(tmp_path, "--summary")
    assert second.returncode == 0 and "Initiator has 0 updates." in second.stdout
