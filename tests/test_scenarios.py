"""Scenario tests: tree before, edits, run, tree after — one per sync rule and feature
(DESIGN.md §3/§4).  Everything goes through the `pair` fixture (conftest.py)."""

import datetime
import os
import re
import subprocess
import time

import pytest

from conftest import (T0, WORKDIR, build, chattr_supported, dir_files, expected, find_content,
                      link, mkdir, need, pid_is_dead, put, remove, snapshot)

SIDES = ["initiator", "target"]


def synced(pair, entries, env=None, mtime=T0):
    """Build `entries` on the initiator, sync once, check both trees equal them."""
    build(pair.initiator, entries, mtime)
    pair.run(env=env, expect=0)
    exp = expected(entries)
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    return exp


def both_equal(pair, exp):
    assert snapshot(pair.initiator) == exp, "initiator tree"
    assert snapshot(pair.target) == exp, "target tree"


# ======================================================================================
# Layout and locks during a run
# ======================================================================================

def test_workdir_layout_on_both_replicas(pair):
    put(pair.initiator, "a", "a")
    put(pair.target, "b", "b")
    pair.run(expect=0)
    for side in SIDES:
        wd = pair.workdir(side)
        for sub in ("state", "backup", "deleted"):
            assert (wd / sub).is_dir(), "%s missing %s" % (side, sub)
        assert not pair.lock(side).exists(), "lock left on %s" % side
    both_equal(pair, expected({"a": "a", "b": "b"}))
    # the work dir itself is never synced into the other tree
    assert not (pair.target / WORKDIR / WORKDIR).exists()


def test_lock_holds_pid_and_instance_during_run(pair, rsync_spy):
    spy = rsync_spy([pair.lock("initiator"), pair.lock("target")])
    put(pair.initiator, "a", "a" * 1000)
    put(pair.target, "b", "b" * 1000)
    p = pair.popen(env=spy.env, instance_id="lockid")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    calls = spy.calls()
    assert calls, "rsync was never run through RSYNC_EXECUTABLE"
    want = "%d@lockid" % p.pid
    for lock in (pair.lock("initiator"), pair.lock("target")):
        seen = [c[str(lock)] for c in calls]
        assert any(s is not None and s.strip() == want for s in seen), (lock, seen, want)
        assert not lock.exists()
    both_equal(pair, expected({"a": "a" * 1000, "b": "b" * 1000}))


# ======================================================================================
# Rule 1: the first run merges
# ======================================================================================

def test_first_run_merges_and_deletes_nothing(pair):
    build(pair.initiator, {"a": "from initiator", "sub/b": "bee", "same": "same content",
                           "only_i_dir/x": "x"})
    build(pair.target, {"c": "from target", "sub/d": "dee", "same": "same content",
                        "only_t_dir/y": "y"})
    ino_i = os.stat(str(pair.initiator / "same")).st_ino
    ino_t = os.stat(str(pair.target / "same")).st_ino
    pair.run(expect=0)
    exp = expected({"a": "from initiator", "sub/b": "bee", "same": "same content",
                    "only_i_dir/x": "x", "c": "from target", "sub/d": "dee",
                    "only_t_dir/y": "y"})
    both_equal(pair, exp)
    # copies keep their mtime
    assert os.stat(str(pair.target / "a")).st_mtime == T0
    assert os.stat(str(pair.initiator / "c")).st_mtime == T0
    # the identical file was only recorded: not rewritten on either side
    assert os.stat(str(pair.initiator / "same")).st_ino == ino_i
    assert os.stat(str(pair.target / "same")).st_ino == ino_t
    for side in SIDES:
        assert dir_files(pair.deleted(side)) == []
        assert dir_files(pair.backup(side)) == []
    pair.assert_converged()


# ======================================================================================
# Rule 2 and 3: changes and deletions propagate
# ======================================================================================

@pytest.mark.parametrize("backup", [None, "yes", "no"])
@pytest.mark.parametrize("side", SIDES)
def test_new_changed_deleted_propagate(pair, side, backup):
    env = {"CONFLICT_BACKUP": backup} if backup else {}
    synced(pair, {"keep": "keep", "mod": "old version", "sub/del": "to delete"}, env)
    src, dst = pair.root(side), pair.root(pair.other(side))
    put(src, "new/file", "brand new", T0 + 50)
    put(src, "mod", "new version!", T0 + 50)
    remove(src, "sub/del")
    pair.run(env=env, expect=0)
    exp = expected({"keep": "keep", "mod": "new version!", "new/file": "brand new", "sub": None})
    both_equal(pair, exp)
    assert os.stat(str(dst / "mod")).st_mtime == T0 + 50
    other = pair.other(side)
    # deletion -> soft-deleted on the other replica, relative path kept
    assert snapshot(pair.deleted(other)) == expected({"sub/del": "to delete"})
    assert dir_files(pair.deleted(side)) == []
    # overwrite -> backup of the old copy on the overwritten replica
    if backup == "no":
        assert dir_files(pair.backup(other)) == []
    else:
        assert snapshot(pair.backup(other)) == expected({"mod": "old version"})
    assert dir_files(pair.backup(side)) == []
    pair.assert_converged(env=env)


@pytest.mark.parametrize("side", SIDES)
def test_hard_delete_when_soft_delete_off(pair, side):
    env = {"SOFT_DELETE": "no"}
    synced(pair, {"a": "a", "d/b": "b"}, env)
    remove(pair.root(side), "d/b")
    pair.run(env=env, expect=0)
    both_equal(pair, expected({"a": "a", "d": None}))
    for s in SIDES:
        assert dir_files(pair.deleted(s)) == []
        assert find_content(pair.workdir(s), "b") == []
    pair.assert_converged(env=env)


def test_deleted_on_both_sides_is_forgotten(pair):
    synced(pair, {"a": "a", "gone": "gone"})
    remove(pair.initiator, "gone")
    remove(pair.target, "gone")
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a"}))
    for s in SIDES:
        assert dir_files(pair.deleted(s)) == []
        assert dir_files(pair.backup(s)) == []
    pair.assert_converged()


@pytest.mark.parametrize("side", SIDES)
def test_soft_delete_keeps_relative_path(pair, side):
    synced(pair, {"dir one/sub/f": "deep file", "dir one/sub/g": "sibling"})
    remove(pair.root(side), "dir one/sub/f")
    pair.run(expect=0)
    both_equal(pair, expected({"dir one/sub/g": "sibling"}))
    other = pair.other(side)
    assert snapshot(pair.deleted(other)) == expected({"dir one/sub/f": "deep file"})
    pair.assert_converged()


# ======================================================================================
# Rule 4: an edit beats a deletion
# ======================================================================================

@pytest.mark.parametrize("deleting_side", SIDES)
def test_edit_beats_deletion(pair, deleting_side):
    synced(pair, {"f": "original", "sub/g": "original g"})
    editing_side = pair.other(deleting_side)
    remove(pair.root(deleting_side), "f")
    remove(pair.root(deleting_side), "sub/g")
    put(pair.root(editing_side), "f", "edited!", T0 + 100)
    put(pair.root(editing_side), "sub/g", "edited g", T0 + 100)
    pair.run(expect=0)
    both_equal(pair, expected({"f": "edited!", "sub/g": "edited g"}))
    assert os.stat(str(pair.root(deleting_side) / "f")).st_mtime == T0 + 100
    for s in SIDES:
        assert dir_files(pair.deleted(s)) == []
    pair.assert_converged()


# ======================================================================================
# Rule 5: conflicts
# ======================================================================================

# (initiator mtime offset, target mtime offset, CONFLICT_PREVALANCE, winner)
CONFLICT_CASES = [
    (20, 10, None, "initiator"),
    (10, 20, None, "target"),
    (10, 10, None, "initiator"),
    (10, 10, "initiator", "initiator"),
    (10, 10, "target", "target"),
    (20, 10, "target", "initiator"),
    (10, 20, "initiator", "target"),
]


@pytest.mark.parametrize("first_run", [False, True], ids=["after-sync", "first-run"])
@pytest.mark.parametrize("i_off,t_off,prevalance,winner", CONFLICT_CASES)
def test_conflict_resolution(pair, i_off, t_off, prevalance, winner, first_run):
    env = {"CONFLICT_PREVALANCE": prevalance} if prevalance else {}
    if not first_run:
        synced(pair, {"dir/x": "base", "other": "o"}, env)
    else:
        build(pair.initiator, {"other": "o"})
    # different sizes, so that equal mtimes still mean different files
    versions = {"initiator": "initiator's edit", "target": "the target's longer edit"}
    put(pair.initiator, "dir/x", versions["initiator"], T0 + i_off)
    put(pair.target, "dir/x", versions["target"], T0 + t_off)
    pair.run(env=env, expect=0)
    loser = pair.other(winner)
    both_equal(pair, expected({"dir/x": versions[winner], "other": "o"}))
    win_mtime = T0 + (i_off if winner == "initiator" else t_off)
    for s in SIDES:
        assert os.stat(str(pair.root(s) / "dir/x")).st_mtime == win_mtime
    assert snapshot(pair.backup(loser)) == expected({"dir/x": versions[loser]})
    assert dir_files(pair.backup(winner)) == []
    pair.assert_converged(env=env)


def test_identical_change_on_both_sides_is_not_a_conflict(pair):
    synced(pair, {"x": "base", "y": "y"})
    put(pair.initiator, "x", "same new content", T0 + 77)
    put(pair.target, "x", "same new content", T0 + 77)
    inodes = {s: os.stat(str(pair.root(s) / "x")).st_ino for s in SIDES}
    pair.run(expect=0)
    both_equal(pair, expected({"x": "same new content", "y": "y"}))
    for s in SIDES:
        assert os.stat(str(pair.root(s) / "x")).st_ino == inodes[s], "%s copy rewritten" % s
        assert dir_files(pair.backup(s)) == []
        assert dir_files(pair.deleted(s)) == []
    pair.assert_converged()


# ======================================================================================
# Rule 6: multiple conflict backups
# ======================================================================================

SUFFIX = r"\.\d{4}\.\d\d\.\d\d-\d\d\.\d\d\.\d\d(\.\d+)?"


def test_multiple_conflict_backups(pair):
    env = {"CONFLICT_BACKUP_MULTIPLE": "yes"}
    year = str(datetime.datetime.now().year)
    put(pair.initiator, "FileA", "A0", T0)
    put(pair.target, "FileB", "B0", T0)
    pair.run("--errors-only", "--summary", "--no-prefix", env=env, expect=0)
    both_equal(pair, expected({"FileA": "A0", "FileB": "B0"}))
    for i in range(1, 4):
        # FileA edited on the target (initiator copy overwritten), FileB on the initiator
        put(pair.target, "FileA", "A%d" % i, T0 + 10 * i)
        put(pair.initiator, "FileB", "B%d" % i, T0 + 10 * i)
        pair.run("--errors-only", "--summary", "--no-prefix", env=env, expect=0)
        both_equal(pair, expected({"FileA": "A%d" % i, "FileB": "B%d" % i}))
    bi = os.listdir(str(pair.backup("initiator")))
    bt = os.listdir(str(pair.backup("target")))
    a_backups = [n for n in bi if n.startswith("FileA." + year)]
    b_backups = [n for n in bt if n.startswith("FileB." + year)]
    assert len(a_backups) == 3, bi
    assert len(b_backups) == 3, bt
    for n in a_backups:
        assert re.fullmatch("FileA" + SUFFIX, n), n
    for n in b_backups:
        assert re.fullmatch("FileB" + SUFFIX, n), n
    assert sorted((pair.backup("initiator") / n).read_text() for n in a_backups) == ["A0", "A1", "A2"]
    assert sorted((pair.backup("target") / n).read_text() for n in b_backups) == ["B0", "B1", "B2"]
    assert not [n for n in bi if n.startswith("FileB")]
    assert not [n for n in bt if n.startswith("FileA")]


def test_multiple_backups_in_subdirectory(pair):
    env = {"CONFLICT_BACKUP_MULTIPLE": "yes"}
    synced(pair, {"d d/f": "v0"}, env)
    put(pair.initiator, "d d/f", "v1", T0 + 10)
    pair.run(env=env, expect=0)
    names = os.listdir(str(pair.backup("target") / "d d"))
    assert len(names) == 1 and re.fullmatch("f" + SUFFIX, names[0]), names
    assert (pair.backup("target") / "d d" / names[0]).read_text() == "v0"


# ======================================================================================
# Rule 8: SKIP_DELETION
# ======================================================================================

@pytest.mark.parametrize("form", ["env", "cli", "conf"])
@pytest.mark.parametrize("value", ["initiator", "target", "initiator,target"])
def test_skip_deletion(pair, value, form):
    listed = set(value.split(","))
    if form == "conf":
        conf = pair.write_conf(keys={"SKIP_DELETION": value})

        def run():
            return pair.run_conf(conf, expect=0)
    else:
        env = {"SKIP_DELETION": value} if form == "env" else {}
        args = ["--skip-deletion=%s" % value] if form == "cli" else []

        def run():
            return pair.run(*args, env=env, expect=0)

    build(pair.initiator, {"keep": "k", "del_on_i": "deleted on initiator",
                           "sub/del_on_t": "deleted on target"})
    run()
    both_equal(pair, expected({"keep": "k", "del_on_i": "deleted on initiator",
                               "sub/del_on_t": "deleted on target"}))
    remove(pair.initiator, "del_on_i")
    remove(pair.target, "sub/del_on_t")

    def check():
        # deletion made on the initiator reaches the target unless the target is listed
        if "target" in listed:
            assert (pair.target / "del_on_i").read_text() == "deleted on initiator"
            assert dir_files(pair.deleted("target")) == []
        else:
            assert not (pair.target / "del_on_i").exists()
            assert dir_files(pair.deleted("target")) == ["del_on_i"]
        if "initiator" in listed:
            assert (pair.initiator / "sub/del_on_t").read_text() == "deleted on target"
            assert dir_files(pair.deleted("initiator")) == []
        else:
            assert not (pair.initiator / "sub/del_on_t").exists()
            assert dir_files(pair.deleted("initiator")) == ["sub/del_on_t"]
        # the kept copies are not copied back to where they were deleted
        assert not (pair.initiator / "del_on_i").exists()
        assert not (pair.target / "sub/del_on_t").exists()
        assert (pair.initiator / "keep").exists() and (pair.target / "keep").exists()

    for _ in range(3):
        run()
        check()

    # once edited again, a kept copy is synced back
    if "target" in listed:
        put(pair.target, "del_on_i", "edited after skip", T0 + 100)
    if "initiator" in listed:
        put(pair.initiator, "sub/del_on_t", "edited after skip", T0 + 100)
    run()
    if "target" in listed:
        assert (pair.initiator / "del_on_i").read_text() == "edited after skip"
        assert (pair.target / "del_on_i").read_text() == "edited after skip"
    if "initiator" in listed:
        assert (pair.target / "sub/del_on_t").read_text() == "edited after skip"
        assert (pair.initiator / "sub/del_on_t").read_text() == "edited after skip"
    assert snapshot(pair.initiator) == snapshot(pair.target)


# ======================================================================================
# Rule 9: one-way sync
# ======================================================================================

@pytest.mark.parametrize("form", ["env", "cli"])
@pytest.mark.parametrize("sync_type", ["initiator2target", "target2initiator"])
def test_one_way_sync(pair, sync_type, form):
    env = {"SYNC_TYPE": sync_type} if form == "env" else {}
    args = ["--sync-type=%s" % sync_type] if form == "cli" else []
    src_side, dst_side = sync_type.split("2")
    src, dst = pair.root(src_side), pair.root(dst_side)
    build(src, {"a": "new on source", "c": "same", "sub/d": "d"})
    put(src, "b", "source version", T0 + 50)
    build(dst, {"c": "same", "only_dst": "destination only", "dst_dir/x": "dst dir file"})
    put(dst, "b", "destination edit, newer", T0 + 100)
    src_before = snapshot(src)
    pair.run(*args, env=env, expect=0)
    assert snapshot(src) == src_before, "the source must not change"
    assert snapshot(dst) == src_before, "the destination must equal the source"
    dst_work = pair.workdir(dst_side)
    assert find_content(dst_work / "deleted", "destination only") + \
        find_content(dst_work / "backup", "destination only"), "target-only file not kept"
    assert find_content(dst_work / "deleted", "dst dir file") + \
        find_content(dst_work / "backup", "dst dir file"), "target-only dir not kept"
    assert find_content(dst_work / "backup", "destination edit, newer") + \
        find_content(dst_work / "deleted", "destination edit, newer"), "overwritten edit not kept"

    # later runs: source deletions and destination additions are undone on the destination
    remove(src, "a")
    put(dst, "stray", "stray", T0)
    put(src, "sub/d", "d changed", T0 + 10)
    src_before = snapshot(src)
    pair.run(*args, env=env, expect=0)
    assert snapshot(src) == src_before
    assert snapshot(dst) == src_before
    pair.assert_converged(*args, env=env)


# ======================================================================================
# Rule 10: type changes
# ======================================================================================

def _file_to_dir(root):
    remove(root, "x")
    put(root, "x/inner", "inner new", T0 + 100)


def _dir_to_file(root):
    remove(root, "x")
    put(root, "x", "x is a file now", T0 + 100)


def _file_to_link(root):
    remove(root, "x")
    link(root, "x", "y")


def _link_to_file(root):
    remove(root, "x")
    put(root, "x", "x is a file now", T0 + 100)


TYPE_CHANGES = {
    # name: (initial entries, change, expected entries after, content that must be kept)
    "file-to-dir": ({"x": "old x file", "y": "y"}, _file_to_dir,
                    {"x/inner": "inner new", "y": "y"}, "old x file"),
    "dir-to-file": ({"x/inner": "old inner", "y": "y"}, _dir_to_file,
                    {"x": "x is a file now", "y": "y"}, "old inner"),
    "file-to-link": ({"x": "old x file", "y": "y"}, _file_to_link,
                     {"x": ("l", "y"), "y": "y"}, "old x file"),
    "link-to-file": ({"x": ("l", "y"), "y": "y"}, _link_to_file,
                     {"x": "x is a file now", "y": "y"}, None),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", sorted(TYPE_CHANGES))
def test_type_change_propagates(pair, case, side):
    initial, change, after, kept = TYPE_CHANGES[case]
    synced(pair, initial)
    change(pair.root(side))
    pair.run(expect=0)
    both_equal(pair, expected(after))
    if kept is not None:
        other = pair.workdir(pair.other(side))
        assert find_content(other / "backup", kept) + find_content(other / "deleted", kept), \
            "the replaced file is not kept in backup/ or deleted/"
    pair.assert_converged()


# ======================================================================================
# Rule 11: directories
# ======================================================================================

def test_empty_directories_created_and_deleted(pair):
    mkdir(pair.initiator, "e1")
    mkdir(pair.target, "e2/sub")
    put(pair.initiator, "f", "f")
    pair.run(expect=0)
    both_equal(pair, expected({"e1": None, "e2/sub": None, "f": "f"}))
    # an empty directory deleted on one side is (soft-)deleted on the other
    remove(pair.target, "e1")
    remove(pair.initiator, "e2/sub")
    pair.run(expect=0)
    both_equal(pair, expected({"e2": None, "f": "f"}))
    assert snapshot(pair.deleted("initiator")) == {"e1": ("d",)}
    assert snapshot(pair.deleted("target")) == {"e2": ("d",), "e2/sub": ("d",)}
    pair.assert_converged()


@pytest.mark.parametrize("deleting_side", SIDES)
def test_deleted_dir_with_new_file_on_other_side(pair, deleting_side):
    synced(pair, {"d/old": "old file", "d/s/old2": "old 2", "z": "z"})
    adding_side = pair.other(deleting_side)
    remove(pair.root(deleting_side), "d")
    put(pair.root(adding_side), "d/s/new", "new file", T0 + 100)
    pair.run(expect=0)
    both_equal(pair, expected({"d/s/new": "new file", "z": "z"}))
    kept = snapshot(pair.deleted(adding_side))
    assert kept.get("d/old") == ("f", b"old file")
    assert kept.get("d/s/old2") == ("f", b"old 2")
    assert dir_files(pair.deleted(deleting_side)) == []
    pair.assert_converged()


def test_deleted_dir_with_content_is_soft_deleted(pair):
    synced(pair, {"d/a": "a", "d/e/b": "b", "d/empty": None, "z": "z"})
    remove(pair.initiator, "d")
    pair.run(expect=0)
    both_equal(pair, expected({"z": "z"}))
    assert snapshot(pair.deleted("target")) == expected({"d/a": "a", "d/e/b": "b", "d/empty": None})
    pair.assert_converged()


# ======================================================================================
# Rule 12: symlinks
# ======================================================================================

def test_symlinks_synced_as_links(pair, tmp_path):
    outside = tmp_path / "outside_file"
    outside.write_text("outside")
    entries = {"real": "real", "sub/dir/f": "f",
               "abs": ("l", str(outside)),
               "rel": ("l", "real"),
               "sub/updir": ("l", "../real"),
               "dirlink": ("l", "sub/dir"),
               "broken": ("l", "does/not/exist"),
               "broken_abs": ("l", str(tmp_path / "nowhere"))}
    synced(pair, entries)
    for rel in ("abs", "rel", "dirlink", "broken", "broken_abs", "sub/updir"):
        assert os.path.islink(str(pair.target / rel)), rel
    # deleting links propagates; they land in deleted/ as links
    for rel in ("abs", "broken", "dirlink"):
        remove(pair.initiator, rel)
    for rel in ("rel", "broken_abs"):
        remove(pair.target, rel)
    pair.run(expect=0)
    rest = {k: v for k, v in entries.items() if k not in ("abs", "broken", "dirlink", "rel",
                                                          "broken_abs")}
    both_equal(pair, expected(rest))
    assert snapshot(pair.deleted("target")) == expected(
        {"abs": ("l", str(outside)), "broken": ("l", "does/not/exist"), "dirlink": ("l", "sub/dir")})
    assert snapshot(pair.deleted("initiator")) == expected(
        {"rel": ("l", "real"), "broken_abs": ("l", str(tmp_path / "nowhere"))})
    assert outside.read_text() == "outside"
    assert (pair.initiator / "sub/dir/f").exists() and (pair.target / "sub/dir/f").exists()
    pair.assert_converged()


def test_symlink_retarget_propagates(pair):
    synced(pair, {"a": "a", "b": "b", "l": ("l", "a")})
    os.unlink(str(pair.target / "l"))
    os.symlink("b", str(pair.target / "l"))
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a", "b": "b", "l": ("l", "b")}))
    pair.assert_converged()


# ======================================================================================
# Rule 13: dry run
# ======================================================================================

def summary_lines(output):
    out = []
    for line in output.splitlines():
        line = line.strip()
        if re.match(r"^(UPDATE|DELETE) (>>|<<) ", line):
            out.append(line)
    return sorted(out)


def test_dry_run_on_fresh_replicas_creates_nothing(pair):
    build(pair.initiator, {"a": "a", "d/b": "b"})
    build(pair.target, {"c": "c"})
    before = [snapshot(r, mtimes=True, exclude_workdir=False) for r in pair.roots]
    pair.run("--dry", expect=0)
    after = [snapshot(r, mtimes=True, exclude_workdir=False) for r in pair.roots]
    assert after == before
    for r in pair.roots:
        assert not (r / WORKDIR).exists()
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a", "d/b": "b", "c": "c"}))


def test_dry_run_changes_nothing_and_predicts_real_run(pair):
    synced(pair, {"keep": "k", "mod_i": "m1", "mod_t": "m2", "del_i": "d1", "del_t": "d2",
                  "conf": "c0"})
    put(pair.initiator, "new_i", "ni", T0 + 10)
    put(pair.target, "new_t", "nt", T0 + 10)
    put(pair.initiator, "mod_i", "m1 changed", T0 + 10)
    put(pair.target, "mod_t", "m2 changed", T0 + 10)
    remove(pair.initiator, "del_i")
    remove(pair.target, "del_t")
    put(pair.initiator, "conf", "conflict initiator", T0 + 20)
    put(pair.target, "conf", "conflict target", T0 + 30)

    before = pair.full_snapshot(with_state=True)
    lock_before = [pair.lock(s).exists() for s in SIDES]
    dry = pair.run("--dry", "--summary", expect=0)
    assert pair.full_snapshot(with_state=True) == before, "dry run changed a replica or the state"
    assert [pair.lock(s).exists() for s in SIDES] == lock_before
    dry2 = pair.run("--dry", "--summary", expect=0)
    assert summary_lines(dry2.stdout) == summary_lines(dry.stdout)

    real = pair.run("--summary", expect=0)
    exp = expected({"keep": "k", "mod_i": "m1 changed", "mod_t": "m2 changed",
                    "new_i": "ni", "new_t": "nt", "conf": "conflict target"})
    both_equal(pair, exp)
    assert snapshot(pair.deleted("target")) == expected({"del_i": "d1"})
    assert snapshot(pair.deleted("initiator")) == expected({"del_t": "d2"})
    assert summary_lines(real.stdout), "the real run printed no UPDATE/DELETE lines" + real.stdout
    assert summary_lines(dry.stdout) == summary_lines(real.stdout)
    pair.assert_converged()


# ======================================================================================
# Rule 14: --initialize
# ======================================================================================

def test_initialize_records_baseline(pair):
    build(pair.initiator, {"a": "a", "b": "b", "i_only": "i"})
    build(pair.target, {"a": "a", "b": "b", "t_only": "t"})
    before = [snapshot(r, mtimes=True) for r in pair.roots]
    pair.run("--initialize", expect=0)
    assert [snapshot(r, mtimes=True) for r in pair.roots] == before, "--initialize synced"
    remove(pair.initiator, "b")
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a", "i_only": "i", "t_only": "t"}))
    assert snapshot(pair.deleted("target")) == expected({"b": "b"})
    assert dir_files(pair.deleted("initiator")) == []
    pair.assert_converged()


def test_without_initialize_first_run_restores_deleted(pair):
    build(pair.initiator, {"a": "a"})
    build(pair.target, {"a": "a", "b": "b"})
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a", "b": "b"}))
    for s in SIDES:
        assert dir_files(pair.deleted(s)) == []


# ======================================================================================
# Rule 15: exclusions
# ======================================================================================

PATTERN_TREE = {
    "x.php": "1", "sub/y.php": "2", "keep.php": "3", "other.txt": "4",
    "tmp/f": "5", "sub/tmp/f": "6",
    "cache/f": "7", "sub/cache/g": "8", "b/cache": "9",
    "a/b/c": "10", "a/b/d": "11", "a/b/x/c": "12",
    "logs/q/z": "13", "logs/top": "14",
    "deep/1/2/z.log": "15", "deep/1/z.log": "16", "deep/1/keep.log": "17",
}


def _without(tree, *names):
    return {k: v for k, v in tree.items() if k not in names}


def test_exclude_patterns_rsync_semantics(pair):
    env = {"RSYNC_EXCLUDE_PATTERN": "*.php;/tmp;cache/;a/*/c;logs/**;deep/**/z.log"}
    build(pair.initiator, PATTERN_TREE)
    pair.run(env=env, expect=0)
    exp = expected(_without(PATTERN_TREE, "x.php", "sub/y.php", "keep.php", "tmp/f",
                            "cache/f", "sub/cache/g", "a/b/c", "logs/q/z", "logs/top",
                            "deep/1/2/z.log", "deep/1/z.log"))
    exp["logs"] = ("d",)          # logs/** excludes what is inside logs, not logs itself
    exp["deep/1/2"] = ("d",)      # only the file inside is excluded
    for excluded_dir in ("tmp", "cache", "sub/cache"):
        exp.pop(excluded_dir, None)
    assert snapshot(pair.target) == exp
    assert snapshot(pair.initiator) == expected(PATTERN_TREE)
    pair.assert_converged(env=env)


def test_exclude_pattern_custom_separator(pair):
    env = {"RSYNC_EXCLUDE_PATTERN": "*.php,*.txt", "PATH_SEPARATOR_CHAR": ","}
    build(pair.initiator, {"a.php": "1", "b.txt": "2", "c.dat": "3", "semi;colon": "4"})
    pair.run(env=env, expect=0)
    assert snapshot(pair.target) == expected({"c.dat": "3", "semi;colon": "4"})


@pytest.mark.parametrize("first,keep_synced", [(None, True), ("include", True), ("exclude", False)])
def test_include_exclude_order(pair, first, keep_synced):
    env = {"RSYNC_EXCLUDE_PATTERN": "*.php", "RSYNC_INCLUDE_PATTERN": "keep.php"}
    if first:
        env["RSYNC_PATTERN_FIRST"] = first
    build(pair.initiator, {"keep.php": "k", "drop.php": "d", "f.txt": "t"})
    pair.run(env=env, expect=0)
    exp = {"f.txt": "t"}
    if keep_synced:
        exp["keep.php"] = "k"
    assert snapshot(pair.target) == expected(exp)


def test_excluded_file_never_copied_deleted_or_backed_up(pair):
    env = {"RSYNC_EXCLUDE_PATTERN": "*.php"}
    build(pair.initiator, {"x.php": "same", "conf.php": "initiator php", "i.php": "i only",
                           "normal": "n"})
    build(pair.target, {"x.php": "same", "t.php": "t only"})
    put(pair.target, "conf.php", "target php, different and newer", T0 + 100)
    pair.run(env=env, expect=0)
    assert snapshot(pair.initiator) == expected({"x.php": "same", "conf.php": "initiator php",
                                                 "i.php": "i only", "normal": "n"})
    assert snapshot(pair.target) == expected({"x.php": "same", "t.php": "t only", "normal": "n",
                                              "conf.php": "target php, different and newer"})
    # delete an excluded file on one side: the other copy stays
    remove(pair.initiator, "x.php")
    put(pair.target, "conf.php", "target php edited again", T0 + 200)
    pair.run(env=env, expect=0)
    assert (pair.target / "x.php").read_text() == "same"
    assert (pair.initiator / "conf.php").read_text() == "initiator php"
    assert not (pair.initiator / "x.php").exists()
    for s in SIDES:
        assert dir_files(pair.deleted(s)) == []
        assert dir_files(pair.backup(s)) == []
    pair.assert_converged(env=env)


def test_exclude_from_file_quicksync(pair, tmp_path):
    pat = tmp_path / "exclude.list"
    pat.write_text("*.php\n/tmp\n")
    inc = tmp_path / "include.list"
    inc.write_text("keep.php\n")
    env = {"RSYNC_EXCLUDE_FROM": str(pat), "RSYNC_INCLUDE_FROM": str(inc)}
    build(pair.initiator, {"a.php": "1", "keep.php": "2", "tmp/x": "3", "sub/tmp/y": "4", "f": "5"})
    pair.run(env=env, expect=0)
    assert snapshot(pair.target) == expected({"keep.php": "2", "sub/tmp/y": "4", "f": "5"})


def test_exclude_from_missing_file_is_an_error(pair, tmp_path):
    env = {"RSYNC_EXCLUDE_FROM": str(tmp_path / "no_such.list")}
    build(pair.initiator, {"a": "a"})
    build(pair.target, {"b": "b"})
    before = [snapshot(r) for r in pair.roots]
    pair.run(env=env, expect=1)
    assert [snapshot(r) for r in pair.roots] == before


def test_exclusions_in_config_mode(pair):
    confdir = pair.base / "etc"
    confdir.mkdir()
    (confdir / "excl.list").write_text("*.tmp\ncache/\n")
    (confdir / "incl.list").write_text("keep.tmp\n")
    conf = pair.write_conf(directory=confdir, keys={
        "RSYNC_EXCLUDE_PATTERN": "*.php;/top",
        "RSYNC_INCLUDE_PATTERN": "keep.php",
        "RSYNC_EXCLUDE_FROM": "excl.list",
        "RSYNC_INCLUDE_FROM": "incl.list",
        "RSYNC_PATTERN_FIRST": "include",
    })
    build(pair.initiator, {"a.php": "1", "keep.php": "2", "b.tmp": "3", "keep.tmp": "4",
                           "cache/x": "5", "top/y": "6", "s/top/z": "7", "ok": "8"})
    pair.run_conf(conf, expect=0)
    assert snapshot(pair.target) == expected({"keep.php": "2", "keep.tmp": "4", "s/top/z": "7",
                                              "ok": "8"})
    pair.assert_converged(conf=conf)


def test_config_mode_missing_exclude_file_is_an_error(pair):
    conf = pair.write_conf(keys={"RSYNC_EXCLUDE_FROM": "missing.list"})
    build(pair.initiator, {"a": "a"})
    pair.run_conf(conf, expect=1)
    assert snapshot(pair.target) == {}


# ======================================================================================
# Rule 16: locks
# ======================================================================================

def _prepare_locked(pair, side, content):
    synced(pair, {"a": "a"})
    put(pair.initiator, "new_i", "ni")
    put(pair.target, "new_t", "nt")
    lock = pair.lock(side)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(content)
    return lock


@pytest.mark.parametrize("side", SIDES)
def test_live_lock_refuses(pair, side):
    content = "%d@otherid" % os.getpid()
    lock = _prepare_locked(pair, side, content)
    before = [snapshot(r) for r in pair.roots]
    pair.run(expect=1)
    assert lock.read_text() == content
    assert [snapshot(r) for r in pair.roots] == before
    other = pair.lock(pair.other(side))
    assert not other.exists()


@pytest.mark.parametrize("side", SIDES)
def test_live_lock_of_child_process_refuses(pair, side):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        content = "%d@quicksync_task" % sleeper.pid
        lock = _prepare_locked(pair, side, content)
        before = [snapshot(r) for r in pair.roots]
        pair.run(expect=1)
        assert lock.read_text() == content
        assert [snapshot(r) for r in pair.roots] == before
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("content", ["65536@quicksync_task", "65536", "65536@bogusinstance"])
@pytest.mark.parametrize("side", SIDES)
def test_dead_lock_is_taken_over(pair, side, content):
    if not pid_is_dead(65536):
        pytest.skip("pid 65536 is alive on this host")
    lock = _prepare_locked(pair, side, content)
    pair.run(expect=0)
    assert not lock.exists()
    both_equal(pair, expected({"a": "a", "new_i": "ni", "new_t": "nt"}))


@pytest.mark.parametrize("side", SIDES)
def test_force_unlock_runs_despite_live_lock(pair, side):
    _prepare_locked(pair, side, "%d@otherid" % os.getpid())
    pair.run("--force-unlock", expect=0)
    both_equal(pair, expected({"a": "a", "new_i": "ni", "new_t": "nt"}))


def test_no_locks_neither_takes_nor_checks(pair, rsync_spy):
    content = "%d@otherid" % os.getpid()
    lock = _prepare_locked(pair, "initiator", content)
    spy = rsync_spy([pair.lock("initiator"), pair.lock("target")])
    pair.run("--no-locks", env=spy.env, expect=0)
    both_equal(pair, expected({"a": "a", "new_i": "ni", "new_t": "nt"}))
    assert lock.read_text() == content
    assert not pair.lock("target").exists()
    calls = spy.calls()
    assert calls
    for c in calls:
        assert c[str(pair.lock("target"))] is None, "a target lock was taken"
        assert c[str(pair.lock("initiator"))] == content


# ======================================================================================
# Rule 17: replica checks
# ======================================================================================

@pytest.mark.parametrize("missing", SIDES)
def test_missing_replica_dir_is_an_error(pair, missing):
    put(pair.root(pair.other(missing)), "a", "a")
    pair.root(missing).rmdir()
    present_before = snapshot(pair.root(pair.other(missing)), exclude_workdir=False)
    pair.run(expect=1)
    assert not pair.root(missing).exists()
    assert snapshot(pair.root(pair.other(missing)), exclude_workdir=False) == present_before


@pytest.mark.parametrize("form", ["env", "conf"])
def test_create_dirs(pair, form):
    put(pair.initiator, "a", "a")
    pair.target.rmdir()
    deeper_target = pair.base / "new" / "deeper" / "target"
    if form == "env":
        pair.run(env={"CREATE_DIRS": "yes"}, target_spec=pair.spec_for(deeper_target), expect=0)
    else:
        conf = pair.write_conf(keys={"CREATE_DIRS": "yes",
                                     "TARGET_SYNC_DIR": pair.spec_for(deeper_target)})
        pair.run_conf(conf, expect=0)
    assert (deeper_target / "a").read_text() == "a"
    assert (deeper_target / WORKDIR).is_dir()


def test_create_dirs_both_missing(pair):
    pair.initiator.rmdir()
    pair.target.rmdir()
    pair.run(env={"CREATE_DIRS": "true"}, expect=0)
    assert pair.initiator.is_dir() and pair.target.is_dir()


@pytest.mark.parametrize("variant", ["same", "trailing-slash", "symlink", "dot-dot"])
def test_initiator_equal_to_target_is_an_error(pair, variant):
    put(pair.initiator, "a", "a")
    i = pair.initiator
    if variant == "same":
        t = str(i)
    elif variant == "trailing-slash":
        t = str(i) + "/"
    elif variant == "symlink":
        ln = pair.base / "alias"
        os.symlink(str(i), str(ln))
        t = str(ln)
    else:
        t = str(pair.target / ".." / "initiator")
    pair.run(target_spec=pair.spec_for(t), expect=1)
    assert snapshot(i) == expected({"a": "a"})


@pytest.mark.parametrize("inner", SIDES)
def test_nested_replicas_are_an_error(pair, inner):
    put(pair.initiator, "a", "a")
    if inner == "target":
        initiator = pair.initiator
        target = pair.initiator / "sub" / "target"
    else:
        target = pair.target
        initiator = pair.target / "sub" / "initiator"
    initiator.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    before = [snapshot(pair.initiator, exclude_workdir=False),
              snapshot(pair.target, exclude_workdir=False)]
    pair.run(initiator=initiator, target_spec=pair.spec_for(target), expect=1)
    assert [snapshot(pair.initiator, exclude_workdir=False),
            snapshot(pair.target, exclude_workdir=False)] == before


# ======================================================================================
# Rule 18: unmounted-disk guard
# ======================================================================================

@pytest.mark.parametrize("lost", SIDES)
def test_unmounted_replica_guard(pair, lost):
    synced(pair, {"a": "a", "d/b": "b", "c": "c"})
    lost_root = pair.root(lost)
    for name in os.listdir(str(lost_root)):
        remove(lost_root, name)
    keeper = pair.other(lost)
    before = snapshot(pair.root(keeper), mtimes=True, exclude_workdir=False)
    r = pair.run(expect=1)
    assert snapshot(pair.root(keeper), mtimes=True, exclude_workdir=False) == before, \
        "the guard let the run change the other replica" + r.stdout
    assert os.listdir(str(lost_root)) == [], "the guard let the run write to the empty replica"


# ======================================================================================
# Rule 19: custom state dirs
# ======================================================================================

@pytest.mark.parametrize("form", ["env", "cli", "conf"])
def test_custom_state_dirs(pair, tmp_path, form):
    si, st = tmp_path / "state_i", tmp_path / "state_t"
    si.mkdir()
    st.mkdir()
    if form == "env":
        env = {"INITIATOR_CUSTOM_STATE_DIR": str(si), "TARGET_CUSTOM_STATE_DIR": str(st)}

        def run():
            return pair.run(env=env, expect=0)
    elif form == "cli":
        def run():
            return pair.run("--initiator-state-dir=%s" % si, "--target-state-dir=%s" % st,
                            expect=0)
    else:
        conf = pair.write_conf(keys={"INITIATOR_CUSTOM_STATE_DIR": str(si),
                                     "TARGET_CUSTOM_STATE_DIR": str(st)})

        def run():
            return pair.run_conf(conf, expect=0)

    build(pair.initiator, {"a": "a", "b": "b"})
    build(pair.target, {"c": "c"})
    run()
    both_equal(pair, expected({"a": "a", "b": "b", "c": "c"}))
    remove(pair.initiator, "b")
    remove(pair.target, "c")
    run()
    both_equal(pair, expected({"a": "a"}))
    assert dir_files(pair.deleted("target")) == ["b"]
    assert dir_files(pair.deleted("initiator")) == ["c"]
    assert dir_files(si), "no state in the initiator's custom state dir"
    for s in SIDES:
        assert dir_files(pair.workdir(s) / "state") == [], "state written in %s's work dir" % s
    run()
    both_equal(pair, expected({"a": "a"}))


# ======================================================================================
# Rule 20: convergence on a mixed scenario
# ======================================================================================

def test_mixed_scenario_converges(pair):
    synced(pair, {"a": "a", "b": "b", "c/d": "d", "e/f": "f", "l": ("l", "a"), "empty": None})
    put(pair.initiator, "a", "a2", T0 + 10)
    put(pair.target, "b", "b2", T0 + 10)
    remove(pair.initiator, "c")
    remove(pair.target, "l")
    put(pair.target, "e/new", "new", T0 + 10)
    mkdir(pair.initiator, "empty/sub")
    link(pair.initiator, "nl", "missing")
    pair.run(expect=0)
    both_equal(pair, expected({"a": "a2", "b": "b2", "e/f": "f", "e/new": "new",
                               "empty/sub": None, "nl": ("l", "missing")}))
    pair.assert_converged()
    pair.assert_converged()


# ======================================================================================
# Rule 21: a deletion that fails
# ======================================================================================

def test_deletion_failure_is_retried(pair):
    if not chattr_supported(pair.target):
        need("chattr +i is not supported on this filesystem")
    rel = "dir one/sub two/file x"
    synced(pair, {rel: "protected", "dir one/other": "o"})
    remove(pair.initiator, rel)
    victim = pair.target / rel
    subprocess.run(["chattr", "+i", str(victim)], check=True)
    try:
        pair.run(expect=1)
        assert victim.read_text() == "protected"
        assert not (pair.deleted("target") / rel).exists()
        assert not (pair.initiator / rel).exists(), "the undeletable file was copied back"
    finally:
        subprocess.run(["chattr", "-i", str(victim)], check=True)
    pair.run("--verbose", expect=0)
    assert not victim.exists()
    assert (pair.deleted("target") / rel).read_text() == "protected"
    assert not (pair.initiator / rel).exists()
    pair.assert_converged()


# ======================================================================================
# Rule 22: cleanup of backup/ and deleted/
# ======================================================================================

@pytest.mark.parametrize("days", [None, "1", "30", "0"])
def test_fresh_backups_and_deletions_survive_cleanup(pair, days):
    env = {}
    if days is not None:
        env = {"CONFLICT_BACKUP_DAYS": days, "SOFT_DELETE_DAYS": days}
    old = int(time.time()) - 400 * 86400      # content mtimes far older than any limit
    synced(pair, {"m": "old m", "d/x": "x", "keep": "k"}, env, old)
    put(pair.initiator, "m", "new m", old + 60)
    remove(pair.initiator, "d/x")
    pair.run(env=env, expect=0)
    for _ in range(2):
        assert (pair.backup("target") / "m").read_text() == "old m"
        assert (pair.deleted("target") / "d/x").read_text() == "x"
        pair.run(env=env, expect=0)
    assert (pair.backup("target") / "m").read_text() == "old m"
    assert (pair.deleted("target") / "d/x").read_text() == "x"


def test_days_zero_never_cleans_old_items(pair):
    env = {"CONFLICT_BACKUP_DAYS": "0", "SOFT_DELETE_DAYS": "0"}
    synced(pair, {"a": "a"}, env)
    very_old = int(time.time()) - 1000 * 86400
    for s in SIDES:
        put(pair.backup(s), "ob/old_backup", "ob", very_old)
        put(pair.deleted(s), "od/old_deleted", "od", very_old)
        os.utime(str(pair.backup(s) / "ob"), (very_old, very_old))
        os.utime(str(pair.deleted(s) / "od"), (very_old, very_old))
    pair.run(env=env, expect=0)
    for s in SIDES:
        assert (pair.backup(s) / "ob/old_backup").read_text() == "ob"
        assert (pair.deleted(s) / "od/old_deleted").read_text() == "od"


# ======================================================================================
# Rule 23: --summary
# ======================================================================================

def test_summary_output(pair):
    synced(pair, {"a": "a0", "b": "b0", "c": "c0"})
    put(pair.initiator, "a", "a1 from initiator", T0 + 10)
    put(pair.target, "b", "b1 from target", T0 + 10)
    remove(pair.initiator, "c")
    r = pair.run("--summary", expect=0)
    lines = [l.strip() for l in r.stdout.splitlines()]

    def index(pred, what):
        for i, l in enumerate(lines):
            if pred(l):
                return i
        raise AssertionError("no %s line in:\n%s" % (what, r.stdout))

    h1 = index(lambda l: l.startswith("File transfers and simple deletions: INITIATOR << >> TARGET"),
               "transfer header")
    ua = index(lambda l: re.match(r"^UPDATE >> (.*/)?a$", l), "UPDATE >> a")
    ub = index(lambda l: re.match(r"^UPDATE << (.*/)?b$", l), "UPDATE << b")
    h2 = index(lambda l: l.startswith("File deletions: INITIATOR << >> TARGET"), "deletion header")
    dc = index(lambda l: re.match(r"^DELETE >> (.*/)?c$", l), "DELETE >> c")
    assert h1 < ua < h2 and h1 < ub < h2 < dc
    for counter in ("Initiator has 1 updates.", "Target has 1 updates.",
                    "Initiator has 0 deletions.", "Target has 1 deletions."):
        assert any(l.endswith(counter) for l in lines), counter + "\n" + r.stdout
    assert not any(re.match(r"^(UPDATE|DELETE) .*(/|^)c$", l) for l in lines
                   if not l.startswith("DELETE >> "))
    both_equal(pair, expected({"a": "a1 from initiator", "b": "b1 from target"}))
