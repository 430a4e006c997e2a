"""Operator operations. Each lands in the SQL books first, together with an outbox
row, and reaches Redis from that outbox: at once when Redis answers, else later
(the worker, or the next callguard command, applies what is pending). Applying
is idempotent per ledger entry, so nothing is applied twice, however often it is
retried or whoever retries it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from functools import cached_property

import redis
from sqlalchemy import delete, update

from . import nodes
from .books.database import make_engine
from .books.ledger import Booking, Books, BooksError, record_action
from .books.models import Account, RedisOutbox, utcnow
from .config import Settings
from .engine import state
from .engine.connect import EmbeddedUse, RedisTLS, connect
from .engine.core import Keys, Ops, Plans, SessionId
from .engine.runner import SyncEngine
from .logs import Throttled
from .rating import Rate, normalize_number
from .statedir import private_dir

log = logging.getLogger(__name__)


class App:
    """What a callguard process needs, opened on first use."""

    def __init__(self, settings: Settings, one_shot: bool = False):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # How this process uses the embedded Redis (engine.connect): a one-shot command
        # stops a server it had to start when it closes; otherwise (serve, worker, an App
        # outside the CLI) the server stays up. Set before the first use of Redis.
        self.one_shot = one_shot
        self._embedded: EmbeddedUse | None = None
        self.sql_pool: int | None = None  # SQL connections kept open (None: the default)

    @cached_property
    def books(self) -> Books:
        if self.settings.database_url is None:  # SQLite in the state directory
            private_dir(self.settings.home)
        return Books(make_engine(self.settings.sql_url, self.sql_pool))

    @cached_property
    def redis_url(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        self._embedded = EmbeddedUse(self.settings.home, long_running=not self.one_shot)
        return self._embedded.url

    @property
    def redis_tls(self) -> RedisTLS:
        s = self.settings
        return RedisTLS(s.redis_tls_ca, s.redis_tls_cert, s.redis_tls_key)

    @cached_property
    def redis(self):
        return connect(self.redis_url, self.redis_tls)

    @cached_property
    def plans(self) -> Plans:
        return Plans(self.books.load_plans())

    def ops(self, node: str = "") -> Ops:
        s = self.settings
        return Ops(self.keys, self.plans, quota=s.quota_seconds, node=node,
                   ring_seconds=s.ring_seconds, grace=s.grace_seconds,
                   stale_grace=s.stale_grace_seconds, blind_quota=s.fail_open_grant)

    @cached_property
    def engine(self) -> SyncEngine:
        return SyncEngine(self.redis, self.ops())

    def serving(self) -> None:
        """This process (serve, worker) is up: the embedded Redis stays up for it and after
        it (engine.connect). Before, it joined as a one-shot command would."""
        self.one_shot = False
        if self._embedded is not None:
            self._embedded.promote()

    def close(self) -> None:
        """Release the SQL pool and the Redis connections this App opened, and leave the
        embedded Redis (which a one-shot command may stop)."""
        if "books" in self.__dict__:
            self.books.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()
        if self._embedded is not None:
            self._embedded.release()
            self._embedded = None


@dataclass(frozen=True)
class Applied:
    """What an operation did: `in_redis` False means booked, Redis still to follow."""

    in_redis: bool
    now: int = 0  # outbox rows applied by this call (earlier attempts' included)
    error: str = ""


# -- the outbox into Redis -------------------------------------------------------

_warn_outbox = Throttled(log, logging.ERROR, interval=10.0)


def apply_outbox(app: App, account: str | None = None, limit: int = 500) -> int:
    """Apply pending settings and movements to Redis, oldest first; returns how many.
    Raises a Redis error when Redis cannot take them (they stay pending). A row Redis
    refuses (its account is gone from Redis) stays pending too, said once in a while,
    and the others go on; for one account, the CLI is told."""
    done = 0
    for row_id, account_id, entry, amount in app.books.outbox(account, limit):
        try:
            done += _apply_one(app, row_id, account_id, entry, amount)
        except BooksError as exc:
            if account is not None:
                raise
            _warn_outbox("%s (the books' change stays in the outbox)", exc)
    return done


def _apply_one(app: App, row_id: int, account_id: str, entry: int | None,
               amount: int | None) -> bool:
    with app.books.session.begin() as db:
        # Claim the row with a write: it locks the row (the database on SQLite), so two
        # appliers never both apply it; 0 rows: someone else has just done it. By what the
        # row says, not by its id alone: SQLite gives a deleted row's id to the next row,
        # and an applier holding an old list would credit an entry Redis already has and
        # delete the new row unapplied (seen with concurrent API top-ups).
        claimed = db.execute(update(RedisOutbox).where(
            RedisOutbox.id == row_id, RedisOutbox.account == account_id,
            RedisOutbox.entry.is_(None) if entry is None else RedisOutbox.entry == entry)
            .values(account=RedisOutbox.account)).rowcount
        if not claimed:
            return False
        if entry is None:
            state.push_account(app.engine, db.get(Account, account_id))
        else:
            try:
                app.engine.credit(account_id, amount, entry)
            except redis.ResponseError as exc:
                if "unknown account" not in str(exc):
                    raise
                raise BooksError(f"account {account_id} is not in Redis (Redis lost its data?):"
                                 " run `callguard rebuild --yes`") from None
        db.execute(delete(RedisOutbox).where(RedisOutbox.id == row_id))
    if entry is not None:
        # The books no longer list the movement, so nothing will apply it again.
        app.redis.delete(app.keys.marker(account_id, entry))
    return True


def apply_now(app: App, account: str) -> Applied:
    """Apply what the books hold for `account` now, or say why Redis must wait."""
    try:
        return Applied(True, apply_outbox(app, account))
    except (redis.RedisError, OSError, BooksError) as exc:
        log.debug("outbox for %s stays pending", account, exc_info=True)
        return Applied(False, error=str(exc) or type(exc).__name__)


# -- accounts ---------------------------------------------------------------

# Who acts (`actor`): None is this process's operator (books.actors.local: the CLI's); the
# HTTP API and callguard's automatic actions say who they are.

def create_account(app: App, account_id: str, opening_balance: int = 0,
                   actor: str | None = None, **values) -> tuple[Account, Applied]:
    plan = values.get("plan") or "default"
    if plan != "default" and not app.books.plan_exists(plan):
        raise BooksError(f"unknown rate plan {plan}")
    check_auto_topup(Account(id=account_id, kind=values.get("kind")), values,
                     app.settings.payment_url)
    row = app.books.create_account(account_id, opening_balance, actor=actor, **values)
    return row, apply_now(app, account_id)


def update_account(app: App, account_id: str, block=(), unblock=(), *,
                   actor: str | None = None, reason: str | None = None,
                   action: str = "change", **changes) -> tuple[Account, Applied]:
    """Change settings, recorded as `actor`'s `action` with its `reason`; `block`/`unblock`:
    destination prefixes added to or taken from the account's own blocked list."""
    plan = changes.get("plan")
    if plan and plan != "default" and not app.books.plan_exists(plan):
        raise BooksError(f"unknown rate plan {plan}")
    row = app.books.get_account(account_id)
    if "credit_limit" in changes and row.kind != "postpaid":
        raise BooksError(f"account {account_id} is prepaid: it has no credit limit")
    if block or unblock:
        changes["blocked_prefixes"] = blocked_prefixes(row.blocked_prefixes, block, unblock)
    if changes.get("status") == "active":
        changes.setdefault("unblocked_at", utcnow())  # lifts an engine fraud block too
    check_auto_topup(row, changes, app.settings.payment_url)
    row = app.books.update_account(account_id, actor=actor, action=action, reason=reason,
                                   **changes)
    return row, apply_now(app, account_id)


def block_account(app: App, account_id: str, reason: str, hangup: bool = False,
                  actor: str | None = None) -> tuple[Account, Applied, int | None]:
    """Block both ways; with `hangup`, end its calls in progress too (each kill recorded
    with the block's reason). The count of calls hung up is None when Redis is away: they
    go on until Redis has the block."""
    row, applied = update_account(app, account_id, actor=actor, reason=reason, action="block",
                                  status="blocked", block_reason=reason)
    hung_up = None
    if applied.in_redis:
        sessions = [s["session"] for s in live_sessions(app, account_id)] if hangup else []
        kill(app, sessions, actor, reason)
        hung_up = len(sessions)
    return row, applied, hung_up


def unblock_account(app: App, account_id: str, actor: str | None = None,
                    reason: str | None = None) -> tuple[Account, Applied]:
    return update_account(app, account_id, actor=actor, reason=reason, action="unblock",
                          status="active", block_reason=None)


def blocked_prefixes(current: str, block, unblock) -> str:
    """The account's blocked list (space-separated, as dialled numbers are normalised)."""
    prefixes = set(current.split()) | {normalize_number(p) for p in block}
    for text in unblock:
        prefix = normalize_number(text)
        if prefix not in prefixes:
            raise BooksError(f"prefix {prefix} is not blocked on this account")
        prefixes.discard(prefix)
    listed = " ".join(sorted(prefixes))
    if len(listed) > Account.blocked_prefixes.type.length:
        raise BooksError("too many blocked prefixes on one account (use a rate plan's "
                         "blocked rows)")
    return listed


def check_auto_topup(row: Account, changes: dict, payment_url: str | None) -> None:
    """The first seed: auto top-up needs a card on file (and a provider to charge it)."""
    after = {name: changes.get(name, getattr(row, name)) for name in
             ("payment_method", "auto_topup_below", "auto_topup_amount")}
    if not (after["auto_topup_below"] or after["auto_topup_amount"]):
        return
    if row.kind != "prepaid":
        raise BooksError(f"account {row.id} is postpaid: auto top-up is for prepaid accounts")
    if not after["payment_method"]:
        raise BooksError("auto top-up needs a payment method on file (--payment-method TOKEN)")
    if not (after["auto_topup_below"] and after["auto_topup_amount"]):
        raise BooksError("auto top-up needs both --auto-topup-below and --auto-topup-amount")
    if not payment_url:
        raise BooksError("auto top-up needs a payment provider: set CALLGUARD_PAYMENT_URL")


MOVEMENTS = {"topup": "prepaid", "payment": "postpaid", "adjustment": None}


def move_money(app: App, account_id: str, kind: str, amount: int, ref: str | None,
               actor: str | None = None, reason: str | None = None
               ) -> tuple[Booking, Applied]:
    """A top-up (prepaid) or a payment (postpaid) raises the balance; an adjustment moves
    it either way. The same `ref` is booked once, for ever (with its first actor and
    reason: a retry by someone else changes nothing)."""
    row = app.books.get_account(account_id)
    wanted = MOVEMENTS[kind]
    if wanted and row.kind != wanted:
        verb = "top up" if kind == "topup" else "take a payment on"
        raise BooksError(f"cannot {verb} {row.kind} account {account_id}"
                         f" (use {'payment' if kind == 'topup' else 'topup'})")
    if amount == 0 or (wanted and amount < 0):
        raise BooksError("amount must be greater than zero")
    if ref is not None:
        # One reference is one movement on an account, whatever its kind: a transfer booked
        # as a top-up is not booked again as an adjustment.
        for other in MOVEMENTS.keys() - {kind}:
            if (entry := app.books.entry_by_key(movement_key(other, account_id, ref))):
                raise BooksError(f"reference {ref!r} is already booked on {account_id} as "
                                 f"{'an' if other[0] in 'aeiou' else 'a'} {other} (entry "
                                 f"{entry.id})")
    booking = app.books.book(account_id, kind, amount, movement_key(kind, account_id, ref),
                             reference=ref, actor=actor, reason=reason)
    return booking, apply_now(app, account_id)


def movement_key(kind: str, account: str, ref: str | None) -> str:
    """The idempotency key: the reference itself, or its digest when it would not fit (or
    looks like one: a reference "sha256:..." must not be taken for another's digest)."""
    if ref is None:
        return f"{kind}:{account}:{uuid.uuid4()}"
    key = f"{kind}:{account}:{ref}"
    if len(key) > 200 or ref.startswith("sha256:"):
        key = f"{kind}:{account}:sha256:{hashlib.sha256(ref.encode()).hexdigest()}"
    return key


# -- calls --------------------------------------------------------------------

def live_sessions(app: App, account: str | None = None) -> list[dict]:
    return state.live_sessions(app.redis, app.keys, account)


class _NobodyListens(Exception):
    pass


def kill(app: App, sessions: list[str], actor: str | None = None,
         reason: str | None = None) -> int:
    """Ask whichever adapter holds these sessions to hang them up; returns listeners. Each
    kill is recorded as `actor`'s, in a transaction that commits once the request went
    out: none is recorded when nobody listens or Redis cannot be reached."""
    accounts = [SessionId.parse(session).account for session in sessions]
    if not sessions:
        return 0
    try:
        with app.books.session.begin() as db:
            for account, session in zip(accounts, sessions, strict=True):
                record_action(db, account, "kill", actor, reason, session=session)
            db.flush()  # refused by SQL: nothing was asked of Redis either
            listeners = app.redis.publish(app.keys.kill_channel, " ".join(sessions))
            if not listeners:
                raise _NobodyListens
    except _NobodyListens:
        return 0
    return listeners


def sweep(app: App, now_ms: int | None = None, node: str | None = None,
          skip: frozenset[str] = frozenset()) -> list[str]:
    """Close sessions whose PBX went silent past their deadline, each charged up to its
    last grant. With `node`, only that node's own (a serve process sweeping itself);
    without, those of nodes no process holds (the worker): a live node's sessions are its
    own to commit, with the real end time it may still be retrying to write."""
    now = now_ms if now_ms is not None else redis_now_ms(app.redis)
    overdue = [s for s in state.live_sessions(app.redis, app.keys, overdue_at=now)
               if s["session"] not in skip]
    if node is None:
        alive = nodes.live_nodes(app.redis, app.keys, {s.get("node", "") for s in overdue})
        overdue = [s for s in overdue if s.get("node", "") not in alive]
    else:
        overdue = [s for s in overdue if s.get("node") == node]
    closed = []
    for s in overdue:
        charge = app.engine.commit(s["session"], "stale", now, mode="stale")
        if charge.state == "done":
            log.info("closed stale session %s (charged %s micro-units)", s["session"],
                     charge.cost)
            closed.append(s["session"])
    if closed:
        # One line however many: a PBX that died with 5,000 calls up must not flood the log.
        log.warning("closed %d stale session(s) that no PBX ended, each charged up to its "
                    "last grant (first: %s)", len(closed), closed[0])
    return closed


def redis_now_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


# -- rate plans ---------------------------------------------------------------

def import_plan(app: App, name: str, direction: str, rates: list[Rate]) -> int:
    version = app.books.replace_plan(name, direction, rates)
    # Serving processes reload on the message; the version key catches a missed one.
    app.redis.set(app.keys.plans_version, version_stamp(app))
    app.redis.publish(app.keys.plans_channel, name)
    return version


def version_stamp(app: App) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(app.books.plan_versions().items()))
