"""The quota engine against real Redis: rules, idempotency, the books in step."""

from __future__ import annotations

import pytest

from callguard import service
from callguard.decisions import Reason
from callguard.engine.core import session_id

from engine_helpers import PREMIUM, T0, postpaid, prepaid, setup_plan, snapshot


@pytest.fixture
def eng(app):
    setup_plan(app)
    return app.engine


def call(eng, account, dest, channel, answer_at=None, end_at=None, direction="outbound", at=T0):
    decision = eng.authorize(account, dest, direction, channel, now_ms=at)
    if decision.allow and answer_at is not None:
        eng.answer(decision.session, now_ms=answer_at)
    if decision.allow and end_at is not None:
        eng.commit(decision.session, "16", now_ms=end_at)
    return decision


def test_allow_reserves_first_slice_and_takes_a_channel(app, eng):
    prepaid(app)
    d = eng.authorize("41441234567", "+41901234567", "outbound", "c1", now_ms=T0)
    assert (d.allow, d.reason, d.grant, d.final) == (True, Reason.OK, 60, False)
    assert d.session == "41441234567/c1"
    assert d.maxsec == 1000  # CHF 50 at CHF 3/min, 1/1 increments
    s = snapshot(app, "41441234567")
    assert s["reserved"] == 3_000_000 and s["channels"] == 1 and s["balance"] == 50_000_000


def test_repeated_authorize_returns_first_answer_and_reserves_once(app, eng):
    prepaid(app)
    first = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    again = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0 + 5)
    assert again == first
    assert snapshot(app, "41441234567")["reserved"] == 3_000_000


@pytest.mark.parametrize("dest,reason", [
    ("41991234567", Reason.DEST_BLOCKED),
    ("3312345678", Reason.NO_RATE),
    ("12ab", Reason.BAD_REQUEST),
])
def test_destination_denials(app, eng, dest, reason):
    prepaid(app)
    d = eng.authorize("41441234567", dest, "outbound", "c1", now_ms=T0)
    assert (d.allow, d.reason) == (False, reason)
    assert snapshot(app, "41441234567")["reserved"] == 0


def test_unknown_account(app, eng):
    d = eng.authorize("999", "41791234567", "outbound", "c1", now_ms=T0)
    assert (d.allow, d.reason) == (False, Reason.UNKNOWN_ACCOUNT)


def test_operator_block_denies_both_directions_until_unblocked(app, eng):
    prepaid(app)
    service.update_account(app, "41441234567", status="blocked", block_reason="fraud")
    for i, direction in enumerate(("outbound", "inbound")):
        d = eng.authorize("41441234567", "41791234567", direction, f"c{i}", now_ms=T0)
        assert d.reason == Reason.BLOCKED
    service.update_account(app, "41441234567", status="active", block_reason=None)
    assert eng.authorize("41441234567", "41791234567", "outbound", "c9", now_ms=T0).allow


def test_no_funds_blocks_both_ways_and_topup_lifts_it(app, eng):
    prepaid(app, balance=0)
    for i, direction in enumerate(("outbound", "inbound")):
        d = eng.authorize("41441234567", "41791234567", direction, f"c{i}", now_ms=T0)
        assert d.reason == Reason.NO_FUNDS
    service.move_money(app, "41441234567", "topup", 1_000_000, "r1")
    assert eng.authorize("41441234567", "41791234567", "inbound", "c3", now_ms=T0).allow


def test_outbound_needs_connect_fee_and_first_increment(app, eng):
    # CH mobile: 0.05 connect + 30 s at 0.40/min = 0.25 for the first increment.
    prepaid(app, balance=249_999)
    d = eng.authorize("41441234567", "41791234567", "outbound", "c1", now_ms=T0)
    assert d.reason == Reason.NO_FUNDS
    service.move_money(app, "41441234567", "topup", 1, "one-micro")
    d = eng.authorize("41441234567", "41791234567", "outbound", "c2", now_ms=T0)
    assert (d.allow, d.grant) == (True, 30)


def test_postpaid_credit_limit(app, eng):
    postpaid(app, credit_limit=3_000_000)
    d = eng.authorize("4144555", "41901234567", "outbound", "c1", now_ms=T0)
    assert (d.allow, d.grant) == (True, 60)
    eng.answer(d.session, now_ms=T0)
    charge = eng.commit(d.session, "16", now_ms=T0 + 60_000)
    assert charge.cost == 3_000_000
    s = snapshot(app, "4144555")
    assert s["balance"] == -3_000_000 and s["available"] == 0
    d = eng.authorize("4144555", "41901234567", "inbound", "c2", now_ms=T0)
    assert d.reason == Reason.NO_FUNDS  # outstanding reached the limit: blocked both ways
    service.move_money(app, "4144555", "payment", 3_000_000, "inv-1")
    assert eng.authorize("4144555", "41901234567", "inbound", "c3", now_ms=T0).allow


def test_channel_limit_counts_both_directions(app, eng):
    prepaid(app, max_channels=2)
    assert eng.authorize("41441234567", "41791234567", "outbound", "c1", now_ms=T0).allow
    assert eng.authorize("41441234567", "41441234567", "inbound", "c2", now_ms=T0).allow
    d = eng.authorize("41441234567", "41791234567", "outbound", "c3", now_ms=T0)
    assert d.reason == Reason.CHANNEL_LIMIT
    eng.release("41441234567/c1", now_ms=T0)
    assert eng.authorize("41441234567", "41791234567", "outbound", "c4", now_ms=T0).allow


def test_cps_limit(app, eng):
    prepaid(app, cps_limit=2)
    results = [eng.authorize("41441234567", "41791234567", "outbound", f"c{i}", now_ms=T0).reason
               for i in range(3)]
    assert results == [Reason.OK, Reason.OK, Reason.RATE_LIMIT]
    d = eng.authorize("41441234567", "41791234567", "outbound", "c9", now_ms=T0 + 1000)
    assert d.allow


def test_inbound_is_free_without_inbound_rates(app, eng):
    prepaid(app, balance=1_000_000)
    d = call(eng, "41441234567", "41441234567", "c1", T0, T0 + 600_000, direction="inbound")
    assert d.allow
    assert snapshot(app, "41441234567")["balance"] == 1_000_000


def test_ring_time_is_not_billed(app, eng):
    prepaid(app)
    d = call(eng, "41441234567", "41901234567", "c1", answer_at=T0 + 5_000, end_at=T0 + 15_000)
    assert d.allow
    cdr_cost = service.state.account_state(app.redis, app.keys, "41441234567")["balance"]
    assert 50_000_000 - cdr_cost == 500_000  # 10 s at CHF 3/min, not 15 s


def test_unanswered_costs_nothing_and_frees_everything(app, eng):
    prepaid(app)
    d = call(eng, "41441234567", "41901234567", "c1", end_at=T0 + 30_000)
    s = snapshot(app, "41441234567")
    assert d.allow and (s["balance"], s["reserved"], s["channels"]) == (50_000_000, 0, 0)


def test_extend_shrinks_to_credit_then_final(app, eng):
    prepaid(app, balance=4_000_000)  # 80 s at CHF 3/min
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    g = eng.answer(d.session, now_ms=T0)
    assert (g.grant, g.grant_end_ms, g.final) == (60, T0 + 60_000, False)
    g = eng.extend(d.session, 60, now_ms=T0 + 55_000)
    assert (g.grant, g.final) == (80, True)
    assert snapshot(app, "41441234567")["reserved"] == 4_000_000
    again = eng.extend(d.session, 60, now_ms=T0 + 56_000)  # retried: nothing twice
    assert again.grant == 80
    charge = eng.commit(d.session, "16", now_ms=T0 + 80_400)
    assert (charge.duration, charge.cost) == (80, 4_000_000)
    s = snapshot(app, "41441234567")
    assert (s["balance"], s["reserved"], s["channels"]) == (0, 0, 0)


def test_extend_too_early_does_nothing(app, eng):
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    g = eng.extend(d.session, 60, now_ms=T0 - 1_000)
    assert g.grant == 60 and snapshot(app, "41441234567")["reserved"] == 3_000_000


def test_commit_is_idempotent(app, eng):
    prepaid(app)
    d = call(eng, "41441234567", "41901234567", "c1", T0, T0 + 30_000)
    late = eng.commit(d.session, "16", now_ms=T0 + 90_000)
    assert late.state == "already" and late.cost == 1_500_000
    assert eng.answer(d.session, now_ms=T0 + 91_000).state == "done"
    assert snapshot(app, "41441234567")["balance"] == 48_500_000


def test_increment_rounding_in_redis_matches_python(app, eng):
    prepaid(app, balance=100_000_000)
    from engine_helpers import MOBILE
    for i, seconds in enumerate((0, 1, 29, 30, 31, 36, 37, 59, 61, 3601)):
        before = snapshot(app, "41441234567")["balance"]
        call(eng, "41441234567", "41791234567", f"m{i}", T0, T0 + seconds * 1000 + 999)
        assert before - snapshot(app, "41441234567")["balance"] == MOBILE.cost(seconds), seconds


def test_stale_session_charged_to_last_grant_and_released(app, eng):
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    assert service.sweep(app, now_ms=T0 + 61_000) == []  # inside the grace period
    closed = service.sweep(app, now_ms=T0 + 60_000 + 30_001)
    assert closed == [d.session]
    s = snapshot(app, "41441234567")
    assert (s["balance"], s["reserved"], s["channels"]) == (47_000_000, 0, 0)


def test_worker_books_calls_once_and_balances_agree(app, eng):
    prepaid(app)
    for i in range(5):
        call(eng, "41441234567", "41901234567", f"c{i}", T0, T0 + (i + 1) * 7_000)
    assert service.reconcile(app) == []  # undrained charges count as booked
    service.drain(app, "w1")
    # A crash after the SQL commit but before XACK: the entries come back; nothing doubles.
    assert service.drain(app, "w1", pending=True) == 0
    row = app.books.get_account("41441234567")
    assert row.balance == snapshot(app, "41441234567")["balance"]
    assert row.balance == app.books.ledger_sum("41441234567")
    assert len(app.books.cdrs("41441234567")) == 5
    assert service.reconcile(app) == []


def test_redelivered_commit_is_booked_once(app, eng):
    prepaid(app)
    d = call(eng, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    events = app.redis.xreadgroup("books", "w1", {app.keys.events("41441234567"): ">"})
    commit = next(f for _, entries in events for _, f in entries if f["type"] == "commit")
    assert app.books.record_call(service.cdr_from_event(commit)) is True
    # Crash here: not acknowledged. The next worker run reads the pending entries again.
    service.drain(app, "w1", pending=True)
    assert app.books.get_account("41441234567").balance == 49_500_000
    assert len(app.books.ledger("41441234567")) == 2  # opening balance + one charge
    assert d.session == session_id("41441234567", "c1")


def test_rebuild_after_redis_lost_its_data(app, eng):
    prepaid(app)
    call(eng, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    service.drain(app, "w1")
    for key in app.redis.scan_iter(f"{app.keys.prefix}:*"):
        app.redis.delete(key)
    assert service.rebuild(app) == 1
    assert snapshot(app, "41441234567")["balance"] == 49_500_000
    assert service.reconcile(app) == []
    # A retried top-up from before the loss is recognised.
    assert not app.engine.credit("41441234567", 50_000_000, "open:41441234567")[0]


def test_plan_change_reaches_a_process_that_guessed_wrong(app, eng):
    setup_plan(app, rates=[PREMIUM.__class__("4190", "cheap", 60_000, 0, 1, 1)], name="cheap")
    prepaid(app, plan="cheap")
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    assert d.allow and d.maxsec == 50_000  # priced by 'cheap', learnt from Redis's reply


@pytest.fixture(params=["single", "cluster"])
def redis_url(request):
    """The whole engine suite runs on one Redis and on a real 3-master Redis Cluster."""
    name = "single_redis_url" if request.param == "single" else "cluster_url"
    return request.getfixturevalue(name)


def test_scripts_are_reloaded_after_redis_forgot_them(app, eng, redis_url):
    """EVALSHA with a reload on NOSCRIPT: a Redis restart or SCRIPT FLUSH costs nothing."""
    prepaid(app)
    if redis_url.startswith("redis+cluster"):
        for node in app.redis.get_primaries():
            app.redis.get_redis_connection(node).script_flush()
    else:
        app.redis.script_flush()
    assert eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0).allow
