"""A hostile review of the limits that act: each test reproduces a problem the review found
(it failed before the fix that followed). The two still marked xfail(strict=True) are
known limits, said in the README: the hour of the spend limit is a sliding estimate over
two hourly buckets, and a rebuilt Redis starts the hour afresh."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from callguard import limit_events as limit_events_module
from callguard import notify, service, sync, topup, worker
from callguard.books.models import Account, AutoTopup, Notification
from callguard.books.notices import add_notice
from callguard.decisions import Reason

from engine_helpers import T0, answered, limit_entries, postpaid, prepaid, setup_plan, snapshot
from test_notify import SECRET, receiver, smtp_server  # noqa: F401 - fixtures
from test_topup import provider  # noqa: F401 - fixtures

ACCT, BIZ = "41441234567", "4144555"
PREMIUM, NATIONAL = "41901234567", "41441112233"
HOUR = 3_600_000
H = (T0 // HOUR + 1) * HOUR  # the first hour boundary after T0 (T0 + 800 s)


@pytest.fixture
def eng(app):
    setup_plan(app)
    return app.engine


@pytest.fixture
def paying(app):
    """An App that has a payment provider configured (never reached in these tests)."""
    other = service.App(dataclasses.replace(app.settings, payment_url="http://127.0.0.1:9/"))
    yield other
    other.close()


def limit_events(app, account=ACCT) -> list[str]:
    return [f["event"] for _, f in limit_entries(app, account)]


def notice_types(app, account=ACCT) -> list[str]:
    with app.books.session() as db:
        return list(db.scalars(select(Notification.type).where(Notification.account == account)
                               .order_by(Notification.id)))


def start(eng, channel, dest=PREMIUM, account=ACCT, at=T0, direction="outbound"):
    return answered(eng, account, channel, dest, at, direction)


def fraud_blocked(app, eng):
    """An on_fraud=block account the engine has just blocked for velocity (in Redis only:
    the worker has not booked the event yet)."""
    prepaid(app, balance=500_000_000, max_spend_per_hour=6_000_000, on_fraud="block")
    live = [start(eng, f"f{i}", at=T0 + i) for i in range(2)]
    assert start(eng, "f9", at=T0 + 10).reason == Reason.VELOCITY_LIMIT
    assert start(eng, "f10", dest=NATIONAL, at=T0 + 11).reason == Reason.BLOCKED
    return live


# -- limit bypass -------------------------------------------------------------------------

def test_velocity_limit_stops_a_long_call_too(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=10_000_000)
    d = start(eng, "long")
    assert d.allow
    grant = d.grant
    for minute in range(1, 11):  # ten minutes of CHF 3.00/min: 30.00 in the hour
        g = eng.extend(d.session, grant, now_ms=T0 + minute * 60_000 - 10_000)
        grant = g.grant
        if g.final:
            break
    eng.commit(d.session, now_ms=T0 + grant * 1000)
    cost = app.redis.hget(app.keys.account(ACCT), "vs")
    assert int(cost) <= 10_000_000 + 3_000_000  # at most one slice past the limit


def test_a_late_commit_from_the_previous_hour_does_not_wipe_this_hours_spend(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=8_000_000)
    b = start(eng, "b", at=H - 62_000)  # answered 09:58:58, its 60 s grant ends 09:59:58
    a = start(eng, "a", at=H - 55_000)
    assert a.allow and b.allow
    eng.commit(a.session, now_ms=H + 5_000)  # 60 s: 3.00, counted in the new hour
    # b's hangup reaches callguard late (or the sweeper closes it at its grant's end):
    eng.commit(b.session, now_ms=H + 6_000, end_ms=H - 2_000)  # 3.00 in the old hour
    # 6.00 spent within the last hour; a third 3.00 call would make 9.00 > 8.00.
    third = start(eng, "c", at=H + 10_000)
    assert third.reason == Reason.VELOCITY_LIMIT


@pytest.mark.xfail(strict=True, reason="the two-bucket estimate weighs the previous hour by "
                   "the share of this hour still to come: spend at the end of one hour "
                   "counts half 30 minutes later, so ~2x the limit fits in 60 minutes")
def test_velocity_window_across_the_hour_boundary_is_a_real_hour(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=10_000_000)
    calls = [start(eng, f"v{i}", at=H - 61_000 + i) for i in range(3)]
    for d in calls:
        eng.commit(d.session, now_ms=H - 1_000)  # 9.00 spent in the last minute of the hour
    # 30 minutes later the 9.00 is well within the last 60 minutes: 9.00 + 3.00 > 10.00.
    late = start(eng, "late", at=H + 30 * 60_000)
    assert late.reason == Reason.VELOCITY_LIMIT


def test_a_settings_change_does_not_lift_the_engines_fraud_block(app, eng):
    fraud_blocked(app, eng)
    service.update_account(app, ACCT, email="anna@example.net")  # worker not run yet
    # a free incoming call (nothing to hold, so no VELOCITY_LIMIT) gets through
    assert start(eng, "after", dest="41449998877", at=T0 + 20,
                 direction="inbound").reason == Reason.BLOCKED


# -- state corrupted / operator overridden -------------------------------------------------

def test_an_operator_unblock_before_the_worker_books_the_fraud_event_stands(app, eng):
    fraud_blocked(app, eng)
    service.update_account(app, ACCT, status="active", block_reason=None)  # account unblock
    assert start(eng, "ok", dest="41449998877", at=T0 + 30, direction="inbound").allow
    sync.drain(app, "w1")
    assert app.books.get_account(ACCT).status == "active"
    assert snapshot(app, ACCT)["status"] == "active"


def test_a_replayed_fraud_event_does_not_re_block_an_unblocked_account(app, eng):
    fraud_blocked(app, eng)
    entries = limit_entries(app, ACCT)
    sync.drain(app, "w1")
    assert app.books.get_account(ACCT).status == "blocked"
    service.update_account(app, ACCT, status="active", block_reason=None)
    with app.books.session.begin() as db:  # the same entries booked again
        hang_up = limit_events_module.book(db, entries)
    assert app.books.get_account(ACCT).status == "active"
    assert hang_up == set()


def test_a_reservation_released_does_not_leave_the_account_blocked(app, eng):
    prepaid(app, balance=3_000_000)  # exactly one 60 s slice at CHF 3.00/min
    d = eng.authorize(ACCT, PREMIUM, "outbound", "ring", now_ms=T0)
    assert d.allow and d.grant == 60
    eng.release(d.session, now_ms=T0 + 20_000)  # never answered: nothing spent
    assert snapshot(app, ACCT)["available"] == 3_000_000
    again = eng.authorize(ACCT, "41449998877", "inbound", "in-1", now_ms=T0 + 30_000)
    assert again.allow, again.reason


def test_ringing_calls_do_not_exhaust_an_account_that_keeps_its_money(app, eng):
    prepaid(app, balance=50_000_000)
    talking = start(eng, "talk")
    ringing = [eng.authorize(ACCT, PREMIUM, "outbound", f"r{i}", now_ms=T0 + 1 + i)
               for i in range(15)]  # 16 x 3.00 held: 2.00 left
    assert all(r.allow for r in ringing)
    assert eng.extend(talking.session, talking.grant, now_ms=T0 + 50_000).final
    for r in ringing:
        eng.release(r.session, now_ms=T0 + 55_000)
    eng.commit(talking.session, now_ms=T0 + 60_000)  # 3.00 spent: 47.00 left
    assert snapshot(app, ACCT)["available"] == 47_000_000
    assert eng.authorize(ACCT, NATIONAL, "outbound", "next", now_ms=T0 + 70_000).allow


def test_a_rebuild_does_not_repeat_a_postpaid_credit_warning(app, eng):
    postpaid(app, BIZ, credit_limit=10_000_000, warn_at=6_000_000)
    d = start(eng, "b1", account=BIZ)
    eng.extend(d.session, d.grant, now_ms=T0 + 50_000)
    eng.commit(d.session, now_ms=T0 + 120_000)  # 6.00 outstanding: warned once
    sync.drain(app, "w1")
    assert notice_types(app, BIZ) == ["credit_warning"]
    app.redis.delete(*app.redis.keys(f"{app.settings.key_prefix}:*"))  # Redis lost its data
    sync.rebuild(app)
    start(eng, "b2", dest=NATIONAL, account=BIZ, at=T0 + 200_000)
    sync.drain(app, "w1")
    assert notice_types(app, BIZ) == ["credit_warning"]


# -- auto top-up ---------------------------------------------------------------------------

def test_a_skipped_topup_re_arms_the_threshold(app, eng, paying):
    prepaid(paying, balance=12_000_000, payment_method="tok_1", auto_topup_below=8_000_000,
            auto_topup_amount=20_000_000)
    d = start(eng, "t1")
    eng.extend(d.session, d.grant, now_ms=T0 + 50_000)  # 6.00 available: one request
    eng.commit(d.session, now_ms=T0 + 51_000)  # 2.55 spent: 9.45 available again
    # The first was asked when the account was created, before its opening balance came.
    assert limit_events(app).count("topup") == 2
    sync.drain(app, "w1")
    assert topup.charge_due(paying) == 1
    with app.books.session() as db:
        assert [t.state for t in db.scalars(select(AutoTopup))] == ["skipped"]
    start(eng, "t2", at=T0 + 60_000)  # 6.45 available: below 8.00 for real this time
    sync.drain(app, "w1")
    with app.books.session() as db:
        assert len(list(db.scalars(select(AutoTopup)))) == 2


def test_an_account_created_with_auto_topup_and_no_money_gets_topped_up(app, eng, paying):
    prepaid(paying, balance=0, payment_method="tok_1", auto_topup_below=10_000_000,
            auto_topup_amount=20_000_000)
    refused = eng.authorize(ACCT, NATIONAL, "outbound", "c1", now_ms=T0)
    assert refused.reason == Reason.NO_FUNDS
    assert "topup" in limit_events(app)


def test_an_opening_balance_below_the_topup_threshold_requests_a_topup(app, eng, paying):
    prepaid(paying, balance=5_000_000, payment_method="tok_1", auto_topup_below=10_000_000,
            auto_topup_amount=20_000_000)
    assert "topup" in limit_events(app)


# -- operator UX ---------------------------------------------------------------------------

def test_lowering_a_credit_limit_below_outstanding_says_it_blocks(app, eng, run):
    postpaid(app, BIZ, credit_limit=10_000_000)
    d = start(eng, "b1", account=BIZ)
    eng.commit(d.session, now_ms=T0 + 60_000)  # 3.00 outstanding
    result = run("account", "set", BIZ, "--credit-limit", "2.00")
    assert result.exit_code == 0
    assert eng.authorize(BIZ, NATIONAL, "outbound", "b2", now_ms=T0 + 70_000).reason \
        == Reason.NO_FUNDS
    assert "block" in result.stdout.lower() or "outstanding" in result.stdout.lower()


def test_unblock_of_an_exhausted_account_does_not_claim_calls_work(app, eng, run):
    prepaid(app, balance=3_000_000)
    d = start(eng, "c1")
    eng.commit(d.session, now_ms=T0 + 60_000)  # 0.00 left
    run("account", "block", ACCT)
    result = run("account", "unblock", ACCT)
    assert eng.authorize(ACCT, NATIONAL, "outbound", "c2", now_ms=T0 + 70_000).reason \
        == Reason.NO_FUNDS
    assert "no credit" in result.stdout or "exhausted" in result.stdout


def test_an_account_blocked_prefix_does_not_refuse_incoming_calls(app, eng, run):
    prepaid(app, balance=50_000_000)
    assert run("account", "set", ACCT, "--block-prefix", "4144").exit_code == 0
    assert eng.authorize(ACCT, "41441112233", "outbound", "o1", now_ms=T0).reason \
        == Reason.DEST_BLOCKED
    assert eng.authorize(ACCT, "41449998877", "inbound", "i1", now_ms=T0).allow


# -- notices: duplicates and a delivery thread that dies -----------------------------------

NOTIFY_WORKER = """
import time
from callguard.config import load_settings
from callguard.notify import deliver_due
from callguard.service import App

app = App(load_settings())
while True:
    deliver_due(app, timeout=60)
    time.sleep(0.05)
"""


def queue_notice(app, key="low_balance:41441234567:1-0"):
    with app.books.session.begin() as db:
        assert add_notice(db, key, db.get(Account, ACCT), "low_balance", balance=9_000_000,
                          available=9_000_000, limit=10_000_000)
    return key


def test_a_kill_during_a_slow_webhook_does_not_resend_the_mail(app, settings, smtp_server,  # noqa: F811
                                                              receiver):  # noqa: F811
    prepaid(app, email="anna@example.net")
    key = queue_notice(app)
    mailbox, port = smtp_server()
    receiver.answers = ["hang"]
    env = {**os.environ, "CALLGUARD_HOME": str(settings.home),
           "CALLGUARD_DATABASE_URL": settings.database_url,
           "CALLGUARD_SMTP_URL": f"smtp://127.0.0.1:{port}",
           "CALLGUARD_WEBHOOK_URL": receiver.url, "CALLGUARD_WEBHOOK_SECRET": SECRET}
    proc = subprocess.Popen([sys.executable, "-c", NOTIFY_WORKER], env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not (mailbox.messages and receiver.requests):
            assert time.monotonic() < deadline, "the worker never sent"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: the mail was taken, the webhook has no answer yet
        proc.wait(10)
    both = service.App(dataclasses.replace(app.settings, smtp_url=f"smtp://127.0.0.1:{port}",
                                           webhook_url=receiver.url, webhook_secret=SECRET))
    try:
        with app.books.session() as db:
            lease_end = db.scalar(select(Notification.next_attempt_at)
                                  .where(Notification.key == key))
        later = lease_end.replace(tzinfo=UTC) + timedelta(seconds=1)
        assert notify.deliver_due(both, now=later) == 1
    finally:
        both.close()
    assert len(mailbox.messages) == 1


def test_a_malformed_webhook_url_is_a_delivery_error_not_a_crash(app):
    prepaid(app)
    key = queue_notice(app)
    bad = service.App(dataclasses.replace(app.settings, webhook_url="https://hooks.example.com:"
                                          "8443x/cg", webhook_secret=SECRET))
    try:
        notify.deliver_due(bad)
    finally:
        bad.close()
    with app.books.session() as db:
        assert db.scalar(select(Notification.last_error).where(Notification.key == key))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_outboxes_thread_survives_a_bad_notice_pass(app):
    prepaid(app)
    queue_notice(app)
    bad = service.App(dataclasses.replace(app.settings, webhook_url="http://hooks..example.com/",
                                          webhook_secret=SECRET))
    stop = threading.Event()
    thread = threading.Thread(target=worker.outboxes, args=(bad, stop), daemon=True)
    try:
        thread.start()
        time.sleep(1.5)
        alive = thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
        bad.close()
    assert alive


# -- auto top-up during a fraud block; a rebuild forgets the hour's spend ------------------

def test_no_card_charge_for_an_account_blocked_for_fraud(app, eng, provider):  # noqa: F811
    card = provider()
    charging = service.App(dataclasses.replace(app.settings, payment_url=card.url))
    try:
        prepaid(charging, balance=12_000_000, payment_method="tok_1",
                auto_topup_below=8_000_000, auto_topup_amount=20_000_000,
                max_spend_per_hour=6_000_000, on_fraud="block")
        start(eng, "f0", at=T0)
        start(eng, "f1", at=T0 + 1)  # 6.00 available: below 8.00, a top-up is requested
        assert start(eng, "f2", at=T0 + 2).reason == Reason.VELOCITY_LIMIT  # and blocked
        sync.drain(app, "w1")
        assert app.books.get_account(ACCT).status == "blocked"
        topup.charge_due(charging)
    finally:
        charging.close()
    assert card.charges == []


@pytest.mark.xfail(strict=True, reason="the velocity buckets live in Redis only: after "
                   "`rebuild` the hour's spend is forgotten and the limit starts afresh")
def test_a_rebuild_keeps_the_hours_spend(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=10_000_000)
    calls = [start(eng, f"v{i}", at=T0 + i) for i in range(3)]
    for d in calls:
        eng.commit(d.session, now_ms=T0 + 60_000)  # 9.00 spent
    sync.drain(app, "w1")
    assert start(eng, "before", at=T0 + 70_000).reason == Reason.VELOCITY_LIMIT
    app.redis.delete(*app.redis.keys(f"{app.settings.key_prefix}:*"))
    sync.rebuild(app)
    assert start(eng, "after", at=T0 + 80_000).reason == Reason.VELOCITY_LIMIT


def test_incoming_calls_past_the_channel_cap_do_not_block_the_account(app, eng):
    prepaid(app, balance=50_000_000, max_channels=1, on_fraud="block")
    assert start(eng, "busy", dest=NATIONAL).allow  # the customer's one channel is in use
    for i in range(10):  # an outsider redials the customer's number
        refused = eng.authorize(ACCT, "41449998877", "inbound", f"in{i}", now_ms=T0 + i)
        assert refused.reason == Reason.CHANNEL_LIMIT
    assert "fraud_suspected" not in limit_events(app)
    assert eng.authorize(ACCT, "41449998877", "inbound", "later", now_ms=T0 + 60_000).reason \
        == Reason.CHANNEL_LIMIT  # still only the cap: not blocked


def test_fraud_notices_tell_the_customer_in_words(app, eng):
    fraud_blocked(app, eng)
    sync.drain(app, "w1")
    with app.books.session() as db:
        payloads = [json.loads(p) for p in db.scalars(select(Notification.payload)
                                                       .order_by(Notification.id))]
    assert [p["type"] for p in payloads] == ["fraud_suspected", "blocked"]
    for payload in payloads:
        subject, body = notify.render(payload)
        assert "velocity_limit" not in body, body
