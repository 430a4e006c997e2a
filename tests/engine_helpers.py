"""Helpers for engine tests: accounts and plans set up the way the CLI does it."""

from __future__ import annotations

from callguard import service
from callguard.engine import state
from callguard.engine.connect import connect
from callguard.engine.core import shard_of
from callguard.rating import Rate

from servers import admin_url

T0 = 1_900_000_000_000  # simulated clock, epoch ms

PREMIUM = Rate("4190", "premium", 3_000_000, 0, 1, 1)  # CHF 3.00/min, 1/1
NATIONAL = Rate("41", "Switzerland", 100_000, 0, 60, 60)  # CHF 0.10/min, 60/60
MOBILE = Rate("417", "CH mobile", 400_000, 50_000, 30, 6)  # CHF 0.40/min + 0.05, 30/6
BLOCKED = Rate("4199", "blocked", 1_000_000, 0, 1, 1, blocked=True)


def setup_plan(app, rates=(PREMIUM, NATIONAL, MOBILE, BLOCKED), name="default",
               direction="outbound"):
    service.import_plan(app, name, direction, list(rates))
    app.plans.replace(app.books.load_plans())


def prepaid(app, account="41441234567", balance=50_000_000, max_channels=0, **values):
    row, applied = service.create_account(app, account, opening_balance=balance,
                                          kind="prepaid", max_channels=max_channels, **values)
    assert applied.in_redis
    return row


def postpaid(app, account="4144555", credit_limit=300_000_000, max_channels=0, **values):
    row, applied = service.create_account(app, account, kind="postpaid",
                                          credit_limit=credit_limit, max_channels=max_channels,
                                          **values)
    assert applied.in_redis
    return row


def limit_entries(app, account) -> list[tuple[str, dict]]:
    """The engine's limit events for `account` still in its shard's stream, in order."""
    stream = app.keys.events(shard_of(account))
    return [(i, f) for i, f in app.redis.xrange(stream)
            if f.get("type") == "limit" and f["acct"] == account]


def answered(eng, account, channel, dest, at=T0, direction="outbound"):
    """A call authorised and, when allowed, answered at once (simulated time `at`)."""
    decision = eng.authorize(account, dest, direction, channel, now_ms=at)
    if decision.allow:
        eng.answer(decision.session, now_ms=at)
    return decision


def snapshot(app, account):
    return state.account_state(app.redis, app.keys, account)


def prefixed_keys(app) -> set[str]:
    """Every key of this test's prefix. SCAN as an admin: callguard's own ACL user may not
    list keys (contrib/redis/callguard.acl)."""
    client = connect(admin_url(app.redis_url))
    try:
        return set(client.scan_iter(f"{app.keys.prefix}:*"))
    finally:
        client.close()
