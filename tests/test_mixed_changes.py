"""A content edit on one replica and an attribute change (chmod, chown, chgrp, setfacl,
setfattr) on the other, in the same interval: the edited content reaches both sides and
the attribute change is never reverted.  When both sides changed the attributes, the
newer change (ctime) wins them and the replaced set is logged; the content is the edited
one either way.  With SYNC_TYPE the mirrored side wins everything.  Real tools, run as
root, on local and ssh pairs."""

import os
import shutil
import subprocess
import time

import pytest

import osync
from conftest import T0, chattr_supported, need, put

ATTRS_ON = {"PRESERVE_ACL": "yes", "PRESERVE_XATTR": "yes"}
SIDES = ("initiator", "target")


@pytest.fixture(autouse=True)
def tools():
    if os.geteuid() != 0:
        need("the mixed-change tests run as root (chown, chgrp, trusted.* xattrs)")
    for tool_name in ("setfacl", "setfattr"):
        if shutil.which(tool_name) is None:
            need("%s is not installed (packages acl and attr)" % tool_name)


def tool(*argv):
    subprocess.run([str(word) for word in argv], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def attributes(path):
    """What a user sees of a file's attributes: mode, owner, group, every xattr (the ACL
    included)."""
    info = os.lstat(str(path))
    values = {}
    for name in os.listxattr(str(path), follow_symlinks=False):
        values[name] = os.getxattr(str(path), name, follow_symlinks=False)
    return (oct(info.st_mode), info.st_uid, info.st_gid, values)


def edit(path, content, mtime):
    """Rewrite a file in place, as an editor that keeps the file's inode and attributes."""
    with open(str(path), "r+b") as handle:
        handle.truncate(0)
        handle.write(content)
    os.utime(str(path), (mtime, mtime))


def read(path):
    with open(str(path), "rb") as handle:
        return handle.read()


def log_size(pair):
    return len(pair.logfile.read_text(errors="replace")) if pair.logfile.exists() else 0


def log_since(pair, start):
    return pair.logfile.read_text(errors="replace")[start:]


def assert_converged_with_attributes(pair, wanted, env):
    """A further run changes nothing: no tree change (assert_converged), and every file keeps
    the attributes `wanted` says, on both sides."""
    start = log_size(pair)
    pair.assert_converged("--verbose", env=env)
    log = log_since(pair, start)
    assert "update attributes" not in log and "copy " not in log, "the second run did not converge:\n" + log
    for name, attrs in sorted(wanted.items()):
        for root in pair.roots:
            assert attributes(root / name) == attrs, "%s on %s after the second run" % (name, root)


# One change of attributes each: (name, how).  The file starts with an ACL entry and
# user.origin, so that changing and removing them are changes too.
ATTRIBUTE_CHANGES = (
    ("chmod", lambda p: os.chmod(str(p), 0o604)),
    ("chown", lambda p: os.chown(str(p), 1234, -1)),
    ("chgrp", lambda p: os.chown(str(p), -1, 2345)),
    ("setfacl", lambda p: tool("setfacl", "-m", "u:1234:rwx", p)),
    ("setfacl-remove", lambda p: tool("setfacl", "-b", p)),
    ("setfattr", lambda p: tool("setfattr", "-n", "user.colour", "-v", "blue", p)),
    ("setfattr-trusted", lambda p: tool("setfattr", "-n", "trusted.tag", "-v", "root-only", p)),
    ("setfattr-remove", lambda p: tool("setfattr", "-x", "user.origin", p)),
)


def start_file(root, name):
    path = put(root, name, b"first version of " + name.encode(), mtime=T0)
    tool("setfacl", "-m", "u:4321:r--", path)
    tool("setfattr", "-n", "user.origin", "-v", "start", path)
    return path


def test_an_attribute_change_is_kept_when_the_other_side_edits_the_content(pair):
    """Edit on one side, chmod/chown/chgrp/setfacl/setfattr on the other, both directions:
    the new content with the changed attributes ends up on both sides."""
    cases = []
    for edited in SIDES:
        changed = pair.other(edited)
        for how, change in ATTRIBUTE_CHANGES:
            cases.append(("%s-edited-%s" % (edited, how), edited, changed, change))
    for name, _, _, _ in cases:
        start_file(pair.initiator, name)
    pair.run(env=ATTRS_ON, expect=0)

    wanted_content, wanted_attrs = {}, {}
    for number, (name, edited, changed, change) in enumerate(cases):
        change(pair.root(changed) / name)
        wanted_attrs[name] = attributes(pair.root(changed) / name)
        wanted_content[name] = b"edited on the %s, case %d, longer than before" % (edited.encode(), number)
        edit(pair.root(edited) / name, wanted_content[name], T0 + 60)
    pair.run(env=ATTRS_ON, expect=0)

    for name, edited, changed, _ in cases:
        for root in pair.roots:
            assert read(root / name) == wanted_content[name], "%s: the edit did not reach %s" % (name, root)
            assert attributes(root / name) == wanted_attrs[name], \
                "%s: the %s's attribute change was reverted by the %s's edit (on %s)" % (name, changed, edited, root)
    assert_converged_with_attributes(pair, wanted_attrs, ATTRS_ON)


def test_both_sides_changed_attributes_and_one_edited_the_content(pair):
    """The edited content wins; the attributes go to the newer change (ctime), and the set it
    replaces is logged."""
    names = []
    for edited in SIDES:
        for newer in ("editor", "other"):
            name = "%s-edited-%s-newer" % (edited, newer)
            names.append((name, edited, newer))
            start_file(pair.initiator, name)
    pair.run(env=ATTRS_ON, expect=0)

    wanted_content, wanted_attrs = {}, {}
    # The older changes first, then (after a pause, so ctimes differ) the newer ones.
    for name, edited, newer in names:
        other = pair.other(edited)
        if newer == "editor":
            tool("setfattr", "-n", "user.note", "-v", "older", pair.root(other) / name)
            os.chmod(str(pair.root(other) / name), 0o600)
    time.sleep(0.05)
    for name, edited, newer in names:
        wanted_content[name] = b"edited on the " + edited.encode() + b" while both changed attributes"
        path = pair.root(edited) / name
        tool("setfattr", "-n", "user.note", "-v", "by the editor", path)
        edit(path, wanted_content[name], T0 + 60)
    time.sleep(0.05)
    for name, edited, newer in names:
        other = pair.other(edited)
        if newer == "other":
            tool("setfattr", "-n", "user.note", "-v", "newer", pair.root(other) / name)
            tool("setfacl", "-m", "u:1234:rw-", pair.root(other) / name)
        winner = edited if newer == "editor" else other
        wanted_attrs[name] = attributes(pair.root(winner) / name)

    start = log_size(pair)
    pair.run(env=ATTRS_ON, expect=0)
    log = log_since(pair, start)
    for name, edited, newer in names:
        for root in pair.roots:
            assert read(root / name) == wanted_content[name], "%s: the edit did not reach %s" % (name, root)
            assert attributes(root / name) == wanted_attrs[name], "%s: not the newer attributes on %s" % (name, root)
        other = pair.other(edited)
        winner, loser = (edited, other) if newer == "editor" else (other, edited)
        notices = [line for line in log.splitlines() if "Attributes of %s " % name in line]
        assert len(notices) == 1, log
        assert "changed on both replicas; the %s's newer change wins, and the %s's are replaced" % (
            winner, loser) in notices[0], notices
        replaced = "user.note=older" if newer == "editor" else "user.note=by the editor"
        assert replaced in notices[0], notices
    assert_converged_with_attributes(pair, wanted_attrs, ATTRS_ON)


def test_one_way_sync_the_mirrored_side_wins_content_and_attributes(pair):
    """SYNC_TYPE=initiator2target: the target's chmod and setfattr are replaced by the
    initiator's edited file with the initiator's attributes, as a mirror does."""
    start_file(pair.initiator, "mirrored")
    env = dict(ATTRS_ON, SYNC_TYPE="initiator2target")
    pair.run(env=env, expect=0)
    os.chmod(str(pair.target / "mirrored"), 0o600)
    tool("setfattr", "-n", "user.colour", "-v", "red", pair.target / "mirrored")
    edit(pair.initiator / "mirrored", b"the mirrored edit", T0 + 60)
    wanted = attributes(pair.initiator / "mirrored")
    pair.run(env=env, expect=0)
    assert read(pair.target / "mirrored") == b"the mirrored edit"
    assert attributes(pair.target / "mirrored") == wanted
    assert attributes(pair.initiator / "mirrored") == wanted
    assert_converged_with_attributes(pair, {"mirrored": wanted}, env)


def test_when_the_attributes_cannot_be_kept_the_copy_waits_for_the_next_run(pair, tmp_path):
    """The edited source is immutable (chattr +i), so the other side's chmod cannot be set
    on it before the copy: the copy is not made, nothing is reverted or lost, the run says
    why, and once the source can be changed again the next run brings both changes
    together."""
    if not chattr_supported(tmp_path):
        need("chattr +i is not supported here")
    start_file(pair.initiator, "stuck")
    pair.run(env=ATTRS_ON, expect=0)
    os.chmod(str(pair.target / "stuck"), 0o604)
    wanted_attrs = attributes(pair.target / "stuck")
    edit(pair.initiator / "stuck", b"the edit of an immutable file", T0 + 60)
    subprocess.run(["chattr", "+i", str(pair.initiator / "stuck")], check=True)
    try:
        result = pair.run(env=ATTRS_ON, expect=1)
        assert "Cannot set the attributes of stuck on the initiator replica before copying it" in result.output, \
            result.output
        assert read(pair.target / "stuck") == b"first version of stuck", "copied although its chmod was lost"
        assert attributes(pair.target / "stuck") == wanted_attrs, "the target's chmod was reverted"
        assert read(pair.initiator / "stuck") == b"the edit of an immutable file"
    finally:
        subprocess.run(["chattr", "-i", str(pair.initiator / "stuck")], check=True)
    pair.run(env=ATTRS_ON, expect=0)
    for root in pair.roots:
        assert read(root / "stuck") == b"the edit of an immutable file", root
        assert attributes(root / "stuck") == wanted_attrs, root
    assert_converged_with_attributes(pair, {"stuck": wanted_attrs}, ATTRS_ON)


def test_only_the_x_bits_travel_without_preserve_permissions(pair):
    """PRESERVE_PERMISSIONS=no, PRESERVE_EXECUTABILITY=yes: a chmod +x on one side (alone,
    or with an edit on the other side) gives the other copy its x bits, and nothing else of
    that mode: its read and write bits stay."""
    env = {"PRESERVE_PERMISSIONS": "no"}
    for name in ("x-only", "x-and-edit"):
        put(pair.initiator, name, b"script " + name.encode(), mtime=T0)
        put(pair.target, name, b"script " + name.encode(), mtime=T0)
        os.chmod(str(pair.initiator / name), 0o640)
        os.chmod(str(pair.target / name), 0o604)
    pair.run(env=env, expect=0)
    for name in ("x-only", "x-and-edit"):
        os.chmod(str(pair.target / name), 0o705)
    edit(pair.initiator / "x-and-edit", b"edited script", T0 + 60)
    pair.run(env=env, expect=0)
    assert oct(os.lstat(str(pair.initiator / "x-only")).st_mode & 0o7777) == oct(0o741), "x bits only"
    for name in ("x-only", "x-and-edit"):
        assert oct(os.lstat(str(pair.target / name)).st_mode & 0o7777) == oct(0o705), name
    assert read(pair.target / "x-and-edit") == b"edited script"
    # rsync --executability carries the x bits of the source over the destination's mode.
    assert os.lstat(str(pair.initiator / "x-and-edit")).st_mode & 0o111 == 0o101
    pair.assert_converged(env=env)


# -- the planner's rule, as a pure function ------------------------------------------------

def planned(previous, initiator, target, **policy):
    """The planner's one decision for a path."""
    decisions = list(osync.plan(iter([(previous[0].path,) + tuple(previous)]), iter([initiator]), iter([target]),
                                osync.Policy(**policy)))
    assert len(decisions) == 1
    return decisions[0]


def test_the_planner_keeps_the_destination_attributes_in_the_copy_and_the_state():
    """What the copy carries and what the state records: the edit's content with the
    attributes of the side whose change wins."""
    synced = osync.Entry("f", "f", 3, 100 * 10 ** 9, 0o644, 0, 0, 7, 100 * 10 ** 9)
    edited = synced._replace(size=9, mtime_ns=200 * 10 ** 9, ctime_ns=200 * 10 ** 9)
    chmodded = synced._replace(mode=0o600, ctime_ns=150 * 10 ** 9)

    decision = planned((synced, synced), edited, chmodded)
    assert (decision.action, decision.source, decision.attributes_reason) == (osync.COPY, "initiator",
                                                                                osync.WON_ONLY_CHANGED)
    assert decision.scanned_source == edited
    assert decision.initiator == edited._replace(mode=0o600), "the copy carries the target's mode"
    again = osync.Decision.from_record(decision.record())
    assert (again.scanned_source, again.initiator) == (decision.scanned_source, decision.initiator)
    arrived = edited._replace(mode=0o600, ino=8)
    assert osync.recorded_pair(decision, osync.DONE, arrived) == (edited._replace(mode=0o600), arrived)
    assert osync.recorded_pair(decision, osync.NOT_WRITTEN) == (synced, synced), "not copied: decided again"

    # Both changed the mode: the newer ctime wins it, the content is the edit's either way.
    older_edit = edited._replace(mode=0o640, ctime_ns=120 * 10 ** 9)
    decision = planned((synced, synced), older_edit, chmodded)
    assert (decision.source, decision.attributes_reason, decision.initiator.mode) == ("initiator", osync.WON_NEWER,
                                                                                     0o600)
    assert decision.note == "changed on both replicas"
    newer_edit = edited._replace(mode=0o640, ctime_ns=180 * 10 ** 9)
    decision = planned((synced, synced), newer_edit, chmodded)
    assert (decision.attributes_reason, decision.scanned_source, decision.initiator) == (osync.WON_NEWER, None,
                                                                                        newer_edit)
    tie = edited._replace(mode=0o640, ctime_ns=150 * 10 ** 9)
    decision = planned((synced, synced), tie, chmodded, prevalence="target")
    assert (decision.attributes_reason, decision.initiator.mode) == (osync.WON_PREVALENCE, 0o600)

    # Without PRESERVE_PERMISSIONS only the x bits are the target's.
    decision = planned((synced, synced), edited, synced._replace(mode=0o705), permissions=False)
    assert decision.initiator.mode == 0o745
    # A mirror takes the source's attributes with its content.
    decision = planned((synced, synced), edited, chmodded, sync_type="initiator2target")
    assert (decision.source, decision.attributes_reason, decision.initiator) == ("initiator", "", edited)
