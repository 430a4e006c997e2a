"""The live console at `/`: one page (console.html, no build step, nothing from elsewhere)
and the event stream it reads, `/v1/console/events` (server-sent events).

One poller per process reads the live calls, the accounts they belong to and the newest
notices once a second (in a thread: the service layer is synchronous Redis and SQL),
compares them with what it read before and sends each subscriber only what changed. A
thousand browsers cost one read a second, not a thousand; a quiet second costs no bytes.

Events: `snapshot` {now, calls, accounts, notices} on connect; `update` {now, upsert,
remove, costs, accounts, gone_accounts, notices} when something changed; `error`
{message} while Redis or the books are away (the next update or snapshot clears it); a
comment every 15 s to keep the link and its proxies awake. Calls are `views.call_view`,
accounts `views.account_view`, notices `notify.notice_rows`: the CLI's and the API's own
dicts. Talk time and time left tick in the browser (from `answered_at`, `grant_end` and
the server's `now`), so they are not changes; the cost so far is rated here, and sent on
its own (`costs`, session to amount) when only it moved."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import zlib
from base64 import b64encode
from dataclasses import dataclass, field
from importlib.resources import files

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy import select

from .. import notify, views
from ..books.ledger import UnknownAccount
from ..books.models import Account as AccountRow
from ..engine import state as engine_state
from ..logs import Throttled
from ..refusals import explain
from .problems import Problem
from .tokens import Caller

log = logging.getLogger("callguard.api")

POLL = 1.0  # seconds between reads of the live calls
SLOW_EVERY = 5.0  # seconds between reads of the notices
ROUNDS = 5  # every call and account is read again at least every ROUNDS polls
HEARTBEAT = 15.0  # seconds of silence before a comment line
NOTICES = 20  # the newest notices shown
LINGER_MS = 300_000  # an account stays listed this long after its last call
QUEUE = 32  # events waiting for one subscriber; beyond, it is dropped (it reconnects)
MAX_SUBSCRIBERS = 64
OPERATOR_SLOTS = 16  # of those, never taken by tokens bound to an account
PER_TOKEN = 4  # streams one token may hold open
RECHECK = 2.0  # seconds between checks that a stream's token still holds
# The fields of a call that move every second by themselves: the browser ticks them.
TICKING = frozenset({"answered_for", "left_seconds", "cost_so_far"})
# The Redis hash fields the books push (state.account_fields): when one changes, the
# account's SQL row is read again at once, not at the next slow read.
CHANGES = ("upsert", "remove", "costs", "accounts", "gone_accounts", "notices")
SETTINGS = ("kind", "status", "reason", "credit", "max_channels", "plan", "cps", "currency",
            "warn", "tpb", "cpm", "vmax", "bp", "fraud", "ub")


@dataclass(frozen=True)
class Reading:
    """What one poll saw: the whole picture, never changed after it is made."""

    now: int
    calls: dict[str, dict]  # session -> call view
    accounts: dict[str, dict]  # account -> account view
    notices: dict[str, list[dict]]  # "" -> the newest of all; account -> its own newest


@dataclass(eq=False)
class Subscriber:
    account: str | None  # a token bound to an account sees that account only
    token: str = ""  # who opened it: checked again while it is open (a revocation)
    name: str = ""
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE))
    fresh: bool = True  # owes a snapshot
    dropped: bool = False


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _steady(view: dict) -> dict:
    return {k: v for k, v in view.items() if k not in TICKING}


def diff(before: Reading, after: Reading) -> dict:
    """What changed from `before` to `after`, for every account (filtered per subscriber
    later). Empty lists when nothing did."""
    upsert, costs = [], {}
    for session, view in after.calls.items():
        old = before.calls.get(session)
        if old is view:  # not read again this poll (Poller): the same
            continue
        if old is None or _steady(old) != _steady(view):
            upsert.append(view)
        elif old["cost_so_far"] != view["cost_so_far"]:
            costs[session] = view["cost_so_far"]
    notices = {}
    for key, rows in after.notices.items():
        known = {n["seq"]: n for n in before.notices.get(key, ())}
        notices[key] = [n for n in rows if known.get(n["seq"]) != n]
    return {"now": after.now, "upsert": upsert,
            "remove": [s for s in before.calls if s not in after.calls], "costs": costs,
            "accounts": [v for a, v in after.accounts.items()
                         if before.accounts.get(a) is not v and before.accounts.get(a) != v],
            "gone_accounts": [a for a in before.accounts if a not in after.accounts],
            "notices": notices}


def _mine(account: str | None, item: str) -> bool:
    return account is None or item == account


def _account_of(session: str) -> str:
    return session.split("/", 1)[0]


def snapshot_for(reading: Reading, account: str | None) -> dict:
    return {"now": reading.now,
            "calls": [v for v in reading.calls.values() if _mine(account, v["account"])],
            "accounts": [v for a, v in reading.accounts.items() if _mine(account, a)],
            "notices": reading.notices.get(account or "", [])}


def update_for(change: dict, account: str | None, always: bool = False) -> dict | None:
    """The part of `change` a subscriber sees; None when that is nothing (unless
    `always`)."""
    if account is None:
        out = {**change, "notices": change["notices"].get("", [])}
    else:
        out = {"now": change["now"],
               "upsert": [v for v in change["upsert"] if v["account"] == account],
               "remove": [s for s in change["remove"] if _account_of(s) == account],
               "costs": {s: c for s, c in change["costs"].items()
                         if _account_of(s) == account},
               "accounts": [v for v in change["accounts"] if v["account"] == account],
               "gone_accounts": [a for a in change["gone_accounts"] if a == account],
               "notices": change["notices"].get(account, [])}
    if not always and not any(out[k] for k in CHANGES):
        return None
    return out


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % ROUNDS


class Poller:
    """The reads, in a worker thread, one at a time; the caches here belong to it.

    Reading every session's hash every second would cost a 1,000-call switch some 50 ms of
    CPU a second. The live sets' scores (a session's deadline) move whenever its hash
    does (authorize, answer, extend; a commit removes it), so each poll reads the live
    sets and only the hashes of new or moved sessions, plus one fifth of the others in
    turn: every call's cost so far, and every account, is read again at least every
    ROUNDS polls, whatever else changed."""

    def __init__(self, app):
        self.app = app
        self.round = 0
        # member -> (deadline, view, bucket)
        self.members: dict[str, tuple[int, dict | None, int]] = {}
        self.rows: dict[str, object] = {}  # account -> its books row
        self.settings: dict[str, tuple] = {}  # account -> its SETTINGS as Redis has them
        self.accounts: dict[str, dict] = {}  # account -> its last view
        self.seen: dict[str, int] = {}  # account -> when it last had a call (Redis ms)
        self.notices_at = float("-inf")  # monotonic time of the last notices read
        self.notices: dict[str, list[dict]] = {"": []}

    def read(self, pinned: frozenset[str]) -> Reading:
        from ..service import redis_now_ms

        app, r, keys = self.app, self.app.redis, self.app.keys
        self.round = (self.round + 1) % ROUNDS
        now = redis_now_ms(r)
        live = dict(engine_state.live_members(r, keys, None))
        members = {}
        due, moved = [], set()
        for member, deadline in live.items():
            known = self.members.get(member)
            if known is None or known[0] != deadline:
                due.append(member)
                moved.add(member)
            elif known[2] == self.round:
                due.append(member)
            else:
                members[member] = known
        pipe = r.pipeline(transaction=False)
        for member in due:
            pipe.hgetall(keys.session(*member.split("/", 1)))
        touched = set()
        for member, fields in zip(due, pipe.execute() if due else [], strict=True):
            session = engine_state.session_reading(member, live[member], fields)
            view = None if session is None else views.call_view(session, now)
            if view is not None and member in moved:
                touched.add(view["account"])
            known = self.members.get(member)
            members[member] = (live[member], view,
                               known[2] if known is not None else _bucket(member))
        gone = {v["account"] for m, (_, v, _) in self.members.items()
                if v is not None and m not in live}
        self.members = members
        calls = {v["session"]: v for _, v, _ in members.values() if v is not None}

        if time.monotonic() - self.notices_at >= SLOW_EVERY or set(pinned) - set(self.notices):
            notices = {"": notify.notice_rows(app, None, NOTICES)}
            for account in pinned:
                with contextlib.suppress(UnknownAccount):
                    notices[account] = notify.notice_rows(app, account, NOTICES)
            self.notices, self.notices_at = notices, time.monotonic()
        for view in calls.values():
            self.seen[view["account"]] = now
        self.seen = {a: t for a, t in self.seen.items() if now - t < LINGER_MS}
        shown = set(self.seen) | set(pinned) | {
            n["account"] for rows in self.notices.values() for n in rows}
        # Read again: the accounts whose calls moved, came or went, those new here, and a
        # fifth of the others in turn.
        due = sorted(a for a in shown if a in touched or a in gone or a not in self.accounts
                     or _bucket(a) == self.round)
        pipe = r.pipeline(transaction=False)
        for account in due:
            pipe.hgetall(keys.account(account))
        hashes = dict(zip(due, pipe.execute() if due else [], strict=True))
        fresh = {a: tuple(h.get(k) for k in SETTINGS) for a, h in hashes.items()}
        self._load_rows([a for a in due if a not in self.rows or self.settings.get(a) != fresh[a]
                         or _bucket(a) == self.round])
        self.settings = {a: v for a, v in {**self.settings, **fresh}.items() if a in shown}
        self.rows = {a: row for a, row in self.rows.items() if a in shown}
        accounts = {a: v for a, v in self.accounts.items() if a in shown and a not in hashes}
        for account, raw in hashes.items():
            row = self.rows.get(account)
            if row is not None:
                accounts[account] = views.account_view(engine_state.account_reading(raw), row)
        self.accounts = accounts
        return Reading(now, calls, dict(sorted(accounts.items())), self.notices)

    def _load_rows(self, accounts: list[str]) -> None:
        for start in range(0, len(accounts), 500):
            chunk = accounts[start:start + 500]
            with self.app.books.session() as db:
                found = {row.id: row for row in db.scalars(
                    select(AccountRow).where(AccountRow.id.in_(chunk)))}
            for account in chunk:
                if account in found:
                    self.rows[account] = found[account]
                else:
                    self.rows.pop(account, None)


class Hub:
    """The subscribers of this process and the one poller they share: started by the
    first, stopped when the last leaves."""

    def __init__(self, app, poll: float = POLL):
        self.poller = Poller(app)
        self.poll = poll
        self.subscribers: set[Subscriber] = set()
        self.reading: Reading | None = None
        self.error: str | None = None
        self.task: asyncio.Task | None = None
        self.polls = 0
        self.warn = Throttled(log, interval=60.0)

    def subscribe(self, account: str | None, token: str = "", name: str = "") -> Subscriber:
        if sum(s.name == name for s in self.subscribers) >= PER_TOKEN:
            raise Problem(503, f"token {name} has {PER_TOKEN} console streams open already",
                          {"Retry-After": "10"})
        # Operators' tokens keep slots of their own: customers' streams cannot fill them.
        if len(self.subscribers) >= MAX_SUBSCRIBERS - (OPERATOR_SLOTS if account else 0):
            raise Problem(503, f"the console has {len(self.subscribers)} streams open "
                               "already", {"Retry-After": "10"})
        sub = Subscriber(account, token, name)
        self.subscribers.add(sub)
        if self.task is not None and self.reading is not None and account is None:
            self._send(sub, sse("snapshot", snapshot_for(self.reading, None)))
            sub.fresh = False
        # else: a bound account may not be read yet (its notices); the next poll sends it
        if self.error is not None:
            self._send(sub, sse("error", {"message": self.error}))
        if self.task is None:
            self.reading = None
            self.task = asyncio.get_running_loop().create_task(self._run())
        return sub

    def leave(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (a server stopping): each browser reconnects elsewhere."""
        for sub in list(self.subscribers):
            self._drop(sub)

    def _drop(self, sub: Subscriber) -> None:
        sub.dropped = True
        self.subscribers.discard(sub)
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)

    def _send(self, sub: Subscriber, data: bytes) -> None:
        try:
            sub.queue.put_nowait(data)
        except asyncio.QueueFull:  # too slow a reader: it gets a new snapshot instead
            log.info("console: a stream too slow to follow was dropped")
            self._drop(sub)

    async def _run(self) -> None:
        try:
            while self.subscribers:
                started = time.monotonic()
                await self._once()
                await asyncio.sleep(max(0.0, self.poll - (time.monotonic() - started)))
        finally:
            self.task = None
            self.reading = None

    async def _once(self) -> None:
        pinned = frozenset(s.account for s in self.subscribers if s.account is not None)
        try:
            reading = await asyncio.to_thread(self.poller.read, pinned)
        except Exception as exc:  # noqa: BLE001 - said to the browsers, tried again
            known = explain(exc)
            if known is None:
                log.error("console: reading the live state failed", exc_info=exc)
                message = "internal error (the server's log has the details)"
            else:
                message = known[1]
                self.warn("console: %s", message)
            if message != self.error:
                self.error = message
                data = sse("error", {"message": message})
                for sub in list(self.subscribers):
                    self._send(sub, data)
            return
        self.polls += 1
        recovered, self.error = self.error is not None, None
        before, self.reading = self.reading, reading
        change = diff(before, reading) if before is not None else None
        shared: dict[str | None, bytes | None] = {}
        for sub in list(self.subscribers):
            if sub.account is not None and sub.account not in pinned:
                continue  # come since this read began: the next one reads its account
            if sub.fresh or change is None:
                sub.fresh = False
                self._send(sub, sse("snapshot", snapshot_for(reading, sub.account)))
                continue
            if sub.account not in shared:
                part = update_for(change, sub.account)
                if part is None and recovered:  # an update all the same: the error is over
                    part = update_for(change, sub.account, always=True)
                shared[sub.account] = None if part is None else sse("update", part)
            if shared[sub.account] is not None:
                self._send(sub, shared[sub.account])


async def stream(hub: Hub, sub: Subscriber, verify=None):
    """The events of one subscriber. Before what it sends, at most every RECHECK s (from
    the verifier's cache mostly), its token is checked again: a revoked one ends the
    stream within a heartbeat."""
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        yield b": callguard console\n\n"
        while not sub.dropped:
            try:
                data = await asyncio.wait_for(sub.queue.get(), HEARTBEAT)
            except TimeoutError:
                data = b": keepalive\n\n"
            if data is None:
                return
            if verify is not None and loop.time() - checked >= RECHECK:
                checked = loop.time()
                caller = await run_in_threadpool(verify, sub.token)
                if caller is None or caller.account != sub.account:
                    yield sse("error", {"message": "this token was revoked"})
                    return
            yield data
    finally:
        hub.leave(sub)


def _page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy naming its own inline script and style
    by hash: nothing else may run there, whatever text a call or a notice carries."""
    html = files("callguard.api").joinpath("console.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        return " ".join(
            f"'sha256-{b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    policy = (f"default-src 'none'; script-src {hashes('script')}; "
              f"style-src {hashes('style')}; connect-src 'self'; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


def mount(web: FastAPI, app, read) -> None:
    hub = Hub(app)
    web.state.console = hub
    page, policy = _page()
    headers = {"Content-Security-Policy": policy, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "X-Frame-Options": "DENY"}

    @web.get("/", include_in_schema=False, response_class=HTMLResponse)
    def console():
        return HTMLResponse(page, headers=headers)

    @web.get("/v1/console/events", include_in_schema=False)
    async def console_events(request: Request, caller: Caller = Depends(read)):  # noqa: B008 - `read` is local
        token = request.headers["authorization"].partition(" ")[2].strip()
        sub = hub.subscribe(caller.account, token, caller.name)
        log.debug("console stream opened by token %s", caller.name)
        return StreamingResponse(stream(hub, sub, web.state.verify),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})
