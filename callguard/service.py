"""Operator operations: each lands in the SQL books first, then in Redis.

Both steps are idempotent, so an operation cut off between them is simply run
again: SQL recognises the booking, Redis recognises the movement's key.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from functools import cached_property

from .books.database import make_engine
from .books.ledger import Booking, Books, BooksError
from .books.models import Account
from .config import Settings
from .engine import state
from .engine.connect import connect, resolve_url
from .engine.core import Keys, Ops, Plans, split_session  # noqa: F401 (re-exported)
from .engine.runner import SyncEngine
from .rating import Rate

log = logging.getLogger(__name__)


class App:
    """What a callguard process needs, opened on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)

    @cached_property
    def books(self) -> Books:
        return Books(make_engine(self.settings.sql_url))

    @cached_property
    def redis_url(self) -> str:
        return resolve_url(self.settings.redis_url, self.settings.home)

    @cached_property
    def redis(self):
        return connect(self.redis_url)

    @cached_property
    def plans(self) -> Plans:
        return Plans(self.books.load_plans())

    def ops(self) -> Ops:
        s = self.settings
        return Ops(self.keys, self.plans, quota=s.quota_seconds, node=s.node,
                   stale_grace=s.stale_grace_seconds)

    @cached_property
    def engine(self) -> SyncEngine:
        return SyncEngine(self.redis, self.ops())

    def close(self) -> None:
        """Release the SQL pool and the Redis connections this App opened."""
        if "books" in self.__dict__:
            self.books.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()


# -- accounts ---------------------------------------------------------------

def create_account(app: App, account_id: str, opening_balance: int = 0, **values) -> Account:
    plan = values.get("plan") or "default"
    if plan != "default" and not app.books.plan_exists(plan):
        raise BooksError(f"unknown rate plan {plan}")
    row = app.books.create_account(account_id, **values)
    if opening_balance:
        # The opening balance is a ledger entry like any other: balance = sum(ledger).
        app.books.book(account_id, "topup", opening_balance, f"open:{account_id}",
                       reference="opening balance")
    row = app.books.get_account(account_id)
    state.push_account(app.redis, app.keys, row)
    return row


def update_account(app: App, account_id: str, **changes) -> Account:
    plan = changes.get("plan")
    if plan and plan != "default" and not app.books.plan_exists(plan):
        raise BooksError(f"unknown rate plan {plan}")
    row = app.books.get_account(account_id)
    if "credit_limit" in changes and row.kind != "postpaid":
        raise BooksError(f"account {account_id} is prepaid: it has no credit limit")
    row = app.books.update_account(account_id, **changes)
    state.push_account(app.redis, app.keys, row)
    return row


def move_money(app: App, account_id: str, kind: str, amount: int, ref: str | None) -> Booking:
    """A top-up (prepaid) or a payment (postpaid): both raise the balance."""
    row = app.books.get_account(account_id)
    wanted = "prepaid" if kind == "topup" else "postpaid"
    if row.kind != wanted:
        verb = "top up" if kind == "topup" else "take a payment on"
        raise BooksError(f"cannot {verb} {row.kind} account {account_id}"
                         f" (use {'payment' if kind == 'topup' else 'topup'})")
    if amount <= 0:
        raise BooksError("amount must be greater than zero")
    key = f"{kind}:{account_id}:{ref}" if ref else f"{kind}:{account_id}:{uuid.uuid4()}"
    booking = app.books.book(account_id, kind, amount, key, reference=ref)
    state.push_account(app.redis, app.keys, row)  # in case Redis never saw this account
    app.engine.credit(account_id, booking.amount, key)
    return booking


def live_sessions(app: App, account: str | None = None) -> list[dict]:
    accounts = [account] if account else state.account_ids(app.redis, app.keys)
    return state.live_sessions(app.redis, app.keys, accounts)


def kill(app: App, sessions: list[str]) -> int:
    """Ask whichever adapter holds these sessions to hang them up; returns listeners."""
    for session in sessions:
        split_session(session)
    if not sessions:
        return 0
    return app.redis.publish(app.keys.kill_channel, " ".join(sessions))


# -- rate plans ---------------------------------------------------------------

def import_plan(app: App, name: str, direction: str, rates: list[Rate]) -> int:
    version = app.books.replace_plan(name, direction, rates)
    # Serving processes reload on the message; the version key catches a missed one.
    app.redis.set(app.keys.plans_version, version_stamp(app))
    app.redis.publish(app.keys.plans_channel, name)
    return version


def version_stamp(app: App) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(app.books.plan_versions().items()))


# -- books and Redis in step ----------------------------------------------------

@dataclass
class Difference:
    account: str
    field: str
    books: str
    redis: str


def cdr_from_event(fields: dict) -> dict:
    account, channel = split_session(fields["session"])
    return {
        "session": fields["session"], "account": account, "channel": channel,
        "node": fields.get("node", ""), "direction": fields["dir"], "destination": fields["dst"],
        "prefix": fields.get("pfx", ""), "rate_per_min": int(fields["r"]),
        "connect_fee": int(fields["cf"]), "initial_increment": int(fields["i"]),
        "subsequent_increment": int(fields["s"]), "setup_ms": int(fields["setup"]),
        "answer_ms": int(fields["ans"]) if fields.get("ans") else None,
        "end_ms": int(fields["end"]), "duration": int(fields["dur"]),
        "billed": int(fields["billed"]), "cost": int(fields["cost"]),
        "cause": fields.get("cause", ""),
    }


def drain(app: App, consumer: str, pending: bool = False, count: int = 500) -> int:
    """Book commit events into SQL; acknowledge (and delete) each only after its commit.

    pending=True re-reads what this consumer took but never acknowledged (a crash
    between the SQL commit and the XACK): booking is idempotent, so it is safe.
    """
    r, keys = app.redis, app.keys
    accounts = state.account_ids(r, keys)
    pipe = r.pipeline(transaction=False)
    for account in accounts:
        pipe.xreadgroup(state.GROUP, consumer, {keys.events(account): "0" if pending else ">"},
                        count=count)
    done = 0
    for account, reply in zip(accounts, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, Exception):
            if "NOGROUP" in str(reply):
                state.ensure_group(r, keys, account)
                continue
            raise reply
        for _stream, entries in reply or []:
            ids = []
            for entry_id, fields in entries:
                if fields and fields.get("type") == "commit":
                    app.books.record_call(cdr_from_event(fields))
                ids.append(entry_id)
            if ids:
                stream = keys.events(account)
                r.xack(stream, state.GROUP, *ids)
                r.xdel(stream, *ids)
                done += len(ids)
    return done


def sweep(app: App, now_ms: int | None = None) -> list[str]:
    """Close sessions whose PBX went silent; they are charged up to their last grant."""
    now = now_ms if now_ms is not None else redis_now_ms(app.redis)
    closed = []
    for session in state.overdue(app.redis, app.keys, state.account_ids(app.redis, app.keys), now):
        charge = app.engine.commit(session, "stale", now, mode="stale")
        if charge.state == "done":
            log.info("closed stale session %s (charged %s micro-units)", session, charge.cost)
            closed.append(session)
    if closed:
        # One line however many: a PBX that died with 5,000 calls up must not flood the log.
        log.warning("closed %d stale session(s) that no PBX ended, each charged up to its "
                    "last grant (first: %s)", len(closed), closed[0])
    return closed


def redis_now_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def reconcile(app: App) -> list[Difference]:
    """Compare every account in SQL with Redis; charges still in the stream count as booked."""
    diffs: list[Difference] = []
    rows = {row.id: row for row in app.books.list_accounts()}
    ids = sorted(set(rows) | set(state.account_ids(app.redis, app.keys)))
    for account in ids:
        row = rows.get(account)
        live = state.account_state(app.redis, app.keys, account)
        if row is None or live is None:
            diffs.append(Difference(account, "exists", str(row is not None), str(live is not None)))
            continue
        ledger = app.books.ledger_sum(account)
        if ledger != row.balance:
            diffs.append(Difference(account, "balance vs ledger", str(row.balance), str(ledger)))
        pending = sum(int(e["cost"]) for e in state.undrained_commits(app.redis, app.keys, account))
        if row.balance - pending != live["balance"]:
            diffs.append(Difference(account, "balance", str(row.balance - pending),
                                    str(live["balance"])))
        for name, value in state.account_fields(row).items():
            if str(value) != str(live.get(name, "")):
                diffs.append(Difference(account, name, str(value), str(live.get(name, ""))))
    return diffs


def rebuild(app: App) -> int:
    """Reload Redis from the books, e.g. after Redis lost its data.

    Balances become the books' minus charges still waiting in the stream; live
    reservations and channel counts are left to the sessions that hold them.
    """
    count = 0
    for row in app.books.list_accounts():
        pending = sum(int(e["cost"])
                      for e in state.undrained_commits(app.redis, app.keys, row.id))
        state.push_account(app.redis, app.keys, row, balance=row.balance - pending)
        # Movements retried after the rebuild must not be applied a second time.
        for entry in app.books.ledger(row.id):
            if entry.kind != "call_charge":
                app.redis.set(app.keys.marker(row.id, entry.idempotency_key), 1,
                              ex=90 * 86400)
        count += 1
    app.redis.set(app.keys.plans_version, version_stamp(app))
    return count


def claim_abandoned(app: App, consumer: str, idle_ms: int = 60_000) -> int:
    """Take over entries another worker read but never acknowledged (it died)."""
    claimed = 0
    for account in state.account_ids(app.redis, app.keys):
        try:
            _next, entries, *_ = app.redis.xautoclaim(
                app.keys.events(account), state.GROUP, consumer, idle_ms, "0-0", count=1000)
        except Exception as exc:  # noqa: BLE001 - NOGROUP on an account never seen: skip it
            log.debug("xautoclaim %s: %s", account, exc)
            continue
        claimed += len(entries)
    return claimed
