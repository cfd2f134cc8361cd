"""The seams of osync.py that other code relies on: the agent serves exactly the
operations of its table, importing osync.py leaves the logging module as it was, and the
names the work dir and the state dir are made of come from one place."""
import io
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import osync  # noqa: E402


def serve(requests):
    """Run serve_agent over a stream of requests; return the replies."""
    reader = io.BytesIO()
    for request in requests:
        osync.send_message(reader, request)
    reader.seek(0)
    writer = io.BytesIO()
    osync.serve_agent(reader, writer)
    writer.seek(0)
    replies = []
    while True:
        reply = osync.read_message(writer)
        if reply is None:
            return replies
        replies.append(reply)


@pytest.mark.parametrize("op", ["_check_state_dir", "__init__", "_keep_copy", "check_custom_state_dir",
                                "read_children", "work_dir_parts", "close", "nonsense"])
def test_agent_refuses_every_operation_outside_its_table(tmp_path, op):
    """A request names a method: only those in AGENT_OPERATIONS may run, whatever else
    LocalReplica has (a private helper called with chosen arguments could write anywhere)."""
    replies = serve([{"op": "open", "args": ["target", str(tmp_path), ""]},
                     {"op": op, "args": []}])
    assert "ok" in replies[0]
    assert replies[1] == {"error": "unknown request %r" % op}


def test_every_operation_of_the_table_is_served_and_reached_by_the_remote_replica():
    for op, (form, _) in osync.AGENT_OPERATIONS.items():
        assert callable(getattr(osync.LocalReplica, op)), op
        assert form in (osync.CALL, osync.CHUNKED, osync.STREAM)
        if form != osync.STREAM:
            remote = osync.RemoteReplica.__new__(osync.RemoteReplica)
            assert callable(getattr(remote, op)), op
    remote = osync.RemoteReplica.__new__(osync.RemoteReplica)
    with pytest.raises(AttributeError):
        remote._check_state_dir


def test_a_streamed_operation_answers_in_batches_then_the_end(tmp_path):
    for number in range(2500):
        (tmp_path / ("f%04d" % number)).write_text("x")
    replies = serve([{"op": "open", "args": ["target", str(tmp_path), ""]},
                     {"op": "scan", "args": [[], {}]}])
    batches = replies[1:-1]
    assert replies[-1] == {"end": True}
    assert [len(batch["batch"]) for batch in batches] == [1000, 1000, 500]


def test_importing_osync_leaves_the_logging_level_names_alone():
    code = ("import logging, sys; sys.path.insert(0, %r); import osync; "
            "print(logging.getLevelName(15), logging.getLevelName(logging.WARNING), logging.getLevelName(25))" % ROOT)
    output = subprocess.check_output([sys.executable, "-c", code]).decode().split()
    assert output == ["Level", "15", "WARNING", "Level", "25"]


def test_one_stderr_flattener_shows_no_terminal_escapes_and_keeps_the_end():
    text = "first line\n\n  \x1b[31mred\x1b[0m line  \nlast: the reason\n"
    flat = osync.one_line(text)
    assert "\x1b" not in flat and "\n" not in flat
    assert flat.endswith("last: the reason")
    assert osync.one_line("x" * 5000 + "\nthe reason", 100).endswith("the reason")


def test_entry_fields_are_one_list():
    assert osync.Entry._fields == tuple(name for name, _ in osync.ENTRY_FIELDS)
    entry = osync.Entry("a", "f")
    assert entry.size == 0 and entry.error == ""
    assert osync.entry_problem(list(entry)) is None
    assert osync.entry_problem(list(entry)[:-1]) is not None


def test_work_dir_layout_is_the_same_for_both_replica_classes(tmp_path):
    local = osync.LocalReplica("initiator", str(tmp_path))
    remote = osync.RemoteReplica.__new__(osync.RemoteReplica)
    remote.work_dir = local.work_dir
    for method in ("temp_dir", "partial_dir"):
        assert getattr(local, method)() == getattr(remote, method)()
    assert local.transfer_backup_dir("S") == remote.transfer_backup_dir("S") == \
        os.path.join(str(tmp_path), ".osync_workdir", "backup", ".transfer-S")
    assert local.state_dir == os.path.join(str(tmp_path), ".osync_workdir", "state")
    assert osync.state_dir_file("state", "job") == "osync.py-state-job"
