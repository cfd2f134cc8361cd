"""Units of osync.py that have a contract of their own: the settings table and sync.conf,
the config reader, rsync pattern matching (checked against the real rsync), the state
file, locks and the cleanup of old backups."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import osync  # noqa: E402


# -- settings table and sync.conf ----------------------------------------------------------------

def test_sync_conf_is_generated_from_the_settings_table():
    with open(os.path.join(ROOT, "sync.conf")) as handle:
        assert handle.read() == osync.example_config(), "regenerate sync.conf from osync.example_config()"


def test_sync_conf_lists_every_key_with_its_default_and_a_comment():
    path = os.path.join(ROOT, "sync.conf")
    assignments = osync.read_config_file(path)
    keys = [key for _, key, _ in assignments]
    table = [setting.key for setting in osync.SETTINGS if setting.key]
    assert keys == table
    lines = open(path).read().splitlines()
    for number, key, value in assignments:
        setting = osync.SETTINGS_BY_KEY[key]
        expected = setting.default
        if setting.kind == "str":
            expected = os.path.expanduser(expected) if expected.startswith("~") else expected
            assert value == expected, key
        else:
            assert osync.convert_value(setting, value) == expected, key
        assert lines[number - 2].startswith("# "), "%s has no comment above it" % key


def test_every_option_of_osync_v1_3_is_accepted():
    options = ["--dry", "--silent", "--verbose", "--errors-only", "--no-prefix", "--non-interactive", "--summary",
               "--log-conflicts", "--alert-conflicts", "--stats", "--partial", "--no-maxtime", "--force-unlock",
               "--no-locks", "--no-resume", "--initialize", "--on-changes", "--on-changes-target", "--initiator",
               "--target", "--rsakey", "--password-file", "--krb5", "--ssh-controlmaster", "--remote-token",
               "--instance-id", "--skip-deletion", "--sync-type", "--destination-mails", "--initiator-state-dir",
               "--target-state-dir"]
    known = set(setting.option for setting in osync.SETTINGS if setting.option)
    assert set(options) <= known
    help_lines = osync.help_text().splitlines()
    for option in options:
        assert len([line for line in help_lines if line.strip().startswith(option + " ")
                    or line.strip().startswith(option + "=")]) == 1, option


# -- config reader ---------------------------------------------------------------------------------

def write(tmp_path, text, name="x.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_reader_handles_the_shell_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("SOMEVAR", "from-env")
    path = write(tmp_path, "\n".join([
        "#!/usr/bin/env bash", "[GENERAL]", "A=plain", 'B="double $SOMEVAR"', "C='single $SOMEVAR'",
        "D=${A}-x", "E=~/dir", '  F="with # hash" # comment', "export G=exported", 'H=a\\ b', "I=", ""]))
    values = dict((key, value) for _, key, value in osync.read_config_file(path))
    assert values == {"A": "plain", "B": "double from-env", "C": "single $SOMEVAR", "D": "plain-x",
                      "E": os.path.expanduser("~") + "/dir", "F": "with # hash", "G": "exported", "H": "a b", "I": ""}


@pytest.mark.parametrize("line", ["X=$(touch /tmp/pwned)", "X=`touch /tmp/pwned`", 'X="$(id)"', "X=a; rm -rf /",
                                  "X=a b", "X=${A:-x}", "X=a|b", 'X="unclosed', "echo hi"])
def test_reader_refuses_shell_code_naming_file_line_and_key(tmp_path, line):
    path = write(tmp_path, "OK=1\n%s\n" % line)
    with pytest.raises(osync.ConfigError) as error:
        osync.read_config_file(path)
    message = str(error.value)
    assert message.startswith("%s:2: " % path)
    if line.startswith("X="):
        assert message.startswith("%s:2: X: " % path)


def test_bad_values_name_file_line_and_key(tmp_path):
    path = write(tmp_path, "INSTANCE_ID=x\nINITIATOR_SYNC_DIR=/a\nTARGET_SYNC_DIR=/b\nSOFT_DELETE=maybe\n")
    cfg = osync.Config(quicksync=False)
    with pytest.raises(osync.ConfigError) as error:
        cfg.load_file(path)
    assert str(error.value).startswith("%s:4: SOFT_DELETE: " % path)


def test_old_names_and_values_are_translated_with_a_warning(tmp_path):
    path = write(tmp_path, "MASTER_SYNC_DIR=/a\nSLAVE_SYNC_DIR=/b\nSYNC_ID=old\nCONFLICT_PREVALANCE=slave\n"
                           "SKIP_DELETION=master\nBOGUS_KEY=1\n")
    cfg = osync.Config(quicksync=False)
    cfg.load_file(path)
    assert (cfg["INITIATOR_SYNC_DIR"], cfg["TARGET_SYNC_DIR"], cfg["INSTANCE_ID"]) == ("/a", "/b", "old")
    assert cfg["CONFLICT_PREVALANCE"] == "target" and cfg["SKIP_DELETION"] == "initiator"
    text = "\n".join(cfg.warnings)
    for name in ("MASTER_SYNC_DIR", "SLAVE_SYNC_DIR", "SYNC_ID", "BOGUS_KEY", "CONFIG_FILE_REVISION"):
        assert name in text


def test_every_boolean_has_one_default_in_both_modes():
    for setting in osync.SETTINGS:
        if setting.kind == "bool":
            assert setting.quick is None, setting.key
            assert osync.Config(True)[setting.key] == osync.Config(False)[setting.key]


def test_empty_boolean_means_the_default(tmp_path):
    cfg = osync.Config(quicksync=True)
    cfg.set_from_text("SOFT_DELETE", "", "test")
    assert cfg["SOFT_DELETE"] is True


# -- rsync patterns, checked against the real rsync --------------------------------------------------

TREE = ["a.php", "b.txt", "tmp/x", "sub/tmp/y", "sub/a.php", "cache/c", "sub/cache", "a/b/c", "a/x/c",
        "deep/1/2/deep", "x1", "x12", "bob", "abc", "dir/in/file", "dirfile", "sp ace/f", "[br]/f"]

PATTERN_SETS = [
    [("-", "*.php")], [("-", "/tmp")], [("-", "tmp")], [("-", "cache/")], [("-", "a/*/c")],
    [("-", "**/deep")], [("-", "x?")], [("-", "[ab]*")], [("-", "dir/***")], [("-", "sp ace")],
    [("+", "*/"), ("+", "*.txt"), ("-", "*")], [("+", "sub/a.php"), ("-", "*.php")], [("-", "sub/")],
    [("-", "/sub/tmp")], [("-", "\\[br\\]")], [("-", "b*.txt")], [("-", "*/c")], [("-", "a/**/c")],
    [("-", "deep/**")], [("+", "sub/***"), ("-", "*")],
]


@pytest.mark.parametrize("rules", PATTERN_SETS, ids=lambda rules: " ".join("%s%s" % rule for rule in rules))
def test_filter_agrees_with_rsync(tmp_path, rules):
    root = tmp_path / "r"
    for name in TREE:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    argv = ["rsync", "-r", "--list-only"]
    for sign, pattern in rules:
        argv.append(("--include=" if sign == "+" else "--exclude=") + pattern)
    listing = subprocess.run(argv + [str(root) + "/"], stdout=subprocess.PIPE, check=True,
                             universal_newlines=True).stdout
    expected = set()
    for line in listing.splitlines():
        name = line.split(None, 4)[4]
        if name != ".":
            expected.add(name)
    spec = [[sign, pattern] for sign, pattern in rules]
    got = set(entry.path for entry in osync.walk_tree(str(root), osync.PathFilter(spec), {}))
    assert got == expected


# -- state file --------------------------------------------------------------------------------------

def test_state_round_trips_any_name(tmp_path):
    names = ["plain", "new\nline", "\udcff\udcfe-latin1", "tab\there", "-rf", "quote\"'", "é日本", "a/b"]
    records = []
    for number, name in enumerate(sorted(names, key=osync.path_key)):
        entry = osync.Entry(name, "f", number, number * 10 ** 9 + 7, 0o640, 1, 2, 3, 4, "", "")
        records.append((name, entry, None if number % 2 else entry))
    path = str(tmp_path / "state")
    osync.write_state(path, {"instance": "x"}, osync.state_lines(records))
    assert list(osync.read_state(path)) == records
    header = json.loads(open(path).readline())
    assert header["format"] == osync.STATE_FORMAT and header["version"] == osync.STATE_VERSION


def test_damaged_state_is_reported(tmp_path):
    path = tmp_path / "state"
    osync.write_state(str(path), {}, osync.state_lines([("a", osync.Entry("a", "f"), None)]))
    with open(str(path), "a") as handle:
        handle.write("not json\n")
    with pytest.raises(osync.StateError):
        list(osync.read_state(str(path)))


def test_state_line_damaged_after_its_path_is_found_when_the_merge_needs_it(tmp_path):
    # Only the path of each line is decoded on reading; the rest of a damaged line must
    # still stop the run's use of the state (StateError) when a scan differs from it.
    path = str(tmp_path / "state")
    osync.write_state(path, {}, osync.state_lines([("a", osync.Entry("a", "f", 1, 2), None)]))
    text = open(path).read().replace('"f", 1, 2', '"f", 1, {', 1)
    open(path, "w").write(text)
    records = osync.read_state_records(path)
    with pytest.raises(osync.StateError, match="line 2 is damaged"):
        list(osync.merge_streams(records, iter([osync.Entry("a", "f", 1, 3)]), iter(())))
    with pytest.raises(osync.StateError, match="line 2 is damaged"):
        list(osync.read_state(path))


def test_merge_over_a_state_file_gives_the_rows_of_the_decoded_state(tmp_path):
    # merge_streams compares a state line as text with the line the scans' entries make
    # and decodes it only when they differ: the rows must be those of the decoded state,
    # whatever changed, on either side or both, for every kind of difference.
    names = sorted(["d", "d/x", "d/y", "e\udcff", "f", "g", "h", "\u65e5"], key=osync.path_key)
    recorded = []
    for number, name in enumerate(names):
        initiator = osync.Entry(name, "d" if name == "d" else "f", number, 10 ** 9 * number, 0o644, 1, 2, number, 5)
        target = None if name == "h" else initiator._replace(ino=number + 100)
        recorded.append((name, initiator, target))
    path = str(tmp_path / "state")
    osync.write_state(path, {}, osync.state_lines(recorded))
    initiator_scan, target_scan = [], []
    for name, initiator, target in recorded:
        if name == "f":
            initiator = initiator._replace(size=99)          # changed on the initiator
        if name == "g":
            target = target._replace(mode=0o600)             # changed on the target
        if name != "e\udcff":
            initiator_scan.append(initiator)                 # e...: deleted on the initiator
        if target is not None:
            target_scan.append(target)
    target_scan.append(osync.Entry("z", "f", 1, 1))          # new on the target
    fast = list(osync.merge_streams(osync.read_state_records(path), iter(initiator_scan), iter(target_scan)))
    slow = list(osync.merge_streams(iter(list(osync.read_state(path))), iter(initiator_scan), iter(target_scan)))
    assert fast == slow
    assert [row[0] for row in fast] == names + ["z"]
    by_path = dict((row[0], row) for row in fast)
    was = dict((name, initiator) for name, initiator, _ in recorded)
    assert by_path["f"][1].size == was["f"].size != 99 and by_path["f"][3].size == 99
    assert by_path["g"][2].mode == 0o644 and by_path["g"][4].mode == 0o600
    assert by_path["e\udcff"][3] is None and by_path["e\udcff"][1] is not None


def test_state_line_coder_never_gives_the_line_of_other_entries():
    one = osync.Entry("a", "f", 1, 2)
    other = osync.Entry("a", "f", 1, 3)
    first = osync.state_line("a", one, None)
    assert osync.state_line("a", other, None) != first
    assert osync.state_line("a", one, None) == first
    assert osync.state_line("b", one, None) != first
    assert osync.state_line("a", one, one) != first
    assert json.loads(first) == ["a", list(one[1:]), None]


# -- locks ---------------------------------------------------------------------------------------------

def test_lock_is_exclusive_and_only_our_own_is_removed(tmp_path):
    replica = osync.LocalReplica("initiator", str(tmp_path))
    replica.prepare_work_dir()
    assert replica.acquire_lock("1@job") is None
    assert replica.acquire_lock("2@job") == "1@job"
    replica.release_lock("2@job")  # never removes another run's lock
    assert open(replica.lock_path).read() == "1@job"
    replica.release_lock("1@job")
    assert not os.path.exists(replica.lock_path)


def test_lock_is_taken_over_only_if_it_still_holds_what_was_judged_dead(tmp_path):
    replica = osync.LocalReplica("target", str(tmp_path))
    replica.prepare_work_dir()
    with open(replica.lock_path, "w") as handle:
        handle.write("999999999@other")
    assert replica.acquire_lock("123@job", replace="888@someone-else") == "999999999@other"
    assert replica.acquire_lock("123@job", replace="999999999@other") is None
    assert open(replica.lock_path).read() == "123@job"


# -- cleanup of old backups and soft-deleted items -------------------------------------------------------

def test_clean_old_removes_only_items_older_than_the_limit(tmp_path):
    replica = osync.LocalReplica("initiator", str(tmp_path))
    replica.prepare_work_dir()
    deleted = os.path.join(replica.work_dir, "deleted")
    os.makedirs(os.path.join(deleted, "d/e"))
    for name in ("d/e/f", "g.php", "h"):
        open(os.path.join(deleted, name), "w").close()
    os.symlink("nowhere", os.path.join(deleted, "link"))
    os.makedirs(os.path.join(deleted, "empty"))
    spec = [["-", "*.php"]]
    # Everything is a few seconds old: a 30-day limit keeps it all, 0 keeps it forever.
    assert replica.clean_old("deleted", 30, spec) == [0, []]
    assert replica.clean_old("deleted", 0, spec, now=time.time() + 400 * 86400) == [0, []]
    # 31 days later: files, links and emptied directories go; excluded names stay.
    removed, errors = replica.clean_old("deleted", 30, spec, now=time.time() + 31 * 86400)
    assert errors == []
    assert sorted(os.listdir(deleted)) == ["g.php"]
    assert removed == 6  # d/e/f, h, link, e, d, empty


# -- remote: URI, bootstrap, protocol ---------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("ssh://backup@host.example:2222//srv/data", ("backup", "host.example", 2222, "/srv/data")),
    ("ssh://host/rel/path", (None, "host", 22, "rel/path")),
    ("ssh://u@[::1]:22//abs", ("u", "::1", 22, "/abs")),
    ("ssh://u@h//path/with@at:and:colons", ("u", "h", 22, "/path/with@at:and:colons")),
    ("ssh://h:2//a b", (None, "h", 2, "/a b")),
])
def test_ssh_uri(uri, expected):
    assert osync.parse_ssh_uri(uri) == expected


@pytest.mark.parametrize("uri", ["ssh://", "ssh://host", "ssh://host:", "ssh://host:abc//x", "ssh://host:0//x",
                                 "ssh://host:70000//x", "ssh://@host//x", "ssh://[::1//x"])
def test_malformed_ssh_uri_is_one_sentence(uri):
    with pytest.raises(osync.ConfigError) as error:
        osync.parse_ssh_uri(uri)
    assert uri in str(error.value) and str(error.value).endswith(".")


def test_ssh_filter_knows_the_bootstrap_osync_sends():
    sys.path.insert(0, ROOT)
    import ssh_filter
    assert ssh_filter.AGENT_STUB == osync.AGENT_STUB
    stub = ["env", "_REMOTE_TOKEN=t", "python3", "-c", osync.AGENT_STUB, "1234"]
    assert ssh_filter.allowed(stub, "t", False)
    assert not ssh_filter.allowed(stub, "other", False)
    assert not ssh_filter.allowed(stub[:2] + ["sudo", "-n"] + stub[2:], "t", False)
    assert ssh_filter.allowed(stub[:2] + ["sudo", "-n"] + stub[2:], "t", True)
    assert ssh_filter.allowed(["env", "_REMOTE_TOKEN=t", "/usr/bin/rsync", "--server", "-s", "."], "t", False)
    for refused in (["env", "_REMOTE_TOKEN=t", "python3", "-c", "import os"], ["ls"],
                    ["env", "_REMOTE_TOKEN=t", "sh", "-c", "rsync --server"], ["env", "_REMOTE_TOKEN=", "ls"],
                    ["env", "_REMOTE_TOKEN=t", "rsync", "--daemon"]):
        assert not ssh_filter.allowed(refused, "t", True)
    assert not ssh_filter.allowed(["env", "_REMOTE_TOKEN=", "rsync", "--server"], "", True)
    assert ssh_filter.EXIT_REFUSED == osync.AGENT_EXIT_REFUSED


def test_the_explained_stub_is_the_stub():
    """AGENT_STUB_EXPLAINED, the commented copy, compiles to the same program as the
    one-line AGENT_STUB, and the stub exits with the codes the initiator's table reads."""
    import ast
    assert ast.dump(ast.parse(osync.AGENT_STUB_EXPLAINED)) == ast.dump(ast.parse(osync.AGENT_STUB))
    assert "\n" not in osync.AGENT_STUB
    for code in (osync.AGENT_EXIT_OLD_PYTHON, osync.AGENT_EXIT_SHORT_SOURCE):
        assert osync.AGENT_STUB.count("sys.exit(%d)" % code) == 1
        assert code in osync.AGENT_START_FAILURES
    used_elsewhere = {1, 2, 126, 127, 255}     # Python, usage, shells and env, ssh
    own = {osync.AGENT_EXIT_OLD_PYTHON, osync.AGENT_EXIT_SHORT_SOURCE, osync.AGENT_EXIT_REFUSED}
    assert len(own) == 3 and not own & used_elsewhere and max(own) < 128


def test_protocol_round_trips_any_name_and_compresses_big_messages():
    import io
    names = ["\udcff\udcfe", "new\nline", "é日本", "x" * 5000]
    stream = io.BytesIO()
    osync.send_message(stream, {"batch": names})
    assert stream.getvalue()[:1] == b"Z"
    stream.seek(0)
    assert osync.read_message(stream) == {"batch": names}
    assert osync.read_message(stream) is None


# -- what to install -------------------------------------------------------------------------------

@pytest.mark.parametrize("managers, program, hint", [
    (["apt-get"], "rsync", "apt install rsync"),
    (["apt-get"], "ssh", "apt install openssh-client"),
    (["dnf", "yum"], "ssh", "dnf install openssh-clients"),
    (["apk"], "inotifywait", "apk add inotify-tools"),
    (["brew"], "sshpass", "brew install sshpass"),
    ([], "rsync", "install rsync"),
])
def test_install_hint_names_the_package_for_this_hosts_package_manager(monkeypatch, tmp_path, managers, program,
                                                                       hint):
    """A newcomer told that rsync is missing is told the command that installs it there."""
    for manager in managers:
        (tmp_path / manager).write_text("#!/bin/sh\n")
        (tmp_path / manager).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert osync.install_hint(program) == hint


# -- stopping a child's process group ------------------------------------------------------------

SLOW_TO_FINISH_GROUP = r"""
import os, signal, sys, time
if os.fork() == 0:
    # like rsync's receiver: on SIGTERM it still has a second of work (saving a partial file)
    def finish(signum, frame):
        time.sleep(1)
        open(sys.argv[1], "w").close()
        os._exit(0)
    signal.signal(signal.SIGTERM, finish)
    while True:
        time.sleep(1)
signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(1))  # the leader ends at once
while True:
    time.sleep(1)
"""


def test_stopping_a_group_lets_its_other_processes_finish(tmp_path):
    """The rest of a group gets time to end after its leader did, so rsync's receiver
    still saves the partly received file once the rsync it forked from has exited."""
    finished = tmp_path / "finished"
    process = subprocess.Popen([sys.executable, "-c", SLOW_TO_FINISH_GROUP, str(finished)], start_new_session=True)
    time.sleep(0.5)  # the fork and the handlers in place
    osync.kill_process_group(process, grace=2.0)
    assert finished.exists(), "the group's second process was killed before it finished"
    with pytest.raises(OSError):
        os.killpg(process.pid, 0)


def test_every_non_canonical_wire_path_is_refused_and_no_canonical_one():
    # An agent's paths are checked without splitting each one (wire_path_problem's quick
    # test): every form of an empty, "." or ".." component must still be found, and the
    # names that only look like them must pass.
    bad = ["a//b", "a/", "/a", ".", "..", "./a", "../a", "a/./b", "a/../b", "a/.", "a/..", "a/b//",
           ".osync_workdir", ".osync_workdir/state", "a\0b", ""]
    good = ["a", "a/b", ".a", "a.", "a..b", "..a", "a/.b/..c", "...", "a/...", ".osync_workdir-x",
            "x/.osync_workdir", "日本/\udcff"]
    for path in bad:
        assert osync.wire_path_problem(path) is not None, path
    for path in good:
        assert osync.wire_path_problem(path) is None, path
    assert "component '..'" in osync.wire_path_problem("a/../b")
    assert "component ''" in osync.wire_path_problem("a//b")


def test_plain_entry_is_the_entry_make_entry_gives(tmp_path):
    # The scan's fast path for a plain scan builds its entries itself: for every kind of
    # item they must be the very entries make_entry() gives with no option on.
    (tmp_path / "file").write_bytes(b"12345")
    os.chmod(str(tmp_path / "file"), 0o4751)
    (tmp_path / "dir").mkdir()
    os.link(str(tmp_path / "file"), str(tmp_path / "hard"))
    os.symlink("file", str(tmp_path / "link"))
    os.mkfifo(str(tmp_path / "fifo"))
    for name in ("file", "dir", "hard", "link", "fifo"):
        path = str(tmp_path / name)
        info = os.lstat(path)
        assert osync.plain_entry(path, name, info) == osync.make_entry(path, name, info, {}), name
        assert type(osync.plain_entry(path, name, info)) is osync.Entry
