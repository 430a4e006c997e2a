"""The durable books (SQLAlchemy 2). Schema changes go through Alembic migrations.

Money columns are BigInteger micro-units. An account's `balance` is the sum of
its ledger entries: positive is money the customer has (prepaid credit), a
postpaid account's unpaid cost shows as a negative balance (outstanding =
-balance). One sign convention serves both kinds:
available credit = balance + credit_limit - reserved.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

KINDS = ("prepaid", "postpaid")
LEDGER_KINDS = ("topup", "payment", "call_charge", "adjustment")
# Account settings that are money (micro-units inside, decimal strings at the edges).
MONEY_SETTINGS = frozenset({"warn_below", "credit_limit", "warn_at", "auto_topup_below",
                            "auto_topup_amount", "max_spend_per_hour"})
DIRECTIONS = ("outbound", "inbound")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime:
    """Aware UTC; now for None. SQLite gives datetimes back naive (all were written UTC)."""
    if moment is None:
        return utcnow()
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# A moment, aware UTC. MySQL/MariaDB's DATETIME keeps whole seconds unless asked for
# microseconds (fsp=6), and the books compare times to the millisecond (an operator's
# unblock with the engine's fraud block): DATETIME(6) there, the same type elsewhere.
Moment = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class Base(DeclarativeBase):
    pass


class RatePlanRow(Base):
    __tablename__ = "rate_plans"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)


class RateRow(Base):
    __tablename__ = "rates"

    plan: Mapped[str] = mapped_column(
        ForeignKey("rate_plans.name", ondelete="CASCADE"), primary_key=True
    )
    direction: Mapped[str] = mapped_column(String(8), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), primary_key=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    rate_per_min: Mapped[int] = mapped_column(BigInteger)
    connect_fee: Mapped[int] = mapped_column(BigInteger)
    initial_increment: Mapped[int] = mapped_column(Integer)
    subsequent_increment: Mapped[int] = mapped_column(Integer)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('prepaid', 'postpaid')", name="ck_accounts_kind"),
        CheckConstraint("status IN ('active', 'blocked')", name="ck_accounts_status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    currency: Mapped[str] = mapped_column(String(3), default="CHF")
    plan: Mapped[str] = mapped_column(String(64), default="default")
    status: Mapped[str] = mapped_column(String(8), default="active")
    block_reason: Mapped[str | None] = mapped_column(String(200))
    max_channels: Mapped[int] = mapped_column(Integer, default=10)
    cps_limit: Mapped[int] = mapped_column(Integer, default=0)  # 0: none
    balance: Mapped[int] = mapped_column(BigInteger, default=0)  # = sum(ledger.amount)
    credit_limit: Mapped[int] = mapped_column(BigInteger, default=0)
    warn_below: Mapped[int | None] = mapped_column(BigInteger)  # prepaid warning level
    warn_at: Mapped[int | None] = mapped_column(BigInteger)  # postpaid warning level
    email: Mapped[str | None] = mapped_column(String(254))
    payment_method: Mapped[str | None] = mapped_column(String(200))
    auto_topup_below: Mapped[int | None] = mapped_column(BigInteger)
    auto_topup_amount: Mapped[int | None] = mapped_column(BigInteger)
    # Fraud controls (the second seed's hacked PBX); 0 or empty: none.
    max_calls_per_minute: Mapped[int] = mapped_column(Integer, default=0)
    max_spend_per_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    blocked_prefixes: Mapped[str] = mapped_column(String(2000), default="")  # space-separated
    on_fraud: Mapped[str] = mapped_column(String(8), default="notify")  # notify | block
    # The last operator unblock: an engine fraud block from before it no longer holds.
    unblocked_at: Mapped[datetime | None] = mapped_column(Moment)
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        Moment, default=utcnow, onupdate=utcnow
    )


class LedgerEntry(Base):
    """Append-only: an entry is never updated or deleted; corrections are adjustments."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)  # signed effect on the balance
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    reference: Mapped[str | None] = mapped_column(String(200))
    session: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    # Who booked it (books.actors) and why; NULL on entries booked before revision 0005.
    actor: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(String(200))


ACTIONS = ("create", "change", "block", "unblock", "kill")


class OperatorAction(Base):
    """Append-only: who did what to an account that is not a money movement (those are
    ledger entries, with their own actor and reason), and why. Written in the transaction
    of the change itself, so a change without its record cannot exist. `changes` is a JSON
    object of the settings it changed, each [old, new] (money in micro-units); `session`
    the call a kill ended."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(200))
    session: Mapped[str | None] = mapped_column(String(200))
    changes: Mapped[str | None] = mapped_column(Text)


class Cdr(Base):
    __tablename__ = "cdrs"
    __table_args__ = (Index("ix_cdrs_account_setup", "account", "setup_ms"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    session: Mapped[str] = mapped_column(String(200), unique=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    channel: Mapped[str] = mapped_column(String(200))
    node: Mapped[str] = mapped_column(String(100), default="")
    direction: Mapped[str] = mapped_column(String(8))
    destination: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16), default="")
    rate_per_min: Mapped[int] = mapped_column(BigInteger, default=0)
    connect_fee: Mapped[int] = mapped_column(BigInteger, default=0)
    initial_increment: Mapped[int] = mapped_column(Integer, default=1)
    subsequent_increment: Mapped[int] = mapped_column(Integer, default=1)
    setup_ms: Mapped[int] = mapped_column(BigInteger)
    answer_ms: Mapped[int | None] = mapped_column(BigInteger)
    end_ms: Mapped[int] = mapped_column(BigInteger)
    duration: Mapped[int] = mapped_column(Integer, default=0)  # answered seconds
    billed: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    cause: Mapped[str] = mapped_column(String(32), default="")


class RedisOutbox(Base):
    """What the books changed that Redis has not applied yet: an account's settings
    (entry NULL) or a money movement (its ledger entry). Written in the same transaction
    as the change; the row goes once Redis has it, whoever applies it (the CLI at once,
    else the worker when Redis is back)."""

    __tablename__ = "redis_outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    entry: Mapped[int | None] = mapped_column(ForeignKey("ledger.id"))
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)


NOTICE_TYPES = ("low_balance", "exhausted", "credit_warning", "credit_limit", "unblocked",
                "topup_succeeded", "topup_failed", "fraud_suspected", "blocked")


class Notification(Base):
    """Outbox: written in the transaction that books the event causing it, delivered
    later by the worker. `key` is the notice id a receiver sees (webhook `id`, mail
    Message-ID): the same event always gives the same key, so it is booked once."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_due", "sent_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)  # JSON: the webhook body's fields
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    # Delivery: each channel is marked when it took the notice, so a retry of one never
    # repeats the other; sent_at when every configured channel has it.
    mail_sent_at: Mapped[datetime | None] = mapped_column(Moment)
    webhook_sent_at: Mapped[datetime | None] = mapped_column(Moment)
    sent_at: Mapped[datetime | None] = mapped_column(Moment)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Moment)
    failed_at: Mapped[datetime | None] = mapped_column(Moment)  # gave up
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))


TOPUP_STATES = ("pending", "succeeded", "declined", "skipped")


class AutoTopup(Base):
    """One auto top-up attempt (the first seed): created when the engine saw available
    credit cross below the account's threshold, charged by the worker through the payment
    provider with `key` as its Idempotency-Key (the same key on every retry)."""

    __tablename__ = "auto_topups"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    payment_method: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Moment)
    provider_id: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(String(500))
    entry: Mapped[int | None] = mapped_column(ForeignKey("ledger.id"))  # the booked top-up
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(Moment)


SCOPES = ("read", "money", "admin")  # each includes the ones before it


class ApiToken(Base):
    """A bearer token of the HTTP API. Only its SHA-256 digest is kept: the token itself is
    shown once, when it is created. `account` set: it sees and changes that account only."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("scope IN ('read', 'money', 'admin')", name="ck_api_tokens_scope"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(8))
    account: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(Moment, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(Moment)
