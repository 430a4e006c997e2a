"""The notices outbox delivered (`callguard.notify`), against real servers on loopback: an
aiosmtpd SMTP server (plain, STARTTLS with AUTH, implicit TLS) and an HTTP server that
checks the webhook's signature the way a receiver would. Time is passed in; no test
sleeps out a backoff."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from callguard import notify
from callguard.books.models import NOTICE_TYPES, Account, Notification
from callguard.books.notices import add_notice
from callguard.service import App, create_account

from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
P = "41441234567"  # prepaid, with an address
Q = "4144555"  # postpaid, with an address
N = "41449999"  # prepaid, no address
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "whsec-s3cr3t"
USER, PASSWORD = "relay@example.net", "p@ss:w/rd%"  # URL-encoded in the SMTP URL
SMTP_AUTH = "relay%40example.net:p%40ss%3Aw%2Frd%25"
CHF = 1_000_000


# -- the servers ---------------------------------------------------------------------------

class Mailbox:
    """An aiosmtpd handler that keeps what it accepted; it can refuse recipients, and hold
    a message in DATA until released (then answering 451: not taken)."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.held: list[email.message.EmailMessage] = []
        self.refuse: str | None = None
        self.hold: threading.Event | None = None
        self.in_data = threading.Event()
        self.delay = 0.0
        self.close_after = False  # hang up after each message taken
        self.sessions = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        hold = self.hold
        if hold is not None:
            self.held.append(message)
            self.in_data.set()
            while not hold.is_set():
                await asyncio.sleep(0.01)
            return "451 4.3.0 not taken, try again later"
        await asyncio.sleep(self.delay)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        tls = session.ssl or server.transport.get_extra_info("ssl_object")  # STARTTLS or not
        message["X-Over-TLS"] = "yes" if tls else "no"
        self.messages.append(message)
        if self.close_after:
            asyncio.get_running_loop().call_soon(server.transport.close)
        return "250 OK"


def authenticator(logins: list):
    def check(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=(auth_data.login.decode(), auth_data.password.decode())
                          == (USER, PASSWORD), handled=False)
    return check


@pytest.fixture
def smtp_server():
    """Start aiosmtpd servers on 127.0.0.1: smtp_server(**controller options) ->
    (mailbox, port). All stop at the end of the test."""
    controllers = []

    def start(**options):
        mailbox = Mailbox()
        controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(),
                                server_hostname="localhost", **options)
        controller.start()
        controllers.append((controller, mailbox))
        return mailbox, controller.port

    yield start
    for controller, mailbox in controllers:
        if mailbox.hold is not None:
            mailbox.hold.set()
        controller.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl: `cryptography` is not installed)."""
    base = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(base / "key.pem"), "-out", str(base / "cert.pem")],
                   check=True, capture_output=True)
    return base / "cert.pem", base / "key.pem"


@pytest.fixture
def tls_context(tls_files):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, tls_files))
    return context


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1: checks the signature from the raw body and the
    timestamp as a receiver would, answers with the statuses queued in `answers` (then
    200), "hang" for no answer until the test ends."""

    daemon_threads = True

    def __init__(self, secret: str = SECRET):
        super().__init__(("127.0.0.1", 0), Hook)
        self.secret = secret
        self.answers: list = []
        self.requests: list[dict] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/callguard"

    def verified(self, secret: str, headers, body: bytes) -> bool:
        timestamp = headers.get("X-Callguard-Timestamp", "")
        expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                                        hashlib.sha256).hexdigest()
        return timestamp.isdigit() and hmac.compare_digest(
            headers.get("X-Callguard-Signature", ""), expected)


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Receiver = self.server
        server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                "valid": server.verified(server.secret, self.headers, body)})
        answer = server.answers.pop(0) if server.answers else 200
        if answer == "hang":
            server.release.wait(10)
            return
        self.send_response(answer)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


# -- the books -----------------------------------------------------------------------------

@pytest.fixture
def accounts(app):
    create_account(app, P, kind="prepaid", opening_balance=50 * CHF, email="anna@example.net")
    create_account(app, Q, kind="postpaid", credit_limit=300 * CHF, warn_at=200 * CHF,
                   email="billing@example.org")
    create_account(app, N, kind="prepaid", opening_balance=5 * CHF)
    return app


@pytest.fixture
def configured(app):
    """An App on the same books with changed settings: configured(smtp_url=...)."""
    apps = []

    def make(**changes) -> App:
        apps.append(App(replace(app.settings, mail_from="noc@callguard.example", **changes)))
        return apps[-1]

    yield make
    for other in apps:
        other.close()


def notice(app, key: str, account: str = P, type: str = "low_balance", **facts) -> str:
    if not facts and type == "low_balance":
        facts = {"balance": 9_500_000, "available": 9_500_000, "limit": 10 * CHF}
    with app.books.session.begin() as db:
        assert add_notice(db, key, db.get(Account, account), type, **facts)
    return key


def row(app, key: str) -> Notification:
    with app.books.session() as db:
        return db.query(Notification).filter_by(key=key).one()


def utc(at: datetime | None) -> datetime | None:
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def text_of(message) -> str:
    """The body's text with its lines joined (it is wrapped at 72)."""
    body = message.get_content()
    told = body.split("\n\nAccount:")[0]  # then the facts, one a line
    assert told and max(map(len, told.splitlines())) <= 72
    return " ".join(body.split())


def smtp_url(port: int, auth: str = "", scheme: str = "smtp", query: str = "") -> str:
    return f"{scheme}://{auth + '@' if auth else ''}127.0.0.1:{port}{query}"


# -- email -----------------------------------------------------------------------------------

def test_mail_goes_once_with_a_stable_message_id_in_the_accounts_words(
        accounts, configured, smtp_server, run):
    app = accounts
    key = notice(app, "low_balance:41441234567:1712345678901-0")
    assert notify.deliver_due(app, now=T0) == 0  # nothing configured: kept, not attempted
    assert row(app, key).attempts == 0
    mailbox, port = smtp_server()
    mail = configured(smtp_url=smtp_url(port), webhook_secret=SECRET)
    assert notify.deliver_due(mail, now=T0) == 1
    assert notify.deliver_due(mail, now=T0 + timedelta(hours=2)) == 0
    [message] = mailbox.messages
    assert message["Message-ID"] == notify.message_id(key) == \
        "<low_balance=3A41441234567=3A1712345678901-0@callguard>"
    assert (message["From"], message["To"], message["X-Envelope-To"], message["X-Over-TLS"]) \
        == ("noc@callguard.example", "anna@example.net", "anna@example.net", "no")
    assert message["Subject"] == "Low balance on account 41441234567: CHF 9.50 left"
    body = text_of(message)
    for said in ("Your account 41441234567 has CHF 9.50 of credit left, below your warning "
                  "level of CHF 10.00.", "Please top up soon", "CHF 0.00",
                  "Balance: CHF 9.50", "Warning level: CHF 10.00", key, " UTC"):
        assert said in body
    assert SECRET not in message.as_string() and "{" not in body
    done = row(app, key)
    assert (done.attempts, utc(done.sent_at), utc(done.mail_sent_at), done.next_attempt_at,
            done.last_error) == (1, T0, T0, None, None)


def test_mail_for_an_account_without_an_address_is_kept(accounts, configured, smtp_server,
                                                        receiver):
    app = accounts
    key = notice(app, "low_balance:41449999:1", account=N)
    mailbox, port = smtp_server()
    mail = configured(smtp_url=smtp_url(port))
    assert notify.deliver_due(mail, now=T0) == 0
    assert (row(app, key).attempts, mailbox.messages) == (0, [])
    assert [r["state"] for r in notify.notice_rows(mail)] == ["kept"]
    both = configured(smtp_url=smtp_url(port), webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(both, now=T0) == 1  # a channel for it now: the webhook
    assert (len(receiver.requests), mailbox.messages) == (1, [])


def test_recipient_refused_fails_at_once(accounts, configured, smtp_server):
    app = accounts
    key = notice(app, "exhausted:41441234567:1", type="exhausted", balance=0, available=0)
    mailbox, port = smtp_server()
    mailbox.refuse = "550 5.1.1 <anna@example.net>: mailbox unavailable"
    mail = configured(smtp_url=smtp_url(port))
    assert notify.deliver_due(mail, now=T0) == 0
    failed = row(app, key)
    assert utc(failed.failed_at) == T0 and failed.next_attempt_at is None
    assert failed.last_error == "mail: recipient refused: 550 5.1.1 <anna@example.net>: " \
                                "mailbox unavailable"
    mailbox.refuse = None
    assert notify.deliver_due(mail, now=T0 + timedelta(days=2)) == 0
    assert mailbox.messages == [] and row(app, key).attempts == 1


def test_starttls_with_credentials(accounts, configured, smtp_server, tls_context):
    app = accounts
    logins = []
    mailbox, port = smtp_server(tls_context=tls_context, require_starttls=True,
                                auth_required=True, auth_require_tls=True,
                                authenticator=authenticator(logins))
    key = notice(app, "credit_limit:4144555:1", account=Q, type="credit_limit",
                 outstanding=300 * CHF, available=0, limit=300 * CHF, warn_at=200 * CHF)
    # Verification is on unless the URL turns it off: a self-signed certificate fails.
    strict = configured(smtp_url=smtp_url(port, SMTP_AUTH, query="?starttls=1"))
    assert notify.deliver_due(strict, now=T0) == 0
    first = row(app, key)
    assert "CERTIFICATE_VERIFY_FAILED" in first.last_error and first.failed_at is None
    assert (mailbox.messages, logins) == ([], [])
    # A wrong password: said, retried, and the password in the URL is not in the error.
    wrong = configured(smtp_url=smtp_url(port, "relay%40example.net:n0t-it%2F",
                                         query="?starttls=1&verify=0"))
    assert notify.deliver_due(wrong, now=T0 + timedelta(seconds=30)) == 0
    second = row(app, key)
    assert second.last_error.startswith("mail: 535") and second.failed_at is None
    assert "n0t-it" not in second.last_error and set(logins) == {(USER, "n0t-it/")}
    lab = configured(smtp_url=smtp_url(port, SMTP_AUTH, query="?starttls=1&verify=0&timeout=5"))
    assert notify.deliver_due(lab, now=T0 + timedelta(seconds=90)) == 1
    assert logins[-1] == (USER, PASSWORD)
    [message] = mailbox.messages
    assert (message["To"], message["X-Over-TLS"]) == ("billing@example.org", "yes")
    assert message["Subject"] == "Account 4144555 has reached its credit limit"
    body = text_of(message)
    for said in ("CHF 300.00 outstanding and has reached its credit limit of CHF 300.00",
                  "pay all open and overdue invoices", "Outstanding: CHF 300.00",
                  "Credit limit: CHF 300.00", "Warning level: CHF 200.00"):
        assert said in body
    assert PASSWORD not in message.as_string()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls(accounts, configured, smtp_server, tls_context):
    app = accounts
    logins = []
    # auth_require_tls=False: aiosmtpd 1.4 only counts STARTTLS as TLS; this one is TLS
    # from the first byte (X-Over-TLS below).
    mailbox, port = smtp_server(ssl_context=tls_context, auth_required=True,
                                auth_require_tls=False, authenticator=authenticator(logins))
    notice(app, "fraud_suspected:41441234567:1", type="fraud_suspected",
           reason="31 calls in a minute to 4190", balance=42 * CHF)
    mail = configured(smtp_url=smtp_url(port, SMTP_AUTH, "smtps", "?verify=0"))
    assert notify.deliver_due(mail, now=T0) == 1
    [message] = mailbox.messages
    assert message["X-Over-TLS"] == "yes"
    assert "unusual calling on your account 41441234567: 31 calls in a minute to 4190" in \
        text_of(message)
    assert "contact support" in text_of(message)
    assert logins == [(USER, PASSWORD)]


def test_a_kept_connection_the_server_closed_is_opened_again(accounts, configured,
                                                            smtp_server):
    app = accounts
    keys = [notice(app, f"low_balance:41441234567:{i}") for i in range(3)]
    mailbox, port = smtp_server()
    mailbox.close_after = True
    assert notify.deliver_due(configured(smtp_url=smtp_url(port)), now=T0) == 3
    assert [m["Message-ID"] for m in mailbox.messages] == list(map(notify.message_id, keys))
    assert mailbox.sessions == 3


# -- webhook ---------------------------------------------------------------------------------

def test_webhook_is_signed_as_the_receiver_checks_it(accounts, configured, receiver,
                                                      smtp_server):
    app = accounts
    key = notice(app, "topup_succeeded:41441234567:7", type="topup_succeeded",
                 amount=20 * CHF, balance=29_500_000)
    mailbox, port = smtp_server()
    both = configured(smtp_url=smtp_url(port), webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(both, now=T0) == 1
    [request] = receiver.requests
    assert request["valid"], "the receiver could not verify the signature"
    assert not receiver.verified("another secret", request["headers"], request["body"])
    assert request["path"] == "/hooks/callguard"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Callguard-Signature"].startswith("sha256=")
    payload = json.loads(request["body"])
    assert payload == json.loads(row(app, key).payload)
    assert (payload["id"], payload["type"], payload["account"], payload["amount"]) == (
        key, "topup_succeeded", P, "20.000000")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", payload["at"])
    [message] = mailbox.messages
    assert message["Subject"] == "Top-up of CHF 20.00 on account 41441234567"
    assert "the balance is now CHF 29.50" in text_of(message)
    assert utc(row(app, key).webhook_sent_at) == T0


def test_webhook_retries_with_backoff_then_delivers(accounts, configured, receiver):
    app = accounts
    key = notice(app, "low_balance:41441234567:2")
    receiver.answers = [500, 503]
    hook = configured(webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(hook, now=T0) == 0
    assert utc(row(app, key).next_attempt_at) == T0 + timedelta(seconds=30)
    assert row(app, key).last_error == "webhook: HTTP 500 Internal Server Error"
    assert notify.deliver_due(hook, now=T0 + timedelta(seconds=29)) == 0  # not due yet
    assert len(receiver.requests) == 1
    t1 = T0 + timedelta(seconds=30)
    assert notify.deliver_due(hook, now=t1) == 0
    assert utc(row(app, key).next_attempt_at) == t1 + timedelta(seconds=60)
    [listed] = notify.notice_rows(hook)
    assert (listed["state"], listed["attempts"], listed["last_error"]) == (
        "retrying", 2, "webhook: HTTP 503 Service Unavailable")
    assert notify.deliver_due(hook, now=t1 + timedelta(seconds=60)) == 1
    assert len(receiver.requests) == 3 and all(r["valid"] for r in receiver.requests)
    assert len({r["body"] for r in receiver.requests}) == 1  # the same notice, the same id
    assert notify.deliver_due(hook, now=t1 + timedelta(days=1)) == 0
    assert len(receiver.requests) == 3
    assert notify.notice_rows(hook)[0]["state"] == "sent"


def test_backoff_doubles_to_an_hour():
    assert [notify.backoff(n).total_seconds() for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


@pytest.mark.parametrize(("answer", "state"), [(400, "failed"), (404, "failed"),
                                               (408, "retrying"), (429, "retrying")])
def test_webhook_4xx_is_for_good_but_408_and_429(accounts, configured, receiver, answer,
                                                 state):
    app = accounts
    notice(app, "blocked:41441234567:1", type="blocked", reason="fraud suspected")
    receiver.answers = [answer]
    hook = configured(webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(hook, now=T0) == 0
    [listed] = notify.notice_rows(hook)
    assert listed["state"] == state and listed["last_error"].startswith(f"webhook: HTTP {answer}")


def test_webhook_without_an_answer_is_retried(accounts, configured, receiver):
    app = accounts
    key = notice(app, "unblocked:41441234567:1", type="unblocked", balance=60 * CHF)
    later = notice(app, "unblocked:41441234567:2", type="unblocked", balance=60 * CHF)
    receiver.answers = ["hang"]
    hook = configured(webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(hook, now=T0, timeout=0.3) == 0
    assert row(app, key).last_error == "webhook: no answer within 0.3 s"
    assert utc(row(app, key).next_attempt_at) == T0 + timedelta(seconds=30)
    # The receiver is down: the pass ended there, the next notice was not tried.
    assert (len(receiver.requests), row(app, later).attempts) == (1, 0)
    assert notify.deliver_due(hook, now=T0 + timedelta(seconds=30)) == 2


def test_gives_up_after_max_attempts(accounts, configured, receiver):
    app = accounts
    key = notice(app, "credit_warning:4144555:1", account=Q, type="credit_warning",
                 outstanding=210 * CHF, limit=300 * CHF, warn_at=200 * CHF)
    receiver.answers = [500] * 100
    hook = configured(webhook_url=receiver.url, webhook_secret=SECRET)
    now = T0
    while (r := row(app, key)).failed_at is None:
        assert notify.deliver_due(hook, now=now) == 0
        now = utc(row(app, key).next_attempt_at or now)
    assert r.attempts == len(receiver.requests) == notify.MAX_ATTEMPTS
    assert timedelta(hours=12) < utc(r.failed_at) - T0 < timedelta(hours=16)
    assert notify.deliver_due(hook, now=now + timedelta(days=7)) == 0
    assert len(receiver.requests) == notify.MAX_ATTEMPTS
    assert notify.notice_rows(hook)[0]["state"] == "failed"


def test_no_secret_no_webhook_and_no_secret_in_errors(accounts, configured, receiver):
    app = accounts
    key = notice(app, "low_balance:41441234567:3")
    unsigned = configured(webhook_url=receiver.url)
    assert notify.deliver_due(unsigned, now=T0) == 0
    assert row(app, key).last_error == "webhook: CALLGUARD_WEBHOOK_SECRET is not set"
    assert receiver.requests == []
    # Nobody listening, a token in the URL: the error says what happened, not the URL.
    token = "tok-9f8e7d"
    closed = configured(webhook_url=f"http://hook:{token}@127.0.0.1:{free_port()}/h?key={token}",
                        webhook_secret=SECRET)
    assert notify.deliver_due(closed, now=T0 + timedelta(minutes=1)) == 0
    error = row(app, key).last_error
    assert error.startswith("webhook: ConnectError") and token not in error
    assert SECRET not in error and "\n" not in error


def test_mail_taken_is_not_sent_again_when_the_webhook_fails(accounts, configured,
                                                             smtp_server, receiver):
    app = accounts
    key = notice(app, "topup_failed:41441234567:1", type="topup_failed", amount=20 * CHF,
                 balance=3 * CHF, reason="card declined")
    mailbox, port = smtp_server()
    receiver.answers = [500]
    both = configured(smtp_url=smtp_url(port), webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(both, now=T0) == 0
    half = row(app, key)
    assert (utc(half.mail_sent_at), half.webhook_sent_at, half.sent_at) == (T0, None, None)
    assert notify.deliver_due(both, now=T0 + timedelta(seconds=30)) == 1
    assert len(mailbox.messages) == 1 and len(receiver.requests) == 2
    assert "We could not charge CHF 20.00 to the payment method on file for your account " \
           "41441234567: card declined." in text_of(mailbox.messages[0])


# -- never twice ----------------------------------------------------------------------------

def test_two_workers_never_send_one_notice_twice(accounts, configured, smtp_server):
    app = accounts
    keys = [notice(app, f"low_balance:41441234567:{i}") for i in range(30)]
    mailbox, port = smtp_server()
    mailbox.delay = 0.005  # each takes a moment, so both workers see the same due rows
    workers = [configured(smtp_url=smtp_url(port)) for _ in range(2)]
    start, counts = threading.Barrier(2), []

    def work(worker):
        start.wait()
        counts.append(notify.deliver_due(worker, now=T0))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = sorted(m["Message-ID"] for m in mailbox.messages)
    assert ids == sorted(map(notify.message_id, keys))
    assert sum(counts) == 30
    assert {row(app, k).attempts for k in keys} == {1}
    assert mailbox.sessions <= 2  # one SMTP session a worker for the whole pass


WORKER = """
import time
from callguard.config import load_settings
from callguard.notify import deliver_due
from callguard.service import App

app = App(load_settings())
while True:
    deliver_due(app, timeout=60)
    time.sleep(0.05)
"""


def test_sigkill_while_the_server_holds_the_data(accounts, configured, smtp_server, settings):
    app = accounts
    key = notice(app, "exhausted:41441234567:9", type="exhausted", balance=0, available=0)
    mailbox, port = smtp_server()
    mailbox.hold = threading.Event()
    env = {**os.environ, "CALLGUARD_HOME": str(settings.home),
           "CALLGUARD_DATABASE_URL": settings.database_url, "CALLGUARD_SMTP_URL": smtp_url(port)}
    worker = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT)
    try:
        assert mailbox.in_data.wait(60), "the worker never sent"
    finally:
        worker.kill()
        worker.wait(10)
    mailbox.hold.set()  # the held message is answered 451 (to nobody): not taken
    mailbox.hold = None
    claimed = row(app, key)
    assert (claimed.attempts, claimed.mail_sent_at, claimed.sent_at) == (1, None, None)
    mail = configured(smtp_url=smtp_url(port))
    assert notify.deliver_due(mail) == 0  # claimed by the dead worker until its lease ends
    after_lease = utc(claimed.next_attempt_at) + timedelta(seconds=1)
    assert notify.deliver_due(mail, now=after_lease) == 1
    assert notify.deliver_due(mail, now=after_lease + timedelta(hours=1)) == 0
    [message] = mailbox.messages
    assert message["Message-ID"] == mailbox.held[0]["Message-ID"] == notify.message_id(key)
    assert row(app, key).attempts == 2


# -- the operator's view ---------------------------------------------------------------------

def test_notices_list(accounts, configured, receiver, run, monkeypatch):
    app = accounts
    notice(app, "low_balance:41441234567:10")
    notice(app, "blocked:41441234567:11", type="blocked", reason="fraud suspected")
    notice(app, "credit_warning:4144555:12", account=Q, type="credit_warning",
           outstanding=210 * CHF, limit=300 * CHF)
    out = run("notices", "list")
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.split()[-1] == "kept" for line in lines)
    receiver.answers = [200, 400, 500]  # oldest first: sent, failed, retrying
    hook = configured(webhook_url=receiver.url, webhook_secret=SECRET)
    assert notify.deliver_due(hook, now=T0) == 1
    notice(app, "unblocked:41441234567:13", type="unblocked")
    monkeypatch.setenv("CALLGUARD_WEBHOOK_URL", receiver.url)
    lines = run("notices", "list").stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "unblocked:41441234567:13", "credit_warning:4144555:12", "blocked:41441234567:11",
        "low_balance:41441234567:10"]
    assert lines[0].endswith("  41441234567  unblocked  pending")
    assert lines[1].endswith("  4144555  credit_warning  retrying (attempt 1, next "
                             "2030-01-01 12:00:30)  webhook: HTTP 500 Internal Server Error")
    assert lines[2].endswith("  blocked  failed (after 1 attempt)  webhook: HTTP 400 Bad Request")
    assert lines[3].endswith("  low_balance  sent")
    data = json.loads(run("notices", "list", "--account", Q, "--json").stdout)
    assert data == [{
        "id": "credit_warning:4144555:12", "seq": data[0]["seq"], "account": Q,
        "type": "credit_warning", "at": data[0]["at"], "state": "retrying", "attempts": 1,
        "next_attempt_at": "2030-01-01T12:00:30Z",
        "last_error": "webhook: HTTP 500 Internal Server Error", "mail_sent_at": None,
        "webhook_sent_at": None, "sent_at": None, "failed_at": None}]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", data[0]["at"])
    sent = json.loads(run("notices", "list", "--account", P, "--json").stdout)[-1]
    assert (sent["state"], sent["sent_at"], sent["webhook_sent_at"]) == (
        "sent", "2030-01-01T12:00:00Z", "2030-01-01T12:00:00Z")
    gone = run("notices", "list", "--account", "4100000")
    assert (gone.exit_code, gone.stderr) == (1, "callguard: unknown account 4100000\n")
    assert run("notices", "list", "--account", N).stdout == "no notices\n"


# -- the pieces ------------------------------------------------------------------------------

def test_message_ids_are_valid_and_distinct():
    keys = ["a:b", "a=3Ab", "a.b", "a/b", "a b", "ä", "x" * 200, "y" * 200]
    ids = [notify.message_id(k) for k in keys]
    assert len(set(ids)) == len(ids)
    atext = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    for mid in ids:
        assert re.fullmatch(rf"<{atext}(\.{atext})*@callguard>", mid) and len(mid) < 250


def test_every_type_has_words_even_with_few_facts():
    for type in NOTICE_TYPES:
        bare = {"id": f"{type}:1", "type": type, "account": P, "at": "2030-01-01T12:00:00Z",
                "kind": "prepaid", "currency": "CHF"}
        subject, body = notify.render(bare)
        assert P in subject and P in body and "2030-01-01 12:00:00 UTC" in body
        assert not re.search(r"[{}]|None", subject + body), (type, subject, body)
        assert len(body.split("\n\n")) >= 4  # what happened, what to do, the facts, who
    subject, body = notify.render({"type": "exhausted"})
    assert subject == "Account ? is out of credit" and "topped up" in body


def test_smtp_urls():
    t = notify.parse_smtp_url("smtp://u%40x:p%3Aw@mail.example.net:587?starttls=1&verify=0")
    assert (t.host, t.port, t.security, t.user, t.password, t.verify) == (
        "mail.example.net", 587, "starttls", "u@x", "p:w", False)
    t = notify.parse_smtp_url("smtps://u:p@mail.example.net?timeout=3")
    assert (t.port, t.security, t.verify, t.timeout) == (465, "tls", True, 3.0)
    t = notify.parse_smtp_url("smtp://127.0.0.1")
    assert (t.port, t.security, t.user) == (25, "plain", None)
    for bad in ("http://x", "smtp://u:p@host:25", "smtp://host:x", "smtp:///"):
        with pytest.raises(ValueError) as info:
            notify.parse_smtp_url(bad)
        assert ":p@" not in str(info.value)


def test_errors_are_one_line_without_secrets(settings):
    webhook = "https://hooks.example.net/T0/B1/xoxb-secret-path?sig=abc123"
    couriers = notify.Couriers(replace(settings, smtp_url=smtp_url(25, SMTP_AUTH, "smtps"),
                                       webhook_secret=SECRET, webhook_url=webhook), 1.0)
    said = couriers.scrub(f"a receiver echoing\n{PASSWORD}, {SMTP_AUTH}, {SECRET} and {webhook}"
                          + "x" * 600)
    assert said.startswith("a receiver echoing ***, relay%40example.net:***, *** and ***x")
    assert len(said) == 500
