"""The engine's limit events, booked: the Lua scripts see each crossing where the money
moves (common.lua `watch`, `suspect`) and put it on the shard's stream; the worker books
it here, in the transaction that books the calls that came with it. Every key derives
from the stream entry, so a replay after a crash books nothing twice."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .books import actors
from .books.ledger import record_action, setting_changes
from .books.models import Account, RedisOutbox, as_utc
from .books.notices import add_notice
from .engine import state

NOTICES = {"low_balance", "exhausted", "credit_warning", "credit_limit", "unblocked"}
EVENTS = NOTICES | {"topup", "fraud_suspected"}


# What the engine's rule names mean, for the customer's notice.
REASONS = {
    "velocity_limit": "calls in the last hour would cost more than the account's hourly "
                      "spending limit",
    "channel_limit": "calls were refused again and again at the account's limit of "
                     "simultaneous calls",
    "rate_limit": "calls were attempted faster than the account's limit allows, again and "
                  "again",
}


def _unblocked_since(row: Account, entry_id: str) -> bool:
    """An operator unblocked the account after the engine blocked it (the stream entry's
    id is the Redis time it was written, in ms): the operator's word stands."""
    if row.unblocked_at is None:
        return False
    return as_utc(row.unblocked_at).timestamp() * 1000 >= int(entry_id.split("-")[0])


def money_facts(row: Account, fields: dict) -> dict:
    """How the account stood when the engine saw the crossing: balance or outstanding,
    what was available, and the limit the notice is about."""
    balance, credit, reserved = (int(fields.get(name) or 0) for name in ("bal", "credit", "res"))
    facts = {"available": balance + credit - reserved, "reserved": reserved}
    if row.kind == "prepaid":
        facts |= {"balance": balance, "limit": state.warn_level(row)}
    else:
        facts |= {"outstanding": -balance, "limit": row.credit_limit}
        if row.warn_at is not None:
            facts["warn_at"] = row.warn_at
    return facts


def book(db: Session, events: list[tuple[str, dict]]) -> set[str]:
    """Book (entry id, fields) limit events; returns the accounts whose calls are to be hung
    up (blocked for fraud). Raises ValueError for an entry that cannot be booked."""
    hang_up: set[str] = set()
    for entry_id, fields in events:
        event, account = fields.get("event"), fields.get("acct", "")
        if event not in EVENTS:
            raise ValueError(f"unknown limit event {event!r}")
        row = db.get(Account, account)
        if row is None:
            raise ValueError(f"unknown account {account!r}")
        key = f"{event}:{account}:{entry_id}"
        if event in NOTICES:
            add_notice(db, key, row, event, **money_facts(row, fields))
        elif event == "topup":
            from .topup import request_topup  # the worker's; a serving process never loads it

            request_topup(db, row, key)
        else:
            why = REASONS.get(fields.get("reason", ""), fields.get("reason", ""))
            add_notice(db, key, row, "fraud_suspected", reason=why, **money_facts(row, fields))
            if row.on_fraud == "block" and not _unblocked_since(row, entry_id):
                if row.status != "blocked":
                    # The engine blocked it in Redis already: the books follow.
                    block = {"status": "blocked", "block_reason": f"fraud suspected: {why}"[:200]}
                    before = {name: getattr(row, name) for name in block}
                    row.status, row.block_reason = block["status"], block["block_reason"]
                    db.add(RedisOutbox(account=account))
                    record_action(db, account, "block", actors.FRAUD, row.block_reason,
                                  changes=setting_changes(before, block))
                    add_notice(db, f"blocked:{account}:{entry_id}", row, "blocked",
                               reason=row.block_reason, **money_facts(row, fields))
                hang_up.add(account)  # again on a replay: a crash may have come before it
    return hang_up
