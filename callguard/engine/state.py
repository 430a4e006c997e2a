"""Reading and seeding the engine's Redis state, off the call path.

Everything here uses the blocking client: the CLI, the worker and the
sweeper run it, and the asyncio adapters call it through a thread at start.
"""

from __future__ import annotations

import redis

from .core import Keys, session_id

GROUP = "books"  # the worker's consumer group on every account's event stream
CONFIG_FIELDS = ("kind", "status", "reason", "credit", "max_channels", "plan", "cps", "currency")


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
    }


def push_account(client, keys: Keys, row, balance: int | None = None) -> None:
    """Write an account's settings; its balance only when Redis has none (or when
    `balance` is given, as rebuild does)."""
    acct = keys.account(row.id)
    pipe = client.pipeline(transaction=False)
    pipe.hset(acct, mapping=account_fields(row))
    if balance is None:
        pipe.hsetnx(acct, "balance", row.balance)
    else:
        pipe.hset(acct, "balance", balance)
    pipe.hsetnx(acct, "reserved", 0)
    pipe.hsetnx(acct, "channels", 0)
    pipe.sadd(keys.accounts, row.id)
    pipe.execute()
    ensure_group(client, keys, row.id)


def ensure_group(client, keys: Keys, account: str) -> None:
    try:
        client.xgroup_create(keys.events(account), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def account_ids(client, keys: Keys) -> list[str]:
    return sorted(client.smembers(keys.accounts))


def account_state(client, keys: Keys, account: str) -> dict[str, int | str] | None:
    raw = client.hgetall(keys.account(account))
    if not raw:
        return None
    state = dict(raw)
    for name in ("balance", "credit", "reserved", "channels", "max_channels", "cps"):
        state[name] = int(raw.get(name, 0) or 0)
    state["available"] = state["balance"] + state["credit"] - state["reserved"]
    return state


def live_sessions(client, keys: Keys, accounts: list[str]) -> list[dict]:
    """Every supervised session of these accounts, with its deadline."""
    pipe = client.pipeline(transaction=False)
    for account in accounts:
        pipe.zrange(keys.live(account), 0, -1, withscores=True)
    members = pipe.execute()
    wanted = [(a, ch, int(score))
              for a, found in zip(accounts, members, strict=True) for ch, score in found]
    pipe = client.pipeline(transaction=False)
    for account, channel, _ in wanted:
        pipe.hgetall(keys.session(account, channel))
    out = []
    for (account, channel, deadline), fields in zip(wanted, pipe.execute(), strict=True):
        if fields:
            out.append({**fields, "account": account, "channel": channel,
                        "session": session_id(account, channel), "deadline": deadline})
    return out


def overdue(client, keys: Keys, accounts: list[str], now_ms: int) -> list[str]:
    """Sessions whose PBX has gone silent past their deadline."""
    pipe = client.pipeline(transaction=False)
    for account in accounts:
        pipe.zrangebyscore(keys.live(account), "-inf", now_ms)
    replies = pipe.execute()
    return [session_id(a, ch) for a, chans in zip(accounts, replies, strict=True) for ch in chans]


def undrained_commits(client, keys: Keys, account: str) -> list[dict]:
    """Commit events still in the stream, i.e. charges not yet in the books."""
    return [
        fields for _, fields in client.xrange(keys.events(account))
        if fields.get("type") == "commit"
    ]
