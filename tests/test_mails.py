"""Alert mails and the conflict list, against a real SMTP server on loopback (aiosmtpd):
plain SMTP, STARTTLS and implicit TLS with a throwaway CA made by openssl (given to
osync.py through the standard SSL_CERT_FILE variable), a dead server, the local sendmail (msmtp) and mutt,
the mails at the soft and hard time limits, and --log-conflicts / --alert-conflicts."""

import email
import email.policy
import gzip
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import T0, Pair, WORKDIR, free_port, need, put, this_and_oldest_python

try:
    import aiosmtpd.controller as aiosmtpd_controller
    from aiosmtpd.smtp import AuthResult
except ImportError:
    aiosmtpd_controller = None

# The implicit-TLS server takes AUTH without knowing its socket is encrypted (see smtp).
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

RECIPIENTS = ["ops@example.test", "oncall@example.test"]
SENDER = "osync@example.test"
PASSWORD = "Pa55-w0rd-never-shown"
USER = "mailer"
# A warning in every run: more free space asked for than any disk has.
WARN_ENV = {"MINIMUM_SPACE": str(2 ** 50)}


# --------------------------------------------------------------------------------------
# A throwaway CA and an SMTP server
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    if not shutil.which("openssl"):
        need("openssl is not installed: tests/run installs it")
    d = tmp_path_factory.mktemp("ca")

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=str(d), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=osync test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return d


class Inbox:
    """What the SMTP server received: envelopes (sender, recipients, message) and logins."""

    def __init__(self):
        self.mails = []
        self.logins = []

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), message, envelope.content))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        login = auth_data.login.decode()
        password = auth_data.password.decode()
        self.logins.append((login, password))
        return AuthResult(success=(login, password) == (USER, PASSWORD))

    def wait(self, count, timeout=10):
        deadline = time.time() + timeout
        while len(self.mails) < count and time.time() < deadline:
            time.sleep(0.05)
        return self.mails

    def subjects(self):
        return [str(message["Subject"]) for _, _, message, _ in self.mails]


@pytest.fixture
def smtp(ca):
    """smtp(mode, auth=False) starts a server (mode plain, tls or ssl) and returns
    (inbox, port)."""
    if aiosmtpd_controller is None:
        need("aiosmtpd is not installed: tests/run installs it (pip install aiosmtpd)")
    started = []

    def start(mode="plain", auth=False):
        inbox = Inbox()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(ca / "server.pem"), str(ca / "server.key"))
        options = {}
        if mode == "tls":
            options.update(tls_context=context, require_starttls=True)
        if auth:
            # With implicit TLS aiosmtpd cannot tell that the socket is encrypted: it would
            # refuse AUTH if it required TLS for it.
            options.update(authenticator=inbox.authenticate, auth_required=True, auth_require_tls=mode == "tls")
        port = free_port()
        controller = aiosmtpd_controller.Controller(
            inbox, hostname="127.0.0.1", port=port, ssl_context=context if mode == "ssl" else None,
            server_hostname="localhost", **options)
        controller.start()
        started.append(controller)
        return inbox, port
    yield start
    for controller in started:
        controller.stop()


def mail_env(port, encryption="none", ca=None, **extra):
    env = {"DESTINATION_MAILS": " ".join(RECIPIENTS), "SENDER_MAIL": SENDER, "SMTP_SERVER": "127.0.0.1",
           "SMTP_PORT": str(port), "SMTP_ENCRYPTION": encryption}
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca / "ca.pem")
        env["SSL_CERT_DIR"] = str(ca)
    env.update(extra)
    return env


def parts(message):
    """(body text, [(attachment name, bytes)])"""
    if not message.is_multipart():
        return message.get_content(), []
    body, attachments = None, []
    for part in message.iter_parts():
        if part.get_content_disposition() == "attachment":
            attachments.append((part.get_filename(), part.get_payload(decode=True)))
        else:
            body = part.get_content()
    return body, attachments


# --------------------------------------------------------------------------------------
# Alert mails
# --------------------------------------------------------------------------------------

def test_warning_run_mails_its_own_log_lines_to_every_recipient(tmp_path, smtp):
    """A run with a warning sends one mail through plain SMTP to both recipients: the
    subject names the INSTANCE_ID, the body holds this run's log lines (not the earlier
    run's), and the whole run's log is attached gzip-compressed."""
    inbox, port = smtp("plain")
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "a", "a")
    pair.run(expect=2, env=WARN_ENV)         # an earlier run, in the same log file
    put(pair.initiator, "b", "b")
    r = pair.run(expect=2, env=dict(WARN_ENV, **mail_env(port)), instance_id="nightly")
    assert (pair.target / "b").read_text() == "b"
    mails = inbox.wait(1)
    assert len(mails) == 1, r.output
    sender, recipients, message, raw = mails[0]
    assert sender == SENDER and recipients == RECIPIENTS
    assert str(message["Subject"]) == "Finished run - Warning alert for nightly"
    assert str(message["To"]) == ", ".join(RECIPIENTS)
    body, attachments = parts(message)
    assert "instance nightly" in body and "finished with warnings" in body
    assert "There is not enough free space" in body
    assert body.count("launched as") == 1, body          # only this run's lines
    assert "PID %s" % r.stdout.split("(PID ")[1].split(")")[0] in body
    assert [name for name, _ in attachments] == ["osync.nightly.log.gz"]
    log = gzip.decompress(attachments[0][1]).decode()
    assert log.count("launched as") == 1 and "There is not enough free space" in log
    assert "Sent the mail [Finished run - Warning alert for nightly]" in pair.logfile.read_text()


def test_body_holds_at_most_the_last_1000_lines(tmp_path, smtp):
    inbox, port = smtp("plain")
    pair = Pair(tmp_path / "p")
    for number in range(1200):
        put(pair.initiator, "f%04d" % number, "x")
    pair.run("--verbose", expect=2, env=dict(WARN_ENV, **mail_env(port)))
    _, _, message, _ = inbox.wait(1)[0]
    body, attachments = parts(message)
    tail = body.split("Last 1000 lines of this run's log:\n", 1)[1].splitlines()
    assert len(tail) == 1000
    log = gzip.decompress(attachments[0][1]).decode().splitlines()
    assert len(log) > 1200 and log[-1000:] == tail


def test_clean_run_mails_only_with_always_send_mails(tmp_path, smtp):
    """Config mode: no mail after a clean run, "Finished run - Alert for ID" with
    ALWAYS_SEND_MAILS; the exit code stays 0."""
    inbox, port = smtp("plain")
    pair = Pair(tmp_path / "p")
    conf = pair.write_conf(keys=mail_env(port))
    pair.run_conf(conf, expect=0)
    time.sleep(0.5)
    assert inbox.mails == []
    conf = pair.write_conf(keys=dict(mail_env(port), ALWAYS_SEND_MAILS="yes"))
    pair.run_conf(conf, expect=0)
    assert inbox.wait(1) and inbox.subjects() == ["Finished run - Alert for conftask"]


@pytest.mark.parametrize("python", this_and_oldest_python(), ids=lambda p: p[0])
@pytest.mark.parametrize("encryption", ["tls", "ssl"])
def test_encrypted_smtp_with_login_keeps_the_password_secret(tmp_path, smtp, ca, encryption, python):
    """STARTTLS and implicit TLS with SMTP_USER/SMTP_PASSWORD; the server's certificate is
    verified (here against the test CA named by SSL_CERT_FILE).  The password appears in
    neither the log, the screen nor the mail."""
    inbox, port = smtp(encryption, auth=True)
    pair = Pair(tmp_path / "p")
    pair.interpreter = python[1]
    r = pair.run(expect=2, env=dict(WARN_ENV, **mail_env(port, encryption, ca, SMTP_USER=USER,
                                                       SMTP_PASSWORD=PASSWORD)))
    assert inbox.wait(1), r.output + pair.logfile.read_text()
    assert inbox.logins == [(USER, PASSWORD)]
    _, recipients, message, raw = inbox.mails[0]
    assert recipients == RECIPIENTS
    assert str(message["Subject"]) == "Finished run - Warning alert for quicksync_task"
    body, attachments = parts(message)
    assert PASSWORD.encode() not in raw and PASSWORD not in gzip.decompress(attachments[0][1]).decode()
    assert PASSWORD not in r.output and PASSWORD not in pair.logfile.read_text()


@pytest.mark.parametrize("encryption", ["tls", "ssl"])
def test_untrusted_certificate_is_refused_with_one_warning(tmp_path, smtp, encryption):
    """Without the test CA the server's certificate cannot be verified: nothing is sent,
    the password never leaves, the run syncs and exits 2 (one warning)."""
    inbox, port = smtp(encryption, auth=True)
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "a", "a")
    pair.run(expect=2, env=dict(mail_env(port, encryption, SMTP_USER=USER, SMTP_PASSWORD=PASSWORD),
                                ALWAYS_SEND_MAILS="yes"))
    assert (pair.target / "a").read_text() == "a"
    assert inbox.mails == [] and inbox.logins == []
    warnings = [line for line in pair.logfile.read_text().splitlines() if "(WARN)" in line]
    assert len(warnings) == 1, warnings
    assert "Cannot send the mail [Finished run - Alert for quicksync_task]" in warnings[0]
    assert "certificate" in warnings[0] and "SSL_CERT_FILE" in warnings[0]


def test_dead_smtp_server_only_warns(tmp_path):
    """Nothing listens on SMTP_PORT: a run with an error still exits 1, a clean one 2; both
    sync, no traceback."""
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "a", "a")
    r = pair.run(expect=2, env=dict(mail_env(free_port()), ALWAYS_SEND_MAILS="yes"))
    assert (pair.target / "a").read_text() == "a"
    assert "Cannot send the mail [Finished run - Alert for quicksync_task]" in r.stderr
    assert "check SMTP_SERVER, SMTP_PORT and SMTP_ENCRYPTION" in r.stderr
    r = pair.run(expect=1, env=mail_env(free_port()), target_spec=str(tmp_path / "missing"))
    assert "Cannot send the mail [Finished run - Error alert for quicksync_task]" in r.stderr


def mailer_bin(tmp_path, name, program):
    """A PATH dir holding only `program` under `name` (and rsync), so that osync.py finds
    that local mailer first."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / name).symlink_to(program)
    return "%s:%s" % (tools, Path(shutil.which("rsync")).parent)


def test_local_sendmail_without_smtp_server(tmp_path, smtp):
    """No SMTP_SERVER: the local sendmail (msmtp, a real sendmail-compatible client, which
    hands the mail to the test server) gets the whole message, subject and attachment, and
    every recipient on its command line."""
    msmtp = shutil.which("msmtp") or need("msmtp is not installed: tests/run installs it")
    inbox, port = smtp()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".msmtprc").write_text("account default\nhost 127.0.0.1\nport %d\nfrom %s\n" % (port, SENDER))
    (home / ".msmtprc").chmod(0o600)
    pair = Pair(tmp_path / "p")
    env = dict(WARN_ENV, DESTINATION_MAILS=",".join(RECIPIENTS), SENDER_MAIL=SENDER, HOME=str(home),
               PATH=mailer_bin(tmp_path, "sendmail", msmtp))
    r = pair.run(expect=2, env=env)
    assert "Sent the mail [Finished run - Warning alert for quicksync_task]" in r.output, r.output
    sender, recipients, message, _ = inbox.wait(1)[0]
    assert sender == SENDER and recipients == RECIPIENTS
    assert str(message["Subject"]) == "Finished run - Warning alert for quicksync_task"
    body, attachments = parts(message)
    assert "There is not enough free space" in body
    assert "There is not enough free space" in gzip.decompress(attachments[0][1]).decode()


def test_local_mutt_without_smtp_server(tmp_path, smtp):
    """Without sendmail, mutt (configured by the user's muttrc to use the test server) gets
    the subject, the body and the compressed log as an attachment."""
    mutt = shutil.which("mutt") or need("mutt is not installed: tests/run installs it")
    if Path("/usr/sbin/sendmail").exists() or Path("/usr/lib/sendmail").exists():
        pytest.skip("a sendmail is installed on this host, and osync.py prefers it to mutt")
    inbox, port = smtp()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".muttrc").write_text('set smtp_url="smtp://127.0.0.1:%d/"\nset from="%s"\nset use_from=yes\n'
                                  'set copy=no\nset ssl_starttls=no\nset ssl_force_tls=no\n' % (port, SENDER))
    pair = Pair(tmp_path / "p")
    env = dict(WARN_ENV, DESTINATION_MAILS=" ".join(RECIPIENTS), HOME=str(home),
               PATH=mailer_bin(tmp_path, "mutt", mutt))
    r = pair.run(expect=2, env=env)
    assert "Sent the mail [Finished run - Warning alert for quicksync_task]" in r.output, r.output
    _, recipients, message, _ = inbox.wait(1)[0]
    assert recipients == RECIPIENTS
    assert str(message["Subject"]) == "Finished run - Warning alert for quicksync_task"
    body, attachments = parts(message)
    assert "There is not enough free space" in body
    name, data = attachments[0]
    assert name.endswith(".gz") and "There is not enough free space" in gzip.decompress(data).decode()


def test_no_mailer_at_all_is_one_warning(tmp_path):
    pair = Pair(tmp_path / "p")
    empty = tmp_path / "empty"
    empty.mkdir()
    rsync_dir = str(Path(shutil.which("rsync")).parent)
    path = "%s:%s" % (empty, rsync_dir)
    if any(shutil.which(name, path=path) for name in ("sendmail", "mutt", "mail")) or \
            Path("/usr/sbin/sendmail").exists() or Path("/usr/lib/sendmail").exists():
        pytest.skip("a local mailer is installed on this host")
    r = pair.run(expect=2, env={"DESTINATION_MAILS": RECIPIENTS[0], "ALWAYS_SEND_MAILS": "yes", "PATH": path})
    assert "SMTP_SERVER is not set and no local mailer (sendmail, mutt or mail) is installed" in r.stderr


def slow_rsync(tmp_path, seconds):
    script = tmp_path / "slow-rsync"
    script.write_text("#!/bin/sh\nsleep %s\nexec %s \"$@\"\n" % (seconds, shutil.which("rsync")))
    script.chmod(0o755)
    return str(script)


def test_currently_running_mail_at_the_soft_limit(tmp_path, smtp):
    """Past SOFT_MAX_EXEC_TIME a "Currently running - Warning alert" goes out while the
    run goes on; then the end-of-run mail."""
    inbox, port = smtp("plain")
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "a", "a")
    pair.run(expect=2, env=dict(mail_env(port), SOFT_MAX_EXEC_TIME="1",
                                RSYNC_EXECUTABLE=slow_rsync(tmp_path, 3)))
    assert (pair.target / "a").read_text() == "a"
    inbox.wait(2)
    assert inbox.subjects() == ["Currently running - Warning alert for quicksync_task",
                                "Finished run - Warning alert for quicksync_task"]
    running, _ = parts(inbox.mails[0][2])
    assert "is still running" in running and "Max soft execution time [1] exceeded" in running


def test_currently_running_mail_at_the_hard_limit(tmp_path, smtp):
    inbox, port = smtp("plain")
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "a", "a")
    pair.run(expect=1, env=dict(mail_env(port), HARD_MAX_EXEC_TIME="2", SOFT_MAX_EXEC_TIME="0",
                                RSYNC_EXECUTABLE=slow_rsync(tmp_path, 6)))
    inbox.wait(2)
    assert inbox.subjects() == ["Currently running - Error alert for quicksync_task",
                                "Finished run - Error alert for quicksync_task"]
    finished, _ = parts(inbox.mails[1][2])
    assert "Max hard execution time [2] exceeded" in finished


# --------------------------------------------------------------------------------------
# The conflict list
# --------------------------------------------------------------------------------------

def make_conflict(pair, name):
    put(pair.initiator, name, "0")
    put(pair.initiator, "quiet", "q")
    pair.run(expect=0)
    put(pair.initiator, name, "initiator edit", T0 + 10)
    put(pair.target, name, "target's longer edit", T0 + 20)


def test_log_conflicts_lists_both_versions_the_winner_and_the_backup(pair):
    name = "caf\u00e9 report.txt"
    make_conflict(pair, name)
    r = pair.run("--log-conflicts", "--no-prefix", expect=0)
    initiator, target = str(pair.initiator), str(pair.target)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(T0 + 10))
    later = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(T0 + 20))
    expected = ["%s/%s << >> %s/%s" % (initiator, name, target, name),
                "    initiator: 14 bytes, modified %s; target: 20 bytes, modified %s" % (stamp, later),
                "    the target's version won (newer modification time); the initiator's version was kept in "
                "%s/%s/backup/%s" % (initiator, WORKDIR, name)]
    state = pair.initiator / WORKDIR / "state" / "conflicts-quicksync_task"
    assert state.read_text().splitlines() == expected
    lines = r.stdout.splitlines()
    start = lines.index("File conflicts: INITIATOR << >> TARGET")
    assert lines[start + 1:start + 5] == expected + ["There are 1 conflicting files."]
    assert (pair.initiator / WORKDIR / "backup" / name).read_text() == "initiator edit"
    log = pair.logfile.read_text()
    assert "\n".join(expected) in log


def test_conflict_list_says_prevalence_and_no_backup(tmp_path):
    pair = Pair(tmp_path / "p")
    put(pair.initiator, "same", "0")
    pair.run(expect=0)
    put(pair.initiator, "same", "from initiator", T0 + 30)
    put(pair.target, "same", "from target", T0 + 30)
    pair.run("--log-conflicts", expect=0, env={"CONFLICT_PREVALANCE": "target", "CONFLICT_BACKUP": "no"})
    lines = (pair.initiator / WORKDIR / "state" / "conflicts-quicksync_task").read_text().splitlines()
    assert lines[2] == ("    the target's version won (same modification time, CONFLICT_PREVALANCE=target); "
                        "the initiator's version was replaced without a backup (CONFLICT_BACKUP=no)")


def test_dry_run_logs_the_conflicts_a_real_run_would_have(tmp_path):
    pair = Pair(tmp_path / "p")
    make_conflict(pair, "doc")
    state = pair.initiator / WORKDIR / "state" / "conflicts-quicksync_task"
    r = pair.run("--log-conflicts", "--dry", expect=0)
    assert "    the target's version wins (newer modification time); the initiator's version would be kept in " \
        "%s/%s/backup/doc" % (pair.initiator, WORKDIR) in r.stdout
    assert not state.exists()


def test_alert_conflicts_mails_the_list(pair, smtp):
    """--alert-conflicts: a mail "Conflictual files found in [ID]" with the list, in
    MAIL_BODY_CHARSET, without attachment; a clean run sends no other mail."""
    inbox, port = smtp("plain")
    name = "caf\u00e9"
    make_conflict(pair, name)
    pair.run("--alert-conflicts", expect=0, env=mail_env(port, MAIL_BODY_CHARSET="ISO-8859-1"))
    inbox.wait(1)
    assert inbox.subjects() == ["Conflictual files found in [quicksync_task]"]
    _, recipients, message, raw = inbox.mails[0]
    assert recipients == RECIPIENTS
    assert message.get_content_charset() == "iso-8859-1"
    body, attachments = parts(message)
    assert attachments == []
    assert "%s/%s << >> %s/%s" % (pair.initiator, name, pair.target, name) in body
    assert "the target's version won (newer modification time)" in body
    time.sleep(0.5)
    assert len(inbox.mails) == 1


def test_attached_log_is_bounded_and_says_where_the_rest_is(monkeypatch):
    """A run that logs without end (a debug run over a huge tree) does not fill /tmp with
    the attachment's spool: past the limit only the body's last lines keep moving."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import osync
    monkeypatch.setattr(osync, "MAIL_ATTACHED_LOG_LIMIT", 10000)
    out = osync.Output()
    collector = osync.RunLogCollector(out)
    out.logger.addHandler(collector)
    for number in range(2000):
        out.logger.log(osync.NOTICE, "line %04d %s" % (number, "x" * 80))
    attached = gzip.decompress(collector.compressed()).decode()
    assert 10000 <= len(attached) < 10000 + 300
    assert attached.rstrip().endswith("the rest of this run's log is in the log file, not in this attachment.")
    assert "line 0000" in attached and "line 1999" not in attached
    tail = collector.tail()
    assert len(tail) == osync.MAIL_BODY_LINES and "line 1999" in tail[-1]
