"""The quota engine against real Redis: rules, idempotency, the books in step."""

from __future__ import annotations

import pytest

from callguard import service, sync
from callguard.decisions import Reason
from callguard.engine import state
from callguard.engine.connect import connect
from callguard.engine.core import SHARDS, shard_of

from engine_helpers import PREMIUM, T0, postpaid, prefixed_keys, prepaid, setup_plan, snapshot
from servers import admin_url


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
    assert d.session == "41441234567/c1/1"  # account / channel / attempt
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
    first = eng.authorize("41441234567", "41791234567", "outbound", "c1", now_ms=T0)
    assert first.allow  # the same request again: the same call, no second channel
    eng.release(first.session, now_ms=T0)
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


def test_a_pbx_talk_time_is_billed_from_the_answer_redis_holds(app, eng):
    """FreeSWITCH's billmsec: the end time's clock (off, or poisoned) does not count; a
    talk time no PBX reports is ignored; the cap at the grant end still holds."""
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0 + 5_000)
    charge = eng.commit(d.session, "16", now_ms=T0 + 200_000, end_ms=T0 + 9_000,
                        talk_ms=30_400)
    assert charge.duration == 30  # from the stored answer, floor, whatever end_ms says
    d = eng.authorize("41441234567", "41901234567", "outbound", "c2", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    charge = eng.commit(d.session, "16", now_ms=T0 + 200_000, talk_ms=600_000)
    assert charge.duration == 60 + app.settings.grace_seconds  # its grant, plus the grace
    d = eng.authorize("41441234567", "41901234567", "outbound", "c3", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    charge = eng.commit(d.session, "16", now_ms=T0 + 20_000, talk_ms=-5)
    assert charge.duration == 20  # not a duration: the end time tells


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
    eng.ops.quota = 3700  # one grant covers every call: no extends, no cap at its end
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
    assert sync.reconcile(app) == []  # undrained charges count as booked
    assert sync.drain(app, "w1") == 5
    assert sync.drain(app, "w1") == 0  # acknowledged and deleted: nothing comes back
    row = app.books.get_account("41441234567")
    assert row.balance == snapshot(app, "41441234567")["balance"]
    assert row.balance == app.books.ledger_sum("41441234567")
    assert len(app.books.cdrs("41441234567")) == 5
    assert sync.reconcile(app) == []


def test_redelivered_commit_is_booked_once(app, eng):
    prepaid(app)
    call(eng, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    stream = app.keys.events(shard_of("41441234567"))
    state.ensure_groups(app.redis, app.keys)
    events = app.redis.xreadgroup("books", "w1", {stream: ">"})
    commit = next(f for _, entries in events for _, f in entries if f["type"] == "commit")
    assert app.books.record_call(sync.cdr_from_event(commit)) is True
    # Not acknowledged: the next pass of the same consumer reads its pending entries again.
    assert sync.drain(app, "w1") == 1
    assert app.books.get_account("41441234567").balance == 49_500_000
    assert len(app.books.ledger("41441234567")) == 2  # opening balance + one charge
    assert app.redis.xlen(stream) == 0


def test_a_booked_commit_still_in_the_stream_is_not_counted_twice(app, eng):
    """The worker booked the CDR and died before it acknowledged the entry: reconcile
    must agree, and rebuild must not subtract the charge a second time."""
    prepaid(app)
    call(eng, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    stream = app.keys.events(shard_of("41441234567"))
    [(_, fields)] = app.redis.xrange(stream)
    app.books.record_call(sync.cdr_from_event(fields))
    assert app.books.get_account("41441234567").balance == 49_500_000
    assert sync.reconcile(app) == []
    sync.rebuild(app)
    assert snapshot(app, "41441234567")["balance"] == 49_500_000
    assert sync.reconcile(app) == []


def test_rebuild_after_redis_lost_its_data(app, eng):
    prepaid(app)
    call(eng, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    sync.drain(app, "w1")
    service.move_money(app, "41441234567", "topup", 5_000_000, "bank-1")
    for key in prefixed_keys(app):
        app.redis.delete(key)
    assert sync.rebuild(app) == 1
    assert snapshot(app, "41441234567")["balance"] == 54_500_000
    assert sync.reconcile(app) == []
    # A top-up retried after the loss is recognised by the books and applied nowhere.
    booking, applied = service.move_money(app, "41441234567", "topup", 5_000_000, "bank-1")
    assert not booking.created and applied.in_redis
    assert snapshot(app, "41441234567")["balance"] == 54_500_000


def test_rebuild_with_a_topup_landing_meanwhile_applies_it_once(app, eng, monkeypatch):
    prepaid(app, balance=10_000_000)
    for key in prefixed_keys(app):
        app.redis.delete(key)  # Redis lost its data
    accounts = app.books.list_accounts

    def topup_meanwhile():  # booked after rebuild started, before it reaches the account
        service.move_money(app, "41441234567", "topup", 5_000_000, "pay-123")
        return accounts()

    monkeypatch.setattr(app.books, "list_accounts", topup_meanwhile)
    sync.rebuild(app)
    monkeypatch.setattr(app.books, "list_accounts", accounts)
    service.apply_outbox(app)
    assert snapshot(app, "41441234567")["balance"] == 15_000_000
    assert sync.reconcile(app, rechecks=0) == []


def test_rebuild_with_a_commit_booked_meanwhile_subtracts_it_once(app, eng, monkeypatch):
    prepaid(app, balance=10_000_000)
    accounts = app.books.list_accounts

    def commit_meanwhile():  # committed and booked, not yet acknowledged by the worker
        call(eng, "41441234567", "41901234567", "c1", T0, T0 + 60_000)
        [fields] = [f for _, f in app.redis.xrange(app.keys.events(shard_of("41441234567")))
                    if f["type"] == "commit"]
        app.books.record_calls([sync.cdr_from_event(fields)])
        return accounts()

    monkeypatch.setattr(app.books, "list_accounts", commit_meanwhile)
    sync.rebuild(app)
    monkeypatch.setattr(app.books, "list_accounts", accounts)
    sync.drain(app, "w1")
    assert snapshot(app, "41441234567")["balance"] == 7_000_000
    assert sync.reconcile(app, rechecks=0) == []


def test_the_longest_ids_fit_every_column(app, eng):
    """A 64-character account and a 96-character channel: session ids and the ledger key of
    their charge fit, whatever the attempt number grows to; a longer channel is refused."""
    account, channel = "A" * 64, "c" * 96
    prepaid(app, account)
    app.redis.set(app.keys.seq(shard_of(account)), 10**12)  # a shard that has seen a lot
    d = call(eng, account, "41901234567", channel, T0, T0 + 10_000)
    assert d.allow
    assert sync.drain(app, "w1") == 1 and app.books.cdrs(account)[0].session == d.session
    assert sync.reconcile(app) == []
    longer = eng.authorize(account, "41901234567", "outbound", channel + "c", now_ms=T0)
    assert longer.reason == Reason.BAD_REQUEST


def test_an_earlier_life_of_the_same_pid_gives_its_identity_up(app):
    """A container restarts: same host, same boot, callguard is pid 1 again."""
    import os
    import socket

    from callguard.nodes import NodeClash, NodeLease, _boot_id

    earlier = f"{socket.gethostname()} {_boot_id()} {os.getpid()} 12345 old"
    app.redis.set(app.keys.node("n1"), earlier)
    NodeLease(app.engine, "n1").acquire(wait=0)  # this pid started later: not the holder
    with pytest.raises(NodeClash):
        NodeLease(app.engine, "n1").acquire(wait=0)  # this process holds it now


def test_made_up_accounts_leave_nothing_in_the_process(app, eng):
    for i in range(100):
        assert eng.authorize(f"nobody{i}", "41901234567", "outbound", "c1").reason == \
            Reason.UNKNOWN_ACCOUNT
    assert not eng.ops.plans.account_plan


# -- the same channel, another call ------------------------------------------------------

def test_a_second_authorize_for_another_destination_is_decided_anew(app, eng):
    """A dialplan that tries another number on the same channel gets that number's rate,
    and its block; the first attempt's reservation goes."""
    prepaid(app, balance=50_000_000)
    first = eng.authorize("41441234567", "41441234567", "outbound", "c1", now_ms=T0)
    assert first.allow and first.maxsec == 30_000  # national: CHF 0.10/min, 60/60
    blocked = eng.authorize("41441234567", "41991234567", "outbound", "c1", now_ms=T0 + 10)
    assert (blocked.allow, blocked.reason) == (False, Reason.DEST_BLOCKED)
    assert snapshot(app, "41441234567")["reserved"] == 0  # the first attempt was released
    eng.ops.quota = 600  # one slice for the whole call
    premium = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0 + 20)
    assert premium.allow and premium.session != first.session and premium.maxsec == 1000
    eng.answer(premium.session, now_ms=T0 + 20)
    eng.commit(premium.session, "16", now_ms=T0 + 20 + 600_000)  # 10 minutes at CHF 3.00
    sync.drain(app, "w1")
    assert app.books.get_account("41441234567").balance == 50_000_000 - 30_000_000
    cdrs = {c.session: (c.destination, c.cost) for c in app.books.cdrs("41441234567")}
    assert cdrs[premium.session] == ("41901234567", 30_000_000)
    assert cdrs[first.session] == ("41441234567", 0)


def test_direction_counts_as_another_call(app, eng):
    prepaid(app)
    out = eng.authorize("41441234567", "41441234567", "outbound", "c1", now_ms=T0)
    into = eng.authorize("41441234567", "41441234567", "inbound", "c1", now_ms=T0)
    assert out.allow and into.allow and into.session != out.session
    assert snapshot(app, "41441234567")["channels"] == 1


def test_an_authorize_after_the_commit_is_a_new_call_never_a_stale_allow(app, eng):
    prepaid(app, balance=3_000_000)  # one minute at CHF 3.00
    d = call(eng, "41441234567", "41901234567", "c1", T0, T0 + 60_000)
    assert d.allow and snapshot(app, "41441234567")["balance"] == 0
    again = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0 + 61_000)
    assert (again.allow, again.reason) == (False, Reason.NO_FUNDS)


def test_a_talking_call_replaced_on_its_channel_is_charged_up_to_then(app, eng):
    """A calling-card channel that dials a second number after the first call: the first is
    committed at the second authorize, both get their own CDR."""
    prepaid(app)
    first = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(first.session, now_ms=T0)
    second = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0 + 20_000)
    assert second.allow and second.session != first.session
    assert eng.extend(first.session, 60, now_ms=T0 + 21_000).state == "superseded"
    assert eng.commit(first.session, "16", now_ms=T0 + 30_000).state == "superseded"
    eng.commit(second.session, "16", now_ms=T0 + 30_000)  # never answered
    sync.drain(app, "w1")
    costs = {c.session: c.cost for c in app.books.cdrs("41441234567")}
    assert costs == {first.session: 1_000_000, second.session: 0}  # 20 s at CHF 3.00/min
    assert snapshot(app, "41441234567")["channels"] == 0


# -- bounds ------------------------------------------------------------------------------

def test_a_deny_leaves_nothing_in_redis(app, eng):
    prepaid(app, balance=0)
    before = prefixed_keys(app)
    for i in range(500):
        d = eng.authorize("41441234567", "41901234567", "outbound", f"flood{i}", now_ms=T0)
        assert d.reason == Reason.NO_FUNDS and d.session == ""
    assert prefixed_keys(app) == before
    assert all(app.redis.xlen(app.keys.events(n)) == 0 for n in range(SHARDS))


def test_billing_stops_at_the_grant_end_plus_grace_whatever_the_event_lag(app, eng):
    prepaid(app, balance=3_000_000)  # 60 s at CHF 3.00/min: the first grant is final
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    assert eng.extend(d.session, 60, now_ms=T0 + 55_000).final
    charge = eng.commit(d.session, "16", now_ms=T0 + 60_000 + 9_000)  # the event came late
    grace = app.settings.grace_seconds
    assert charge.duration == 60 + grace and charge.cost == PREMIUM.cost(60 + grace)


def test_a_commit_at_a_known_end_bills_to_that_end(app, eng):
    """A retried commit (Redis was away when the hangup came) bills to when it ended."""
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    charge = eng.commit(d.session, "16", now_ms=T0 + 50_000, end_ms=T0 + 12_000)
    assert charge.duration == 12


def test_a_blocked_account_gets_no_more_slices(app, eng):
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    eng.answer(d.session, now_ms=T0)
    service.update_account(app, "41441234567", status="blocked", block_reason="fraud")
    g = eng.extend(d.session, 60, now_ms=T0 + 55_000)
    assert (g.grant, g.final) == (60, True)
    assert snapshot(app, "41441234567")["reserved"] == 3_000_000  # the first slice only


def test_an_unanswered_session_is_released_once_the_pbx_gave_up_on_it(app, eng):
    prepaid(app)
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    s = app.settings
    # The PBX's own timeout: ring allowance + first grant + grace; then the sweeper's grace.
    gave_up = T0 + (s.ring_seconds + d.grant + s.grace_seconds + s.stale_grace_seconds) * 1000
    assert service.sweep(app, now_ms=gave_up - 1) == []
    assert service.sweep(app, now_ms=gave_up + 1) == [d.session]
    state_ = snapshot(app, "41441234567")
    assert (state_["reserved"], state_["channels"], state_["balance"]) == (0, 0, 50_000_000)


def test_the_worker_sweeps_only_what_no_live_node_holds(app, eng):
    """A live serve process may still be retrying a commit with its real end time (Redis
    was away): its sessions are its own to close; a dead node's are the worker's."""
    from callguard.engine.runner import SyncEngine
    from callguard.nodes import NodeLease

    prepaid(app)
    alive = SyncEngine(app.redis, app.ops("serve-alive"))
    dead = SyncEngine(app.redis, app.ops("serve-dead"))
    NodeLease(app.engine, "serve-alive").acquire()
    mine = alive.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    gone = dead.authorize("41441234567", "41901234567", "outbound", "c2", now_ms=T0)
    later = T0 + 3_600_000
    assert service.sweep(app, now_ms=later) == [gone.session]
    assert service.sweep(app, now_ms=later, node="serve-alive") == [mine.session]


# -- scale -------------------------------------------------------------------------------

def _commands(client, name: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0))


@pytest.mark.parametrize("accounts", [10, 3000])
def test_a_drain_pass_and_a_sweep_read_each_shard_once_however_many_accounts(
        app, eng, private_redis, accounts):
    app.__dict__.update(redis_url=private_redis.url, redis=private_redis.client())
    app.__dict__.pop("engine", None)
    pipe = app.redis.pipeline(transaction=False)
    for i in range(accounts):  # idle accounts, as Redis holds them
        pipe.hset(app.keys.account(f"idle{i}"), mapping={"status": "active", "balance": 1})
        pipe.sadd(app.keys.accounts, f"idle{i}")
    pipe.execute()
    prepaid(app)
    call(app.engine, "41441234567", "41901234567", "c1", T0, T0 + 10_000)
    state.ensure_groups(app.redis, app.keys)
    before = {n: _commands(app.redis, n) for n in ("xreadgroup", "zrangebyscore")}
    assert sync.Drain(app, "w1").run_once() == 1
    service.sweep(app, now_ms=T0)
    assert _commands(app.redis, "xreadgroup") - before["xreadgroup"] == 2 * SHARDS
    assert _commands(app.redis, "zrangebyscore") - before["zrangebyscore"] == SHARDS


def test_plan_change_reaches_a_process_that_guessed_wrong(app, eng):
    setup_plan(app, rates=[PREMIUM.__class__("4190", "cheap", 60_000, 0, 1, 1)], name="cheap")
    prepaid(app, plan="cheap")
    d = eng.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0)
    assert d.allow and d.maxsec == 50_000  # priced by 'cheap', learnt from Redis's reply


@pytest.fixture(params=["single", "cluster", "acl"])
def redis_url(request):
    """The whole engine suite runs on one Redis, on a real 3-master Redis Cluster and on a
    Redis where callguard has only the rights of contrib/redis/callguard.acl (the cluster's
    nodes load it too)."""
    return request.getfixturevalue(f"{request.param}_redis_url" if request.param != "cluster"
                                   else "cluster_url")


def test_scripts_are_reloaded_after_redis_forgot_them(app, redis_url, request):
    """EVALSHA with a reload on NOSCRIPT: a Redis restart or SCRIPT FLUSH costs nothing.
    The flush runs on the test's own cluster, or on a Redis of the test's own: never on a
    shared one."""
    if not redis_url.startswith("redis+cluster"):
        private = request.getfixturevalue("private_redis")
        app.__dict__.update(redis_url=private.url, redis=private.client())
        app.__dict__.pop("engine", None)
    setup_plan(app)
    prepaid(app)
    if redis_url.startswith("redis+cluster"):
        admin = connect(admin_url(redis_url))  # SCRIPT FLUSH: not callguard's to run
        for node in admin.get_primaries():
            admin.get_redis_connection(node).script_flush()
        admin.close()
    else:
        app.redis.script_flush()
    assert app.engine.authorize("41441234567", "41901234567", "outbound", "c1", now_ms=T0).allow
