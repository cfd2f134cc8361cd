"""Run reports, the journal's line format, secrets kept out of logs, and the progress line.

After every run, dry and refused runs too, osync.py leaves a JSON report of it in the
initiator's state dir (and, with PROMETHEUS_TEXTFILE, the same figures for node_exporter);
under systemd each screen line carries its syslog priority instead of a time prefix; no
password or token reaches a log line or a report; on a terminal a progress line shows
what the run is doing, and nowhere else.
"""

import json
import os
import pty
import re
import subprocess

import pytest

from conftest import (WORKDIR, build, chattr_supported, check_no_internal_error, describe, need, osync_command,
                      remove)

INSTANCE = "reported"


def report_of(pair):
    path = pair.initiator / WORKDIR / "state" / ("run-report-%s.json" % INSTANCE)
    assert path.is_file(), "no run report at %s" % path
    return json.loads(path.read_text())


def run(pair, *args, env=None, expect=None):
    return pair.run(*args, env=env, expect=expect, instance_id=INSTANCE)


def test_report_of_a_normal_run(pair):
    """The report's figures follow what the run did: copies and their bytes, then a
    deletion and a conflict on the next run; the times frame the run."""
    build(pair.initiator, {"a": "1" * 1000, "dir/b": "22", "c": "333", "gone": "g"})
    first = run(pair, expect=0)
    report = report_of(pair)
    assert report["exit_code"] == 0 and report["result"] == "ok", (report, describe(first))
    assert report["dry_run"] is False and report["refused_by"] is None
    assert report["transfers"] == 5          # a, dir, dir/b, c, gone
    assert report["bytes"] == 1000 + 2 + 3 + 1
    assert report["deletions"] == 0 and report["conflicts"] == 0 and report["failed_paths"] == 0
    assert report["counts"]["updated_target"] == 5 and report["counts"]["updated_initiator"] == 0
    assert report["instance_id"] == INSTANCE
    assert report["start_timestamp"] <= report["end_timestamp"]
    assert report["error_lines"] == []
    first_end = report["end_timestamp"]

    remove(pair.initiator, "gone")
    build(pair.initiator, {"c": "initiator's c"}, mtime=2000000000)
    build(pair.target, {"c": "target's newer c"}, mtime=2000000100)
    run(pair, expect=0)
    report = report_of(pair)
    assert report["deletions"] == 1 and report["counts"]["deleted_target"] == 1, report
    assert report["conflicts"] == 1 and report["transfers"] == 1, report
    assert report["bytes"] == len("target's newer c")
    assert report["start_timestamp"] >= first_end, "the report is not the new run's"


def test_report_of_a_dry_run(pair):
    """A dry run's report says what a real run would do and that it was dry; the state
    and the replicas stay as they were."""
    build(pair.initiator, {"a": "a"})
    run(pair, expect=0)
    build(pair.initiator, {"new": "12345"})
    state = pair.initiator / WORKDIR / "state" / ("osync.py-state-%s" % INSTANCE)
    before = state.read_bytes()
    run(pair, "--dry", expect=0)
    report = report_of(pair)
    assert report["dry_run"] is True and report["exit_code"] == 0, report
    assert report["transfers"] == 1 and report["bytes"] == 5, report
    assert state.read_bytes() == before
    assert not (pair.target / "new").exists()


def test_report_of_a_refused_run(pair):
    """A guard's refusal is reported with the guard's name and exit code 1."""
    build(pair.initiator, {"a": "a", "b": "b"})
    run(pair, expect=0)
    subprocess.run(["rm", "-rf", str(pair.target / WORKDIR)], check=True)   # "unmounted"
    refused = run(pair, expect=1)
    report = report_of(pair)
    assert report["result"] == "refused" and report["refused_by"] == "missing-work-dir", (report,
                                                                                          describe(refused))
    assert report["exit_code"] == 1 and report["transfers"] == 0
    assert any("nothing was changed" in line for line in report["error_lines"]), report
    assert not (pair.target / WORKDIR).exists(), "the refused run wrote into the target"


def test_report_of_a_failing_run_names_the_failed_path(pair):
    """A deletion that fails is counted and named, with its reason, and the exit code is 1."""
    if not chattr_supported(pair.target):
        need("chattr +i is not supported on this filesystem")
    build(pair.initiator, {"keep": "k", "stuck": "s"})
    run(pair, expect=0)
    remove(pair.initiator, "stuck")
    victim = pair.target / "stuck"
    subprocess.run(["chattr", "+i", str(victim)], check=True)
    try:
        run(pair, expect=1)
    finally:
        subprocess.run(["chattr", "-i", str(victim)], check=True)
    report = report_of(pair)
    assert report["exit_code"] == 1 and report["result"] == "errors", report
    assert report["failed_paths"] == 1 and report["deletions"] == 0, report
    assert any("stuck" in line and "delete" in line.lower() for line in report["error_lines"]), report


def test_prometheus_textfile(pair, tmp_path):
    """PROMETHEUS_TEXTFILE gets the report's figures in the textfile-collector format,
    replaced atomically on each real run and left alone by a dry run."""
    (tmp_path / "textfiles").mkdir()
    textfile = tmp_path / "textfiles" / "osync.prom"
    build(pair.initiator, {"a": "abc", "b": "de"})
    env = {"PROMETHEUS_TEXTFILE": str(textfile)}
    run(pair, env=env, expect=0)
    text = textfile.read_text()
    label = '{instance_id="%s"}' % INSTANCE
    assert "osync_last_run_exit_code%s 0\n" % label in text, text
    assert "osync_last_run_transfers%s 2\n" % label in text, text
    assert "osync_last_run_transferred_bytes%s 5\n" % label in text, text
    assert "# TYPE osync_last_run_failed_paths gauge" in text
    assert textfile.stat().st_mode & 0o044 == 0o044, "node_exporter, another user, cannot read it"
    assert [name for name in os.listdir(str(textfile.parent))] == ["osync.prom"], "a temp file was left behind"
    build(pair.initiator, {"c": "c"})
    run(pair, "--dry", env=env, expect=0)
    assert textfile.read_text() == text, "a dry run replaced the textfile"


# -- the journal and secrets ---------------------------------------------------------------

def test_lines_under_systemd_journal_carry_priorities(pair, tmp_path):
    """With stdout and stderr on the stream JOURNAL_STREAM names, every screen line starts
    with its syslog priority (<4> for a warning) and has no time prefix of its own; the
    log file keeps its format."""
    build(pair.initiator, {"a": "a"})
    screen = tmp_path / "journal"
    with open(str(screen), "wb") as handle:
        info = os.fstat(handle.fileno())
        env = pair.env(dict(getattr(pair, "quick_env", {}), JOURNAL_STREAM="%d:%d" % (info.st_dev, info.st_ino),
                            MINIMUM_SPACE="2000000000"))   # more than any disk: one warning
        argv = pair.quick_args(instance_id=INSTANCE)
        process = subprocess.run(osync_command(argv, pair.interpreter), env=env, cwd=str(pair.cwd),
                                 stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, timeout=120)
    lines = screen.read_text(errors="replace").splitlines()
    assert process.returncode == 2, lines
    assert lines and all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines
    assert not any("TIME:" in line for line in lines), lines
    assert any(line.startswith("<4>") and "free space" in line for line in lines), lines
    assert any(line.startswith("<6>") and "finished" in line for line in lines), lines
    log = pair.logfile.read_text()
    assert "TIME: " in log and "<6>" not in log

    # JOURNAL_STREAM inherited by a run whose output goes elsewhere (a pipe): not the journal.
    piped = run(pair, env={"JOURNAL_STREAM": "%d:%d" % (info.st_dev, info.st_ino)}, expect=0)
    assert "TIME: " in piped.stdout and "<6>" not in piped.stdout, describe(piped)


def test_secrets_never_reach_log_or_report(pair):
    """The remote token (passed to the remote command line, which --verbose/_DEBUG logs)
    and the SMTP credentials never appear in the log, on the screen or in the report."""
    if pair.kind in ("local", "local-oldest"):
        pytest.skip("the token only travels to a remote target")
    build(pair.initiator, {"a": "a"})
    token = "tok-Secret-4711"
    secrets = [token, "smtp-pass-0815", "smtp-user-9"]
    env = {"_REMOTE_TOKEN": token, "SMTP_PASSWORD": secrets[1], "SMTP_USER": secrets[2], "_DEBUG": "yes"}
    result = run(pair, "--verbose", env=env, expect=0)
    log = pair.logfile.read_text()
    report_text = (pair.initiator / WORKDIR / "state" / ("run-report-%s.json" % INSTANCE)).read_text()
    assert "rsync" in log and "_REMOTE_TOKEN=[hidden]" in log, "the debug lines are not there to check"
    for secret in secrets:
        assert secret not in log and secret not in result.output and secret not in report_text, secret


# -- the progress line -----------------------------------------------------------------------

def run_on_terminal(pair, *args):
    """Run osync.py with stdout and stderr on a pseudo-terminal; returns (code, bytes shown)."""
    master, slave = pty.openpty()
    argv = pair.quick_args(instance_id=INSTANCE) + list(args)
    env = pair.env(dict(getattr(pair, "quick_env", {}), TERM="xterm"))
    process = subprocess.Popen(osync_command(argv, pair.interpreter), env=env, cwd=str(pair.cwd),
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:   # EIO: the terminal's other end closed
            break
        if not data:
            break
        shown += data
    os.close(master)
    return process.wait(timeout=120), shown


def test_progress_line_on_a_terminal_only(pair):
    """On a terminal a run shows one updating line (carriage return, erase to the end of
    the line) with rsync's figures; not with --silent, not through a pipe, never in the
    log."""
    build(pair.initiator, {"big": "x" * 3000000, "small": "y"})
    code, shown = run_on_terminal(pair)
    text = shown.decode("utf-8", "replace")
    assert code == 0, text
    assert "Traceback" not in text
    assert re.search(r"\rCopying to the target: \d+%, [\d,]+ bytes, [^\r]*\x1b\[K", text), text
    assert re.search(r"\rComparing the replicas: \d+ paths", text), text
    assert "osync.py finished." in text
    log = pair.logfile.read_text()
    assert "Copying to the" not in log and "Comparing the replicas" not in log and "\x1b" not in log

    build(pair.initiator, {"more": "z" * 100000})
    code, shown = run_on_terminal(pair, "--silent")
    assert code == 0 and shown == b"", shown

    build(pair.initiator, {"again": "w" * 100000})
    piped = run(pair, expect=0)
    check_no_internal_error(piped)
    assert "Copying to the" not in piped.output and "\r" not in piped.output and "\x1b[K" not in piped.output
    assert (pair.target / "again").exists()
