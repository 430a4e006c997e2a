"""Limits that act (issue 10): the engine sees each crossing where the money moves, says it
once on the shard's stream, blocks by itself, and the worker books it as a notice in the
transaction that books the calls. Real Redis (single and Cluster), real SQL."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import select

from callguard import service, sync, views
from callguard.books.models import Account, Notification
from callguard.decisions import Reason
from callguard.engine.core import shard_of

from engine_helpers import T0, answered, limit_entries, postpaid, prepaid, setup_plan

ACCT, BIZ = "41441234567", "4144555"
PREMIUM, NATIONAL = "41901234567", "41441112233"


@pytest.fixture(params=["single", "cluster"])
def redis_url(request):
    return request.getfixturevalue("single_redis_url" if request.param == "single"
                                   else "cluster_url")


@pytest.fixture
def eng(app):
    setup_plan(app)
    return app.engine


def limit_events(app, account=ACCT) -> list[str]:
    return [f["event"] for _, f in limit_entries(app, account)]


def notices(app, account=ACCT) -> list[tuple[str, dict]]:
    with app.books.session() as db:
        rows = db.scalars(select(Notification).where(Notification.account == account)
                          .order_by(Notification.id))
        return [(n.type, json.loads(n.payload)) for n in rows]


def start(eng, channel, dest=PREMIUM, account=ACCT, at=T0, direction="outbound"):
    return answered(eng, account, channel, dest, at, direction)


def test_a_prepaid_warning_comes_once_per_crossing_and_a_topup_re_arms_it(app, eng):
    prepaid(app, balance=12_000_000)  # warned below 10.00 by default (the seeds)
    first = start(eng, "c1")  # CHF 3.00/min, a 60 s slice reserved: 9.00 available
    assert limit_events(app) == ["low_balance"]
    eng.commit(first.session, now_ms=T0 + 10_000)
    second = start(eng, "c2", at=T0 + 20_000)
    eng.commit(second.session, now_ms=T0 + 30_000)
    assert limit_events(app) == ["low_balance"]  # reservations coming and going: still once
    service.move_money(app, ACCT, "topup", 1_000_000, "bank-1")  # 12.00 again: re-armed
    assert limit_events(app) == ["low_balance"]
    start(eng, "c3", at=T0 + 40_000)
    assert limit_events(app) == ["low_balance", "low_balance"]
    assert sync.drain(app, "w1") > 0
    kinds = notices(app)
    assert [k for k, _ in kinds] == ["low_balance", "low_balance"]
    payload = kinds[0][1]
    assert payload["balance"] == "12.000000" and payload["available"] == "9.000000"
    assert payload["limit"] == "10.000000" and payload["currency"] == "CHF"


def test_the_warning_is_seen_in_the_middle_of_a_call(app, eng):
    prepaid(app, balance=14_000_000, warn_below=10_000_000)
    d = start(eng, "c1")  # 3.00 held: 11.00 available, no warning yet
    assert limit_events(app) == []
    grant = eng.extend(d.session, d.grant, now_ms=T0 + 50_000)  # the next slice: 8.00
    assert grant.live and limit_events(app) == ["low_balance"]


def test_at_zero_the_account_is_blocked_both_ways_until_a_topup_lifts_it(app, eng):
    prepaid(app, balance=4_000_000)
    d = start(eng, "c1")  # 3.00 of 4.00 held
    grant = eng.extend(d.session, d.grant, now_ms=T0 + 50_000)
    assert grant.final and grant.grant == 80  # the second slice cut short: 4.00 buys 80 s
    assert "exhausted" not in limit_events(app)  # held, not spent yet
    eng.commit(d.session, now_ms=T0 + 80_000)  # cut off at its grant: all 4.00 spent
    assert limit_events(app)[-1] == "exhausted"
    for direction, dest in (("outbound", NATIONAL), ("inbound", "41449998877")):
        refused = eng.authorize(ACCT, dest, direction, f"in-{direction}", now_ms=T0 + 90_000)
        assert (refused.allow, refused.reason) == (False, Reason.NO_FUNDS)
    service.move_money(app, ACCT, "topup", 20_000_000, "bank-2")
    assert limit_events(app)[-1] == "unblocked"
    assert eng.authorize(ACCT, "41449998877", "inbound", "in-2", now_ms=T0 + 95_000).allow
    sync.drain(app, "w1")
    assert [k for k, _ in notices(app)][-2:] == ["exhausted", "unblocked"]


def test_a_call_that_ends_early_on_its_last_slice_leaves_the_account_open(app, eng):
    """Held is not spent: the money a cut-short slice did not use is the customer's."""
    prepaid(app, balance=4_000_000)
    d = start(eng, "c1")
    assert eng.extend(d.session, d.grant, now_ms=T0 + 50_000).final
    eng.commit(d.session, now_ms=T0 + 55_000)  # hung up early: 2.75 spent, 1.25 left
    assert "exhausted" not in limit_events(app)
    assert eng.authorize(ACCT, "41449998877", "inbound", "in-1", now_ms=T0 + 60_000).allow


def test_postpaid_warns_at_warn_at_blocks_at_the_limit_and_a_payment_lifts_it(app, eng):
    postpaid(app, BIZ, credit_limit=10_000_000, warn_at=6_000_000)
    d = start(eng, "b1", account=BIZ)  # 3.00 held of 10.00
    assert limit_events(app, BIZ) == []
    eng.extend(d.session, d.grant, now_ms=T0 + 50_000)  # 6.00 held: warn_at reached mid-call
    assert limit_events(app, BIZ) == ["credit_warning"]
    eng.commit(d.session, now_ms=T0 + 120_000)  # 6.00 outstanding
    d = start(eng, "b2", account=BIZ, at=T0 + 200_000)  # 3.00 of the last 4.00
    grant = eng.extend(d.session, d.grant, now_ms=T0 + 250_000)
    assert grant.final
    eng.commit(d.session, now_ms=T0 + 200_000 + grant.grant * 1000)  # 10.00 outstanding
    assert limit_events(app, BIZ)[-1] == "credit_limit"
    refused = eng.authorize(BIZ, "41449998877", "inbound", "b3", now_ms=T0 + 400_000)
    assert refused.reason == Reason.NO_FUNDS
    service.move_money(app, BIZ, "payment", 8_000_000, "INV-1")
    assert limit_events(app, BIZ)[-1] == "unblocked"
    sync.drain(app, "w1")
    kinds = notices(app, BIZ)
    assert [k for k, _ in kinds] == ["credit_warning", "credit_limit", "unblocked"]
    warning = kinds[0][1]
    assert (warning["available"], warning["reserved"], warning["limit"], warning["warn_at"]) \
        == ("4.000000", "6.000000", "10.000000", "6.000000")
    assert kinds[1][1]["outstanding"] == "10.000000"


def test_a_raised_credit_limit_lifts_the_block_as_a_payment_would(app, eng):
    postpaid(app, BIZ, credit_limit=3_000_000)
    d = start(eng, "b1", account=BIZ)
    assert eng.extend(d.session, d.grant, now_ms=T0 + 50_000).final
    eng.commit(d.session, now_ms=T0 + 60_000)
    assert limit_events(app, BIZ)[-1] == "credit_limit"
    service.update_account(app, BIZ, credit_limit=50_000_000)
    assert limit_events(app, BIZ)[-1] == "unblocked"


def test_a_replayed_stream_books_each_notice_once(app, eng):
    prepaid(app, balance=12_000_000)
    d = start(eng, "c1")
    eng.commit(d.session, now_ms=T0 + 30_000)
    stream = app.keys.events(shard_of(ACCT))
    entries = app.redis.xrange(stream)
    sync.drain(app, "w1")
    # A worker killed after booking, before acknowledging, books the same entries again.
    with app.books.session.begin() as db:
        from callguard import limit_events
        limit_events.book(db, [(i, f) for i, f in entries if f["type"] == "limit"])
    assert [k for k, _ in notices(app)] == ["low_balance"]


def test_a_new_account_below_its_warning_level_is_not_told_at_once(app, eng):
    prepaid(app, balance=5_000_000)  # created below 10.00: no crossing, nothing to say
    postpaid(app, BIZ, credit_limit=0)
    assert limit_events(app) == [] and limit_events(app, BIZ) == []


def test_velocity_limit_counts_live_calls_and_suspects_fraud_once(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=10_000_000)
    allowed = [start(eng, f"v{i}", at=T0 + i) for i in range(6)]
    assert [d.allow for d in allowed] == [True, True, True, False, False, False]
    assert allowed[3].reason == Reason.VELOCITY_LIMIT  # 3 x 3.00 held, a fourth is 12.00
    assert limit_events(app).count("fraud_suspected") == 1
    for d in allowed[:3]:
        eng.commit(d.session, now_ms=T0 + 60_000)  # 9.00 spent within the hour
    assert not start(eng, "v9", at=T0 + 70_000).allow
    # An hour later the window has slid past most of it.
    assert start(eng, "v10", at=T0 + 3_600_000 + 3_000_000).allow


def test_on_fraud_block_blocks_in_redis_at_once_and_the_worker_books_it_and_hangs_up(app, eng):
    prepaid(app, balance=500_000_000, max_spend_per_hour=6_000_000, on_fraud="block")
    live = [start(eng, f"f{i}", at=T0 + i) for i in range(2)]
    pubsub = app.redis.pubsub()
    pubsub.subscribe(app.keys.kill_channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    refused = start(eng, "f9", at=T0 + 10)
    assert refused.reason == Reason.VELOCITY_LIMIT
    assert start(eng, "f10", at=T0 + 20).reason == Reason.BLOCKED  # at once, in Redis
    sync.drain(app, "w1")
    killed = pubsub.get_message(timeout=5)
    assert sorted(killed["data"].split()) == sorted(d.session for d in live)
    pubsub.close()
    row = app.books.get_account(ACCT)
    assert row.status == "blocked" and "hourly spending limit" in row.block_reason
    assert [k for k, _ in notices(app)] == ["fraud_suspected", "blocked"]
    # Who did it: callguard's fraud controls, the block and each kill.
    shown = views.who_and_why(app, row)
    assert (shown["blocked_by"]["actor"], shown["blocked_by"]["reason"]) == (
        "callguard:fraud", row.block_reason)
    assert shown["blocked_by"]["changes"]["status"] == {"old": "active", "new": "blocked"}
    kills = [a for a in shown["recent_actions"] if a["action"] == "kill"]
    assert sorted(a["session"] for a in kills) == sorted(d.session for d in live)
    assert {a["actor"] for a in kills} == {"callguard:fraud"}
    assert sync.reconcile(app) == []


def test_calls_per_minute_and_repeated_cap_hits_raise_a_fraud_notice(app, eng):
    prepaid(app, balance=500_000_000, max_calls_per_minute=3, max_channels=0)
    decisions = [eng.authorize(ACCT, NATIONAL, "outbound", f"r{i}", now_ms=T0 + i)
                 for i in range(14)]
    assert [d.allow for d in decisions[:4]] == [True, True, True, False]
    assert decisions[3].reason == Reason.RATE_LIMIT
    assert limit_events(app).count("fraud_suspected") == 1  # the 10th refusal in the minute
    assert eng.authorize(ACCT, NATIONAL, "outbound", "r99", now_ms=T0 + 61_000).allow


def test_account_level_blocked_prefixes(app, eng, run):
    prepaid(app, balance=50_000_000)
    result = run("account", "set", ACCT, "--block-prefix", "+41900", "--block-prefix", "00882")
    assert result.exit_code == 0 and "41900 882" in result.stdout
    assert eng.authorize(ACCT, "0041900123456", "outbound", "p1", now_ms=T0).reason \
        == Reason.DEST_BLOCKED
    assert eng.authorize(ACCT, "88212345", "outbound", "p2", now_ms=T0).reason \
        == Reason.DEST_BLOCKED
    assert run("account", "set", ACCT, "--unblock-prefix", "41900").exit_code == 0
    assert eng.authorize(ACCT, "41900123456", "outbound", "p3", now_ms=T0).allow
    refused = run("account", "set", ACCT, "--unblock-prefix", "41900")
    assert refused.exit_code == 1 and "not blocked" in refused.stderr


def test_auto_topup_needs_a_card_on_file_and_a_provider(app, eng, run):
    prepaid(app, balance=50_000_000)
    result = run("account", "set", ACCT, "--auto-topup-below", "10.00",
                 "--auto-topup-amount", "20.00")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("callguard: auto top-up needs a payment method on file "
                                     "(--payment-method TOKEN)")
    result = run("account", "set", ACCT, "--payment-method", "tok_1", "--auto-topup-below",
                 "10.00", "--auto-topup-amount", "20.00")
    assert result.exit_code == 1 and "CALLGUARD_PAYMENT_URL" in result.stderr
    postpaid(app, BIZ)
    with pytest.raises(service.BooksError, match="postpaid"):
        service.update_account(app, BIZ, payment_method="t", auto_topup_below=1,
                               auto_topup_amount=1)
    with app.books.session() as db:
        assert db.get(Account, ACCT).auto_topup_below is None


def test_one_topup_request_per_crossing_re_armed_only_by_money_or_new_settings(app, eng):
    paying = service.App(dataclasses.replace(app.settings, payment_url="http://127.0.0.1:9/"))
    prepaid(paying, balance=12_000_000, payment_method="tok_1", auto_topup_below=8_000_000,
            auto_topup_amount=20_000_000)
    # Asked once at creation, before the opening balance came (the worker skips a request
    # that is no longer wanted); the opening balance above the threshold re-armed it.
    assert limit_events(app).count("topup") == 1
    d = start(eng, "t1")  # 9.00 left: above 8.00
    assert limit_events(app).count("topup") == 1
    eng.extend(d.session, d.grant, now_ms=T0 + 50_000)  # 6.00 left: one request
    eng.commit(d.session, now_ms=T0 + 70_000)  # 3.50 charged, 8.50 available again...
    d = start(eng, "t2", at=T0 + 80_000)  # ...and below 8.00 once more: no second request
    assert limit_events(app).count("topup") == 2
    service.update_account(paying, ACCT, auto_topup_amount=30_000_000)  # new settings
    assert limit_events(app).count("topup") == 3
    service.move_money(paying, ACCT, "topup", 10_000_000, "bank-9")  # above it: re-armed
    eng.extend(d.session, d.grant, now_ms=T0 + 130_000)
    eng.extend(d.session, d.grant * 2, now_ms=T0 + 190_000)
    assert limit_events(app).count("topup") == 3  # 9.50 left
    eng.extend(d.session, d.grant * 3, now_ms=T0 + 250_000)  # 6.50: below it again
    assert limit_events(app).count("topup") == 4
    paying.close()


def test_a_topup_that_lifts_the_block_says_so(app, eng, run):
    prepaid(app, balance=4_000_000)
    d = start(eng, "c1")
    assert eng.extend(d.session, d.grant, now_ms=T0 + 50_000).final
    eng.commit(d.session, now_ms=T0 + 80_000)  # all 4.00 spent
    shown = json.loads(run("account", "show", ACCT, "--json").stdout)
    assert shown["limit_state"] == "exhausted"
    assert "blocked both ways" in run("account", "show", ACCT).stdout
    result = run("account", "topup", ACCT, "20.00", "--ref", "bank-3")
    assert result.exit_code == 0
    assert f"unblocked {ACCT}: calls are allowed again, both ways" in result.stdout
    assert "unblocked" not in run("account", "topup", ACCT, "1.00", "--ref", "bank-4").stdout
