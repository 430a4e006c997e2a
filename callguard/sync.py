"""Redis and the books in step.

Calls are Redis first: each commit goes to its shard's event stream and the
worker books it into SQL (CDR and charge in one transaction, once per session),
then acknowledges and deletes the entry in one script. An entry that cannot be
booked (poisoned data) is moved to the shard's dead-letter stream instead of
blocking the others; an outage (SQL or Redis away) leaves everything pending
and is waited out. `reconcile` compares the two sides; `rebuild` reloads Redis
from the books.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import redis
import sqlalchemy.exc
from sqlalchemy import func, select, update

from . import limit_events
from .books import actors
from .books.models import Account, Cdr, LedgerEntry, RedisOutbox
from .engine import state
from .engine.core import LAYOUT, SHARDS, SessionId, shard_of
from .logs import Throttled
from .service import App, apply_now, kill, version_stamp

log = logging.getLogger(__name__)

# What means "the database is away", as opposed to "this entry cannot be booked".
SQL_OUTAGES = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
               sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)


def cdr_from_event(fields: dict) -> dict:
    sid = SessionId.parse(fields["session"])
    return {
        "session": str(sid), "account": sid.account, "channel": sid.channel,
        "node": fields.get("node", ""), "direction": fields["dir"], "destination": fields["dst"],
        "prefix": fields.get("pfx", ""), "rate_per_min": int(fields["r"]),
        "connect_fee": int(fields["cf"]), "initial_increment": int(fields["i"]),
        "subsequent_increment": int(fields["s"]), "setup_ms": int(fields["setup"]),
        "answer_ms": int(fields["ans"]) if fields.get("ans") else None,
        "end_ms": int(fields["end"]), "duration": int(fields["dur"]),
        "billed": int(fields["billed"]), "cost": int(fields["cost"]),
        "cause": fields.get("cause", ""),
    }


class Drain:
    """One consumer of the shards' event streams. Its name is the process's node identity,
    so a restarted worker reads back what it had taken but not acknowledged."""

    def __init__(self, app: App, consumer: str, count: int = 500):
        self.app, self.consumer, self.count = app, consumer, count
        self.reread = True  # read our own pending entries first (after a start or a failure)
        self.warn_dead = Throttled(log, logging.ERROR)
        self.booked: Counter[str] = Counter()  # since the start: "calls", "limit events"

    def run_once(self) -> int:
        """Book what is waiting; returns how many entries were settled. After a failure
        (SQL or Redis away half way), what this consumer took stays pending under its
        name: the next pass reads that first."""
        try:
            done = 0
            if self.reread:
                done += self._read("0")
                self.reread = False
            return done + self._read(">")
        except Exception:
            self.reread = True
            raise

    def claim(self, idle_ms: int = 30_000) -> int:
        """Take over entries another consumer read and did not settle for `idle_ms` (it
        died, or its node name changed); they are booked on the next pass."""
        pipe = self.app.redis.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.xautoclaim(self.app.keys.events(shard), state.GROUP, self.consumer, idle_ms,
                            "0-0", count=self.count, justid=True)
        # justid: redis-py returns just the ids claimed
        claimed = sum(len(reply) for reply in pipe.execute(raise_on_error=False)
                      if not isinstance(reply, Exception))
        if claimed:
            log.info("took over %d stream entries other workers left unacknowledged", claimed)
            self.reread = True
        return claimed

    def _read(self, start: str) -> int:
        app, keys = self.app, self.app.keys
        pipe = app.redis.pipeline(transaction=False)
        for shard in range(SHARDS):
            pipe.xreadgroup(state.GROUP, self.consumer, {keys.events(shard): start},
                            count=self.count)
        taken: list[tuple[int, str, dict]] = []
        for shard, reply in enumerate(pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception):
                if "NOGROUP" in str(reply):
                    state.ensure_groups(app.redis, keys)
                    continue
                raise reply
            taken += [(shard, entry_id, fields) for _stream, entries in reply or []
                      for entry_id, fields in entries]
        if not taken:
            return 0
        self._book(taken)
        return len(taken)

    def _book(self, taken: list[tuple[int, str, dict]]) -> None:
        """Book a pass in one transaction; if that fails for anything but an outage, one
        entry at a time, setting aside those that cannot be booked. Then settle them all."""
        commits = [(shard, entry_id, fields) for shard, entry_id, fields in taken
                   if fields and fields.get("type") == "commit"]
        events = [(shard, entry_id, fields) for shard, entry_id, fields in taken
                  if fields and fields.get("type") == "limit"]
        hang_up: set[str] = set()

        def book_events(db, these=events):
            hang_up.update(limit_events.book(db, [(entry_id, f) for _, entry_id, f in these]))

        try:
            self.app.books.record_calls([cdr_from_event(f) for _, _, f in commits], book_events)
        except SQL_OUTAGES:
            raise
        except Exception:  # noqa: BLE001 - one of them is poisoned: find which
            hang_up.clear()
            dead = set()
            for shard, entry_id, fields in commits + events:
                try:
                    if fields["type"] == "commit":
                        self.app.books.record_call(cdr_from_event(fields))
                    else:
                        with self.app.books.session.begin() as db:
                            book_events(db, [(shard, entry_id, fields)])
                except SQL_OUTAGES:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever it is, it is this entry's
                    self._dead_letter(shard, entry_id, fields, exc)
                    dead.add((shard, entry_id))  # ids repeat across streams
            taken = [t for t in taken if t[:2] not in dead]
        kinds = {"commit": "calls", "limit": "limit events"}
        for _, _, fields in taken:
            if fields and fields.get("type") in kinds:
                self.booked[kinds[fields["type"]]] += 1
        if hang_up:
            self._hang_up(hang_up)
        by_shard: dict[int, list[str]] = defaultdict(list)
        for shard, entry_id, _ in taken:
            by_shard[shard].append(entry_id)
        # One round trip for them all, where the client can pipeline scripts (redis-py's
        # cluster pipeline cannot: there, one per shard).
        cluster = isinstance(self.app.redis, redis.RedisCluster)
        pipe = None if cluster else self.app.redis.pipeline(transaction=False)
        for shard, ids in by_shard.items():
            self._settle(shard, ids, pipe=pipe)
        if pipe is not None:
            pipe.execute()

    def _hang_up(self, accounts: set[str]) -> None:
        """Blocked for fraud: end the accounts' calls now, on every node, and get the
        settings (the block) to Redis at once."""
        for account in sorted(accounts):
            sessions = [s["session"] for s in state.live_sessions(self.app.redis, self.app.keys,
                                                                   account)]
            apply_now(self.app, account)  # Redis away: the worker applies it later
            if sessions:
                kill(self.app, sessions, actors.FRAUD, "blocked for suspected fraud")
                log.warning("account %s blocked for suspected fraud: hanging up %d call(s)",
                            account, len(sessions))

    def _settle(self, shard: int, ids: list[str], error: str = "", pipe=None) -> None:
        keys = self.app.keys
        self.app.engine.scripts["settle"](keys=[keys.events(shard), keys.dead(shard)],
                                          args=[state.GROUP, error, *ids],
                                          client=pipe or self.app.redis)

    def _dead_letter(self, shard: int, entry_id: str, fields: dict, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        self._settle(shard, [entry_id], error)
        self.warn_dead("could not book stream entry %s (%s): set aside as a dead letter; "
                       "`callguard reconcile` lists it: %s", entry_id,
                       fields.get("session", "?"), error)


def drain(app: App, consumer: str) -> int:
    """Book everything waiting now (the CLI's and the tests' one-shot drain)."""
    d = Drain(app, consumer)
    total = 0
    while (n := d.run_once()):
        total += n
    return total


def requeue_dead_letters(app: App) -> int:
    """Put dead letters back in their streams, for the worker to try again (after the
    cause was mended). Booking is idempotent, so a crash half way books nothing twice."""
    moved = 0
    r, keys = app.redis, app.keys
    for shard in range(SHARDS):
        for entry_id, fields in r.xrange(keys.dead(shard)):
            original = {k: v for k, v in fields.items() if k not in ("error", "from")}
            pipe = r.pipeline(transaction=False)
            pipe.xadd(keys.events(shard), original)
            pipe.xdel(keys.dead(shard), entry_id)
            pipe.execute()
            moved += 1
    return moved


# -- reconcile and rebuild --------------------------------------------------------

@dataclass
class Difference:
    account: str
    field: str
    books: str
    redis: str


def _unbooked(app: App, dead: bool) -> dict[str, list[dict]]:
    """Commits in the streams (or dead letters) that have no CDR yet, by account."""
    commits = [c for shard in range(SHARDS)
               for c in state.pending_commits(app.redis, app.keys, shard, dead)]
    if not commits:
        return {}
    sessions = {c["session"] for c in commits if c.get("session")}
    booked: set[str] = set()
    listed = sorted(sessions)
    with app.books.session() as db:
        for start in range(0, len(listed), 500):
            booked |= set(db.scalars(select(Cdr.session).where(
                Cdr.session.in_(listed[start:start + 500]))))
    out: dict[str, list[dict]] = defaultdict(list)
    for c in commits:
        if c.get("session") not in booked:
            # A dead letter may be anything: name its account as best it can be read.
            account = str(c.get("session") or "?").split("/", 1)[0][:64]
            cost = c.get("cost", "0")
            out[account].append({**c, "cost": int(cost) if str(cost).isdigit() else 0})
    return out


def reconcile(app: App, rechecks: int = 2) -> list[Difference]:
    """Compare every account in SQL with Redis. Charges Redis made that the books do not
    have yet (in the stream, or dead letters) and movements the books have that Redis
    does not have yet (the outbox) are taken into account, and the last two reported.
    An account that differs is looked at again `rechecks` times before it is reported:
    a call or a top-up in flight is not a difference."""
    diffs = _reconcile(app, None)
    for _ in range(rechecks):
        if not diffs:
            break
        time.sleep(0.2)
        diffs = _reconcile(app, sorted({d.account for d in diffs}))
    return diffs


def _reconcile(app: App, only: list[str] | None) -> list[Difference]:
    diffs: list[Difference] = []
    with app.books.session() as db:
        query = select(Account)
        sums = select(LedgerEntry.account, func.coalesce(func.sum(LedgerEntry.amount), 0)) \
            .group_by(LedgerEntry.account)
        if only is not None:
            query = query.where(Account.id.in_(only))
            sums = sums.where(LedgerEntry.account.in_(only))
        rows = {row.id: row for row in db.scalars(query)}
        ledger = {a: int(total) for a, total in db.execute(sums)}
    in_redis = set(state.account_ids(app.redis, app.keys))
    ids = sorted((set(rows) | in_redis) if only is None else set(only))
    unbooked, dead = _unbooked(app, False), _unbooked(app, True)
    pending_credit: dict[str, int] = defaultdict(int)
    pending_settings: set[str] = set()
    for _row_id, account, entry, amount in app.books.outbox(limit=100_000):
        if entry is None:
            pending_settings.add(account)
        elif not app.redis.exists(app.keys.marker(account, entry)):
            pending_credit[account] += amount
    lives = _account_states(app, ids)
    for account, letters in sorted(dead.items()):
        if only is None or account in only:
            diffs += [Difference(account, "dead letter", f"no CDR for {c['session']}",
                                 f"charged {c['cost']}: {c.get('error', '')}") for c in letters]
    for account in ids:
        row, live = rows.get(account), lives.get(account)
        if row is None or live is None:
            diffs.append(Difference(account, "exists", str(row is not None), str(live is not None)))
            continue
        if ledger.get(account, 0) != row.balance:
            diffs.append(Difference(account, "balance vs ledger", str(row.balance),
                                    str(ledger.get(account, 0))))
        if pending_credit.get(account) or account in pending_settings:
            diffs.append(Difference(account, "not yet in Redis", "booked in the outbox",
                                    "Redis unreachable? the worker applies it"))
        not_booked = unbooked.get(account, []) + dead.get(account, [])
        expected = (row.balance - pending_credit.get(account, 0)
                    - sum(int(c["cost"]) for c in not_booked))
        if expected != live["balance"]:
            diffs.append(Difference(account, "balance", str(expected), str(live["balance"])))
        if account not in pending_settings:
            for name, value in state.account_fields(row).items():
                if str(value) != str(live.get(name, "")):
                    diffs.append(Difference(account, name, str(value), str(live.get(name, ""))))
    return diffs


def _account_states(app: App, ids: list[str]) -> dict[str, dict]:
    out = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = app.redis.pipeline(transaction=False)
        for account in chunk:
            pipe.hgetall(app.keys.account(account))
        for account, raw in zip(chunk, pipe.execute(), strict=True):
            if raw:
                out[account] = {**raw, "balance": int(raw.get("balance", 0) or 0)}
    return out


def rebuild(app: App) -> int:
    """Reload Redis from the books, e.g. after Redis lost its data.

    Per account, under its SQL row lock (so no booking runs beside it): the settings, and
    a balance of the books' minus the charges Redis made that the books do not have yet,
    computed inside Redis in the same script; movements the outbox still lists are
    marked applied (the books' balance holds them). Live reservations and channel counts
    are left to the sessions that hold them.
    """
    r, keys = app.redis, app.keys
    r.set(keys.layout, LAYOUT)
    state.ensure_groups(r, keys)
    count = 0
    for account_id in [row.id for row in app.books.list_accounts()]:
        shard = shard_of(account_id)
        with app.books.session.begin() as db:
            # Everything below is read under the row lock: a movement or a charge booked
            # meanwhile waits for it, and is then applied on top of what is set here.
            db.execute(update(Account).where(Account.id == account_id)
                       .values(balance=Account.balance))
            row = db.get(Account, account_id)
            pending = list(db.scalars(select(RedisOutbox.entry).where(
                RedisOutbox.account == account_id, RedisOutbox.entry.is_not(None))))
            mine = sorted({f.get("session", "") for stream in (keys.events(shard),
                                                               keys.dead(shard))
                           for _, f in r.xrange(stream)
                           if f.get("session", "").startswith(account_id + "/")})
            booked = list(db.scalars(select(Cdr.session).where(Cdr.session.in_(mine)))) \
                if mine else []
            app.engine.script(
                "restore",
                [keys.account(account_id), keys.events(shard), keys.dead(shard),
                 *(keys.marker(account_id, e) for e in pending)],
                [row.balance, account_id + "/", *booked])
            # After the balance: the settings then see the account's money as it stands.
            state.push_account(app.engine, row)
        count += 1
    r.set(keys.plans_version, version_stamp(app))
    return count


class Outage:
    """Waits out a dependency that is away, with one log line per kind of trouble a
    second and a backoff up to `cap` seconds."""

    def __init__(self, cap: float = 5.0):
        self.cap = cap
        self.delay = 0.2
        self.warn = Throttled(log, interval=10.0)

    def failed(self, what: str, exc: Exception) -> float:
        self.warn("%s unavailable (%s); waiting, nothing is lost", what,
                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def ok(self) -> None:
        self.delay = 0.2

    def attempt(self, work, sleep=time.sleep):
        """work(), or None once an outage of Redis or SQL it met has been slept on."""
        try:
            result = work()
        except (redis.RedisError, OSError) as exc:
            sleep(self.failed("Redis", exc))
            return None
        except SQL_OUTAGES as exc:
            sleep(self.failed("the SQL database", exc))
            return None
        self.ok()
        return result

