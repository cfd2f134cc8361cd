"""The planner alone, as the pure function it is: (state, scans, policy) -> decisions."""
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import osync  # noqa: E402
from conftest import T0, find_content, put, remove  # noqa: E402
from osync import Entry, Policy, COPY, DELETE, NOTHING, ATTRS, SKIP  # noqa: E402


def F(path, mtime=100, size=3, mode=0o644, ctime=None):
    return Entry(path, "f", size, mtime * 10 ** 9, mode, 0, 0, 1, (ctime or mtime) * 10 ** 9)


def D(path, mode=0o755, ctime=100):
    return Entry(path, "d", 0, 0, mode, 0, 0, 1, ctime * 10 ** 9)


def L(path, target):
    return Entry(path, "l", 0, 0, 0o777, 0, 0, 1, 0, target)


def ordered(entries):
    return sorted(entries, key=lambda entry: osync.path_key(entry.path))


def state(*pairs):
    """pairs of (initiator entry or None, target entry or None)."""
    records = [((i or t).path, i, t) for i, t in pairs]
    return sorted(records, key=lambda record: osync.path_key(record[0]))


def run(previous, initiator, target, **policy):
    decisions = list(osync.plan(iter(previous), iter(ordered(initiator)), iter(ordered(target)),
                                Policy(**policy)))
    return dict((decision.path, decision) for decision in decisions), decisions


def action(decision):
    return (decision.action, decision.source or decision.side)


# -- DESIGN §3, row by row, and the mirror cases ----------------------------------------------

@pytest.mark.parametrize("side", ["initiator", "target"])
def test_new_on_one_side_is_copied(side):
    here, there = ([F("a")], []) if side == "initiator" else ([], [F("a")])
    got, _ = run([], here, there)
    assert action(got["a"]) == (COPY, side)
    assert not got["a"].conflict and not got["a"].backup


def test_new_on_both_sides_same_content_is_recorded():
    got, _ = run([], [F("a")], [F("a")])
    assert action(got["a"]) == (NOTHING, None)


def test_new_on_both_sides_different_is_a_conflict_won_by_newer():
    got, _ = run([], [F("a", mtime=100)], [F("a", mtime=200, size=5)])
    assert action(got["a"]) == (COPY, "target")
    assert got["a"].conflict and got["a"].backup


@pytest.mark.parametrize("prevalence", ["initiator", "target"])
def test_equal_mtimes_go_to_conflict_prevalance(prevalence):
    prev = state((F("a"), F("a")))
    got, _ = run(prev, [F("a", mtime=150, size=4)], [F("a", mtime=150, size=5)], prevalence=prevalence)
    assert action(got["a"]) == (COPY, prevalence)
    assert got["a"].conflict


def test_unchanged_on_both_sides_does_nothing():
    prev = state((F("a"), F("a")), (D("d"), D("d")), (L("l", "x"), L("l", "x")))
    got, _ = run(prev, [F("a"), D("d"), L("l", "x")], [F("a"), D("d"), L("l", "x")])
    assert all(decision.action == NOTHING for decision in got.values())


@pytest.mark.parametrize("side", ["initiator", "target"])
@pytest.mark.parametrize("backup_overwrites", [True, False])
def test_changed_on_one_side_is_copied_and_old_copy_backed_up_when_asked(side, backup_overwrites):
    prev = state((F("a"), F("a")))
    changed = F("a", mtime=200)
    initiator, target = ([changed], [F("a")]) if side == "initiator" else ([F("a")], [changed])
    got, _ = run(prev, initiator, target, backup_overwrites=backup_overwrites)
    assert action(got["a"]) == (COPY, side)
    assert got["a"].backup is backup_overwrites
    assert not got["a"].conflict


@pytest.mark.parametrize("backup_overwrites", [True, False])
def test_changed_on_both_sides_is_a_conflict_and_the_loser_kept_as_conflict_backup_says(backup_overwrites):
    prev = state((F("a"), F("a")))
    got, _ = run(prev, [F("a", mtime=300, size=7)], [F("a", mtime=200, size=8)],
                 backup_overwrites=backup_overwrites)
    assert action(got["a"]) == (COPY, "initiator")
    assert got["a"].conflict
    assert got["a"].backup is backup_overwrites


def test_changed_on_both_sides_to_the_same_content_is_no_conflict():
    prev = state((F("a"), F("a")))
    got, _ = run(prev, [F("a", mtime=300, size=7)], [F("a", mtime=300, size=7)])
    assert action(got["a"]) == (NOTHING, None)


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_deleted_on_one_side_unchanged_on_other_is_deleted_there(side):
    prev = state((F("a"), F("a")))
    initiator, target = ([], [F("a")]) if side == "initiator" else ([F("a")], [])
    got, _ = run(prev, initiator, target)
    other = "target" if side == "initiator" else "initiator"
    assert action(got["a"]) == (DELETE, other)


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_edit_beats_a_concurrent_deletion(side):
    prev = state((F("a"), F("a")))
    initiator, target = ([], [F("a", mtime=200)]) if side == "initiator" else ([F("a", mtime=200)], [])
    got, _ = run(prev, initiator, target)
    other = "target" if side == "initiator" else "initiator"
    assert action(got["a"]) == (COPY, other)
    assert got["a"].edit_won


def test_deleted_on_both_sides_is_forgotten():
    got, _ = run(state((F("a"), F("a"))), [], [])
    assert action(got["a"]) == (NOTHING, None)
    assert got["a"].initiator is None and got["a"].target is None


@pytest.mark.parametrize("skipped", ["initiator", "target"])
def test_skip_deletion_keeps_the_copy_and_never_copies_it_back(skipped):
    deleter = "target" if skipped == "initiator" else "initiator"
    prev = state((F("a"), F("a")))
    initiator, target = ([F("a")], []) if deleter == "target" else ([], [F("a")])
    got, _ = run(prev, initiator, target, skip_deletion=[skipped])
    assert action(got["a"]) == (NOTHING, None)
    # Next run: the state remembers the path on one side only; it stays as it is...
    kept = F("a")
    one_sided = state((kept, None) if skipped == "initiator" else (None, kept))
    got, _ = run(one_sided, initiator, target, skip_deletion=[skipped])
    assert action(got["a"]) == (NOTHING, None)
    # ...until it is edited again.
    edited = F("a", mtime=500)
    initiator2, target2 = ([edited], []) if skipped == "initiator" else ([], [edited])
    got, _ = run(one_sided, initiator2, target2, skip_deletion=[skipped])
    assert action(got["a"]) == (COPY, skipped)


# -- directories and type changes --------------------------------------------------------------

def test_deleted_directory_is_deleted_children_first_order_kept_canonical():
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")), (F("d/y"), F("d/y")))
    got, decisions = run(prev, [], [D("d"), F("d/x"), F("d/y")])
    assert [decision.path for decision in decisions] == ["d", "d/x", "d/y"]
    assert all(action(decision) == (DELETE, "target") for decision in decisions)


def test_deleted_directory_with_a_new_file_on_the_other_side_comes_back():
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")))
    got, _ = run(prev, [], [D("d"), F("d/x"), F("d/new")])
    assert action(got["d/x"]) == (DELETE, "target")
    assert action(got["d/new"]) == (COPY, "target")
    assert action(got["d"]) == (COPY, "target")
    assert got["d"].edit_won


def test_nested_kept_file_keeps_every_ancestor():
    prev = state((D("d"), D("d")), (D("d/e"), D("d/e")), (F("d/e/x"), F("d/e/x")))
    got, _ = run(prev, [], [D("d"), D("d/e"), F("d/e/x", mtime=900)])
    assert action(got["d/e/x"]) == (COPY, "target")
    assert action(got["d/e"]) == (COPY, "target")
    assert action(got["d"]) == (COPY, "target")


def test_directory_replaced_by_a_file():
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")))
    got, _ = run(prev, [F("d", mtime=200)], [D("d"), F("d/x")])
    assert action(got["d"]) == (COPY, "initiator")
    assert action(got["d/x"]) == (DELETE, "target")


def test_directory_replaced_by_a_file_while_other_side_edits_inside_keeps_both():
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")))
    got, _ = run(prev, [F("d", mtime=200)], [D("d"), F("d/x", mtime=300)])
    assert action(got["d/x"]) == (COPY, "target")
    assert action(got["d"]) == (COPY, "target")
    assert got["d"].conflict and got["d"].backup  # the initiator's new file d is kept in backup/


def test_file_replaced_by_directory_and_symlink():
    prev = state((F("a"), F("a")), (F("b"), F("b")))
    got, _ = run(prev, [D("a"), F("a/in"), L("b", "a")], [F("a"), F("b")])
    assert action(got["a"]) == (COPY, "initiator") and got["a"].backup
    assert action(got["a/in"]) == (COPY, "initiator")
    assert action(got["b"]) == (COPY, "initiator")


def test_symlink_target_change_is_a_change():
    prev = state((L("l", "x"), L("l", "x")))
    got, _ = run(prev, [L("l", "x")], [L("l", "y")])
    assert action(got["l"]) == (COPY, "target")


def test_empty_directory_created_and_deleted():
    got, _ = run([], [D("e")], [])
    assert action(got["e"]) == (COPY, "initiator")
    got, _ = run(state((D("e"), D("e"))), [D("e")], [])
    assert action(got["e"]) == (DELETE, "initiator")


def test_unreadable_directory_leaves_its_subtree_alone():
    broken = Entry("d", "d", error="cannot list directory: Permission denied")
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")), (F("z"), F("z")))
    got, _ = run(prev, [broken, F("z")], [D("d"), F("d/x"), F("z")])
    assert got["d"].action == SKIP and got["d/x"].action == SKIP
    assert got["z"].action == NOTHING


# -- attributes -----------------------------------------------------------------------------------

def test_permission_change_on_one_side_travels():
    prev = state((F("a", mode=0o644), F("a", mode=0o644)))
    got, _ = run(prev, [F("a", mode=0o644)], [F("a", mode=0o600, ctime=500)])
    assert action(got["a"]) == (ATTRS, "target")


def test_permission_change_is_ignored_when_not_preserved():
    prev = state((F("a", mode=0o644), F("a", mode=0o644)))
    got, _ = run(prev, [F("a", mode=0o644)], [F("a", mode=0o600)], permissions=False, executability=False)
    assert action(got["a"]) == (NOTHING, None)


def test_executability_alone():
    prev = state((F("a", mode=0o644), F("a", mode=0o644)))
    got, _ = run(prev, [F("a", mode=0o755)], [F("a", mode=0o644)], permissions=False)
    assert action(got["a"]) == (ATTRS, "initiator")
    got, _ = run(prev, [F("a", mode=0o640)], [F("a", mode=0o644)], permissions=False)
    assert action(got["a"]) == (NOTHING, None)


# -- one-way modes ---------------------------------------------------------------------------------

def test_initiator2target_mirrors():
    prev = state((F("same"), F("same")), (F("edited"), F("edited")))
    got, _ = run(prev, [F("same"), F("edited"), F("new")], [F("same"), F("edited", mtime=900), F("extra")],
                 sync_type="initiator2target")
    assert action(got["new"]) == (COPY, "initiator")
    assert action(got["edited"]) == (COPY, "initiator") and got["edited"].backup
    assert action(got["extra"]) == (DELETE, "target")
    assert action(got["same"]) == (NOTHING, None)


def test_target2initiator_mirrors_and_skip_deletion_keeps():
    got, _ = run([], [F("extra")], [F("t")], sync_type="target2initiator", skip_deletion=["initiator"])
    assert action(got["t"]) == (COPY, "target")
    assert action(got["extra"]) == (NOTHING, None)


# -- osync.sh lists as the baseline -----------------------------------------------------------------

def test_legacy_baseline_propagates_old_deletions_and_merges_edits():
    when = 1000
    legacy = [("gone", Entry("gone", "?", 0, when * 10 ** 9), Entry("gone", "?", 0, when * 10 ** 9)),
              ("kept", Entry("kept", "?", 0, when * 10 ** 9), Entry("kept", "?", 0, when * 10 ** 9))]
    got, _ = run(legacy, [F("kept", mtime=500)], [F("gone", mtime=500), F("kept", mtime=2000, size=9)])
    assert action(got["gone"]) == (DELETE, "target")
    assert action(got["kept"]) == (COPY, "target")


# -- streaming ----------------------------------------------------------------------------------------

def test_plan_streams_its_inputs():
    """The planner yields the first decisions before it has read all of its input."""
    consumed = []

    def scan(prefix):
        for number in itertools.count():
            consumed.append(number)
            yield F("%s%09d" % (prefix, number))

    decisions = osync.plan(iter([]), scan("f"), iter([]), Policy())
    first = list(itertools.islice(decisions, 10))
    assert [decision.path for decision in first] == ["f%09d" % number for number in range(10)]
    assert len(consumed) <= 12


def test_output_is_in_canonical_order_for_awkward_names():
    names = ["a", "a b", "a/b", "a-", "a/b/c", "\udcff", "a\nb", "-x", "a.b"]
    directories = {"a", "a/b"}
    entries = [D(name) if name in directories else F(name) for name in names]
    _, decisions = run([], entries, [])
    paths = [decision.path for decision in decisions]
    assert paths == sorted(names, key=osync.path_key)
    assert paths.index("a") < paths.index("a/b") < paths.index("a/b/c") < paths.index("a b")


# ======================================================================================
# Unreadable items and directory modes without owner x
# ======================================================================================

@pytest.mark.parametrize("kind", ["?", "f"])
def test_what_cannot_be_read_leaves_the_other_sides_subtree_alone(kind):
    """An item that cannot be stat'ed ("?"), or a file that cannot be read, where the
    other side holds a directory: nothing below it is deleted or copied."""
    prev = state((D("x"), D("x")), (F("x/y"), F("x/y")), (F("z"), F("z")))
    broken = Entry("x", kind, error="cannot read: Permission denied")
    got, _ = run(prev, [broken, F("z", mtime=200)], [D("x"), F("x/y"), F("x/new"), F("z")])
    assert [got[path].action for path in ("x", "x/new", "x/y")] == [SKIP, SKIP, SKIP]
    assert action(got["z"]) == (COPY, "initiator")


def test_directory_mode_without_owner_x_is_neither_synced_nor_silent():
    prev = state((D("d"), D("d")), (D("e"), D("e")))
    got, _ = run(prev, [D("d", mode=0o644, ctime=200), D("e", mode=0o700, ctime=200)], [D("d"), D("e")])
    assert action(got["d"]) == (NOTHING, None)
    assert got["d"].warning == ("d on the initiator has mode 0644 without owner x; its mode is not synced "
                                "(chmod u+x it to sync it again).")
    assert action(got["e"]) == (ATTRS, "initiator") and not got["e"].warning


def test_new_directory_without_owner_x_is_copied_with_a_warning():
    got, _ = run([], [], [D("d", mode=0o600)])
    assert action(got["d"]) == (COPY, "target")
    assert "d on the target has mode 0600 without owner x" in got["d"].warning


@pytest.mark.parametrize("side", ["initiator", "target"])
def test_same_size_rewrite_in_the_same_second_is_copied(side):
    """Changed on one side only, to the same size and a time the other side matches to the
    second (it keeps no sub-second part): rsync's quick check calls them equal, the state
    knows better."""
    synced = F("a", mtime=100)
    rewritten = Entry("a", "f", 3, 100 * 10 ** 9 + 1, 0o644, 0, 0, 2, 101 * 10 ** 9)
    here, there = (rewritten, synced) if side == "initiator" else (synced, rewritten)
    got, _ = run(state((synced, synced)), [here], [there])
    assert action(got["a"]) == (COPY, side)
    assert not got["a"].conflict


def test_same_size_rewrite_with_equal_digests_is_not_copied():
    synced = Entry("a", "f", 3, 100 * 10 ** 9, 0o644, 0, 0, 1, 100 * 10 ** 9, "", "d1")
    touched = Entry("a", "f", 3, 100 * 10 ** 9 + 1, 0o644, 0, 0, 1, 101 * 10 ** 9, "", "d1")
    got, _ = run(state((synced, synced)), [touched], [synced])
    assert action(got["a"]) == (NOTHING, None)


# ======================================================================================
# Why a version won: the reason travels with the decision
# ======================================================================================

def test_the_reason_a_version_won_is_set_where_it_was_chosen():
    prev = state((F("changed"), F("changed")), (F("both"), F("both")), (F("tie"), F("tie")),
                 (F("gone"), F("gone")), (F("mode"), F("mode")))
    got, _ = run(prev,
                 [F("both", mtime=300, size=4), F("changed", mtime=200), F("mode", mode=0o600, ctime=300),
                  F("new"), F("tie", mtime=150, size=4)],
                 [F("both", mtime=200, size=5), F("changed"), F("gone", mtime=400), F("mode"),
                  F("tie", mtime=150, size=5)], prevalence="target")
    assert (got["new"].reason, got["changed"].reason) == (osync.WON_ONLY_CHANGED, osync.WON_ONLY_CHANGED)
    assert (got["both"].source, got["both"].reason) == ("initiator", osync.WON_NEWER)
    assert (got["tie"].source, got["tie"].reason) == ("target", osync.WON_PREVALENCE)
    assert (got["gone"].source, got["gone"].reason) == ("target", osync.WON_EDIT)
    assert (got["mode"].action, got["mode"].reason) == (ATTRS, osync.WON_ONLY_CHANGED)


def test_a_directory_kept_for_its_subtree_says_so():
    prev = state((D("d"), D("d")), (F("d/x"), F("d/x")), (D("e"), D("e")), (F("e/x"), F("e/x")))
    got, _ = run(prev, [F("e", mtime=200)], [D("d"), F("d/x"), F("d/new"), D("e"), F("e/x", mtime=300)])
    assert (got["d"].source, got["d"].reason, got["d"].conflict) == ("target", osync.WON_SUBTREE, False)
    assert (got["e"].source, got["e"].reason, got["e"].conflict) == ("target", osync.WON_SUBTREE, True)


def test_one_way_copies_win_because_of_sync_type_even_when_older():
    prev = state((F("a", mtime=100), F("a", mtime=100)), (F("m"), F("m")))
    got, _ = run(prev, [F("a", mtime=100), F("m"), F("new")], [F("a", mtime=900, size=8), F("m", mode=0o600)],
                 sync_type="initiator2target")
    assert (got["a"].source, got["a"].reason, got["a"].conflict) == ("initiator", osync.WON_MIRROR, True)
    assert (got["new"].source, got["new"].reason) == ("initiator", osync.WON_MIRROR)
    assert (got["m"].action, got["m"].source, got["m"].reason) == (ATTRS, "initiator", osync.WON_MIRROR)


def test_a_decision_survives_its_record():
    got, _ = run(state((F("a"), F("a"))), [F("a", mtime=300, size=4)], [F("a", mtime=200, size=5)])
    decision = got["a"]
    decision.note, decision.warning = "a note", "a warning"
    back = osync.Decision.from_record(decision.record())
    assert [getattr(back, name) for name in osync.Decision.__slots__] == \
        [getattr(decision, name) for name in osync.Decision.__slots__]


# ======================================================================================
# What the new state records for each outcome of each decision
# ======================================================================================

def one_decision(previous, initiator, target, **policy):
    _, decisions = run(previous, initiator, target, **policy)
    assert len(decisions) == 1
    return decisions[0]


def test_recorded_for_paths_that_need_no_work():
    synced, touched = F("a"), F("a", mtime=300)
    nothing = one_decision(state((synced, synced)), [touched], [touched])
    assert nothing.action == NOTHING
    assert osync.recorded_pair(nothing) == (touched, touched), "in step: the current pair"
    forgotten = one_decision(state((synced, synced)), [], [])
    assert osync.recorded_pair(forgotten) == (None, None), "deleted on both sides: forgotten"
    broken = Entry("a", "f", error="cannot read: Permission denied")
    skipped = one_decision(state((synced, synced)), [broken], [touched])
    assert skipped.action == SKIP
    assert osync.recorded_pair(skipped) == (synced, synced), "left alone: the previous pair"


def test_recorded_after_a_deletion():
    synced, now = D("d"), D("d", ctime=300)
    decision = one_decision(state((synced, synced)), [], [now])
    assert action(decision) == (DELETE, "target")
    assert osync.recorded_pair(decision, osync.DONE) == (None, None)
    assert osync.recorded_pair(decision, osync.KEPT) == (None, now), "kept: as it is now"
    assert osync.recorded_pair(decision, osync.FAILED) == (synced, synced)


@pytest.mark.parametrize("source", ["initiator", "target"])
def test_recorded_after_each_outcome_of_a_copy(source):
    """An edited file copied from `source`: what the state records for each way the copy
    can come out, in (initiator, target) order."""
    synced, sent = F("a"), F("a", mtime=200, size=5)
    arrived = Entry("a", "f", 5, 200 * 10 ** 9, 0o644, 0, 0, 9, 250 * 10 ** 9)
    other = "target" if source == "initiator" else "initiator"
    initiator, target = ([sent], [synced]) if source == "initiator" else ([synced], [sent])
    decision = one_decision(state((synced, synced)), initiator, target)
    assert action(decision) == (COPY, source)

    def pair(**by_side):
        return (by_side["initiator"], by_side["target"])

    previous = (synced, synced)
    recorded = osync.recorded_pair
    assert recorded(decision, osync.DONE, arrived) == pair(**{source: sent, other: arrived})
    assert recorded(decision, osync.NOT_WRITTEN) == previous
    assert recorded(decision, osync.UNSETTLED) == previous
    assert recorded(decision, osync.SAVED_AFTER, arrived) == previous
    assert recorded(decision, osync.FAILED, synced) == previous
    # The source changed (or went) during the transfer: its version as recorded before,
    # so the next run sends it again; the destination as it arrived.
    assert recorded(decision, osync.SOURCE_CHANGED, arrived) == pair(**{source: synced, other: arrived})
    assert recorded(decision, osync.SOURCE_DELETED, arrived) == pair(**{source: synced, other: arrived})
    # A failed copy that left the destination neither old nor new: no source version, so
    # the copy is owed and the next run does not take the destination for an edit.
    half = Entry("a", "f", 2, 222 * 10 ** 9)
    assert recorded(decision, osync.LEFT_HALF_WRITTEN, half) == pair(**{source: None, other: half})
    with pytest.raises(ValueError):
        recorded(decision, osync.KEPT)


@pytest.mark.parametrize("source", ["initiator", "target"])
def test_recorded_after_a_new_file_changed_or_deleted_during_its_transfer(source):
    new, arrived = F("n", mtime=200), F("n", mtime=200)
    initiator, target = ([new], []) if source == "initiator" else ([], [new])
    decision = one_decision([], initiator, target)
    assert action(decision) == (COPY, source)
    # New, copied, then deleted or changed on the source: recorded on both sides (the
    # source as scanned), so that the next run carries the deletion over or sends the
    # change again, instead of keeping the copy on one side only.  (Recording the copy
    # alone left the replicas apart for good when the source was deleted after the run.)
    assert osync.recorded_pair(decision, osync.SOURCE_DELETED, arrived) == (new, arrived)
    assert osync.recorded_pair(decision, osync.SOURCE_CHANGED, arrived) == (new, arrived)
    # Nothing arrived and nothing was recorded before: nothing to record.
    assert osync.recorded_pair(decision, osync.SOURCE_DELETED, None) == (None, None)
    assert osync.recorded_pair(decision, osync.SOURCE_CHANGED, None) == (None, None)


def test_recorded_after_an_attribute_update():
    synced = F("a", mode=0o644)
    changed = F("a", mode=0o600, ctime=500)
    decision = one_decision(state((synced, synced)), [synced], [changed])
    assert action(decision) == (ATTRS, "target")
    arrived = F("a", mode=0o600, ctime=600)
    assert osync.recorded_pair(decision, osync.DONE, arrived) == (arrived, changed)
    assert osync.recorded_pair(decision, osync.FAILED) == (synced, synced)


# ======================================================================================
# The notices say why, end to end
# ======================================================================================

def test_one_way_notice_says_the_target_edit_is_replaced_because_of_sync_type(pair):
    """Only the target edited, the initiator years older: in one-way mode the initiator's
    version wins because SYNC_TYPE mirrors it, not because it is newer or changed."""
    years_ago = T0 - 5 * 365 * 86400
    put(pair.initiator, "report.txt", "initiator, years old", years_ago)
    pair.run(expect=0)
    put(pair.target, "report.txt", "target edit, today", T0)
    r = pair.run("--sync-type=initiator2target", expect=0)
    assert ("Conflict on report.txt: changed on the target, but SYNC_TYPE=initiator2target mirrors the "
            "initiator: the initiator's version replaces the target's edit, which is kept in its backup dir."
            in r.output), r.output
    assert "changed on both replicas" not in r.output and "newer" not in r.output, r.output
    assert (pair.target / "report.txt").read_text() == "initiator, years old"
    assert find_content(pair.workdir("target") / "backup", "target edit, today"), "the edit must be kept"


def test_conflict_notice_names_the_reason_the_winner_won(pair):
    put(pair.initiator, "tie", "synced", T0)
    put(pair.initiator, "race", "synced", T0)
    pair.run(expect=0)
    put(pair.initiator, "tie", "initiator edit", T0 + 60)
    put(pair.target, "tie", "target edit!", T0 + 60)
    put(pair.initiator, "race", "initiator edit", T0 + 30)
    put(pair.target, "race", "target edit!", T0 + 90)
    r = pair.run(env={"CONFLICT_PREVALANCE": "target"}, expect=0)
    assert ("Conflict on tie: changed on both replicas; the target's version wins (equal mtimes, "
            "CONFLICT_PREVALANCE=target)" in r.output), r.output
    assert "Conflict on race: changed on both replicas; the target's version wins (newer)" in r.output, r.output


# ======================================================================================
# What waits for a directory's subtree is held on disk, not in memory
# ======================================================================================

def test_nested_deleted_directories_keep_the_ancestors_of_a_deep_new_file(tmp_path):
    """Deleted dirs inside deleted dirs, each holding files; one new file deep inside on
    the other side: every ancestor of it comes back, everything else is deleted, and the
    frames that close before it (d/a) are settled from what was spilled."""
    synced = [D("d"), D("d/a"), F("d/a/x"), D("d/b"), D("d/b/c"), F("d/b/c/y"), F("d/b/z"), F("d/w")]
    prev = state(*[(entry, entry) for entry in synced])
    target = synced + [F("d/b/c/new", mtime=900)]
    _, decisions = run(prev, [], target)
    got = dict((decision.path, decision) for decision in decisions)
    assert [decision.path for decision in decisions] == [entry.path for entry in ordered(target)]
    for kept in ("d", "d/b", "d/b/c", "d/b/c/new"):
        assert action(got[kept]) == (COPY, "target"), kept
    for gone in ("d/a", "d/a/x", "d/b/c/y", "d/b/z", "d/w"):
        assert action(got[gone]) == (DELETE, "target"), gone
    assert got["d/b/c"].reason == osync.WON_SUBTREE and got["d/b/c"].edit_won
    spilled = list(osync.plan(iter(prev), iter([]), iter(ordered(target)), Policy(), str(tmp_path)))
    assert [(d.path, d.action, d.source, d.side, d.reason) for d in spilled] == \
        [(d.path, d.action, d.source, d.side, d.reason) for d in decisions]


def test_frames_one_after_another_and_what_they_hold_come_out_whole():
    """Two deleted directories in a row (the spill file is reused), awkward names, and the
    notes and warnings of the held decisions survive the spill."""
    names = ["d1", "d1/\udcff\nx", "d2", "d2/-a b", "d2/z"]
    synced = [D(name) if name in ("d1", "d2") else F(name) for name in names]
    prev = state(*[(entry, entry) for entry in synced])
    broken = Entry("d2/z", "f", error="cannot read: Permission denied")
    target = [D("d1"), F("d1/\udcff\nx"), D("d2"), F("d2/-a b"), D("d2/u", mode=0o600), broken, F("zz")]
    got, decisions = run(prev, [F("zz")], target)
    assert [decision.path for decision in decisions] == [entry.path for entry in ordered(target)]
    assert action(got["d1"]) == (DELETE, "target") and action(got["d1/\udcff\nx"]) == (DELETE, "target")
    assert got["d2/z"].action == SKIP and got["d2/z"].note == "cannot read: Permission denied"
    assert action(got["d2"]) == (COPY, "target"), "kept: something below it is left alone"
    assert action(got["d2/u"]) == (COPY, "target")
    assert "d2/u on the target has mode 0600" in got["d2/u"].warning
    assert action(got["zz"]) == (NOTHING, None)


def test_a_deleted_directory_of_many_files_is_not_held_in_memory():
    """The decisions below a directory deleted on one side wait until its subtree has been
    seen; they wait in a file: the planner's peak memory stays flat."""
    import tracemalloc
    count = 20000

    def synced():
        yield D("big")
        for number in range(count):
            yield F("big/f%06d" % number)

    def previous():
        for entry in synced():
            yield entry.path, entry, entry

    tracemalloc.start()
    try:
        seen = 0
        for decision in osync.plan(previous(), iter([]), synced(), Policy()):
            assert action(decision) == (DELETE, "target")
            seen += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == count + 1
    assert peak < 2 * 1024 * 1024, "%d KiB held for %d decisions" % (peak // 1024, count)


def test_notice_for_a_deleted_directory_kept_for_a_new_file_inside(pair):
    """The directory itself did not change on the target: it comes back because of what
    is below it, and the notice says that."""
    put(pair.initiator, "album/one.jpg", "one", T0)
    pair.run(expect=0)
    remove(pair.initiator, "album")
    put(pair.target, "album/two.jpg", "two, new", T0 + 60)
    r = pair.run(expect=0)
    assert ("album was deleted on the initiator but items below it stay on the target: the directory is copied "
            "back." in r.output), r.output
    assert (pair.initiator / "album/two.jpg").read_text() == "two, new"
    assert not (pair.initiator / "album/one.jpg").exists()
