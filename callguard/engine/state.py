"""Reading and seeding the engine's Redis state, off the call path.

Everything here uses the blocking client: the CLI, the worker and the
sweepers run it, and the asyncio adapters call it through a thread.
"""

from __future__ import annotations

import redis

from ..books.models import as_utc
from .core import LAYOUT, SHARDS, Keys, shard_of

GROUP = "books"  # the worker's consumer group on every shard's event stream


class LayoutMismatch(RuntimeError):
    pass


DEFAULT_WARN_BELOW = 10_000_000  # the seeds: prepaid customers are warned from 10.00 left
CENT = 10_000  # less available than this is nothing (CENT in common.lua)


def warn_level(row) -> int:
    """Available credit below which the account is warned: prepaid `warn_below` (default
    10.00); postpaid from the moment outstanding plus live calls reach `warn_at`."""
    if row.kind == "prepaid":
        return DEFAULT_WARN_BELOW if row.warn_below is None else row.warn_below
    return 0 if row.warn_at is None else row.credit_limit - row.warn_at + 1


def topup_below(row) -> int:
    """The auto top-up threshold the engine watches (0: none)."""
    if row.kind == "prepaid" and row.payment_method and row.auto_topup_amount:
        return row.auto_topup_below or 0
    return 0


def account_fields(row) -> dict[str, str | int]:
    """The Redis view of an SQL account row (everything but the moving money)."""
    return {
        "kind": row.kind,
        "status": row.status,
        "reason": row.block_reason or "",
        "credit": row.credit_limit if row.kind == "postpaid" else 0,
        "max_channels": row.max_channels,
        "plan": row.plan,
        "cps": row.cps_limit,
        "currency": row.currency,
        "warn": warn_level(row),
        "tpb": topup_below(row),
        "cpm": row.max_calls_per_minute or 0,
        "vmax": row.max_spend_per_hour or 0,
        "bp": row.blocked_prefixes or "",
        "fraud": row.on_fraud or "notify",
        "ub": int(as_utc(row.unblocked_at).timestamp() * 1000) if row.unblocked_at else 0,
    }


def push_account(engine, row) -> None:
    """Write an account's settings (settings.lua) and list it."""
    engine.settings(row.id, account_fields(row))
    engine.client.sadd(engine.keys.accounts, row.id)


def check_layout(client, keys: Keys) -> None:
    """Claim this Redis for our key layout, or refuse one written by another version."""
    client.set(keys.layout, LAYOUT, nx=True)
    found = client.get(keys.layout)
    if found != LAYOUT:
        raise LayoutMismatch(
            f"Redis holds callguard key layout {found!r}, this version uses {LAYOUT!r}: "
            "drain the old worker, then `callguard rebuild --yes` (README, changelog)")


def ensure_groups(client, keys: Keys) -> None:
    for shard in range(SHARDS):
        try:
            client.xgroup_create(keys.events(shard), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def account_ids(client, keys: Keys) -> list[str]:
    return sorted(client.sscan_iter(keys.accounts, count=1000))


def account_state(client, keys: Keys, account: str) -> dict[str, int | str] | None:
    return account_reading(client.hgetall(keys.account(account)))


def account_reading(raw: dict) -> dict[str, int | str] | None:
    """An account's Redis hash (HGETALL, or a pipeline's reply), its money as integers."""
    if not raw:
        return None
    state = dict(raw)
    for name in ("balance", "credit", "reserved", "channels", "max_channels", "cps"):
        state[name] = int(raw.get(name, 0) or 0)
    state["available"] = state["balance"] + state["credit"] - state["reserved"]
    return state


def live_members(client, keys: Keys, account: str | None, max_score="+inf") -> list:
    """(member, deadline) of the live sets: one account's, or every shard's."""
    shards = [shard_of(account)] if account else range(SHARDS)
    pipe = client.pipeline(transaction=False)
    for shard in shards:
        pipe.zrangebyscore(keys.live(shard), "-inf", max_score, withscores=True)
    found = [(m, int(score)) for reply in pipe.execute() for m, score in reply]
    if account:
        found = [(m, d) for m, d in found if m.startswith(account + "/")]
    return found


def live_sessions(client, keys: Keys, account: str | None = None,
                  overdue_at: int | None = None) -> list[dict]:
    """Supervised sessions (of one account, or all; only those whose deadline passed
    `overdue_at` when given), each with its id and deadline."""
    members = live_members(client, keys, account, "+inf" if overdue_at is None else overdue_at)
    pipe = client.pipeline(transaction=False)
    for member, _ in members:
        account_id, channel = member.split("/", 1)
        pipe.hgetall(keys.session(account_id, channel))
    found = (session_reading(member, deadline, fields)
             for (member, deadline), fields in zip(members, pipe.execute(), strict=True))
    return [session for session in found if session is not None]


def session_reading(member: str, deadline: int, fields: dict) -> dict | None:
    """A live set's member and its session hash (a pipeline's reply): the session with its
    id and deadline, or None when the hash is gone or the call is over."""
    if fields.get("n") and fields.get("st") in ("auth", "ans"):
        return {**fields, "account": fields["acct"], "channel": fields["ch"],
                "session": f"{member}/{fields['n']}", "deadline": deadline}
    return None


def pending_commits(client, keys: Keys, shard: int, dead: bool = False) -> list[dict]:
    """Commit events still in a shard's stream (or its dead letters): charges Redis made
    that may not be in the books yet."""
    stream = keys.dead(shard) if dead else keys.events(shard)
    return [fields for _, fields in client.xrange(stream) if fields.get("type") == "commit"]


def stream_backlog(client, keys: Keys) -> list[tuple[int, int, int, int]]:
    """(shard, lag, pending, dead letters) of every shard: entries the worker has not read
    yet, read and not settled, set aside. Lag is what Redis 7 tells (0 on older ones)."""
    pipe = client.pipeline(transaction=False)
    for shard in range(SHARDS):
        pipe.xinfo_groups(keys.events(shard))
        pipe.xlen(keys.dead(shard))
    replies = pipe.execute(raise_on_error=False)
    backlog = []
    for shard in range(SHARDS):
        groups, dead = replies[2 * shard], replies[2 * shard + 1]
        ours = [] if isinstance(groups, Exception) else [
            g for g in groups if g.get("name") == GROUP]
        if isinstance(dead, Exception):
            raise dead
        if ours:
            backlog.append((shard, int(ours[0].get("lag") or 0), int(ours[0]["pending"]),
                            int(dead)))
    return backlog
