"""Awkward names (DESIGN §4.8: any name works).

For every name, every kind of entry (a file, a directory holding a file, a symlink) and every pair kind
(the shared `pair` fixture; the kinds other than local run the names of conftest.NAMES_SUBSET one at a
time, for the suite's time, and every name in the all-at-once test): create it on the initiator
and sync, edit it on the target and sync, delete it on the initiator and sync; the edit and the deletion
must travel, the overwritten version must land in backup/ and the deleted one in deleted/<same name>.
Then all the names at once in one tree, changed on both sides, synced, and a second run changes nothing.

Everything is bytes: some names are not UTF-8.
"""

import itertools
import os
import time

import pytest

import treeutil as tu
from conftest import describe

SETTINGS = {
    "SOFT_DELETE": "yes",
    "CONFLICT_BACKUP": "yes",
    "CONFLICT_BACKUP_MULTIPLE": "no",
}

DEEP = b"/".join(b"level%02d" % i for i in range(60)) + b"/leaf"

NAMES = [
    ("leading-space", b" leading space"),
    ("trailing-space", b"trailing space "),
    ("double-space", b"double  space"),
    ("only-spaces", b"   "),
    ("newline", b"new\nline"),
    ("trailing-newline", b"ends with newline\n"),
    ("tab", b"tab\there"),
    ("carriage-return", b"Icon\r"),
    ("dash-rf", b"-rf"),
    ("dash-help", b"--help"),
    ("star", b"*"),
    ("glob-mix", b"x*?[ab]"),
    ("brackets", b"[abc]"),
    ("question", b"q?"),
    ("single-quote", b"it's"),
    ("double-quote", b'say "hi"'),
    ("backtick", b"`id`"),
    ("dollar-home", b"$HOME"),
    ("dollar-paren", b"$(touch pwned)"),
    ("arrow", b"a -> b"),
    ("hash", b"#hash"),
    ("semicolon", b"semi;colon"),
    ("leading-semicolon", b";semi"),
    ("backslash", b"back\\slash"),
    ("trailing-backslash", b"ends\\"),
    ("colon", b"host:path"),
    ("tilde", b"~"),
    ("percent", b"%s%n"),
    ("equals", b"--key=value"),
    ("three-dots", b"..."),
    ("hidden", b".hidden"),
    ("non-utf8", b"\xff\xfe-latin1-\xe9"),
    ("long-255", b"L" * 255),
    ("long-255-utf8", "\u00e9".encode() * 127 + b"x"),
    ("unicode-nfc", "caf\u00e9".encode()),
    ("unicode-nfd", "cafe\u0301".encode()),
    ("cjk", "\u65e5\u672c\u8a9e.txt".encode()),
    ("deep-path", DEEP),
]
# names that a glob or a prefix in one of the names above would match by mistake
DECOYS = [b"xa", b"x*?a", b"a", b"b", b"c", b"q1", b"rf", b"help", b"Icon", b"cafe", b"L" * 254]

for _, _name in NAMES:
    assert all(0 < len(part) <= 255 for part in _name.split(b"/")), _name


def path(pair, side, rel):
    """bytes path of `rel` in one replica of the shared `pair` fixture (any pair kind)."""
    return tu.join(pair.root(side), rel)


CONTENT_COUNTER = itertools.count(1)


def content(label):
    """A content no other write of the session has (numbered), naming what it is for."""
    number = next(CONTENT_COUNTER)
    return b"%d: %s\n" % (number, label) + b"." * (number % 97)


def sync(pair, expect=(0,)):
    r = pair.run(env=SETTINGS, instance_id="names")
    assert r.returncode in expect, "osync.py failed\n%s" % ctx(pair, r)
    return r


def dump(pair):
    return "initiator:\n%s\ntarget:\n%s" % (tu.dump_tree(pair.initiator), tu.dump_tree(pair.target))


def assert_equal(pair, result=None):
    diff = tu.diff_snapshots(tu.tree_snapshot(pair.initiator), tu.tree_snapshot(pair.target),
                             "initiator", "target")
    assert not diff, "replicas differ:\n%s\n%s" % ("\n".join(diff), ctx(pair, result))


def later(seconds):
    """An mtime clearly after anything written so far."""
    return time.time() + seconds


def ctx(pair, result):
    return "%s%s" % (dump(pair), describe(result) if result is not None else "")


# ------------------------------------------------------------------------------------------------
# one name at a time
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_name_as_file(pair, name):
    v1 = content(b"v1 " + name)
    tu.write_file(path(pair, "initiator", name), v1, mtime=later(-100))
    r = sync(pair)
    assert tu.ltype(path(pair, "target", name)) == "file", ctx(pair, r)
    assert tu.read_file(path(pair, "target", name)) == v1, ctx(pair, r)
    assert_equal(pair, r)

    # edit on the target travels back; the initiator's old version goes to its backup/
    v2 = content(b"v2 " + name)
    tu.write_file(path(pair, "target", name), v2, mtime=later(10))
    r = sync(pair)
    assert tu.read_file(path(pair, "initiator", name)) == v2, ctx(pair, r)
    backup = path(pair, "initiator", tu.WORKDIR + b"/backup/" + name)
    assert tu.ltype(backup) == "file" and tu.read_file(backup) == v1, \
        "old version not in initiator backup/\n" + ctx(pair, r)
    assert_equal(pair, r)

    # deletion on the initiator: gone from the target tree, kept in the target's deleted/
    os.unlink(path(pair, "initiator", name))
    r = sync(pair)
    assert not tu.lexists(path(pair, "target", name)), ctx(pair, r)
    deleted = path(pair, "target", tu.WORKDIR + b"/deleted/" + name)
    assert tu.ltype(deleted) == "file" and tu.read_file(deleted) == v2, \
        "deleted file not in target deleted/<name>\n" + ctx(pair, r)
    assert_equal(pair, r)


@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_name_as_directory(pair, name):
    inner = name + b"/" + os.path.basename(name)   # the file inside has the awkward name too
    v1 = content(b"v1 " + inner)
    os.makedirs(path(pair, "initiator", name))
    tu.write_file(path(pair, "initiator", inner), v1, mtime=later(-100))
    r = sync(pair)
    assert tu.ltype(path(pair, "target", name)) == "dir", ctx(pair, r)
    assert tu.ltype(path(pair, "target", inner)) == "file", ctx(pair, r)
    assert tu.read_file(path(pair, "target", inner)) == v1, ctx(pair, r)
    assert_equal(pair, r)

    v2 = content(b"v2 " + inner)
    tu.write_file(path(pair, "target", inner), v2, mtime=later(10))
    r = sync(pair)
    assert tu.read_file(path(pair, "initiator", inner)) == v2, ctx(pair, r)
    backup = path(pair, "initiator", tu.WORKDIR + b"/backup/" + inner)
    assert tu.ltype(backup) == "file" and tu.read_file(backup) == v1, \
        "old version not in initiator backup/\n" + ctx(pair, r)
    assert_equal(pair, r)

    tu.remove(path(pair, "initiator", name))
    r = sync(pair)
    assert not tu.lexists(path(pair, "target", name)), ctx(pair, r)
    deleted = path(pair, "target", tu.WORKDIR + b"/deleted/" + inner)
    assert tu.ltype(deleted) == "file" and tu.read_file(deleted) == v2, \
        "deleted directory not in target deleted/<name>\n" + ctx(pair, r)
    assert_equal(pair, r)


@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_name_as_symlink(pair, name):
    base = os.path.basename(name)
    t1 = base + b".1"                    # relative, dangling, as awkward as the name
    t2 = b"./" + base + b".22"
    tu.make_symlink(path(pair, "initiator", name), t1, mtime=later(-100))
    r = sync(pair)
    assert tu.ltype(path(pair, "target", name)) == "link", ctx(pair, r)
    assert os.readlink(path(pair, "target", name)) == t1, ctx(pair, r)
    assert_equal(pair, r)

    os.unlink(path(pair, "target", name))
    tu.make_symlink(path(pair, "target", name), t2, mtime=later(10))
    r = sync(pair)
    assert tu.ltype(path(pair, "initiator", name)) == "link", ctx(pair, r)
    assert os.readlink(path(pair, "initiator", name)) == t2, ctx(pair, r)
    assert_equal(pair, r)

    os.unlink(path(pair, "initiator", name))
    r = sync(pair)
    assert not tu.lexists(path(pair, "target", name)), ctx(pair, r)
    deleted = path(pair, "target", tu.WORKDIR + b"/deleted/" + name)
    assert tu.ltype(deleted) == "link" and os.readlink(deleted) == t2, \
        "deleted symlink not in target deleted/<name>\n" + ctx(pair, r)
    assert_equal(pair, r)


# ------------------------------------------------------------------------------------------------
# all names in one tree
# ------------------------------------------------------------------------------------------------

def test_all_names_together(pair):
    names = [n for _, n in NAMES] + DECOYS
    expected = {}   # relpath -> ("file", content) / ("link", target) / ("dir",)

    def put_file(side, rel, label):
        data = content(label + b" " + rel)
        tu.write_file(path(pair, side, rel), data, mtime=later(-1000))
        expected[rel] = ("file", data)
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            expected[b"/".join(parts[:i])] = ("dir",)

    for i, name in enumerate(names):
        # at the root: alternately from the initiator and from the target
        put_file("initiator" if i % 2 == 0 else "target", name, b"root")
        # a directory of that name, holding a file of that name, from the initiator
        put_file("initiator", b"dirs/" + name + b"/" + os.path.basename(name), b"dir")
        # a symlink of that name, from the target
        link = b"links/" + name
        tu.make_symlink(path(pair, "target", link), os.path.basename(name) + b".t")
        expected[link] = ("link", os.path.basename(name) + b".t")
        for j, part in enumerate(link.split(b"/")[:-1]):
            expected[b"/".join(link.split(b"/")[:j + 1])] = ("dir",)

    r = sync(pair)
    assert_equal(pair, r)
    for side in ("initiator", "target"):
        got = tu.tree_snapshot(pair.root(side))
        for rel, want in expected.items():
            e = got.get(rel)
            assert e is not None and e[0] == want[0], "%s: %r missing or wrong type (%r)\n%s" % (
                side, rel, e, ctx(pair, r))
            if want[0] == "file":
                assert e[2] == want[1], "%s: %r has the wrong content\n%s" % (side, rel, ctx(pair, r))
            if want[0] == "link":
                assert e[1] == want[1], "%s: %r has the wrong target\n%s" % (side, rel, ctx(pair, r))
        extra = sorted(set(got) - set(expected))
        assert not extra, "%s: unexpected entries %r\n%s" % (side, extra, ctx(pair, r))

    # edits on both sides: the target edits the root files of even index, the initiator deletes those
    # of odd index, the target deletes every other directory
    edited, deleted_files, deleted_dirs = {}, [], []
    for i, name in enumerate(names):
        if i % 2 == 0:
            data = content(b"edit " + name)
            tu.write_file(path(pair, "target", name), data, mtime=later(100))
            edited[name] = data
        else:
            deleted_files.append((name, tu.read_file(path(pair, "initiator", name))))
            os.unlink(path(pair, "initiator", name))
        if i % 3 == 0:
            top = b"dirs/" + name.split(b"/")[0]
            if top not in [d[0] for d in deleted_dirs]:
                inner = b"dirs/" + name + b"/" + os.path.basename(name)
                deleted_dirs.append((top, inner, tu.read_file(path(pair, "target", inner))))
                tu.remove(path(pair, "target", top))

    r = sync(pair)
    assert_equal(pair, r)
    for name, data in edited.items():
        assert tu.read_file(path(pair, "initiator", name)) == data, "edit of %r not synced\n%s" % (
            name, ctx(pair, r))
    for name, data in deleted_files:
        assert not tu.lexists(path(pair, "target", name)), "deletion of %r not synced\n%s" % (
            name, ctx(pair, r))
        d = path(pair, "target", tu.WORKDIR + b"/deleted/" + name)
        assert tu.ltype(d) == "file" and tu.read_file(d) == data, \
            "%r not in target deleted/\n%s" % (name, ctx(pair, r))
    for top, inner, data in deleted_dirs:
        assert not tu.lexists(path(pair, "initiator", top)), "deletion of %r not synced\n%s" % (
            top, ctx(pair, r))
        d = path(pair, "initiator", tu.WORKDIR + b"/deleted/" + inner)
        assert tu.ltype(d) == "file" and tu.read_file(d) == data, \
            "%r not in initiator deleted/\n%s" % (inner, ctx(pair, r))

    # a second run changes nothing
    before = {side: tu.full_snapshot(pair.root(side)) for side in ("initiator", "target")}
    r = sync(pair)
    for side in ("initiator", "target"):
        diff = tu.diff_snapshots(before[side], tu.full_snapshot(pair.root(side)), "before", "after")
        assert not diff, "second run changed the %s replica:\n%s\n%s" % (side, "\n".join(diff), ctx(pair, r))
