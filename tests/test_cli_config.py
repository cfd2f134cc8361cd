"""Command line, config reader, settings precedence, output switches and exit codes."""

import os
import re
import stat

import pytest

from conftest import (REPO, WORKDIR, build, dir_files, expected, put, remove, snapshot,
                      strip_prefix, T0)

# Every option of osync v1.3 (osync-reference.md §1.3)
OPTIONS = [
    "--dry", "--silent", "--verbose", "--errors-only", "--no-prefix", "--non-interactive",
    "--summary", "--log-conflicts", "--alert-conflicts", "--stats", "--partial", "--no-maxtime",
    "--force-unlock", "--no-locks", "--no-resume", "--initialize", "--on-changes",
    "--on-changes-target", "--initiator", "--target", "--rsakey", "--password-file", "--krb5",
    "--ssh-controlmaster", "--remote-token", "--instance-id", "--skip-deletion", "--sync-type",
    "--destination-mails", "--initiator-state-dir", "--target-state-dir",
]

PREFIX_RE = re.compile(r"TIME: [0-9.]+ - ")


def no_traceback(r):
    assert "Traceback (most recent call last)" not in r.output, r.output


def nonempty_lines(text):
    return [l for l in (text or "").splitlines() if l.strip()]


def simple_tree(pair):
    build(pair.initiator, {"from_i": "i", "dir/x": "x"})
    build(pair.target, {"from_t": "t"})


def assert_simple_synced(pair):
    exp = expected({"from_i": "i", "dir/x": "x", "from_t": "t"})
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp


def nothing_synced(pair):
    assert snapshot(pair.initiator) == expected({"from_i": "i", "dir/x": "x"})
    assert snapshot(pair.target) == expected({"from_t": "t"})


# ======================================================================================
# Command line
# ======================================================================================

def test_help_lists_every_option(pair):
    r = pair.run_raw("--help", expect=0)
    no_traceback(r)
    text = r.stdout + r.stderr
    missing = [o for o in OPTIONS
               if not re.search(r"^\s*(?:-[A-Za-z],\s*)?%s(?![\w-])" % re.escape(o), text, re.M)]
    assert not missing, "options not listed one per line in --help: %s\n%s" % (missing, text)


def test_version(pair):
    r = pair.run_raw("--version", expect=0)
    no_traceback(r)
    assert re.search(r"\d+\.\d+", r.stdout + r.stderr), r.output


@pytest.mark.parametrize("with_dirs", [False, True])
def test_unknown_option(pair, with_dirs):
    simple_tree(pair)
    if with_dirs:
        r = pair.run("--bogus", expect=1)
    else:
        r = pair.run_raw("--bogus", expect=1)
    no_traceback(r)
    lines = nonempty_lines(r.stderr)
    assert 1 <= len(lines) <= 2, "expected one short message on stderr:\n" + r.stderr
    assert "--bogus" in r.stderr
    nothing_synced(pair)
    assert not (pair.target / WORKDIR).exists()


@pytest.mark.parametrize("option", ["--instance-id", "--initiator", "--skip-deletion"])
def test_missing_option_value(pair, option):
    simple_tree(pair)
    r = pair.run(option, expect=1)
    no_traceback(r)
    nothing_synced(pair)


def test_space_separated_values(pair):
    simple_tree(pair)
    r = pair.run_raw("--initiator", str(pair.initiator), "--target", pair.target_spec,
                     "--instance-id", "spaceformid", "--non-interactive",
                     *pair.extra_args(), expect=0)
    no_traceback(r)
    assert_simple_synced(pair)
    names = pair.state_files()
    assert any("spaceformid" in n for n in names), names


def test_equals_form_instance_id(pair):
    simple_tree(pair)
    pair.run("--instance-id=eqformid", expect=0)
    names = pair.state_files()
    assert names and all("quicksync_task" not in n for n in names), names
    assert any("eqformid" in n for n in names), names


def test_default_instance_id_is_quicksync_task(pair):
    simple_tree(pair)
    pair.run(expect=0)
    assert any("quicksync_task" in n for n in pair.state_files()), pair.state_files()


def test_no_arguments_no_traceback(pair):
    r = pair.run_raw()
    no_traceback(r)


# ======================================================================================
# Config reader
# ======================================================================================

def _conf_lines(pair, variant):
    i, t = str(pair.initiator), pair.target_spec
    extra = ["%s=\"%s\"" % (k, v) for k, v in pair.conf_keys().items()
             if k not in ("INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR")]
    if variant == "double":
        return 'dq_id', ['INSTANCE_ID="dq_id"', 'INITIATOR_SYNC_DIR="%s"' % i,
                         'TARGET_SYNC_DIR="%s"' % t] + extra
    if variant == "unquoted":
        return 'uq_id', ['INSTANCE_ID=uq_id', 'INITIATOR_SYNC_DIR=%s' % i,
                         'TARGET_SYNC_DIR=%s' % t] + extra
    if variant == "single":
        return 'sq_id', ["INSTANCE_ID='sq_id'", "INITIATOR_SYNC_DIR='%s'" % i,
                         "TARGET_SYNC_DIR='%s'" % t] + extra
    if variant == "variables":
        return 'varid_x', ['INSTANCE_ID="${OSYNC_TEST_ID}_x"',
                           'INITIATOR_SYNC_DIR="${HOME}/initiator"',
                           'TARGET_SYNC_DIR=$OSYNC_TEST_TARGET'] + extra
    if variant == "tilde":
        return 'tilde_id', ['INSTANCE_ID=tilde_id', 'INITIATOR_SYNC_DIR=~/initiator',
                            'TARGET_SYNC_DIR="%s"' % t] + extra
    if variant == "tilde-quoted":
        return 'tildeq_id', ['INSTANCE_ID=tildeq_id', 'INITIATOR_SYNC_DIR="~/initiator"',
                             'TARGET_SYNC_DIR="%s"' % t] + extra
    if variant == "comments-sections":
        return 'cm_id', [
            "#!/usr/bin/env bash",
            "",
            "###### osync - config file",
            "[GENERAL]",
            "# a comment line",
            "#INITIATOR_SYNC_DIR=/wrong/path",
            "   # an indented comment",
            'INSTANCE_ID="cm_id"   # trailing comment',
            'INITIATOR_SYNC_DIR="%s"' % i,
            'TARGET_SYNC_DIR="%s" # where to sync' % t,
            "",
            "[BACKUP_DELETE_OPTIONS]",
            "SOFT_DELETE=yes # comment after a boolean",
            "SOFT_DELETE_DAYS=30",
            "[REMOTE_OPTIONS]",
        ] + extra
    raise ValueError(variant)


CONF_VARIANTS = ["double", "unquoted", "single", "variables", "tilde", "tilde-quoted",
                 "comments-sections"]


@pytest.mark.parametrize("variant", CONF_VARIANTS)
def test_config_syntax(pair, variant):
    instance, lines = _conf_lines(pair, variant)
    conf = pair.base / "conf" / "syntax.conf"
    conf.parent.mkdir()
    conf.write_text("\n".join(["CONFIG_FILE_REVISION=1.3.0"] + lines) + "\n")
    simple_tree(pair)
    env = {"HOME": str(pair.base), "OSYNC_TEST_ID": "varid",
           "OSYNC_TEST_TARGET": pair.target_spec}
    r = pair.run_conf(conf, env=env, expect=0)
    no_traceback(r)
    assert_simple_synced(pair)
    names = pair.state_files()
    assert any(instance in n for n in names), names


SUBSTITUTIONS = [
    ("INSTANCE_ID", "$(touch {m})"),
    ("INSTANCE_ID", '"$(touch {m})"'),
    ("SOFT_DELETE_DAYS", "`touch {m}`"),
    ("INSTANCE_ID", '"x`touch {m}`"'),
    ("X", "$(touch {m})"),
    ("TARGET_SYNC_DIR", '"${{HOME}}$(touch {m})"'),
]


@pytest.mark.parametrize("key,value", SUBSTITUTIONS)
def test_config_command_substitution_is_refused(pair, tmp_path, key, value):
    marker = tmp_path / "EXECUTED"
    lines = ["CONFIG_FILE_REVISION=1.3.0", "[GENERAL]",
             'INSTANCE_ID="subst"',
             'INITIATOR_SYNC_DIR="%s"' % pair.initiator,
             'TARGET_SYNC_DIR="%s"' % pair.target_spec]
    lines += ['%s="%s"' % (k, v) for k, v in pair.conf_keys().items()
              if k not in ("INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR")]
    lines.append("%s=%s" % (key, value.format(m=marker)))
    lineno = len(lines)
    lines.append("SOFT_DELETE=yes")
    conf = pair.base / "bad.conf"
    conf.write_text("\n".join(lines) + "\n")
    simple_tree(pair)
    r = pair.run_conf(conf, expect=1)
    no_traceback(r)
    assert not marker.exists(), "the config file was executed"
    assert re.search(r"%s:%d\b" % (re.escape(conf.name), lineno), r.stderr), r.stderr
    assert key in r.stderr, r.stderr
    nothing_synced(pair)
    for root in pair.roots:
        assert not (root / WORKDIR).exists()


@pytest.mark.parametrize("key,value", [("SOFT_DELETE", "maybe"), ("CONFLICT_BACKUP", "2"),
                                       ("SOFT_DELETE_DAYS", "abc")])
def test_config_bad_value(pair, key, value):
    conf = pair.write_conf(lines=["# bad value below", "%s=%s" % (key, value)])
    lineno = len(conf.read_text().splitlines())
    simple_tree(pair)
    r = pair.run_conf(conf, expect=1)
    no_traceback(r)
    assert "%s:%d: %s:" % (conf.name, lineno, key) in r.output, r.output
    nothing_synced(pair)


@pytest.mark.parametrize("key,value", [("SOFT_DELETE", "maybe"), ("SOFT_DELETE_DAYS", "abc")])
def test_env_bad_value(pair, key, value):
    simple_tree(pair)
    r = pair.run(env={key: value}, expect=1)
    no_traceback(r)
    assert key in r.output
    nothing_synced(pair)


def test_config_unknown_key_warns(pair):
    conf = pair.write_conf(lines=["SOME_BOGUS_SETTING=1"])
    simple_tree(pair)
    r = pair.run_conf(conf, expect=2)
    assert "SOME_BOGUS_SETTING" in r.output
    assert_simple_synced(pair)


@pytest.mark.parametrize("old", ["dirs", "sync-id", "prevalance"])
def test_config_old_names(pair, old):
    keys = {}
    if old == "dirs":
        keys = {"INITIATOR_SYNC_DIR": None, "TARGET_SYNC_DIR": None,
                "MASTER_SYNC_DIR": str(pair.initiator), "SLAVE_SYNC_DIR": pair.target_spec}
    elif old == "sync-id":
        keys = {"INSTANCE_ID": None, "SYNC_ID": "old_sync_id"}
    else:
        keys = {"CONFLICT_PREVALANCE": "master"}
    conf = pair.write_conf(keys=keys)
    simple_tree(pair)
    # a tie (same mtime, different size): the prevailing side (initiator / master) wins
    put(pair.initiator, "tie", "initiator version", T0 + 5)
    put(pair.target, "tie", "target version, longer", T0 + 5)
    r = pair.run_conf(conf, expect=2)
    no_traceback(r)
    exp = expected({"from_i": "i", "dir/x": "x", "from_t": "t", "tie": "initiator version"})
    assert snapshot(pair.initiator) == exp
    assert snapshot(pair.target) == exp
    if old == "sync-id":
        assert any("old_sync_id" in n for n in pair.state_files()), pair.state_files()


def test_config_missing_file(pair):
    simple_tree(pair)
    r = pair.run_conf(pair.base / "no_such_file.conf", expect=1)
    no_traceback(r)
    assert 1 <= len(nonempty_lines(r.stderr)) <= 2, r.stderr
    nothing_synced(pair)


def test_config_name_must_end_in_conf(pair):
    conf = pair.write_conf(name="task.cfg")
    simple_tree(pair)
    r = pair.run_conf(conf, expect=1)
    no_traceback(r)
    assert 1 <= len(nonempty_lines(r.stderr)) <= 2, r.stderr
    nothing_synced(pair)


# ======================================================================================
# Precedence: defaults < config file < environment < command line
# ======================================================================================

PRECEDENCE = [
    # (mode, file value, env value, cli value, winner)
    ("conf", "fromfile", None, None, "fromfile"),
    ("conf", "fromfile", "fromenv", None, "fromenv"),
    ("conf", "fromfile", "fromenv", "fromcli", "fromcli"),
    ("conf", "fromfile", None, "fromcli", "fromcli"),
    ("quick", None, "fromenv", None, "fromenv"),
    ("quick", None, "fromenv", "fromcli", "fromcli"),
]


@pytest.mark.parametrize("mode,file_v,env_v,cli_v,winner", PRECEDENCE)
def test_precedence_instance_id(pair, mode, file_v, env_v, cli_v, winner):
    simple_tree(pair)
    env = {"INSTANCE_ID": env_v} if env_v else {}
    args = ["--instance-id=%s" % cli_v] if cli_v else []
    if mode == "conf":
        conf = pair.write_conf(keys={"INSTANCE_ID": file_v})
        pair.run_conf(conf, *args, env=env, expect=0)
    else:
        pair.run(*args, env=env, expect=0)
    assert_simple_synced(pair)
    names = pair.state_files()
    assert any(winner in n for n in names), names
    for loser in {"fromfile", "fromenv", "fromcli", "quicksync_task"} - {winner}:
        assert not any(loser in n for n in names), (loser, names)
    log = pair.logfile.read_text(errors="replace")
    assert winner in log


@pytest.mark.parametrize("file_v,env_v,soft", [("no", "yes", True), ("yes", "no", False),
                                               ("no", None, False), ("false", "true", True),
                                               (None, "no", False)])
def test_precedence_env_over_config_for_settings(pair, file_v, env_v, soft):
    conf = pair.write_conf(keys={"SOFT_DELETE": file_v})
    env = {"SOFT_DELETE": env_v} if env_v else {}
    build(pair.initiator, {"a": "a", "b": "b"})
    pair.run_conf(conf, env=env, expect=0)
    remove(pair.initiator, "b")
    pair.run_conf(conf, env=env, expect=0)
    assert not (pair.target / "b").exists()
    assert dir_files(pair.deleted("target")) == (["b"] if soft else [])


@pytest.mark.parametrize("value,soft", [("yes", True), ("true", True), ("no", False),
                                        ("false", False)])
@pytest.mark.parametrize("form", ["env", "conf"])
def test_boolean_spellings(pair, form, value, soft):
    build(pair.initiator, {"a": "a", "b": "b"})
    if form == "env":
        def run():
            pair.run(env={"SOFT_DELETE": value}, expect=0)
    else:
        conf = pair.write_conf(lines=["SOFT_DELETE=%s" % value])

        def run():
            pair.run_conf(conf, expect=0)
    run()
    remove(pair.initiator, "b")
    run()
    assert not (pair.target / "b").exists()
    assert dir_files(pair.deleted("target")) == (["b"] if soft else [])


def test_quicksync_cli_beats_env_for_paths(pair, tmp_path):
    simple_tree(pair)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    env = {"INITIATOR_SYNC_DIR": str(decoy), "TARGET_SYNC_DIR": str(decoy)}
    pair.run(env=env, expect=0)
    assert_simple_synced(pair)
    assert os.listdir(str(decoy)) == []


# ======================================================================================
# The example config
# ======================================================================================

def test_sync_conf_example_runs(pair):
    src = REPO / "sync.conf"
    assert src.exists(), "sync.conf is missing at the repository root"
    # A user fills in the job's name and its two replicas; everything else keeps its default.
    keys = dict(pair.conf_keys(), INSTANCE_ID="example")
    lines = src.read_text().splitlines()
    seen = set()
    out = []
    for line in lines:
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=", line)
        if m and m.group(1) in keys:
            out.append('%s="%s"' % (m.group(1), keys[m.group(1)]))
            seen.add(m.group(1))
        else:
            out.append(line)
    assert {"INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR"} <= seen, "sync.conf lacks the replica keys"
    out += ['%s="%s"' % (k, v) for k, v in keys.items() if k not in seen]
    conf = pair.base / "conf" / "sync.conf"
    conf.parent.mkdir()
    conf.write_text("\n".join(out) + "\n")
    simple_tree(pair)
    r = pair.run_conf(conf, expect=0)
    no_traceback(r)
    assert_simple_synced(pair)


# ======================================================================================
# Log file and output switches
# ======================================================================================

def test_logfile_gets_messages_and_is_private(pair):
    simple_tree(pair)
    r = pair.run(expect=0)
    log = pair.logfile
    assert log.exists()
    assert stat.S_IMODE(os.stat(str(log)).st_mode) == 0o600, oct(os.stat(str(log)).st_mode)
    text = log.read_text(errors="replace")
    msgs = [strip_prefix(l).strip() for l in nonempty_lines(r.stdout + r.stderr)]
    msgs = [m for m in msgs if len(m) > 5]
    assert msgs, "a run printed nothing"
    assert any(m in text for m in msgs), "screen messages are not in the log:\n" + text


def test_silent(pair):
    simple_tree(pair)
    r = pair.run("--silent", expect=0)
    assert r.stdout == "" and r.stderr == ""
    assert_simple_synced(pair)
    assert pair.logfile.exists() and pair.logfile.read_text().strip()


def test_silent_on_error(pair):
    simple_tree(pair)
    r = pair.run("--silent", target_spec=pair.spec_for(pair.base / "missing"), expect=1)
    assert r.stdout == "" and r.stderr == ""
    assert pair.logfile.read_text().strip()


def test_errors_only(pair_factory):
    a, b = pair_factory(), pair_factory()
    simple_tree(a)
    simple_tree(b)
    normal = a.run(expect=0)
    quiet = b.run("--errors-only", expect=0)
    assert_simple_synced(b)
    assert len(nonempty_lines(quiet.stdout)) < len(nonempty_lines(normal.stdout)), \
        (normal.stdout, quiet.stdout)
    bad = b.run("--errors-only", target_spec=b.spec_for(b.base / "missing"), expect=1)
    assert nonempty_lines(bad.stderr), "errors must still be shown with --errors-only"


def test_no_prefix(pair_factory):
    a, b = pair_factory(), pair_factory()
    simple_tree(a)
    simple_tree(b)
    normal = a.run(expect=0)
    assert any(PREFIX_RE.match(l) for l in normal.stdout.splitlines()), normal.stdout
    bare = b.run("--no-prefix", expect=0)
    assert nonempty_lines(bare.stdout)
    assert not PREFIX_RE.search(bare.stdout + bare.stderr), bare.output


def test_verbose_prints_more(pair_factory):
    a, b = pair_factory(), pair_factory()
    simple_tree(a)
    simple_tree(b)
    normal = a.run(expect=0)
    verbose = b.run("--verbose", expect=0)
    assert len(nonempty_lines(verbose.stdout)) > len(nonempty_lines(normal.stdout)), \
        (normal.stdout, verbose.stdout)
