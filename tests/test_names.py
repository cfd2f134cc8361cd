"""Awkward names (DESIGN §4.8: any name works).

For every name and every kind (a file, a directory holding a file, a symlink): create it on the initiator
and sync, edit it on the target and sync, delete it on the initiator and sync; the edit and the deletion
must travel, the overwritten version must land in backup/ and the deleted one in deleted/<same name>.
Then all the names at once in one tree, changed on both sides, synced, and a second run changes nothing.

Everything is bytes: some names are not UTF-8.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

import treeutil as tu  # noqa: E402

SETTINGS = {
    "SOFT_DELETE": True,
    "CONFLICT_BACKUP": True,
    "CONFLICT_BACKUP_MULTIPLE": False,
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


class Pair:
    """An initiator and a target replica in a temp dir."""

    def __init__(self, tmp):
        tmp = tu.b(tmp)
        self.initiator = tmp + b"/initiator"
        self.target = tmp + b"/target"
        self.logfile = tmp + b"/osync.log"
        os.mkdir(self.initiator)
        os.mkdir(self.target)
        self.counter = 0

    def root(self, side):
        return self.initiator if side == "initiator" else self.target

    def path(self, side, rel):
        return tu.join(self.root(side), rel)

    def content(self, label):
        self.counter += 1
        return b"%d: %s\n" % (self.counter, label) + b"." * self.counter

    def sync(self, expect=(0,)):
        result = tu.run_osync(self.initiator, self.target, self.logfile, settings=SETTINGS,
                              instance_id="names")
        assert result.returncode in expect, "osync.py failed\n%s\n%s" % (result.describe(), self.dump())
        return result

    def dump(self):
        return "initiator:\n%s\ntarget:\n%s" % (tu.dump_tree(self.initiator), tu.dump_tree(self.target))

    def assert_equal(self, result=None):
        diff = tu.diff_snapshots(tu.tree_snapshot(self.initiator), tu.tree_snapshot(self.target),
                                 "initiator", "target")
        assert not diff, "replicas differ:\n%s\n%s\n%s" % (
            "\n".join(diff), self.dump(), result.describe() if result else "")


@pytest.fixture
def pair(tmp_path):
    return Pair(tmp_path)


def later(seconds):
    """An mtime clearly after anything written so far."""
    return time.time() + seconds


def ctx(pair, result):
    return "%s\n%s" % (pair.dump(), result.describe())


# ------------------------------------------------------------------------------------------------
# one name at a time
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_file(pair, name):
    v1 = pair.content(b"v1 " + name)
    tu.write_file(pair.path("initiator", name), v1, mtime=later(-100))
    r = pair.sync()
    assert tu.ltype(pair.path("target", name)) == "file", ctx(pair, r)
    assert tu.read_file(pair.path("target", name)) == v1, ctx(pair, r)
    pair.assert_equal(r)

    # edit on the target travels back; the initiator's old version goes to its backup/
    v2 = pair.content(b"v2 " + name)
    tu.write_file(pair.path("target", name), v2, mtime=later(10))
    r = pair.sync()
    assert tu.read_file(pair.path("initiator", name)) == v2, ctx(pair, r)
    backup = pair.path("initiator", tu.WORKDIR + b"/backup/" + name)
    assert tu.ltype(backup) == "file" and tu.read_file(backup) == v1, \
        "old version not in initiator backup/\n" + ctx(pair, r)
    pair.assert_equal(r)

    # deletion on the initiator: gone from the target tree, kept in the target's deleted/
    os.unlink(pair.path("initiator", name))
    r = pair.sync()
    assert not tu.lexists(pair.path("target", name)), ctx(pair, r)
    deleted = pair.path("target", tu.WORKDIR + b"/deleted/" + name)
    assert tu.ltype(deleted) == "file" and tu.read_file(deleted) == v2, \
        "deleted file not in target deleted/<name>\n" + ctx(pair, r)
    pair.assert_equal(r)


@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_directory(pair, name):
    inner = name + b"/" + os.path.basename(name)   # the file inside has the awkward name too
    v1 = pair.content(b"v1 " + inner)
    os.makedirs(pair.path("initiator", name))
    tu.write_file(pair.path("initiator", inner), v1, mtime=later(-100))
    r = pair.sync()
    assert tu.ltype(pair.path("target", name)) == "dir", ctx(pair, r)
    assert tu.ltype(pair.path("target", inner)) == "file", ctx(pair, r)
    assert tu.read_file(pair.path("target", inner)) == v1, ctx(pair, r)
    pair.assert_equal(r)

    v2 = pair.content(b"v2 " + inner)
    tu.write_file(pair.path("target", inner), v2, mtime=later(10))
    r = pair.sync()
    assert tu.read_file(pair.path("initiator", inner)) == v2, ctx(pair, r)
    backup = pair.path("initiator", tu.WORKDIR + b"/backup/" + inner)
    assert tu.ltype(backup) == "file" and tu.read_file(backup) == v1, \
        "old version not in initiator backup/\n" + ctx(pair, r)
    pair.assert_equal(r)

    tu.remove(pair.path("initiator", name))
    r = pair.sync()
    assert not tu.lexists(pair.path("target", name)), ctx(pair, r)
    deleted = pair.path("target", tu.WORKDIR + b"/deleted/" + inner)
    assert tu.ltype(deleted) == "file" and tu.read_file(deleted) == v2, \
        "deleted directory not in target deleted/<name>\n" + ctx(pair, r)
    pair.assert_equal(r)


@pytest.mark.parametrize("name", [n for _, n in NAMES], ids=[i for i, _ in NAMES])
def test_symlink(pair, name):
    base = os.path.basename(name)
    t1 = base + b".1"                    # relative, dangling, as awkward as the name
    t2 = b"./" + base + b".22"
    tu.make_symlink(pair.path("initiator", name), t1, mtime=later(-100))
    r = pair.sync()
    assert tu.ltype(pair.path("target", name)) == "link", ctx(pair, r)
    assert os.readlink(pair.path("target", name)) == t1, ctx(pair, r)
    pair.assert_equal(r)

    os.unlink(pair.path("target", name))
    tu.make_symlink(pair.path("target", name), t2, mtime=later(10))
    r = pair.sync()
    assert tu.ltype(pair.path("initiator", name)) == "link", ctx(pair, r)
    assert os.readlink(pair.path("initiator", name)) == t2, ctx(pair, r)
    pair.assert_equal(r)

    os.unlink(pair.path("initiator", name))
    r = pair.sync()
    assert not tu.lexists(pair.path("target", name)), ctx(pair, r)
    deleted = pair.path("target", tu.WORKDIR + b"/deleted/" + name)
    assert tu.ltype(deleted) == "link" and os.readlink(deleted) == t2, \
        "deleted symlink not in target deleted/<name>\n" + ctx(pair, r)
    pair.assert_equal(r)


# ------------------------------------------------------------------------------------------------
# all names in one tree
# ------------------------------------------------------------------------------------------------

def test_all_names_together(pair):
    names = [n for _, n in NAMES] + DECOYS
    expected = {}   # relpath -> ("file", content) / ("link", target) / ("dir",)

    def put_file(side, rel, label):
        data = pair.content(label + b" " + rel)
        tu.write_file(pair.path(side, rel), data, mtime=later(-1000))
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
        tu.make_symlink(pair.path("target", link), os.path.basename(name) + b".t")
        expected[link] = ("link", os.path.basename(name) + b".t")
        for j, part in enumerate(link.split(b"/")[:-1]):
            expected[b"/".join(link.split(b"/")[:j + 1])] = ("dir",)

    r = pair.sync()
    pair.assert_equal(r)
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
            data = pair.content(b"edit " + name)
            tu.write_file(pair.path("target", name), data, mtime=later(100))
            edited[name] = data
        else:
            deleted_files.append((name, tu.read_file(pair.path("initiator", name))))
            os.unlink(pair.path("initiator", name))
        if i % 3 == 0:
            top = b"dirs/" + name.split(b"/")[0]
            if top not in [d[0] for d in deleted_dirs]:
                inner = b"dirs/" + name + b"/" + os.path.basename(name)
                deleted_dirs.append((top, inner, tu.read_file(pair.path("target", inner))))
                tu.remove(pair.path("target", top))

    r = pair.sync()
    pair.assert_equal(r)
    for name, data in edited.items():
        assert tu.read_file(pair.path("initiator", name)) == data, "edit of %r not synced\n%s" % (
            name, ctx(pair, r))
    for name, data in deleted_files:
        assert not tu.lexists(pair.path("target", name)), "deletion of %r not synced\n%s" % (
            name, ctx(pair, r))
        d = pair.path("target", tu.WORKDIR + b"/deleted/" + name)
        assert tu.ltype(d) == "file" and tu.read_file(d) == data, \
            "%r not in target deleted/\n%s" % (name, ctx(pair, r))
    for top, inner, data in deleted_dirs:
        assert not tu.lexists(pair.path("initiator", top)), "deletion of %r not synced\n%s" % (
            top, ctx(pair, r))
        d = pair.path("initiator", tu.WORKDIR + b"/deleted/" + inner)
        assert tu.ltype(d) == "file" and tu.read_file(d) == data, \
            "%r not in initiator deleted/\n%s" % (inner, ctx(pair, r))

    # a second run changes nothing
    before = {side: tu.full_snapshot(pair.root(side)) for side in ("initiator", "target")}
    r = pair.sync()
    for side in ("initiator", "target"):
        diff = tu.diff_snapshots(before[side], tu.full_snapshot(pair.root(side)), "before", "after")
        assert not diff, "second run changed the %s replica:\n%s\n%s" % (side, "\n".join(diff), ctx(pair, r))
