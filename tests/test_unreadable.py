"""What cannot be read is never deleted (DESIGN §4.10), directory modes without owner x
are not spread, and CONFLICT_BACKUP=no keeps no loser (DESIGN §3)."""

import os
import shutil

import pytest

from conftest import T0, build, dir_files, expected, put, snapshot

SIDES = ["initiator", "target"]


def synced(pair, entries, env=None):
    """Build `entries` on the initiator, sync once, check both trees equal them."""
    build(pair.initiator, entries)
    pair.run(env=env, expect=0)
    exp = expected(entries)
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    return exp


# ======================================================================================
# CONFLICT_BACKUP=no
# ======================================================================================

@pytest.mark.parametrize("backup", ["yes", "no"])
def test_conflict_loser_is_kept_only_with_conflict_backup(pair, backup):
    env = {"CONFLICT_BACKUP": backup}
    synced(pair, {"dir/x": "base", "other": "o"}, env)
    put(pair.initiator, "dir/x", "initiator's newer edit", T0 + 20)
    put(pair.target, "dir/x", "target's older edit", T0 + 10)
    r = pair.run(env=env, expect=0)
    exp = expected({"dir/x": "initiator's newer edit", "other": "o"})
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    assert "Conflict on dir/x" in r.output, "the conflict is still logged"
    if backup == "no":
        assert dir_files(pair.backup("target")) == []
        assert "the target's version is replaced (CONFLICT_BACKUP=no)" in r.output
    else:
        assert snapshot(pair.backup("target")) == expected({"dir/x": "target's older edit"})
        assert "the target's version is kept in its backup dir" in r.output
    assert dir_files(pair.backup("initiator")) == []
    pair.assert_converged(env=env)
