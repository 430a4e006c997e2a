"""Properties of the quota engine under random concurrent interleavings (real Redis)."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callguard import service, sync
from callguard.rating import Rate

from engine_helpers import T0, prepaid, setup_plan, snapshot

RATES = [
    Rate("4190", "premium 1/1", 3_000_000, 0, 1, 1),
    Rate("4191", "premium 60/60 with fee", 2_500_000, 500_000, 60, 60),
    Rate("4192", "mobile 30/6", 470_000, 50_000, 30, 6),
    Rate("4193", "odd 7/13", 1_234_567, 1, 7, 13),
]
_accounts = itertools.count()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    balance=st.integers(0, 20_000_000),
    rate_index=st.integers(0, len(RATES) - 1),
    quota=st.sampled_from([1, 6, 30, 60, 120]),
    seed=st.integers(0, 2**32),
)
def test_concurrent_sessions_never_overspend(app, balance, rate_index, quota, seed):
    rnd = random.Random(seed)
    rate = RATES[rate_index]
    if not hasattr(app, "_plan_ready"):
        setup_plan(app, RATES)
        app._plan_ready = True
    account = f"p{next(_accounts)}"
    prepaid(app, account, balance=balance)
    app.engine.ops.quota = quota
    eng = app.engine
    now = T0
    sessions: dict[str, dict] = {}  # live ones
    expected_total = 0
    charged_total = 0
    increment_cost = rate.cost_of_billed(rate.subsequent_increment) - rate.connect_fee
    started = 0

    for step in range(rnd.randint(10, 80)):
        now += rnd.randint(0, 20_000)
        action = rnd.random()
        if action < 0.3 and started < 30:
            channel = f"c{step}"
            d = eng.authorize(account, rate.prefix + "1234", "outbound", channel, now_ms=now)
            started += 1
            if d.allow:
                sessions[d.session] = {"answer": None, "grant": d.grant, "end": 0}
        elif not sessions:
            continue
        else:
            sid = rnd.choice(sorted(sessions))
            s = sessions[sid]
            if s["answer"] is None and action < 0.6:
                g = eng.answer(sid, now_ms=now)
                s.update(answer=now, grant=g.grant, end=g.grant_end_ms, final=g.final)
            elif s["answer"] is not None and action < 0.8 and now < s["end"]:
                g = eng.extend(sid, s["grant"], now_ms=now)
                s.update(grant=g.grant, end=g.grant_end_ms, final=g.final)
            else:
                # The PBX ends the call: by itself, or at the latest when the grant runs
                # out, possibly up to one increment late (its own timeout, our grace).
                end = now
                if s["answer"] is not None:
                    end = min(now, s["end"] + rnd.randint(0, rate.subsequent_increment * 1000 - 1))
                charge = eng.commit(sid, "16", now_ms=end)
                assert charge.state == "done"
                if s["answer"] is not None:
                    # Billing stops at the PBX's own deadline: the grant's end plus the grace.
                    billed_to = min(end, s["end"] + app.settings.grace_seconds * 1000)
                    expected_total += rate.cost((billed_to - s["answer"]) // 1000)
                charged_total += charge.cost
                assert eng.commit(sid, "16", now_ms=end + 5_000).state == "already"
                del sessions[sid]
        state = snapshot(app, account)
        assert state["reserved"] >= 0 and state["channels"] == len(sessions)

    for sid, s in sessions.items():  # hang up what is left at its grant end
        end = s["end"] if s["answer"] is not None else now
        charge = eng.commit(sid, "16", now_ms=end)
        if s["answer"] is not None:
            expected_total += rate.cost((end - s["answer"]) // 1000)
        charged_total += charge.cost

    state = snapshot(app, account)
    assert charged_total == expected_total  # charges are exactly the rated durations
    assert state["balance"] == balance - charged_total  # nothing charged twice
    assert (state["reserved"], state["channels"]) == (0, 0)
    # Spend beyond credit: at most one increment per session (the late end above).
    assert charged_total - balance <= started * increment_cost


def test_thousands_of_random_operations_leave_redis_and_books_equal(app):
    """After the worker drains, Redis balances equal SQL balances to the micro-unit."""
    setup_plan(app, RATES)
    rnd = random.Random(20261121)
    accounts = [f"r{i}" for i in range(6)]
    for i, account in enumerate(accounts):
        if i % 2:
            service.create_account(app, account, kind="postpaid", credit_limit=8_000_000,
                                   max_channels=4)
        else:
            prepaid(app, account, balance=5_000_000, max_channels=4)
    eng, now, live = app.engine, T0, {}
    for step in range(3000):
        now += rnd.randint(0, 3_000)
        account = rnd.choice(accounts)
        kind = app.books.get_account(account).kind if step % 50 == 0 else None
        roll = rnd.random()
        if kind is not None:
            service.move_money(app, account, "topup" if kind == "prepaid" else "payment",
                               rnd.randint(1, 3_000_000), ref=f"m{step}")
        elif roll < 0.35:
            rate = rnd.choice(RATES)
            d = eng.authorize(account, rate.prefix + "77", rnd.choice(["outbound", "inbound"]),
                              f"x{step}", now_ms=now)
            if d.allow:
                live[d.session] = None
        elif live:
            sid = rnd.choice(sorted(live))
            if live[sid] is None and roll < 0.6:
                live[sid] = eng.answer(sid, now_ms=now)
            elif live[sid] is not None and roll < 0.8:
                live[sid] = eng.extend(sid, live[sid].grant, now_ms=now)
            else:
                eng.commit(sid, "16", now_ms=now)
                del live[sid]
        if step % 500 == 0:
            sync.drain(app, "w1")
    for sid in list(live):
        eng.commit(sid, "16", now_ms=now)
    sync.drain(app, "w1")
    for account in accounts:
        row = app.books.get_account(account)
        state = snapshot(app, account)
        assert row.balance == state["balance"] == app.books.ledger_sum(account)
        assert (state["reserved"], state["channels"]) == (0, 0)
    assert sync.reconcile(app) == []
    # The run did what it claims: calls were charged, and movements booked, on every account.
    charged = {c.account for c in app.books.cdrs() if c.cost > 0}
    assert charged == set(accounts)
    assert all(any(e.kind in ("topup", "payment") and e.reference
                   for e in app.books.ledger(a)) for a in accounts)
