"""Auto top-up against a real payment provider on loopback: an idempotent one, as the
contract wants, that remembers every Idempotency-Key and counts what it charged. Each
case ends with one charge at most, one booking at most, SQL and Redis equal."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from callguard import service
from callguard.books.models import Account, AutoTopup, LedgerEntry, Notification, RedisOutbox
from callguard.engine import state
from callguard.topup import BACKOFF_FIRST, GIVE_UP, LEASE, _redact, charge_due, request_topup

from servers import free_port

ACCT = "41441234567"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
OPENING, BELOW, AMOUNT = 5_000_000, 10_000_000, 20_000_000


class Provider:
    """Charges once per Idempotency-Key and answers a repeated key with the stored result.

    mode: "success", "decline", "hold" (charges, then holds the reply for `hold` seconds:
    longer than the client waits), "lost" (charges, then closes the connection without a
    word); `failures`: that many 503s first, charging nothing."""

    def __init__(self, mode: str = "success", hold: float = 0.0, failures: int = 0):
        self.mode, self.hold, self.failures = mode, hold, failures
        self.results: dict[str, dict] = {}
        self.charges: list[dict] = []
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.got = threading.Event()  # a request has come
        self.release = threading.Event()  # held replies go now
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                provider.serve(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/charges"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, http: BaseHTTPRequestHandler) -> None:
        body = json.loads(http.rfile.read(int(http.headers["Content-Length"])))
        key = http.headers["Idempotency-Key"]
        first = False
        with self.lock:
            self.requests.append((key, body))
            if self.failures > 0:
                self.failures -= 1
                reply = None
            elif key in self.results:
                reply = self.results[key]
            else:
                first = True
                if self.mode == "decline":
                    reply = {"status": "declined", "reason": "card declined"}
                else:
                    self.charges.append(body)
                    reply = {"status": "succeeded", "id": f"ch_{len(self.charges)}"}
                self.results[key] = reply
        self.got.set()
        if first and self.mode == "lost":
            http.close_connection = True
            return
        if first and self.mode == "hold":
            self.release.wait(self.hold)
        data = json.dumps(reply).encode() if reply else b"upstream unavailable"
        try:
            http.send_response(200 if reply else 503)
            http.send_header("Content-Type", "application/json")
            http.send_header("Content-Length", str(len(data)))
            http.end_headers()
            http.wfile.write(data)
        except OSError:
            pass  # the client gave up waiting

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider():
    """Starts a provider (`provider(mode, ...)`); every one stops at the end of the test."""
    started: list[Provider] = []

    def start(*args, **kwargs) -> Provider:
        started.append(Provider(*args, **kwargs))
        return started[-1]

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def paying(app):
    """An App of its own (its own SQL pool) paying through the given URL."""
    opened: list[service.App] = []

    def make(url: str, **changes) -> service.App:
        opened.append(service.App(dataclasses.replace(app.settings, payment_url=url,
                                                      **changes)))
        return opened[-1]

    yield make
    for other in opened:
        other.close()


def open_account(app, account: str = ACCT, **changes):
    values = dict(kind="prepaid", opening_balance=OPENING, payment_method="tok_visa",
                  auto_topup_below=BELOW, auto_topup_amount=AMOUNT)
    service.create_account(app, account, **{**values, **changes})


def request(app, key: str = f"topup:{ACCT}:1-0", account: str = ACCT, now=T0):
    """What the drain does with the engine's crossing event: in its own transaction."""
    with app.books.session.begin() as db:
        return request_topup(db, db.get(Account, account), key, now)


def topups(app, account: str = ACCT) -> list[AutoTopup]:
    with app.books.session() as db:
        return list(db.scalars(select(AutoTopup).where(AutoTopup.account == account)
                               .order_by(AutoTopup.id)))


def notices(app, account: str = ACCT) -> list[dict]:
    with app.books.session() as db:
        return [json.loads(n.payload) for n in db.scalars(
            select(Notification).where(Notification.account == account)
            .order_by(Notification.id))]


def auto_entries(app, account: str = ACCT) -> list[LedgerEntry]:
    return [e for e in app.books.ledger(account) if e.idempotency_key.startswith("autotopup:")]


def balances(app, account: str = ACCT) -> tuple[int, int]:
    """(SQL, Redis); the ledger's sum must agree with SQL's balance."""
    sql = app.books.get_account(account).balance
    assert app.books.ledger_sum(account) == sql
    return sql, state.account_state(app.redis, app.keys, account)["balance"]


def topped_up_once(app, p: Provider, account: str = ACCT) -> None:
    assert len(p.charges) == 1
    assert {key for key, _ in p.requests} == {f"topup:{account}:1-0"}  # one key, all tries
    row, = topups(app, account)
    assert (row.state, row.provider_id) == ("succeeded", "ch_1")
    entry, = auto_entries(app, account)
    assert (entry.id, entry.kind, entry.amount) == (row.entry, "topup", AMOUNT)
    assert entry.idempotency_key == f"autotopup:{row.key}"
    assert entry.actor == "callguard:auto-topup"
    assert balances(app, account) == (OPENING + AMOUNT, OPENING + AMOUNT)
    done = [n for n in notices(app, account) if n["type"].startswith("topup")]
    assert [(n["type"], n["amount"], n["balance"]) for n in done] == [
        ("topup_succeeded", "20.000000", "25.000000")]


def test_success_charges_once_and_books_in_sql_and_redis(app, provider, paying):
    p = provider()
    worker = paying(p.url)
    open_account(worker)
    assert request(app) is not None
    assert charge_due(worker, now=T0) == 1
    key, body = p.requests[0]
    assert body == {"account": ACCT, "amount": "20.00", "currency": "CHF",
                    "payment_method": "tok_visa", "reference": key}
    topped_up_once(app, p)
    with app.books.session() as db:
        assert db.scalars(select(RedisOutbox)).all() == []  # Redis has it already
    assert charge_due(worker, now=T0 + timedelta(days=2)) == 0
    assert len(p.requests) == 1


def test_decline_notifies_and_is_not_tried_again(app, provider, paying):
    p = provider("decline")
    worker = paying(p.url)
    open_account(worker)
    request(app)
    assert charge_due(worker, now=T0) == 1
    row, = topups(app)
    assert (row.state, row.last_error, row.entry) == ("declined", "card declined", None)
    failed, = [n for n in notices(app) if n["type"].startswith("topup")]
    assert (failed["type"], failed["reason"], failed["amount"]) == (
        "topup_failed", "card declined", "20.000000")
    assert charge_due(worker, now=T0 + timedelta(days=2)) == 0
    assert len(p.requests) == 1 and p.charges == []
    assert auto_entries(app) == [] and balances(app) == (OPENING, OPENING)


def test_timeout_is_retried_with_the_same_key(app, provider, paying):
    p = provider("hold", hold=30.0)  # charged, answered long after the client gave up
    worker = paying(p.url)
    open_account(worker)
    request(app)
    assert charge_due(worker, now=T0, timeout=0.5) == 1
    row, = topups(app)
    assert (row.state, row.attempts) == ("pending", 1)
    assert "Timeout" in row.last_error
    assert charge_due(worker, now=T0 + BACKOFF_FIRST - timedelta(seconds=1), timeout=0.5) == 0
    assert len(p.requests) == 1
    assert charge_due(worker, now=T0 + BACKOFF_FIRST, timeout=0.5) == 1
    assert len(p.requests) == 2
    topped_up_once(app, p)


def test_5xx_backs_off_doubling_then_succeeds(app, provider, paying):
    p = provider(failures=2)
    worker = paying(p.url)
    open_account(worker)
    request(app)
    assert charge_due(worker, now=T0) == 1
    assert topups(app)[0].last_error == "the payment provider answered HTTP 503"
    second = T0 + BACKOFF_FIRST
    assert charge_due(worker, now=second) == 1
    third = second + 2 * BACKOFF_FIRST
    assert charge_due(worker, now=third - timedelta(seconds=1)) == 0
    assert len(p.requests) == 2
    assert charge_due(worker, now=third) == 1
    assert len(p.requests) == 3
    topped_up_once(app, p)


def test_lost_reply_is_asked_again_and_booked_once(app, provider, paying):
    p = provider("lost")
    worker = paying(p.url)
    open_account(worker)
    request(app)
    assert charge_due(worker, now=T0) == 1
    assert len(p.charges) == 1 and topups(app)[0].state == "pending"
    assert auto_entries(app) == []
    assert charge_due(worker, now=T0 + BACKOFF_FIRST) == 1
    topped_up_once(app, p)


def test_a_sent_charge_is_followed_up_though_the_account_no_longer_needs_it(
        app, provider, paying):
    """The lost reply may have charged the card: the retry finds out, and books it."""
    p = provider("lost")
    worker = paying(p.url)
    open_account(worker)
    request(app)
    charge_due(worker, now=T0)
    service.move_money(worker, ACCT, "topup", 30_000_000, "bank-7")  # well above the threshold
    assert charge_due(worker, now=T0 + BACKOFF_FIRST) == 1
    assert topups(app)[0].state == "succeeded" and len(p.charges) == 1
    total = OPENING + 30_000_000 + AMOUNT
    assert balances(app) == (total, total)


def test_success_while_redis_is_down_reaches_redis_from_the_outbox(app, provider, paying):
    p = provider("lost")
    worker = paying(p.url)
    open_account(worker)
    request(app)
    charge_due(worker, now=T0)  # sent: the retry needs no Redis to decide
    blind = paying(p.url, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert charge_due(blind, now=T0 + BACKOFF_FIRST) == 1
    assert topups(app)[0].state == "succeeded"
    assert app.books.get_account(ACCT).balance == OPENING + AMOUNT
    assert state.account_state(app.redis, app.keys, ACCT)["balance"] == OPENING
    assert service.apply_outbox(app, ACCT) == 1  # what the worker does when Redis is back
    assert service.apply_outbox(app, ACCT) == 0
    topped_up_once(app, p)


def test_gives_up_a_day_after_the_request(app, provider, paying):
    p = provider(failures=10**6)
    worker = paying(p.url)
    open_account(worker)
    request(app)
    assert charge_due(worker, now=T0) == 1
    second = T0 + GIVE_UP - 2 * BACKOFF_FIRST  # the next one is due at GIVE_UP
    assert charge_due(worker, now=second) == 1  # tried again
    assert charge_due(worker, now=T0 + GIVE_UP) == 1
    row, = topups(app)
    assert (row.state, row.last_error, row.attempts) == ("declined", "provider unreachable", 2)
    assert len(p.requests) == 2  # none after giving up
    failed, = [n for n in notices(app) if n["type"].startswith("topup")]
    assert (failed["type"], failed["reason"]) == ("topup_failed", "provider unreachable")
    assert charge_due(worker, now=T0 + 2 * GIVE_UP) == 0


def test_request_once_per_key_and_one_pending_per_account(app, provider, paying):
    worker = paying(provider("decline").url)
    open_account(worker)
    first = request(app, f"topup:{ACCT}:1-0")
    assert (first.amount, first.currency, first.payment_method, first.state) == (
        AMOUNT, "CHF", "tok_visa", "pending")
    assert request(app, f"topup:{ACCT}:1-0") is None  # the stream replayed after a crash
    assert request(app, f"topup:{ACCT}:2-0") is None  # one is pending
    assert len(topups(app)) == 1
    charge_due(worker, now=T0)
    assert request(app, f"topup:{ACCT}:1-0") is None  # replay: still nothing
    assert request(app, f"topup:{ACCT}:3-0") is not None  # re-armed, settled: a new one
    service.update_account(worker, ACCT, auto_topup_below=None, auto_topup_amount=None)
    with app.books.session.begin() as db:
        db.execute(update(AutoTopup).values(state="skipped"))
    assert request(app, f"topup:{ACCT}:4-0") is None  # auto top-up is off
    # Half a setting (the CLI refuses it; the books may hold it from before): off too.
    for other, half in (("41449990001", {"payment_method": None}),
                        ("41449990002", {"auto_topup_amount": None}),
                        ("41449990003", {"auto_topup_below": None})):
        app.books.create_account(other, OPENING, **{
            "kind": "prepaid", "payment_method": "tok_visa", "auto_topup_below": BELOW,
            "auto_topup_amount": AMOUNT, **half})
        assert request(app, f"topup:{other}:1-0", other) is None
    assert [t.key for t in topups(app)] == [f"topup:{ACCT}:1-0", f"topup:{ACCT}:3-0"]


@pytest.mark.parametrize("where", ["provider", "closed port", "bad url"])
def test_the_payment_url_s_credentials_are_never_kept_nor_logged(app, provider, paying,
                                                                   caplog, where):
    base = {"provider": provider(failures=1).url.split("//", 1)[1],
            "closed port": f"127.0.0.1:{free_port()}/v1", "bad url": "[::1/v1"}[where]
    worker = paying(f"http://shop:s3cret@{base}?token=t0ken")
    open_account(worker)
    request(app)
    with caplog.at_level("DEBUG"):
        assert charge_due(worker, now=T0) == 1
    row, = topups(app)
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.last_error
    for secret in ("s3cret", "t0ken", "shop"):
        assert secret not in row.last_error and secret not in caplog.text
    assert _redact(f"POST {worker.settings.payment_url} failed", worker.settings.payment_url
                   ) == "POST *** failed"


@pytest.mark.parametrize("change", ["credit", "method", "off"])
def test_not_charged_when_no_longer_wanted(app, provider, paying, change):
    p = provider()
    worker = paying(p.url)
    open_account(worker)
    request(app)
    if change == "credit":
        service.move_money(worker, ACCT, "topup", 5_000_000, "bank-8")  # available 10.00
        why = "available credit 10.00 is not below 10.00 any more"
    elif change == "method":
        service.update_account(worker, ACCT, payment_method="tok_mastercard")
        why = "the payment method changed"
    else:
        service.update_account(worker, ACCT, auto_topup_below=None, auto_topup_amount=None)
        why = "auto top-up is off for the account"
    assert charge_due(worker, now=T0) == 1
    row, = topups(app)
    assert (row.state, row.last_error, row.attempts) == ("skipped", why, 0)
    assert p.requests == [] and auto_entries(app) == []


def test_two_workers_at_once_send_each_top_up_once(app, provider, paying):
    p = provider("hold", hold=0.3)
    workers = [paying(p.url), paying(p.url)]
    accounts = [f"4144123450{i}" for i in range(5)]
    for account in accounts:
        open_account(workers[0], account)
        request(app, f"topup:{account}:1-0", account)
    for w in workers:
        w.books.get_account(accounts[0])  # pools open before the race
        w.redis.ping()
    start = threading.Barrier(2)
    handled: list[int] = []

    def work(w):
        start.wait()
        handled.append(charge_due(w, now=T0))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(handled) == 5
    assert sorted(key for key, _ in p.requests) == sorted(f"topup:{a}:1-0" for a in accounts)
    for account in accounts:
        assert [e.amount for e in auto_entries(app, account)] == [AMOUNT]
        assert balances(app, account) == (OPENING + AMOUNT, OPENING + AMOUNT)


CHARGE = """
import json, sys
from datetime import datetime
from callguard.config import load_settings
from callguard.service import App
from callguard.topup import charge_due
charge_due(App(load_settings(env={}, **json.loads(sys.argv[1]))),
           now=datetime.fromisoformat(sys.argv[2]))
"""


def test_sigkill_while_the_provider_holds_the_reply(app, provider, paying):
    p = provider("hold", hold=60.0)
    worker = paying(p.url)
    open_account(worker)
    request(app)
    s = app.settings
    config = {"home": str(s.home), "redis_url": s.redis_url, "database_url": s.database_url,
              "key_prefix": s.key_prefix, "payment_url": p.url}
    proc = subprocess.Popen([sys.executable, "-c", CHARGE, json.dumps(config), T0.isoformat()],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not p.got.wait(0.05):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the charge never reached the provider"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
    assert len(p.charges) == 1 and topups(app)[0].state == "pending"
    assert charge_due(worker, now=T0 + LEASE - timedelta(seconds=1)) == 0  # may be in flight
    assert len(p.requests) == 1
    assert charge_due(worker, now=T0 + LEASE) == 1
    topped_up_once(app, p)
