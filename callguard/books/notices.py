"""Notices into the outbox. A notice is written in the transaction that books what
causes it and delivered later by the worker (`callguard.notify`); its key is its id
for ever, so the same event, booked again after a crash, adds nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..money import format_full
from .models import NOTICE_TYPES, Account, Notification, utcnow


def add_notice(db: Session, key: str, row: Account, type: str, at: datetime | None = None,
               **facts) -> bool:
    """Queue a notice once per `key`; returns False when it was queued before.

    `facts`: what the receiver needs to know; ints are money in micro-units (written as
    decimal strings), anything else as it is. The payload always says how the account
    stands: balance or outstanding, and its limit."""
    if type not in NOTICE_TYPES:
        raise ValueError(f"unknown notice type {type!r}")
    if db.scalar(select(Notification.id).where(Notification.key == key)) is not None:
        return False
    at = at or utcnow()
    payload = {"id": key, "type": type, "account": row.id,
               "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
               "kind": row.kind, "currency": row.currency}
    for name, value in facts.items():
        payload[name] = format_full(value) if isinstance(value, int) and not isinstance(
            value, bool) else value
    db.add(Notification(key=key, account=row.id, type=type, created_at=at,
                        payload=json.dumps(payload, sort_keys=True)))
    db.flush()
    return True
