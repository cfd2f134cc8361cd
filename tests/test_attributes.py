"""ACLs, extended attributes, modes and owners: an attribute-only change on either replica
reaches the other one and is never reverted; both sides changing: the newer change wins
and the replaced set is logged; PRESERVE_ACL / PRESERVE_XATTR toggled is not a change of
every file; a filesystem without xattr support gets one warning, not an error per file.
Real setfacl / setfattr / chown, run as root, on local and ssh pairs."""

import contextlib
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import OSYNC, mkdir, need, put

ATTRS_ON = {"PRESERVE_ACL": "yes", "PRESERVE_XATTR": "yes"}
ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


@pytest.fixture(autouse=True)
def tools():
    if os.geteuid() != 0:
        need("the attribute tests run as root (chown, trusted.* xattrs)")
    for tool in ("setfacl", "getfacl", "setfattr"):
        if shutil.which(tool) is None:
            need("%s is not installed (packages acl and attr)" % tool)


def tool(*argv):
    subprocess.run([str(word) for word in argv], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def attributes(path):
    """What a user sees of an item's attributes: mode, owner, group, every xattr (ACLs
    included) of the item itself."""
    info = os.lstat(str(path))
    values = {}
    for name in os.listxattr(str(path), follow_symlinks=False):
        values[name] = os.getxattr(str(path), name, follow_symlinks=False)
    return (oct(info.st_mode), info.st_uid, info.st_gid, values)


def acl_text(path):
    return subprocess.run(["getfacl", "-cp", str(path)], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout


def log_since(pair, start):
    return pair.logfile.read_text(errors="replace")[start:]


def log_size(pair):
    return len(pair.logfile.read_text(errors="replace")) if pair.logfile.exists() else 0


# Each change is made on a file and on a directory, on one side: (name, how, check on the other side).
CHANGES = (
    ("chmod", lambda p: os.chmod(str(p), 0o750 if p.is_dir() else 0o640)),
    ("chown", lambda p: os.chown(str(p), 1234, -1)),
    ("chgrp", lambda p: os.chown(str(p), -1, 2345)),
    ("acl-add", lambda p: tool("setfacl", "-m", "u:1234:rwx", p)),
    ("acl-default", lambda p: tool("setfacl", "-d" if p.is_dir() else "-n", "-m", "g:2345:r-x", p)),
    ("acl-remove", lambda p: tool("setfacl", "-b", p)),
    ("xattr-set", lambda p: tool("setfattr", "-n", "user.colour", "-v", "blue", p)),
    ("xattr-change", lambda p: tool("setfattr", "-n", "user.origin", "-v", "changed", p)),
    ("xattr-remove", lambda p: tool("setfattr", "-x", "user.origin", p)),
    ("xattr-trusted", lambda p: tool("setfattr", "-n", "trusted.tag", "-v", "root-only", p)),
)


def starting_tree(root):
    """On each item: an ACL (for acl-remove) and user.origin (for xattr-change and xattr-remove)."""
    for side in ("i", "t"):
        for name, _ in CHANGES:
            for item in ("%s-%s-file" % (side, name), "%s-%s-dir" % (side, name)):
                path = root / item
                if item.endswith("-dir"):
                    mkdir(root, item)
                else:
                    put(root, item, item)
                tool("setfacl", "-m", "u:4321:r-x", path)
                tool("setfattr", "-n", "user.origin", "-v", "start", path)


def test_every_attribute_change_reaches_the_other_side(pair):
    starting_tree(pair.initiator)
    os.symlink("i-chmod-file", str(pair.initiator / "i-link"))
    os.symlink("t-chmod-file", str(pair.initiator / "t-link"))
    pair.run(env=ATTRS_ON, expect=0)
    for name in os.listdir(str(pair.initiator)):
        if name != ".osync_workdir":
            assert attributes(pair.target / name) == attributes(pair.initiator / name), name
    # What rsync copied with its ACLs and xattrs is recorded as such: nothing more to do.
    start = log_size(pair)
    pair.run("--verbose", env=ATTRS_ON, expect=0)
    assert "update attributes" not in log_since(pair, start), log_since(pair, start)

    changed = {}
    for side, root in (("i", pair.initiator), ("t", pair.target)):
        for name, change in CHANGES:
            for item in ("%s-%s-file" % (side, name), "%s-%s-dir" % (side, name)):
                change(root / item)
                changed[item] = attributes(root / item)
        # A link's own xattrs (trusted.*: Linux takes no user.* on a link), never its target's.
        tool("setfattr", "-h", "-n", "trusted.link", "-v", side, root / ("%s-link" % side))
        changed["%s-link" % side] = attributes(root / ("%s-link" % side))
    start = log_size(pair)
    pair.run("--verbose", env=ATTRS_ON, expect=0)
    for item, wanted in sorted(changed.items()):
        assert attributes(pair.initiator / item) == wanted, "%s reverted or not synced on the initiator" % item
        assert attributes(pair.target / item) == wanted, "%s reverted or not synced on the target" % item
    assert attributes(pair.initiator / "i-chmod-file") == attributes(pair.target / "i-chmod-file")
    log = log_since(pair, start)
    assert "copy file" not in log, "an attribute-only change made a transfer:\n" + log
    assert "changed on both" not in log, log

    start = log_size(pair)
    pair.run("--verbose", env=ATTRS_ON, expect=0)
    log = log_since(pair, start)
    assert "update attributes" not in log and "copy " not in log, "the second run did not converge:\n" + log


def test_both_sides_changed_the_newer_change_wins_and_the_older_is_logged(pair):
    for name in ("f", "g"):
        put(pair.initiator, name, name)
    mkdir(pair.initiator, "d")
    pair.run(env=ATTRS_ON, expect=0)
    # f and d: the initiator first, the target later; g: the other way round.
    tool("setfattr", "-n", "user.note", "-v", "older", pair.initiator / "f")
    tool("setfacl", "-m", "u:1234:rw-", pair.target / "g")
    tool("setfacl", "-d", "-m", "u:1234:r-x", pair.initiator / "d")
    time.sleep(0.05)
    tool("setfattr", "-n", "user.note", "-v", "newer", pair.target / "f")
    tool("setfacl", "-m", "u:1234:rwx", pair.target / "f")
    tool("setfattr", "-n", "user.note", "-v", "newer", pair.initiator / "g")
    tool("setfacl", "-d", "-m", "g:2345:rwx", pair.target / "d")
    newer = {"f": attributes(pair.target / "f"), "g": attributes(pair.initiator / "g"),
             "d": attributes(pair.target / "d")}
    start = log_size(pair)
    pair.run(env=ATTRS_ON, expect=0)
    for name, wanted in newer.items():
        assert attributes(pair.initiator / name) == wanted, name
        assert attributes(pair.target / name) == wanted, name
    log = log_since(pair, start)
    notices = [line for line in log.splitlines() if "changed on both replicas" in line]
    assert len(notices) == 3, log
    by_path = dict((re.search(r"Attributes of (\S+) ", line).group(1), line) for line in notices)
    assert "the target's newer change wins, and the initiator's are replaced" in by_path["f"], by_path
    assert "user.note=older" in by_path["f"], by_path
    assert "the initiator's newer change wins, and the target's are replaced" in by_path["g"], by_path
    assert "user:1234:rw-" in by_path["g"], by_path      # the target's ACL that was replaced
    assert "default user::rwx,user:1234:r-x" in by_path["d"], by_path


def test_turning_acl_and_xattr_tracking_on_and_off_is_not_a_change(pair):
    for number in range(20):
        put(pair.initiator, "f%02d" % number, "content %d" % number)
    mkdir(pair.initiator, "d")
    pair.run(expect=0)
    # The same ACL and xattr on both sides, set while they were not preserved.
    for root in pair.roots:
        tool("setfacl", "-m", "u:1234:r--", root / "f03")
        tool("setfattr", "-n", "user.same", "-v", "1", root / "f04")
    before = dict((name, (os.lstat(str(pair.target / name)).st_ino, attributes(pair.target / name)))
                  for name in os.listdir(str(pair.target)) if name != ".osync_workdir")
    for env in (ATTRS_ON, {"PRESERVE_ACL": "yes"}, {}, ATTRS_ON):
        start = log_size(pair)
        pair.run("--verbose", env=env, expect=0)
        log = log_since(pair, start)
        assert "update attributes" not in log and "copy " not in log, "%s:\n%s" % (env, log)
    after = dict((name, (os.lstat(str(pair.target / name)).st_ino, attributes(pair.target / name)))
                 for name in os.listdir(str(pair.target)) if name != ".osync_workdir")
    assert after == before
    # Tracked now: a change made with the settings on travels.
    tool("setfacl", "-m", "u:1234:rwx", pair.initiator / "f05")
    tool("setfattr", "-n", "user.later", "-v", "2", pair.target / "d")
    pair.run(env=ATTRS_ON, expect=0)
    assert acl_text(pair.target / "f05") == acl_text(pair.initiator / "f05")
    assert "user:1234:rwx" in acl_text(pair.target / "f05")
    assert os.getxattr(str(pair.initiator / "d"), "user.later") == b"2"


@contextlib.contextmanager
def ramfs(directory):
    """A ramfs mounted on `directory`: it takes files but no xattrs, no ACLs at all."""
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(directory)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    if result.returncode != 0:
        need("cannot mount a ramfs (needs root and mount rights): %s" % result.stderr.strip())
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)])


NO_SPACE_CHECK = {"MINIMUM_SPACE": "0"}   # a ramfs shows no free space


def test_filesystem_without_xattr_support_gets_one_warning(pair):
    with ramfs(pair.target):
        probe = pair.target / "probe"
        probe.write_text("x")
        try:
            os.setxattr(str(probe), "user.probe", b"1")
            need("ramfs takes user xattrs on this kernel: no filesystem without xattr support to test with")
        except OSError:
            pass
        probe.unlink()
        for number in range(5):
            put(pair.initiator, "f%d" % number, "content %d" % number)
        mkdir(pair.initiator, "d")
        pair.run(env=NO_SPACE_CHECK, expect=0)
        for number in range(5):
            tool("setfattr", "-n", "user.x", "-v", str(number), pair.initiator / ("f%d" % number))
            tool("setfacl", "-m", "u:1234:rw-", pair.initiator / ("f%d" % number))
        tool("setfacl", "-d", "-m", "u:1234:rwx", pair.initiator / "d")
        put(pair.initiator, "d/new", "new file")
        start = log_size(pair)
        result = pair.run(env=dict(ATTRS_ON, **NO_SPACE_CHECK), expect=2)
        log = log_since(pair, start)
        warnings = [line for line in log.splitlines() if "cannot hold" in line]
        assert len(warnings) == 1, log
        assert "on the target replica" in warnings[0], warnings
        assert "ACLs (PRESERVE_ACL) and extended attributes (PRESERVE_XATTR)" in warnings[0], warnings
        assert "ERROR" not in result.output and "Cannot set" not in log, log
        assert (pair.target / "d" / "new").read_text() == "new file"
        # The next run: the same one warning, nothing else to do.
        start = log_size(pair)
        pair.run("--verbose", env=dict(ATTRS_ON, **NO_SPACE_CHECK), expect=2)
        log = log_since(pair, start)
        assert len([line for line in log.splitlines() if "cannot hold" in line]) == 1, log
        assert "update attributes" not in log and "copy " not in log, log


XATTR_CALLS = ("listxattr", "llistxattr", "getxattr", "lgetxattr", "flistxattr", "fgetxattr")


@pytest.mark.local_only
def test_scan_makes_xattr_calls_only_when_acl_or_xattr_is_preserved(pair, tmp_path):
    if shutil.which("strace") is None:
        need("strace is not installed")
    for number in range(30):
        put(pair.initiator, "f%02d" % number, "content %d" % number)
    mkdir(pair.initiator, "d")
    pair.run(expect=0)

    def traced_calls(env):
        """The xattr system calls of one run (osync.py and every child)."""
        trace = tmp_path / "trace.txt"
        argv = (["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=" + ",".join(XATTR_CALLS), pair.interpreter,
                 str(OSYNC)] + pair.quick_args())
        subprocess.run(argv, env=pair.env(env), cwd=str(pair.cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       check=True, timeout=120)
        return [line for line in trace.read_text(errors="replace").splitlines()
                if re.search(r"\b(%s)\(" % "|".join(XATTR_CALLS), line)]

    assert traced_calls({}) == []
    acl_calls = traced_calls({"PRESERVE_ACL": "yes"})
    assert not any("listxattr(" in line for line in acl_calls), acl_calls[:5]
    assert len([line for line in acl_calls if "system.posix_acl_access" in line]) >= 2 * 31, acl_calls[:5]
    both_calls = traced_calls(ATTRS_ON)
    assert len([line for line in both_calls if "listxattr(" in line]) >= 2 * 31, both_calls[:5]



# A hostile agent's read_attributes reply (the target is the source of an xattr update of
# the initiator): refused before anything is set on the initiator.
ATTRIBUTE_LIES = {
    "system-namespace": ('answer[1] = answer[1] + [["system.posix_acl_access", "AgAAAA=="]]', "not an extended"),
    "other-values": ('answer[1] = [["user.note", "b3RoZXI="]]', "not the ones its scan showed"),
    "not-base64": ('answer[1] = [[name, "***"] for name, _ in answer[1]]', "not base64"),
    "not-asked-acl": ('answer[0] = []', "not asked for"),
    "too-many": ('answer[1] = [["user.n%d" % n, ""] for n in range(5000)]', "at most"),
}


@pytest.mark.parametrize("case", sorted(ATTRIBUTE_LIES))
def test_attribute_values_an_agent_lies_about_end_the_run(pair, case):
    if not pair.kind.startswith("remote"):
        pytest.skip("the hostile agent needs a remote target")
    from test_hostile_agent import assert_refused, hostile_python
    put(pair.initiator, "f", "f")
    pair.run(env=ATTRS_ON, expect=0)
    tool("setfattr", "-n", "user.note", "-v", "from the target", pair.target / "f")
    before = attributes(pair.initiator / "f")
    body, words = ATTRIBUTE_LIES[case]
    patch = ("_real_read_attributes = LocalReplica.read_attributes\n"
             "def _lying_read_attributes(self, items, options):\n"
             "    answers = _real_read_attributes(self, items, options)\n"
             "    for answer in answers:\n"
             "        %s\n"
             "    return answers\n"
             "LocalReplica.read_attributes = _lying_read_attributes\n" % body)
    r = pair.run(env=dict(ATTRS_ON, REMOTE_PYTHON=hostile_python(pair, patch)))
    assert_refused(r, words=[words])
    assert attributes(pair.initiator / "f") == before
    # Nothing recorded: the honest run after it carries the change over.
    pair.run(env=ATTRS_ON, expect=0)
    assert os.getxattr(str(pair.initiator / "f"), "user.note") == b"from the target"


# -- the planner's attribute rules alone ------------------------------------------------------

def planned(previous, initiator, target, **policy):
    """The one decision for path "a" (initiator, target: entries or None)."""
    import osync
    records = [("a", previous[0], previous[1])] if previous else []
    decisions = list(osync.plan(iter(records), iter([initiator]), iter([target]), osync.Policy(**policy)))
    return decisions[0]


def entry(acl="", xattr="", ctime=100, kind="f"):
    import osync
    return osync.Entry("a", kind, 3, 100 * 10 ** 9, 0o644, 0, 0, 1, ctime * 10 ** 9, acl=acl, xattr=xattr)


@pytest.mark.parametrize("preserved", ["acl", "xattr"])
def test_planner_attribute_sets(preserved):
    import osync
    on = {preserved: True}

    def both(fingerprint, ctime=100):
        return entry(ctime=ctime, **{preserved: fingerprint})

    # Changed on one side only: that side's set travels, whichever changed later.
    decision = planned((both("aaaa"), both("aaaa")), both("aaaa", ctime=900), both("bbbb", ctime=200), **on)
    assert (decision.action, decision.source, decision.reason) == (osync.ATTRS, "target", osync.WON_ONLY_CHANGED)
    # Both changed: the newer change (ctime) wins, and the executor is told why.
    decision = planned((both("aaaa"), both("aaaa")), both("cccc", ctime=300), both("bbbb", ctime=200), **on)
    assert (decision.action, decision.source, decision.reason) == (osync.ATTRS, "initiator", osync.WON_NEWER)
    assert decision.note == "changed on both replicas"
    # Not tracked in the state (the setting was off): the same set now is no change.
    assert planned((both(""), both("")), both("aaaa"), both("aaaa"), **on).action == osync.NOTHING
    # Turned off: sets that differ are not looked at.
    assert planned((both("aaaa"), both("aaaa")), both(""), both(""), **{preserved: False}).action == osync.NOTHING
    assert planned((both("aaaa"), both("aaaa")), both("aaaa"), both("bbbb"), **{preserved: False}).action \
        == osync.NOTHING
    # A filesystem that cannot hold them on one side: never a difference.
    assert planned((both("aaaa"), both("aaaa")), both("cccc"), both(osync.ATTRIBUTES_UNSUPPORTED),
                   **on).action == osync.NOTHING
    # ACLs do not apply to links; a link's own xattrs do.
    link = dict(kind="l", ctime=300, **{preserved: "cccc"})
    decision = planned((entry(kind="l", **{preserved: "aaaa"}), entry(kind="l", **{preserved: "aaaa"})),
                       entry(**link), entry(kind="l", **{preserved: "aaaa"}), **on)
    assert decision.action == (osync.ATTRS if preserved == "xattr" else osync.NOTHING)


def test_old_state_lines_read_with_untracked_sets(tmp_path):
    """A state line written before the acl and xattr fields existed reads with both empty."""
    import json
    import osync
    path = tmp_path / "state"
    header = {"format": osync.STATE_FORMAT, "version": 1}
    old_fields = ["f", 3, 100, 0o644, 0, 0, 1, 100, "", "", ""]
    path.write_text(json.dumps(header) + "\n" + json.dumps(["a", old_fields, old_fields]) + "\n")
    [(rel_path, initiator, target)] = list(osync.read_state(str(path)))
    assert (initiator.acl, initiator.xattr, target.acl, target.xattr) == ("", "", "", "")
