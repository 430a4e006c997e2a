"""What an operator sees of an account, a live call, a CDR or a ledger entry: one dict each,
the same for the CLI's `--json` and the HTTP API. Money as decimal strings, times as
ISO 8601 UTC with milliseconds."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time

from sqlalchemy import func, select

from .books.ledger import BooksError
from .books.models import MONEY_SETTINGS, Cdr, LedgerEntry, OperatorAction, as_utc
from .engine import state
from .money import format_full
from .rating import Rate

# The engine's limit level (common.lua `watch`): 2 blocks calls both ways until money arrives.
LIMIT_STATES = {"0": "ok", "1": "warned", "2": "exhausted"}


def money(micros: int | None) -> str | None:
    return None if micros is None else format_full(micros)


def iso(at: datetime | None) -> str | None:
    return None if at is None else as_utc(at).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def iso_ms(ms: int | None) -> str | None:
    return None if ms is None else iso(datetime.fromtimestamp(ms / 1000, UTC))


def epoch_ms(value: str | datetime | None, end: bool = False) -> int | None:
    """A date (`YYYY-MM-DD`, UTC) or an ISO 8601 time as epoch ms; a bare date as an end
    includes that whole day."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(as_utc(value).timestamp() * 1000)
    try:
        at = (datetime.combine(date.fromisoformat(value), time.max if end else time.min, UTC)
              if len(value) == 10 else as_utc(datetime.fromisoformat(value)))
    except (ValueError, OverflowError):
        raise BooksError(f"not a date: {value!r} (YYYY-MM-DD or an ISO 8601 time)") from None
    return int(at.timestamp() * 1000)


def moment(value: str | None, end: bool = False) -> datetime | None:
    ms = epoch_ms(value, end)
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def account_view(live: dict | None, row) -> dict:
    """An account as the books hold it, its money as Redis holds it now (`live`: its
    Redis hash, state.account_state)."""
    live = live or {}
    reserved = live.get("reserved", 0)
    balance = live.get("balance", row.balance)
    credit = row.credit_limit if row.kind == "postpaid" else 0
    return {
        "account": row.id,
        "kind": row.kind,
        "currency": row.currency,
        "status": row.status,
        "block_reason": row.block_reason,
        "plan": row.plan,
        "balance": format_full(balance),
        "credit_limit": format_full(credit),
        "outstanding": format_full(-balance if row.kind == "postpaid" else 0),
        "reserved": format_full(reserved),
        "available": format_full(balance + credit - reserved),
        "channels": live.get("channels", 0),
        "max_channels": row.max_channels,
        "cps_limit": row.cps_limit,
        "limit_state": LIMIT_STATES.get(str(live.get("lv", "")), "ok"),
        "warn_below": money(row.warn_below),
        "warn_at": money(row.warn_at),
        "email": row.email,
        "auto_topup": ({"below": money(row.auto_topup_below),
                        "amount": money(row.auto_topup_amount),
                        "payment_method": "on file"}
                       if state.topup_below(row) else None),
        "max_calls_per_minute": row.max_calls_per_minute,
        "max_spend_per_hour": money(row.max_spend_per_hour or None),
        "blocked_prefixes": row.blocked_prefixes.split(),
        "on_fraud": row.on_fraud,
    }


def account_of(app, row) -> dict:
    return account_view(state.account_state(app.redis, app.keys, row.id), row)


def call_view(s: dict, now: int) -> dict:
    """A live session (state.live_sessions) at `now` (epoch ms, Redis' clock)."""
    answered = int(s["ans"]) if s.get("ans") else None
    talk = max(0, now - answered) // 1000 if answered else 0
    rate = Rate(s.get("pfx", ""), "", int(s["r"]), int(s["cf"]), int(s["i"]), int(s["s"]))
    grant_end = int(s["ge"]) if s.get("ge") else None
    left = max(0, grant_end - now) // 1000 if grant_end is not None else None
    return {
        "session": s["session"], "account": s["account"], "direction": s["dir"],
        "destination": s["dst"], "node": s.get("node", ""),
        "state": call_state(s, left),
        "answered_at": iso_ms(answered),
        "answered_for": talk,
        "granted_until": grant_end // 1000 if grant_end else None,
        "grant_end": iso_ms(grant_end),
        "granted_seconds": int(s.get("g", 0)),
        "left_seconds": left,
        "cost_so_far": format_full(rate.cost(talk, answered is not None)),
        "reserved": format_full(int(s.get("hold", 0))),
    }


def call_state(session: dict, left: int | None) -> str:
    """What the session hash says (authorize.lua, answer.lua, extend.lua): `st` auth is
    ringing, ans is answered; `fin` 1 means the grant it holds is its last (no credit for
    more), so the call ends when it runs out, as it does once nothing of it is left."""
    if session.get("st") != "ans":
        return "ringing"
    if session.get("fin") == "1" or left == 0:
        return "ending"
    return "talking"


def live_calls(app, account: str | None = None) -> list[dict]:
    from .service import redis_now_ms

    now = redis_now_ms(app.redis)
    return [call_view(s, now) for s in state.live_sessions(app.redis, app.keys, account)]


CDR_COLUMNS = ("session", "account", "direction", "destination", "prefix", "setup", "answer",
               "end", "duration", "billed", "rate_per_min", "connect_fee", "cost", "cause",
               "node")
LEDGER_COLUMNS = ("entry", "at", "kind", "amount", "balance", "reference", "session", "actor",
                  "reason")
RECENT_ACTIONS = 5  # what `account show` lists of an account's operator actions


def cdr_view(c: Cdr) -> dict:
    return {"session": c.session, "account": c.account, "direction": c.direction,
            "destination": c.destination, "prefix": c.prefix, "setup": iso_ms(c.setup_ms),
            "answer": iso_ms(c.answer_ms), "end": iso_ms(c.end_ms), "duration": c.duration,
            "billed": c.billed, "rate_per_min": format_full(c.rate_per_min),
            "connect_fee": format_full(c.connect_fee), "cost": format_full(c.cost),
            "cause": c.cause, "node": c.node}


def cdr_query(account: str | None, since_ms: int | None, until_ms: int | None):
    """CDRs by the time they ended, oldest first (then by id: a stable order to page by)."""
    query = select(Cdr).order_by(Cdr.end_ms, Cdr.id)
    if account:
        query = query.where(Cdr.account == account)
    if since_ms is not None:
        query = query.where(Cdr.end_ms >= since_ms)
    if until_ms is not None:
        query = query.where(Cdr.end_ms <= until_ms)
    return query


def ledger_query(account: str, since: datetime | None = None, until: datetime | None = None):
    query = select(LedgerEntry).where(LedgerEntry.account == account).order_by(LedgerEntry.id)
    if since is not None:
        query = query.where(LedgerEntry.created_at >= since)
    if until is not None:
        query = query.where(LedgerEntry.created_at <= until)
    return query


def balance_before(db, account: str, entry_id: int) -> int:
    """The running balance just before ledger entry `entry_id`: a page starts there."""
    return db.scalar(select(func.coalesce(func.sum(LedgerEntry.amount), 0))
                     .where(LedgerEntry.account == account, LedgerEntry.id < entry_id))


def ledger_views(entries, balance: int = 0):
    """Ledger entries with the running balance after each, from `balance` before the first."""
    for e in entries:
        balance += e.amount
        yield {"entry": e.id, "at": iso(e.created_at), "kind": e.kind,
               "amount": format_full(e.amount), "balance": format_full(balance),
               "reference": e.reference, "session": e.session, "actor": e.actor,
               "reason": e.reason}


# -- who did what (books.ledger.record_action) ----------------------------------------

def action_view(a: OperatorAction) -> dict:
    changes = json.loads(a.changes) if a.changes else {}
    return {"id": a.id, "at": iso(a.at), "actor": a.actor, "action": a.action,
            "reason": a.reason, "session": a.session,
            "changes": {name: {"old": _setting(name, old), "new": _setting(name, new)}
                        for name, (old, new) in changes.items()}}


def _setting(name: str, value):
    return money(value) if name in MONEY_SETTINGS else value


def actions_query(account: str):
    return select(OperatorAction).where(OperatorAction.account == account) \
        .order_by(OperatorAction.id)


def who_and_why(app, row) -> dict:
    """An account's latest operator actions, newest first, and the block it is under (null:
    not blocked, or blocked before the books recorded who did it)."""
    latest = actions_query(row.id).order_by(None).order_by(OperatorAction.id.desc())
    with app.books.session() as db:
        recent = list(db.scalars(latest.limit(RECENT_ACTIONS)))
        block = None
        if row.status == "blocked":
            block = db.scalar(latest.where(OperatorAction.action == "block").limit(1))
    return {"blocked_by": action_view(block) if block else None,
            "recent_actions": [action_view(a) for a in recent]}
