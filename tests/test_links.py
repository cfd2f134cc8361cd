"""Symbolic links, COPY_SYMLINKS, KEEP_DIRLINKS, and devices, fifos and sockets.

Links are synced as links (absolute, relative, dangling) and soft-deleted as links; a link
turned into a file or a directory and back is a change like any other, on either side.
With COPY_SYMLINKS or KEEP_DIRLINKS the scan goes through links, yet nothing reached
through a link is ever deleted, moved or backed up, and a link the scan showed as a
directory is removed as the link itself.  Devices, fifos and sockets are never synced:
their paths are left alone on both replicas, with one notice a run, not an error.

Each test groups several cases into few runs of osync.py (every run costs an ssh start on
the remote kinds)."""

import os
import socket
import stat
from pathlib import Path

import pytest

from conftest import (T0, build, describe, expected, find_content, link, put, remove,
                      run_osync, snapshot)

OUTSIDE_CONTENT = b"outside the replica: never touched\n"


def both_hold(pair, entries):
    """Both replicas hold exactly `entries` (a build() description)."""
    want = expected(entries)
    for root in pair.roots:
        assert snapshot(root) == want, "%s differs" % root


def lines_with(result, level):
    return [line for line in result.output.splitlines() if "(%s)" % level in line]


def outside_tree(base, name, files):
    """A directory outside both replicas holding `files` (relative names); returns it."""
    top = Path(str(base)) / name
    top.mkdir()
    for rel in files:
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(OUTSIDE_CONTENT)
        os.utime(str(path), (T0, T0))
    return top


def assert_untouched(top, files):
    """The outside directory still holds exactly `files`, unchanged and not hard-linked
    into a work dir."""
    found = sorted(str(path.relative_to(top)) for path in top.rglob("*") if not path.is_dir())
    assert found == sorted(files), "outside %s now holds %s" % (top, found)
    for rel in files:
        info = os.stat(str(top / rel))
        assert (top / rel).read_bytes() == OUTSIDE_CONTENT and info.st_nlink == 1, rel


# -- plain links ----------------------------------------------------------------------------

def test_links_of_every_kind_both_ways_and_type_changes_on_either_side(pair, tmp_path):
    """Links made on each side reach the other as links; on each side a link becomes a
    file and a directory, a file and a directory become links, then back; deleted links
    land in deleted/ as links, and what they point to is never touched."""
    outside_file = tmp_path / "outside_file"
    outside_file.write_bytes(OUTSIDE_CONTENT)
    build(pair.initiator, {"real": "real", "sub/dir/f": "f",
                           "i_abs": ("l", str(outside_file)), "i_rel": ("l", "real"),
                           "sub/i_up": ("l", "../real"), "i_dangling": ("l", "does/not/exist")})
    build(pair.target, {"t_dirlink": ("l", "sub/dir"), "t_dangling_abs": ("l", str(tmp_path / "nowhere")),
                        "t_self": ("l", "t_self")})
    for side in ("i", "t"):
        build(pair.initiator, {side + "_l2f": ("l", "real"), side + "_l2d": ("l", "sub"),
                               side + "_f2l": "file", side + "_d2l/inner": "inner"})
    result = pair.run(expect=0)
    synced = {"real": "real", "sub/dir/f": "f",
              "i_abs": ("l", str(outside_file)), "i_rel": ("l", "real"), "sub/i_up": ("l", "../real"),
              "i_dangling": ("l", "does/not/exist"), "t_dirlink": ("l", "sub/dir"),
              "t_dangling_abs": ("l", str(tmp_path / "nowhere")), "t_self": ("l", "t_self")}
    for side in ("i", "t"):
        synced.update({side + "_l2f": ("l", "real"), side + "_l2d": ("l", "sub"),
                       side + "_f2l": "file", side + "_d2l/inner": "inner"})
    both_hold(pair, synced)

    # The i_* items change on the initiator, the t_* ones on the target.
    for side, root in (("i", pair.initiator), ("t", pair.target)):
        remove(root, side + "_l2f")
        put(root, side + "_l2f", "was a link", mtime=T0 + 100)
        remove(root, side + "_l2d")
        put(root, side + "_l2d/inside", "was a link too", mtime=T0 + 100)
        link(root, side + "_f2l", "real")
        remove(root, side + "_d2l")
        link(root, side + "_d2l", "sub/dir")
    result = pair.run(expect=0)
    for side in ("i", "t"):
        del synced[side + "_d2l/inner"]
        synced.update({side + "_l2f": "was a link", side + "_l2d/inside": "was a link too",
                       side + "_f2l": ("l", "real"), side + "_d2l": ("l", "sub/dir")})
    both_hold(pair, synced)

    # And back, on the other side this time; links are deleted on both sides.
    for side, root in (("i", pair.target), ("t", pair.initiator)):
        remove(root, side + "_l2f")
        link(root, side + "_l2f", "real")
        remove(root, side + "_l2d")
        link(root, side + "_l2d", "sub")
        remove(root, side + "_f2l")
        put(root, side + "_f2l", "a file again", mtime=T0 + 200)
        remove(root, side + "_d2l")
        put(root, side + "_d2l/inner", "a directory again", mtime=T0 + 200)
    for rel in ("i_abs", "i_dangling", "t_dirlink"):
        remove(pair.initiator, rel)
    for rel in ("i_rel", "t_dangling_abs", "t_self"):
        remove(pair.target, rel)
    result = pair.run(expect=0)
    for side in ("i", "t"):
        del synced[side + "_l2d/inside"]
        synced.update({side + "_l2f": ("l", "real"), side + "_l2d": ("l", "sub"),
                       side + "_f2l": "a file again", side + "_d2l/inner": "a directory again"})
    for rel in ("i_abs", "i_dangling", "t_dirlink", "i_rel", "t_dangling_abs", "t_self"):
        del synced[rel]
    both_hold(pair, synced)
    deleted_on_target = snapshot(pair.deleted("target"))
    deleted_on_initiator = snapshot(pair.deleted("initiator"))
    assert deleted_on_target["i_abs"] == ("l", str(outside_file)), describe(result)
    assert deleted_on_target["i_dangling"] == ("l", "does/not/exist"), describe(result)
    assert deleted_on_target["t_dirlink"] == ("l", "sub/dir"), describe(result)
    assert deleted_on_initiator["i_rel"] == ("l", "real"), describe(result)
    assert deleted_on_initiator["t_dangling_abs"] == ("l", str(tmp_path / "nowhere")), describe(result)
    assert deleted_on_initiator["t_self"] == ("l", "t_self"), describe(result)
    assert outside_file.read_bytes() == OUTSIDE_CONTENT
    assert (pair.initiator / "sub/dir/f").read_text() == "f" and (pair.target / "sub/dir/f").read_text() == "f"
    pair.assert_converged()


# -- COPY_SYMLINKS -----------------------------------------------------------------------------

def test_a_dangling_link_with_copy_symlinks_is_one_error_and_the_rest_syncs(pair, tmp_path):
    outside_file = tmp_path / "outside_file"
    outside_file.write_bytes(OUTSIDE_CONTENT)
    build(pair.initiator, {"a": "a", "to_outside": ("l", str(outside_file)), "dangling": ("l", "nowhere"),
                           "d/rel": ("l", "../a")})
    build(pair.target, {"b": "b"})
    env = {"COPY_SYMLINKS": "yes"}
    result = pair.run(env=env)
    assert result.returncode == 1, describe(result)
    errors = lines_with(result, "ERROR")
    assert len(errors) == 1 and "dangling" in errors[0], describe(result)
    # What links point to arrives as files; the dangling link stays where it is, alone.
    assert snapshot(pair.target) == expected({"a": "a", "b": "b", "to_outside": OUTSIDE_CONTENT, "d/rel": "a"})
    assert os.readlink(str(pair.initiator / "dangling")) == "nowhere"
    assert (pair.initiator / "b").read_text() == "b"
    os.unlink(str(pair.initiator / "dangling"))
    pair.run(env=env, expect=0)
    assert outside_file.read_bytes() == OUTSIDE_CONTENT
    pair.assert_converged(env=env)


def test_with_copy_symlinks_a_link_overwritten_from_the_other_side_becomes_the_file(pair, tmp_path):
    """An absolute and a relative link on the initiator show their files; the target
    rewrites both copies.  Each link gives way to the new file and is kept in backup/ as
    a link, what it pointed to is untouched, and the next run has nothing to do (rather
    than put the link back and replace it again on every run)."""
    outside_file = tmp_path / "outside_file"
    outside_file.write_bytes(OUTSIDE_CONTENT)
    os.utime(str(outside_file), (T0, T0))
    build(pair.initiator, {"real": "real", "abs": ("l", str(outside_file)), "sub/rel": ("l", "../real")})
    env = {"COPY_SYMLINKS": "yes"}
    pair.run(env=env, expect=0)
    put(pair.target, "abs", "rewritten on the target", mtime=T0 + 100)
    put(pair.target, "sub/rel", "rewritten too", mtime=T0 + 100)
    result = pair.run(env=env, expect=0)
    assert snapshot(pair.initiator) == expected({"real": "real", "abs": "rewritten on the target",
                                                 "sub/rel": "rewritten too"}), describe(result)
    assert snapshot(pair.backup("initiator")) == expected({"abs": ("l", str(outside_file)),
                                                           "sub/rel": ("l", "../real")}), describe(result)
    assert outside_file.read_bytes() == OUTSIDE_CONTENT
    pair.assert_converged(env=env)


# -- links out of the root -----------------------------------------------------------------------

OPTION_SETS = [{"COPY_SYMLINKS": "yes"}, {"KEEP_DIRLINKS": "yes"}, {"COPY_SYMLINKS": "yes", "KEEP_DIRLINKS": "yes"}]
OPTION_IDS = ["copy", "keep", "copy+keep"]


@pytest.mark.parametrize("env", OPTION_SETS, ids=OPTION_IDS)
def test_nothing_behind_a_link_out_of_the_root_is_deleted_or_backed_up(pair, env):
    """x and y on the initiator are links to directories outside: the target deletes the
    whole of x, deletes one file of y and rewrites another.  Nothing outside changes and
    nothing of it reaches the initiator's work dir: the link x goes to deleted/ as a link,
    and each refused path below y is one error that names it."""
    files_x = ["a", "sub/b"]
    files_y = ["c", "d"]
    outside_x = outside_tree(pair.base, "outside_x", files_x)
    outside_y = outside_tree(pair.base, "outside_y", files_y)
    os.symlink(str(outside_x), str(pair.initiator / "x"))
    os.symlink(str(outside_y), str(pair.initiator / "y"))
    put(pair.initiator, "plain", "plain")
    pair.run(env=env, expect=0)
    assert (pair.target / "x" / "sub" / "b").read_bytes() == OUTSIDE_CONTENT
    assert not (pair.target / "x").is_symlink(), "the target was given a link to outside"

    remove(pair.target, "x")
    (pair.target / "y" / "c").unlink()
    put(pair.target, "y/d", "rewritten on the target", mtime=T0 + 100)
    put(pair.target, "plain", "still syncs", mtime=T0 + 100)
    result = pair.run(env=env)
    assert result.returncode == 1, describe(result)
    assert_untouched(outside_x, files_x)
    assert_untouched(outside_y, files_y)
    assert find_content(pair.workdir("initiator"), OUTSIDE_CONTENT) == [], describe(result)
    assert not os.path.lexists(str(pair.initiator / "x")), describe(result)
    assert os.readlink(str(pair.deleted("initiator") / "x")) == str(outside_x), describe(result)
    assert (pair.initiator / "y").is_symlink()
    assert (pair.initiator / "plain").read_text() == "still syncs"
    errors = lines_with(result, "ERROR")
    assert len(errors) == 2, describe(result)
    for rel in ("y/c", "y/d"):
        naming = [line for line in errors if " %s " % rel in line or " %s:" % rel in line]
        assert len(naming) == 1 and "symbolic link" in naming[0], "%s: %s" % (rel, describe(result))


@pytest.mark.parametrize("env", OPTION_SETS[:2], ids=OPTION_IDS[:2])
def test_a_link_seen_as_a_directory_is_deleted_or_replaced_as_the_link(pair, env):
    """With SOFT_DELETE=no, e and r on the initiator are links to empty directories
    outside: the target deletes e and turns r into a file.  The links themselves go, the
    directories they point to stay."""
    env = dict(env, SOFT_DELETE="no")
    outside_e = pair.base / "outside_e"
    outside_r = pair.base / "outside_r"
    outside_e.mkdir()
    outside_r.mkdir()
    os.symlink(str(outside_e), str(pair.initiator / "e"))
    os.symlink(str(outside_r), str(pair.initiator / "r"))
    put(pair.initiator, "plain", "plain")
    pair.run(env=env, expect=0)
    assert (pair.target / "e").is_dir() and (pair.target / "r").is_dir()

    remove(pair.target, "e")
    remove(pair.target, "r")
    put(pair.target, "r", "a file now", mtime=T0 + 100)
    result = pair.run(env=env)
    assert result.returncode == 0, describe(result)
    assert not os.path.lexists(str(pair.initiator / "e")), describe(result)
    assert (pair.initiator / "r").read_text() == "a file now", describe(result)
    assert outside_e.is_dir() and outside_r.is_dir()
    assert list(outside_e.iterdir()) == [] and list(outside_r.iterdir()) == []
    pair.assert_converged(env=env)


# Runs osync.py with the clock 40 days ahead (time.time only) in the initiator's process:
# the initiator's old backups and soft-deleted items are then due for cleaning.
LATER = ("import sys, time; sys.path.insert(0, sys.argv[1]); import osync; now = time.time; "
         "time.time = lambda: now() + 40 * 86400; sys.exit(osync.main(sys.argv[2:]))")


def test_cleaning_old_items_removes_links_never_what_they_point_to(pair):
    """Links in backup/ and deleted/ (to a directory outside, to a file outside, in a
    subdirectory) are removed as links when old; what they point to stays whole."""
    files = ["f", "sub/g"]
    outside = outside_tree(pair.base, "outside", files)
    put(pair.initiator, "plain", "plain")
    pair.run(expect=0)
    for area in ("backup", "deleted"):
        top = pair.workdir("initiator") / area
        (top / "sub").mkdir(parents=True, exist_ok=True)
        os.symlink(str(outside), str(top / "dirlink"))
        os.symlink(str(outside / "f"), str(top / "filelink"))
        os.symlink(str(outside / "sub"), str(top / "sub" / "dirlink"))
    environment = pair.env(getattr(pair, "quick_env", {}))
    result = run_osync(pair.quick_args(), environment, pair.cwd, logfile=pair.logfile, python=pair.interpreter,
                       code=LATER)
    # Over ssh the agent's clock was not moved: the run warns about it, and only about it.
    assert result.returncode in (0, 2) and lines_with(result, "ERROR") == [], describe(result)
    assert all("clock" in line for line in lines_with(result, "WARN")), describe(result)
    for area in ("backup", "deleted"):
        top = pair.workdir("initiator") / area
        left = sorted(str(path.relative_to(top)) for path in top.rglob("*"))
        assert not any(os.path.islink(str(top / rel)) for rel in left), "%s: %s%s" % (area, left, describe(result))
    assert_untouched(outside, files)


# -- devices, fifos, sockets ---------------------------------------------------------------------

def make_socket(path):
    """A Unix socket file at path (bound from its directory: the path may be too long)."""
    here = os.getcwd()
    os.chdir(str(path.parent))
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path.name)
        server.close()
    finally:
        os.chdir(here)


def test_devices_fifos_and_sockets_are_left_alone_with_one_notice(pair):
    """A fifo where the other side has a new file, a synced file replaced by a socket, a
    character device (as root) and a fifo in a directory: none is copied, none replaced,
    none makes the other side's file go; one notice, exit 0, and the next run is the same."""
    build(pair.initiator, {"a": "a", "g": "g", "d/x": "x"})
    pair.run(expect=0)
    put(pair.initiator, "p", "a new file where the target has a fifo")
    os.mkfifo(str(pair.target / "p"))
    remove(pair.target, "g")
    make_socket(pair.target / "g")
    os.mkfifo(str(pair.initiator / "d" / "ff"))
    specials = {"target": ["p", "g"], "initiator": ["d/ff"]}
    if os.geteuid() == 0:
        os.mknod(str(pair.initiator / "null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        specials["initiator"].append("null")
    before = pair.full_snapshot()
    result = pair.run(expect=0)
    count = len(specials["target"]) + len(specials["initiator"])
    notices = [line for line in result.output.splitlines() if "device, fifo or socket" in line]
    assert len(notices) == 1 and ("Left %d paths alone" % count) in notices[0], describe(result)
    assert lines_with(result, "WARN") == [] and lines_with(result, "ERROR") == [], describe(result)
    assert pair.full_snapshot() == before, "something changed" + describe(result)
    assert stat.S_ISFIFO(os.lstat(str(pair.target / "p")).st_mode)
    assert stat.S_ISSOCK(os.lstat(str(pair.target / "g")).st_mode)
    assert (pair.initiator / "g").read_text() == "g" and (pair.initiator / "p").exists()
    for rel in specials["initiator"]:
        assert not os.path.lexists(str(pair.target / rel)), rel
    # --verbose names each path; the next run changes nothing either.
    result = pair.run("--verbose", expect=0)
    for side in specials:
        for rel in specials[side]:
            assert any(("Left %s alone" % rel) in line for line in result.output.splitlines()), \
                rel + describe(result)
    assert pair.full_snapshot() == before, "something changed" + describe(result)


def test_keep_dirlinks_writes_through_a_link_to_a_directory_inside_the_replica(pair):
    """On the target, inl is a relative link to indir, inside the replica: with
    KEEP_DIRLINKS a file new in the initiator's inl lands in the target's indir, through
    the link, which stays a link (rsync 3.4 and later refuse only links that leave the
    replica)."""
    env = {"KEEP_DIRLINKS": "yes"}
    build(pair.target, {"indir/f": "f", "inl": ("l", "indir")})
    pair.run(env=env, expect=0)
    assert (pair.initiator / "inl" / "f").read_text() == "f"
    put(pair.initiator, "inl/new", "new", mtime=T0 + 100)
    result = pair.run(env=env, expect=0)
    assert os.readlink(str(pair.target / "inl")) == "indir", describe(result)
    assert (pair.target / "indir" / "new").read_text() == "new", describe(result)
    pair.run(env=env, expect=0)
    assert (pair.initiator / "indir" / "new").read_text() == "new"
    pair.assert_converged(env=env)
