"""A setuid or setgid bit travels only with the owner or group it belongs to: with
PRESERVE_OWNER=no (PRESERVE_GROUP=no) a file received by root would otherwise become a
setuid-root (setgid-root) program, so that whoever can write one replica could plant one
on the other.  Copies and attribute-only updates, both directions, local and over ssh."""
import os
import pwd
import stat

import pytest

from conftest import need, put

SIDES = ("initiator", "target")


@pytest.fixture(autouse=True)
def as_root():
    if os.geteuid() != 0:
        need("the setuid tests run as root (chown to another user)")


def nobody():
    return pwd.getpwnam("nobody").pw_uid


def plant(root, name, mode):
    path = root / name
    put(root, name, b"#!/bin/sh\necho hi\n")
    os.chown(str(path), nobody(), nobody())
    os.chmod(str(path), mode)
    return path


def mode_of(path):
    return stat.S_IMODE(os.lstat(str(path)).st_mode)


@pytest.mark.parametrize("side", SIDES)
def test_without_its_owner_a_setuid_bit_never_arrives(pair, side):
    other = pair.root(pair.other(side))
    settings = {"PRESERVE_OWNER": "no", "PRESERVE_GROUP": "no"}
    plant(pair.root(side), "copied-suid", 0o4755)
    plant(pair.root(side), "copied-sgid", 0o2755)
    put(pair.root(side), "later", b"x\n")
    os.chmod(str(pair.root(side) / "later"), 0o755)
    pair.run(env=settings, expect=0)
    assert mode_of(other / "copied-suid") == 0o755, "a setuid program arrived without its owner"
    assert mode_of(other / "copied-sgid") == 0o755, "a setgid program arrived without its group"
    # An attribute-only change that adds the bit is not carried either.
    os.chown(str(pair.root(side) / "later"), nobody(), nobody())
    os.chmod(str(pair.root(side) / "later"), 0o6755)
    pair.run(env=settings, expect=0)
    assert mode_of(other / "later") == 0o755
    assert mode_of(pair.root(side) / "later") == 0o6755, "the source's own bits were touched"
    pair.assert_converged(env=settings)


@pytest.mark.parametrize("side", SIDES)
def test_with_its_owner_a_setuid_file_arrives_as_it_is(pair, side):
    other = pair.root(pair.other(side))
    plant(pair.root(side), "suid", 0o4755)
    pair.run(expect=0)
    info = os.lstat(str(other / "suid"))
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o4755, nobody())
    pair.assert_converged()
