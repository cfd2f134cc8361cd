"""CHECKSUM (changes found by content, digests kept in the state so that unchanged files
are not read again) and PRESERVE_HARDLINKS (hard-link groups created, extended and split
on either side), locally and over ssh.  Everything goes through the `pair` fixture."""

import os
import re
import shutil

import pytest

from conftest import expected, put, run_osync, snapshot

SIDES = ["initiator", "target"]
CHECKSUM = {"CHECKSUM": "yes"}
HARDLINKS = {"PRESERVE_HARDLINKS": "yes"}


def digest_reads(pair, run_output):
    """(files CHECKSUM read on the initiator, on the target) as the run reports them."""
    found = re.findall(r"CHECKSUM read (\d+) files on the initiator and (\d+) on the target", run_output)
    assert len(found) == 1, run_output
    return int(found[0][0]), int(found[0][1])


def run_counting_reads(pair, log):
    """One CHECKSUM run with the digest test hook on; returns (reported counts, the paths the
    hook saw read, relative to either root)."""
    if log.exists():
        log.unlink()
    r = pair.run("--verbose", env=dict(CHECKSUM, _OSYNC_DIGEST_LOG=str(log)), expect=0)
    read = []
    if log.exists():
        for line in log.read_bytes().splitlines():
            path = os.fsdecode(line)
            for root in (pair.initiator, pair.target):
                if path.startswith(str(root) + "/"):
                    path = path[len(str(root)) + 1:]
            read.append(path)
    return digest_reads(pair, r.stdout + r.stderr), read


def rewrite_keeping_size_and_mtime(path, content):
    """Other bytes of the same length, with the mtime set back to what it was."""
    info = os.stat(str(path))
    assert len(content) == info.st_size
    with open(str(path), "r+b") as handle:
        handle.write(content)
    os.utime(str(path), ns=(info.st_atime_ns, info.st_mtime_ns))
    assert os.stat(str(path)).st_mtime_ns == info.st_mtime_ns


@pytest.mark.parametrize("side", SIDES)
def test_checksum_finds_same_size_same_mtime_edit_and_reads_nothing_else(pair, side, tmp_path):
    files = dict(("file%d" % number, "content %d" % number) for number in range(5))
    for name, content in files.items():
        put(pair.initiator, name, content)
    log = tmp_path / "digests.log"
    (first_i, first_t), _ = run_counting_reads(pair, log)
    assert first_i == len(files)          # the first run reads what it has no digest for

    # A run with no change reads no file on either side: the digests come from the state.
    counts, read = run_counting_reads(pair, log)
    assert counts == (0, 0)
    assert read == []

    # Same size, same mtime, other bytes: found by its content, and copied.
    rewrite_keeping_size_and_mtime(pair.root(side) / "file2", b"CONTENT 2")
    counts, read = run_counting_reads(pair, log)
    assert counts == ((1, 0) if side == "initiator" else (0, 1))
    assert set(read) <= {"file2"}
    files["file2"] = "CONTENT 2"
    want = expected(files)
    assert snapshot(pair.initiator) == want
    assert snapshot(pair.target) == want

    # And the run after that reads nothing again.
    counts, read = run_counting_reads(pair, log)
    assert counts == (0, 0)
    assert read == []


@pytest.mark.local_only
def test_checksum_run_without_changes_opens_no_file_of_either_replica(pair, tmp_path):
    """Seen from outside with strace: after the first sync, a CHECKSUM run with no change
    opens no file of either replica for reading (the state's digests stand)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    names = ["one", "two", "sub/three"]
    for name in names:
        put(pair.initiator, name, "content of %s" % name)
    pair.run(env=CHECKSUM, expect=0)
    trace = tmp_path / "trace"
    argv = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace)]
    run_osync(pair.quick_args(), pair.env(CHECKSUM), pair.cwd, expect=0, prefix=argv)
    opened = set()
    for line in trace.read_text(errors="replace").splitlines():
        for name in names:
            for root in pair.roots:
                if '"%s/%s"' % (root, name) in line and "ENOENT" not in line:
                    opened.add((str(root), name))
    assert opened == set()


def test_checksum_reads_a_file_whose_ctime_moved_even_when_nothing_else_did(pair, tmp_path):
    """chmod moves only the ctime: the file is read again (its digest might no longer be
    true), and found unchanged."""
    put(pair.initiator, "kept", "same bytes")
    put(pair.initiator, "other", "other bytes")
    log = tmp_path / "digests.log"
    run_counting_reads(pair, log)
    os.chmod(str(pair.initiator / "kept"), 0o600)
    counts, read = run_counting_reads(pair, log)
    assert counts[0] == 1
    assert "other" not in read
    assert snapshot(pair.target) == expected({"kept": "same bytes", "other": "other bytes"})


# --------------------------------------------------------------------------------------
# Hard-link groups
# --------------------------------------------------------------------------------------

def inode(root, rel):
    return os.stat(str(root / rel)).st_ino


def assert_groups(root, groups, singles=()):
    """Each group of paths shares one inode, different groups and singles do not."""
    seen = {}
    for group in groups:
        inodes = set(inode(root, rel) for rel in group)
        assert len(inodes) == 1, "%s not one hard-link group in %s" % (group, root)
        seen[tuple(group)] = inodes.pop()
    for rel in singles:
        assert os.stat(str(root / rel)).st_nlink == 1, "%s is still hard-linked in %s" % (rel, root)
    assert len(set(seen.values())) == len(seen), "two groups share an inode in %s" % root


def assert_nothing_kept(pair):
    """No side keeps a backup or a transfer leftover: a member sent only to be linked
    replaced nothing that needs keeping."""
    for side in SIDES:
        kept = [path for path in pair.backup(side).rglob("*") if not path.is_dir()] \
            if pair.backup(side).exists() else []
        assert kept == [], "%s keeps %s" % (side, kept)


def synced_group(pair, side, names=("a", "b"), options=HARDLINKS):
    """A group of hard links made on `side` and synced: both sides hold it as a group."""
    root = pair.root(side)
    put(root, names[0], "linked content")
    for name in names[1:]:
        os.link(str(root / names[0]), str(root / name))
    pair.run(env=options, expect=0)
    for any_side in SIDES:
        assert_groups(pair.root(any_side), [names])


@pytest.mark.parametrize("side", SIDES)
def test_hard_link_group_created_next_to_a_synced_file(pair, side):
    """`ln a b` where a was already synced: b joins a on the other side too."""
    root, other = pair.root(side), pair.root(pair.other(side))
    put(root, "a", "already here")
    put(root, "plain", "not linked")
    pair.run(env=HARDLINKS, expect=0)
    os.link(str(root / "a"), str(root / "dir-b"))
    pair.run(env=HARDLINKS, expect=0)
    assert snapshot(other) == expected({"a": "already here", "dir-b": "already here", "plain": "not linked"})
    assert_groups(other, [("a", "dir-b")], singles=["plain"])
    assert_nothing_kept(pair)
    pair.assert_converged(env=HARDLINKS)
    assert_groups(other, [("a", "dir-b")], singles=["plain"])


@pytest.mark.parametrize("checksum", [False, True], ids=["quick-check", "checksum"])
@pytest.mark.parametrize("side", SIDES)
def test_hard_link_group_extended(pair, side, checksum):
    """A synced group of two gets a third member in another directory."""
    options = dict(HARDLINKS, **(CHECKSUM if checksum else {}))
    synced_group(pair, side, options=options)
    root, other = pair.root(side), pair.root(pair.other(side))
    os.makedirs(str(root / "sub"))
    os.link(str(root / "b"), str(root / "sub" / "c"))
    pair.run(env=options, expect=0)
    assert_groups(other, [("a", "b", "sub/c")])
    assert snapshot(other) == snapshot(root)
    assert_nothing_kept(pair)
    pair.assert_converged(env=options)


@pytest.mark.parametrize("checksum", [False, True],
                         ids=["quick-check", "checksum"])
@pytest.mark.parametrize("side", SIDES)
def test_hard_link_group_split_by_a_copy_with_the_same_size_and_mtime(pair, side, checksum):
    """b is replaced by a copy of itself (cp -p: same bytes, size and mtime): it leaves the
    group on the other side too, so that an edit of a there no longer changes b (with
    CHECKSUM too, where the same digest would otherwise say "same")."""
    options = dict(HARDLINKS, **(CHECKSUM if checksum else {}))
    synced_group(pair, side, names=("a", "b", "c"), options=options)
    root, other = pair.root(side), pair.root(pair.other(side))
    info = os.stat(str(root / "b"))
    copy = root / "b.copy"
    copy.write_bytes((root / "b").read_bytes())
    os.utime(str(copy), ns=(info.st_atime_ns, info.st_mtime_ns))
    os.rename(str(copy), str(root / "b"))
    pair.run(env=options, expect=0)
    assert_groups(other, [("a", "c")], singles=["b"])
    assert snapshot(other) == snapshot(root)
    pair.assert_converged(env=options)
    assert_groups(other, [("a", "c")], singles=["b"])


# --------------------------------------------------------------------------------------
# The digests a target host sends are checked like every other reply
# --------------------------------------------------------------------------------------

DIGEST_LIES = {
    "one-too-few": ("return answers[:-1]", "digest_paths"),
    "not-hex": ('return [["../../etc/passwd" * 3, ""] for _ in answers]', "hex digits"),
    "digest-and-problem": ('return [["0" * 40, "and a problem"] for _ in answers]', "hex digits"),
    "not-a-pair": ("return [answer[0] for answer in answers]", "digest_paths"),
}


@pytest.mark.parametrize("case", sorted(DIGEST_LIES))
def test_digest_reply_lies_end_the_run(pair, case):
    if not pair.kind.startswith("remote"):
        pytest.skip("the hostile agent needs a remote target")
    from test_hostile_agent import assert_refused, hostile_python
    put(pair.initiator, "kept", "kept bytes")
    put(pair.initiator, "edited", "old bytes")
    pair.run(env=CHECKSUM, expect=0)
    rewrite_keeping_size_and_mtime(pair.target / "edited", b"new bytes")
    body, word = DIGEST_LIES[case]
    patch = ("_real_digest_paths = LocalReplica.digest_paths\n"
             "def _lying_digest_paths(self, paths, options):\n"
             "    answers = _real_digest_paths(self, paths, options)\n"
             "    %s\n"
             "LocalReplica.digest_paths = _lying_digest_paths\n" % body)
    before = pair.full_snapshot()
    r = pair.run(env=dict(CHECKSUM, REMOTE_PYTHON=hostile_python(pair, patch)))
    assert_refused(r, words=[word])
    assert pair.full_snapshot() == before, "a replica or work dir changed"
    # The honest agent then finds the edit by its content.
    pair.run(env=CHECKSUM, expect=0)
    assert (pair.initiator / "edited").read_bytes() == b"new bytes"


# --------------------------------------------------------------------------------------
# The digest stage itself: order kept, bounded batches, the state's digests reused
# --------------------------------------------------------------------------------------

def test_digest_stage_streams_in_bounded_batches_and_keeps_the_order(tmp_path):
    import osync

    class CountingReplica(osync.LocalReplica):
        """A real local replica that notes the size of each digest_paths call."""
        batches = []

        def digest_paths(self, paths, options):
            self.batches.append(len(paths))
            return osync.LocalReplica.digest_paths(self, paths, options)

    root = tmp_path / "replica"
    names = ["d%02d/f%03d" % (number % 7, number) for number in range(1200)]
    for name in names:
        put(root, name, "content of %s" % name)
    replica = CountingReplica("initiator", str(root))
    replicas = {"initiator": replica, "target": replica}
    scan = list(replica.scan([], {}))
    assert all(not entry.digest for entry in scan)

    counts = osync.DigestCounts()
    rows = osync.with_digests(osync.merge_streams([], iter(scan), iter(())), replicas, {}, counts,
                              batch_size=500)
    first = next(rows)
    assert CountingReplica.batches == [500]          # the first row came after one batch only
    out = [first] + list(rows)
    assert [row[0] for row in out] == [entry.path for entry in scan]
    assert max(CountingReplica.batches) <= 500 and sum(CountingReplica.batches) == 1200
    for path, _, _, entry, _ in out:
        if entry.kind == "f":
            assert entry.digest == osync.file_digest(str(root / path))
    assert counts.read == {"initiator": 1200, "target": 0}

    # Recorded with those digests, the same files are not read again.
    CountingReplica.batches = []
    recorded = [(path, entry, None) for path, _, _, entry, _ in out]
    counts = osync.DigestCounts()
    again = list(osync.with_digests(osync.merge_streams(iter(recorded), iter(scan), iter(())), replicas, {},
                                    counts))
    assert CountingReplica.batches == []
    assert counts.reused == 1200
    assert [row[3] for row in again] == [row[3] for row in out]
