"""Operations on the books. Every money movement is a ledger entry with an
idempotency key: booking the same key twice returns the first entry and
changes nothing, whoever retries (the CLI, the worker after a crash)."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..money import MAX_MICROS, format_display
from ..rating import Rate, RatePlan
from . import actors
from .models import (
    Account,
    Cdr,
    LedgerEntry,
    OperatorAction,
    RatePlanRow,
    RateRow,
    RedisOutbox,
    utcnow,
)

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")


class BooksError(ValueError):
    """A refused operation, worded for the operator."""


class UnknownAccount(BooksError):
    """No account by that id (the HTTP API answers 404)."""


class AccountExists(BooksError):
    """An account by that id is already there (409)."""


# What would reorder the text around it where an operator reads it (account actions, the
# ledger): U+200E/F, U+202A-E, U+2066-9, U+061C. The C1 controls (U+0080-009F, among them
# CSI) are "Cc" with C0 and DEL: a terminal may take them for escapes.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")


def check_text(column, value: str | None, label: str) -> None:
    """Text for a String(N) column: refused here, before SQL sees it, when it is longer than
    the column (PostgreSQL would raise, SQLite would silently keep it) or holds control
    characters (PostgreSQL cannot store NUL at all; a terminal obeys escapes)."""
    if value is None:
        return
    limit = column.type.length
    if len(value) > limit:
        raise BooksError(f"{label} is longer than {limit} characters ({len(value)})")
    if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in value):
        raise BooksError(f"{label} contains control characters")


def check_email(address: str | None) -> None:
    if address is None:
        return
    check_text(Account.email, address, "email")
    if not _EMAIL.fullmatch(address):
        raise BooksError(f"not an email address: {address!r}")


_ACCOUNT_TEXT = {
    "block_reason": (Account.block_reason, "reason"),
    "payment_method": (Account.payment_method, "payment method"),
}


def check_account_values(values: dict) -> None:
    check_email(values.get("email"))
    for name, (column, label) in _ACCOUNT_TEXT.items():
        check_text(column, values.get(name), label)


@dataclass(frozen=True)
class Booking:
    entry_id: int
    amount: int
    created: bool  # False: the key was booked before, nothing changed
    actor: str | None = None  # who booked the entry, and why (the first booking's)
    reason: str | None = None


# Bookkeeping, not a setting anyone chose: not listed among an action's changes.
_NOT_SETTINGS = {"unblocked_at"}


def setting_changes(before: dict, after: dict) -> dict:
    """{name: [old, new]} of the settings that changed; a card token is a secret of the
    payment provider's: only whether one is on file is recorded."""
    def shown(name, value):
        return ("on file" if value else None) if name == "payment_method" else value

    return {name: [shown(name, before.get(name)), shown(name, value)]
            for name, value in sorted(after.items())
            if name not in _NOT_SETTINGS and before.get(name) != value}


def record_action(db: Session, account: str, action: str, actor: str | None,
                  reason: str | None = None, session: str | None = None,
                  changes: dict | None = None) -> None:
    """Record who did `action` and why, in `db`'s transaction: a refused reason refuses
    the change with it. `actor` None: this process's operator (actors.local)."""
    check_text(OperatorAction.reason, reason, "reason")
    db.add(OperatorAction(account=account, actor=actor or actors.local(), action=action,
                          reason=reason, session=session,
                          changes=json.dumps(changes) if changes else None))


class Books:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.session = sessionmaker(engine, expire_on_commit=False)

    # -- accounts ---------------------------------------------------------
    def create_account(self, account_id: str, opening_balance: int = 0,
                       actor: str | None = None, **values) -> Account:
        """The account, its opening balance as a ledger entry like any other
        (balance = sum(ledger)), and both queued for Redis, in one transaction, with who
        created it (`actor` None: actors.local)."""
        check_account_values(values)
        actor = actor or actors.local()
        exists = AccountExists(f"account {account_id} already exists")
        try:
            with self.session.begin() as db:
                if db.get(Account, account_id) is not None:
                    raise exists
                values["plan"] = values.get("plan") or "default"
                account = Account(id=account_id, **values)
                db.add(account)
                db.flush()
                db.add(RedisOutbox(account=account_id))
                record_action(db, account_id, "create", actor)
                if opening_balance:
                    self.book(account_id, "topup", opening_balance, f"open:{account_id}",
                              reference="opening balance", actor=actor, db=db)
        except IntegrityError:
            # Two creates of one id at once (two API requests): the loser is told so.
            with self.session() as db:
                if db.get(Account, account_id) is None:
                    raise
            raise exists from None
        return account

    def get_account(self, account_id: str) -> Account:
        with self.session() as db:
            account = db.get(Account, account_id)
        if account is None:
            raise UnknownAccount(f"unknown account {account_id}")
        return account

    def list_accounts(self) -> list[Account]:
        with self.session() as db:
            return list(db.scalars(select(Account).order_by(Account.id)))

    def update_account(self, account_id: str, *, actor: str | None = None,
                       action: str = "change", reason: str | None = None,
                       **changes) -> Account:
        """Change settings; Redis gets them through the outbox, and the books who changed
        what and why (`action`: change, block, unblock), in the same transaction."""
        check_account_values(changes)
        with self.session.begin() as db:
            account = db.get(Account, account_id, with_for_update=True)
            if account is None:
                raise UnknownAccount(f"unknown account {account_id}")
            before = {name: getattr(account, name) for name in changes}
            for name, value in changes.items():
                setattr(account, name, value)
            db.add(RedisOutbox(account=account_id))
            record_action(db, account_id, action, actor, reason,
                          changes=setting_changes(before, changes))
        return account

    # -- ledger -----------------------------------------------------------
    def book(
        self,
        account_id: str,
        kind: str,
        amount: int,
        key: str,
        reference: str | None = None,
        session: str | None = None,
        db: Session | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Booking:
        """Append one movement and move the account's balance by `amount`, once per key,
        with who booked it (`actor` None: actors.local) and why.

        An operator's movement is also queued for Redis in the same transaction; a call
        charge is not: Redis made it, the books only learn it."""
        check_text(LedgerEntry.idempotency_key, key, "reference")
        check_text(LedgerEntry.reference, reference, "reference")
        check_text(LedgerEntry.reason, reason, "reason")
        if db is None:
            with self.session.begin() as db:
                return self.book(account_id, kind, amount, key, reference, session, db,
                                 actor, reason)
        existing = db.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))
        if existing is not None:
            return _booked_before(existing)
        # Move the balance first. Its row lock orders concurrent bookings on PostgreSQL, and
        # it opens the write transaction on SQLite, whose driver only starts one at the first
        # write: a SAVEPOINT before that would commit the entry on its own at RELEASE.
        self._move_balance(db, account_id, amount)
        entry = LedgerEntry(
            account=account_id, kind=kind, amount=amount, idempotency_key=key,
            reference=reference, session=session, actor=actor or actors.local(),
            reason=reason,
        )
        try:
            with db.begin_nested():
                db.add(entry)
                db.flush()
                if kind != "call_charge":
                    db.add(RedisOutbox(account=account_id, entry=entry.id))
                    db.flush()
        except IntegrityError:
            # A concurrent writer booked the same key between our check and insert.
            db.execute(update(Account).where(Account.id == account_id)
                       .values(balance=Account.balance - amount))
            existing = db.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))
            if existing is None:
                raise
            return _booked_before(existing)
        return Booking(entry.id, amount, True, entry.actor, entry.reason)

    @staticmethod
    def _move_balance(db: Session, account_id: str, amount: int) -> None:
        moved = db.execute(
            update(Account).where(
                Account.id == account_id,
                # Redis (Lua doubles) holds at most 2**53-1: refuse here, before anything
                # is booked, rather than let SQL run ahead of Redis.
                Account.balance + amount <= MAX_MICROS,
                Account.balance + amount >= -MAX_MICROS,
            ).values(balance=Account.balance + amount)
        )
        if moved.rowcount != 1:
            if db.get(Account, account_id) is None:
                raise UnknownAccount(f"unknown account {account_id}")
            raise BooksError(f"amount too large: the balance of {account_id} would go beyond "
                             f"{format_display(MAX_MICROS)}")

    def entry_by_key(self, key: str) -> LedgerEntry | None:
        with self.session() as db:
            return db.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))

    def ledger_sum(self, account_id: str) -> int:
        with self.session() as db:
            total = db.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount), 0))
                .where(LedgerEntry.account == account_id)
            )
        return int(total)

    def ledger(self, account_id: str) -> list[LedgerEntry]:
        with self.session() as db:
            return list(db.scalars(
                select(LedgerEntry).where(LedgerEntry.account == account_id)
                .order_by(LedgerEntry.id)
            ))

    # -- the Redis outbox -----------------------------------------------------
    def outbox(self, account_id: str | None = None, limit: int = 500) -> list[tuple]:
        """Pending (id, account, entry, amount) rows, oldest first; entry None: settings."""
        query = (select(RedisOutbox.id, RedisOutbox.account, RedisOutbox.entry, LedgerEntry.amount)
                 .outerjoin(LedgerEntry, LedgerEntry.id == RedisOutbox.entry)
                 .order_by(RedisOutbox.id).limit(limit))
        if account_id:
            query = query.where(RedisOutbox.account == account_id)
        with self.session() as db:
            return [tuple(row) for row in db.execute(query)]

    def outbox_done(self, ids: list[int]) -> None:
        if ids:
            with self.session.begin() as db:
                db.execute(delete(RedisOutbox).where(RedisOutbox.id.in_(ids)))

    # -- calls ------------------------------------------------------------
    def record_calls(self, cdrs: list[dict], then=None) -> int:
        """Book many finished calls in one transaction, each once; returns how many were
        new. Set-wise: one insert of the CDRs, one of their charges, one balance update
        per account. `then(db)` books more in the same transaction (the engine's limit
        events that came with them). Any error books none of it (the caller then books
        one at a time, which says which one is at fault)."""
        with self.session.begin() as db:
            new = self._add_calls(db, cdrs)
            if then is not None:
                then(db)
        return new

    def _add_calls(self, db: Session, cdrs: list[dict]) -> int:
        if not cdrs:
            return 0
        sessions = [c["session"] for c in cdrs]
        seen = set(db.scalars(select(Cdr.session).where(Cdr.session.in_(sessions))))
        new = []
        for cdr in cdrs:
            if cdr["session"] not in seen:
                seen.add(cdr["session"])
                new.append(cdr)
        if not new:
            return 0
        charges: dict[str, int] = {}
        for cdr in new:
            charges[cdr["account"]] = charges.get(cdr["account"], 0) + cdr["cost"]
        for account_id in sorted(a for a, total in charges.items() if total):
            # Accounts in one order, so two workers rarely wait on each other in a circle
            # (the limit events booked after them may lock accounts again: a deadlock
            # PostgreSQL then breaks is retried as an outage, nothing lost).
            self._move_balance(db, account_id, -charges[account_id])
        db.execute(insert(Cdr), new)
        entries = [{"account": c["account"], "kind": "call_charge", "amount": -c["cost"],
                    "idempotency_key": f"call:{c['session']}",
                    "reference": c["destination"], "session": c["session"],
                    "actor": actors.CALLS, "created_at": utcnow()} for c in new if c["cost"]]
        if entries:
            db.execute(insert(LedgerEntry), entries)
        return len(new)

    def record_call(self, cdr: dict) -> bool:
        """Book a finished call's CDR and its charge in one transaction, once per session."""
        try:
            return self._record_call(cdr)
        except IntegrityError:
            # A concurrent writer booked the same session between our check and insert;
            # any other violation (an account the books do not have) is the entry's fault.
            with self.session() as db:
                if db.scalar(select(Cdr.id).where(Cdr.session == cdr["session"])) is None:
                    raise
            return False

    def _record_call(self, cdr: dict) -> bool:
        with self.session.begin() as db:
            if db.scalar(select(Cdr.id).where(Cdr.session == cdr["session"])) is not None:
                return False
            self._add_call(db, cdr)
        return True

    def _add_call(self, db: Session, cdr: dict) -> None:
        db.add(Cdr(**cdr))
        db.flush()
        if cdr["cost"]:
            self.book(cdr["account"], "call_charge", -cdr["cost"], f"call:{cdr['session']}",
                      reference=cdr["destination"], session=cdr["session"], db=db,
                      actor=actors.CALLS)

    def cdrs(self, account_id: str | None = None) -> list[Cdr]:
        query = select(Cdr).order_by(Cdr.id)
        if account_id:
            query = query.where(Cdr.account == account_id)
        with self.session() as db:
            return list(db.scalars(query))

    # -- rate plans ---------------------------------------------------------
    def replace_plan(self, name: str, direction: str, rates: list[Rate]) -> int:
        """Swap a plan's rows for one direction in one transaction; returns the new version."""
        with self.session.begin() as db:
            plan = db.get(RatePlanRow, name, with_for_update=True)
            if plan is None:
                plan = RatePlanRow(name=name, version=1)
                db.add(plan)
            else:
                plan.version += 1
            db.flush()
            db.execute(delete(RateRow).where(RateRow.plan == name, RateRow.direction == direction))
            db.add_all(
                RateRow(
                    plan=name, direction=direction, prefix=r.prefix, description=r.description,
                    rate_per_min=r.rate_per_min, connect_fee=r.connect_fee,
                    initial_increment=r.initial_increment,
                    subsequent_increment=r.subsequent_increment, blocked=r.blocked,
                )
                for r in rates
            )
            return plan.version

    def plan_exists(self, name: str) -> bool:
        with self.session() as db:
            return db.get(RatePlanRow, name) is not None

    def plan_versions(self) -> dict[str, int]:
        with self.session() as db:
            return dict(db.execute(select(RatePlanRow.name, RatePlanRow.version)).all())

    def load_plans(self) -> dict[tuple[str, str], RatePlan]:
        """Every plan, keyed by (name, direction), ready for in-process lookups."""
        versions = self.plan_versions()
        rows: dict[tuple[str, str], list[Rate]] = {}
        with self.session() as db:
            for r in db.scalars(select(RateRow)):
                rows.setdefault((r.plan, r.direction), []).append(Rate(
                    r.prefix, r.description, r.rate_per_min, r.connect_fee,
                    r.initial_increment, r.subsequent_increment, r.blocked,
                ))
        return {
            key: RatePlan(key[0], rates, versions.get(key[0], 0)) for key, rates in rows.items()
        }


def _booked_before(entry: LedgerEntry) -> Booking:
    return Booking(entry.id, entry.amount, False, entry.actor, entry.reason)
