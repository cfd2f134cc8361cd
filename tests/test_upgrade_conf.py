"""--upgrade-conf FILE: an osync v1.0-v1.2 config rewritten to the current format (the
original kept as FILE.save), its old state lists renamed, and then used for a real sync."""

import os
import re
import stat
import subprocess

import pytest

import osync
from conftest import REPO, Pair, chattr_supported, make_pair, need

# A config as osync v1.0 wrote it: SYNC_ID, MASTER/SLAVE, yes/no, master as a value, the old
# section titles and revision comment, and a user's own comments.
OLD_V10 = """#!/usr/bin/env bash

###### osync - Rsync based two way sync engine with fault tolerance
###### (C) 2013-2015 by Orsiris "Ozy" de Jong (www.netpower.fr)
#### osync v1.00a config file rev 2015040601

## ---------- GENERAL OPTIONS

## Sync job identification (our wiki keeps the config file revision history)
SYNC_ID="legacy_job"

## Directories to synchronize. Master must be on the system Osync runs on.
MASTER_SYNC_DIR="{initiator}"
SLAVE_SYNC_DIR="{target}"
## If slave replica is a remote directory, you must specify a RSA key.
SSH_RSA_PRIVATE_KEY="{key}"

## Create sync directories if they do not exist
CREATE_DIRS=no
LOGFILE=""
RSYNC_EXCLUDE_PATTERN="tmp;archives"
PATH_SEPARATOR_CHAR=";"
MINIMUM_SPACE=10240
BANDWIDTH=0
SUDO_EXEC=no
RSYNC_EXECUTABLE=rsync
{extra}
## ---------- REMOTE SYNC OPTIONS

SSH_COMPRESSION=yes
REMOTE_HOST_PING=no

## ---------- MISC OPTIONS

PRESERVE_ACL=no
PRESERVE_XATTR=no
RSYNC_COMPRESS=yes
SOFT_MAX_EXEC_TIME=7200
HARD_MAX_EXEC_TIME=10600

## ---------- BACKUP AND DELETION OPTIONS

## Our own note: the office copy wins ties.
CONFLICT_BACKUP=yes
CONFLICT_BACKUP_DAYS=30
CONFLICT_PREVALANCE=master
SOFT_DELETE=yes

## ---------- RESUME OPTIONS

RESUME_SYNC=yes
RESUME_TRY=2

## ---------- ALERT OPTIONS

DESTINATION_MAILS=""

## ---------- EXECUTION HOOKS

LOCAL_RUN_BEFORE_CMD=""
STOP_ON_CMD_ERROR=yes
"""

CONF_KEYS = [s.key for s in osync.SETTINGS if s.key and s.conf]


def old_config(path, initiator, target, key="/nonexistent/id_rsa", extra=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OLD_V10.format(initiator=initiator, target=target, key=key, extra=extra))
    return path


def values(path):
    """{key: value} as osync.py's reader reads the file (last assignment wins)."""
    return dict((key, value) for _, key, value in osync.read_config_file(str(path)))


def upgrade(pair, path, expect=0):
    return pair.run_raw("--upgrade-conf", str(path), expect=expect)


def put_trees(pair):
    (pair.initiator / "from-initiator.txt").write_text("i\n")
    (pair.target / "from-target.txt").write_text("t\n")


def assert_synced(pair):
    for root in pair.roots:
        assert (root / "from-initiator.txt").read_text() == "i\n"
        assert (root / "from-target.txt").read_text() == "t\n"


def assert_no_old_name_warning(r):
    assert "WARN" not in r.output and "v1.0" not in r.output and "rename it" not in r.output, r.output


@pytest.mark.remote_newest   # also under Python 3.6 (local-oldest): old configs live on old hosts
def test_v10_config_upgraded_then_synced(pair):
    """Every change the reader would translate is written, the rest of the file stays, and
    the result runs a sync with no warning."""
    conf = old_config(pair.base / "conf" / "old.conf", pair.initiator, pair.target_spec,
                      key=getattr(pair, "key", "/nonexistent/id_rsa"))
    original = conf.read_bytes()
    upgrade(pair, conf)
    assert (pair.base / "conf" / "old.conf.save").read_bytes() == original
    text = conf.read_text()
    found = values(conf)
    assert set(CONF_KEYS) <= set(found), set(CONF_KEYS) - set(found)
    assert not set(found) & set(osync.OLD_NAMES), "old names left: %s" % (set(found) & set(osync.OLD_NAMES))
    assert found["INSTANCE_ID"] == "legacy_job"
    assert found["INITIATOR_SYNC_DIR"] == str(pair.initiator)
    assert found["TARGET_SYNC_DIR"] == pair.target_spec
    assert found["CONFLICT_PREVALANCE"] == "initiator"
    assert found["CONFIG_FILE_REVISION"] == osync.CONFIG_FILE_REVISION_REQUIRED
    assert found["RSYNC_EXCLUDE_PATTERN"] == "tmp;archives"
    # yes/no stay as the user wrote them: the reader takes both.
    assert "CREATE_DIRS=no\n" in text and "SOFT_DELETE=yes\n" in text
    for comment in ("## Our own note: the office copy wins ties.",
                    "## Sync job identification (our wiki keeps the config file revision history)",
                    "###### (C) 2013-2015 by Orsiris"):
        assert comment in text
    assert "config file rev 2015040601" not in text
    for section in osync.SECTION_TITLES:
        assert "\n[%s]\n" % section in text
    assert "## ----------" not in text
    blocks = osync.example_blocks()
    for key in ("PROMETHEUS_TEXTFILE", "MAX_DELETION_SHARE", "SMTP_ENCRYPTION", "RUN_AFTER_CMD_ON_ERROR"):
        assert "\n".join(blocks[key]) in text, "%s lacks its sync.conf comment" % key
    # Each added key lands in its own section.
    sections = re.findall(r"^\[([A-Z_]+)\]$|^([A-Z_][A-Z0-9_]*)=", text, re.M)
    current, where = None, {}
    for header, key in sections:
        current = header or current
        if key:
            where[key] = current
    assert where["MAX_DELETION_SHARE"] == "BACKUP_DELETE_OPTIONS"
    assert where["SMTP_ENCRYPTION"] == "ALERT_OPTIONS"
    assert where["REMOTE_PYTHON"] == "REMOTE_OPTIONS"

    put_trees(pair)
    env = getattr(pair, "quick_env", None)   # a remote target: the test sshd's known_hosts and Python
    run = pair.run_conf(conf, env=env, expect=0)
    assert_no_old_name_warning(run)
    assert_synced(pair)


def test_v12_remote_settings_become_an_ssh_target(tmp_path, request):
    """REMOTE_SYNC=yes with REMOTE_USER/HOST/PORT and a plain SLAVE_SYNC_DIR is written as
    the ssh:// TARGET_SYNC_DIR the reader makes of it, and syncs through the test sshd."""
    pair = make_pair("remote", tmp_path / "p", request)
    remote = ("CONFIG_FILE_REVISION=1.2.0\nREMOTE_SYNC=yes\nREMOTE_USER=root\nREMOTE_HOST=%s\nREMOTE_PORT=%d\n"
              % (pair.sshd.host, pair.sshd.port))
    conf = old_config(pair.base / "conf" / "v12.conf", pair.initiator, pair.target, key=pair.key, extra=remote)
    r = upgrade(pair, conf)
    found = values(conf)
    assert found["TARGET_SYNC_DIR"] == pair.target_spec
    assert not set(found) & set(osync.LEGACY_REMOTE_KEYS)
    # An old revision is raised, not only added when missing (osync's upgrade script kept 1.2.0).
    assert found["CONFIG_FILE_REVISION"] == osync.CONFIG_FILE_REVISION_REQUIRED
    assert conf.read_text().count("CONFIG_FILE_REVISION=") == 1
    assert "#REMOTE_HOST=%s" % pair.sshd.host in conf.read_text(), "the old lines are kept as comments"
    assert "state dir of the target %s" % pair.target_spec in r.output
    put_trees(pair)
    run = pair.run_conf(conf, env=pair.quick_env, expect=0)
    assert_no_old_name_warning(run)
    assert_synced(pair)


def test_old_state_lists_renamed(tmp_path):
    """master-/slave- lists in both state dirs get their initiator-/target- names (same
    content), and the first run reads them as osync.sh's last state."""
    pair = Pair(tmp_path / "p")
    conf = old_config(pair.base / "conf" / "old.conf", pair.initiator, pair.target)
    put_trees(pair)
    initiator_state = pair.workdir("initiator") / "state"
    target_state = pair.workdir("target") / "state"
    initiator_state.mkdir(parents=True)
    target_state.mkdir(parents=True)
    for root in pair.roots:   # what both held after osync's last run, as its lists say
        (root / "common.txt").write_text("c\n")
    lists = {initiator_state / "master-tree-after-legacy_job": "common.txt\n",
             initiator_state / "slave-tree-after-legacy_job": "common.txt\n",
             initiator_state / "master-tree-current-legacy_job-dry": "x\n",
             target_state / "master-deleted-list-legacy_job": "gone\n",
             initiator_state / "master-tree-after-other_job": "other job's\n"}
    for path, content in lists.items():
        path.write_text(content)
    r = upgrade(pair, conf)
    renamed = {initiator_state / "initiator-tree-after-legacy_job": "common.txt\n",
               initiator_state / "target-tree-after-legacy_job": "common.txt\n",
               initiator_state / "initiator-tree-current-legacy_job-dry": "x\n",
               target_state / "initiator-deleted-list-legacy_job": "gone\n",
               initiator_state / "master-tree-after-other_job": "other job's\n"}
    for path, content in renamed.items():
        assert path.read_text() == content, r.output
    assert sorted(p.name for p in initiator_state.iterdir()) + sorted(p.name for p in target_state.iterdir()) == \
        sorted(p.name for p in renamed if p.parent == initiator_state) + \
        sorted(p.name for p in renamed if p.parent == target_state)
    run = pair.run_conf(conf, expect=0)
    assert "osync.sh lists" in run.output, run.output
    assert_synced(pair)


def test_current_config_left_alone(tmp_path):
    """sync.conf is current: a notice, the file untouched, no .save."""
    pair = Pair(tmp_path / "p")
    conf = pair.base / "conf" / "current.conf"
    conf.parent.mkdir()
    conf.write_bytes((REPO / "sync.conf").read_bytes())
    os.utime(str(conf), (1000000000, 1000000000))
    r = upgrade(pair, conf)
    assert "already in the current format" in r.output
    assert conf.read_bytes() == (REPO / "sync.conf").read_bytes()
    assert conf.stat().st_mtime == 1000000000
    assert sorted(os.listdir(str(conf.parent))) == ["current.conf"]


def test_mode_and_owner_kept_and_backups_never_overwritten(tmp_path):
    pair = Pair(tmp_path / "p")
    conf = old_config(pair.base / "conf" / "old.conf", pair.initiator, pair.target)
    original = conf.read_bytes()
    earlier = pair.base / "conf" / "old.conf.save"
    earlier.write_text("an earlier backup\n")
    os.chmod(str(conf), 0o640)
    if os.geteuid() == 0:
        os.chown(str(conf), 65534, 65534)
    upgrade(pair, conf)
    info = conf.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert earlier.read_text() == "an earlier backup\n"
    assert (pair.base / "conf" / "old.conf.save.1").read_bytes() == original
    assert "INSTANCE_ID=" in conf.read_text()


def critical_line(output):
    return [line for line in output.splitlines() if "CRITICAL" in line][-1].split("CRITICAL", 1)[1]


@pytest.mark.parametrize("case", ["missing", "not-a-config", "rejected-line", "not-writable", "with-dry"])
def test_errors_change_nothing(tmp_path, case):
    pair = Pair(tmp_path / "p")
    directory = pair.base / "conf"
    conf = old_config(directory / "old.conf", pair.initiator, pair.target)
    args = []
    if case == "missing":
        conf.unlink()
        conf = directory / "missing.conf"
        expected = "Config file %s does not exist." % conf
    elif case == "not-a-config":
        conf = directory / "notes.conf"
        conf.write_text("# my notes\nCOLOUR=blue\n")
        expected = "%s is not an osync config file" % conf
    elif case == "rejected-line":
        conf.write_text(conf.read_text().replace('SYNC_ID="legacy_job"', 'SYNC_ID="job-$(hostname)"'))
        number = conf.read_text().splitlines().index('SYNC_ID="job-$(hostname)"') + 1
        expected = "%s:%d: SYNC_ID: command substitution" % (conf, number)
    elif case == "not-writable":
        if not chattr_supported(directory):
            need("chattr +i is not supported here")
        subprocess.run(["chattr", "+i", str(conf)], check=True)
        expected = "Config file %s is not writable" % conf
    else:
        args = ["--dry"]
        expected = "--dry cannot be combined with --upgrade-conf"
    before = dict((name, (directory / name).read_bytes()) for name in os.listdir(str(directory)))
    try:
        r = pair.run_raw("--upgrade-conf", str(conf), *args, expect=1)
    finally:
        if case == "not-writable":
            subprocess.run(["chattr", "-i", str(conf)], check=True)
    assert expected in r.output, r.output
    assert dict((name, (directory / name).read_bytes()) for name in os.listdir(str(directory))) == before
    if case == "rejected-line":
        # The very sentence the config reader gives when the file is run.
        run = pair.run_raw(str(conf), expect=1)
        assert critical_line(run.output) == critical_line(r.output)
