"""The HTTP API (`callguard api`): what the CLI does for accounts, money and calls, for an
operator's portal and billing. Every route is a thin translation into `service` and
`views`, the CLI's own: no rule of its own here but who may do what.

Routes are plain functions: FastAPI runs them in its thread pool, where the books (SQL)
and Redis are the same synchronous code the CLI calls. Who may: a bearer token's scope
(read < money < admin), and for a token bound to an account, that account only and
never what the operator decides (money moves, credit, channels, plan, blocks)."""


import logging
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from .. import notify, service, views
from ..books import actors
from ..books.models import MONEY_SETTINGS
from ..books.models import Account as AccountRow
from ..books.models import Cdr as CdrRow
from ..books.models import LedgerEntry as LedgerRow
from ..books.models import OperatorAction as ActionRow
from ..engine.core import ACCOUNT_ID, SessionId
from ..money import format_display, format_full, parse_amount
from . import models as m
from .problems import MEDIA_TYPE, Problem, install
from .tokens import Caller, Verifier

log = logging.getLogger("callguard.api")

MAX_PAGE = 1000
THREADS = 16  # routes run at once (FastAPI's thread pool), each with an SQL connection
SQL_POOL = THREADS + 4  # and the console's poller, and a lookup of a token meanwhile


def _problems(*statuses: int) -> dict:
    return {s: {"model": m.ProblemDetail} for s in statuses}


# Every route can answer these; each adds its own.
COMMON = _problems(400, 401, 403, 411, 413, 422, 503)

bearer = HTTPBearer(auto_error=False, description="A token from `callguard api token create`.")


def require(scope: str):
    """A route's dependency: the caller, when its token has `scope` (or more)."""

    async def caller(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Security(bearer)]) -> Caller:
        # async: a token known within the last 2 s costs no hop into the thread pool.
        challenge = {"WWW-Authenticate": 'Bearer realm="callguard"'}
        if credentials is None:
            raise Problem(401, "a bearer token is required (Authorization: Bearer cg_...)",
                          challenge)
        verify = request.app.state.verify
        found = verify.cached(credentials.credentials)
        if found is False:
            found = await run_in_threadpool(verify, credentials.credentials)
        if found is None:
            raise Problem(401, "unknown or revoked token", challenge)
        if not found.may(scope):
            raise Problem(403, f"token {found.name} has scope {found.scope}; this needs "
                               f"{scope}")
        return found

    return caller


def known_query(request: Request) -> None:
    """A query parameter the route does not take is refused, not ignored: `?acount=X` must
    not answer every account's CDRs."""
    route = request.scope.get("route")
    taken = {p.alias for p in route.dependant.query_params} if route else set()
    unknown = sorted(set(request.query_params) - taken)
    if unknown:
        raise Problem(422, f"unknown query parameter(s): {', '.join(map(repr, unknown))}")


def operator_only(caller: Caller) -> None:
    if caller.account is not None:
        raise Problem(403, f"token {caller.name} is for account {caller.account} only; this "
                           "needs an operator's token")


def _own(caller: Caller, account: str) -> None:
    """A token bound to another account learns nothing of this one, not even that it is."""
    if not caller.sees(account):
        raise Problem(404, f"unknown account {account}")


OPERATOR = "operator"  # who acted, as a token bound to an account sees an operator


def _as_seen(caller: Caller, view: dict | None) -> dict | None:
    """A ledger entry's or action's view as `caller` may see it: a token bound to an
    account sees its own name and callguard's own parts act, any other actor (an
    operator's user name, another token's) as OPERATOR."""
    actor = view.get("actor") if view else None
    if caller.account is None or actor is None or actor.startswith("callguard:") or \
            actor == actors.api(caller.name):
        return view
    return {**view, "actor": OPERATOR}


AccountPath = Annotated[str, Path(pattern=f"^{ACCOUNT_ID.pattern}$")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"At most {MAX_PAGE}.")]
Since = Annotated[str | None, Query(description="From this time on (ISO 8601, or "
                                                "YYYY-MM-DD in UTC).", max_length=40)]
Until = Annotated[str | None, Query(description="Up to this time (a bare date includes "
                                                "that day).", max_length=40)]
After = Annotated[str | None, Query(description="The `next` cursor of the page before.",
                                    max_length=100)]
# An account's id: its shape, so junk (a NUL, which PostgreSQL refuses) is a 422, not a 500.
AccountAfter = Annotated[str | None, Query(description="The `next` cursor of the page before.",
                                           pattern=f"^{ACCOUNT_ID.pattern}$")]
IdempotencyKey = Annotated[str, Header(
    alias="Idempotency-Key", min_length=1, max_length=180,
    description="The movement's reference (a bank transfer, a receipt; UTF-8), as the "
                "CLI's --ref: one key is one movement on an account, for ever, whatever its "
                "kind; the same request again answers 200 with the same entry.")]


def _cursor(text: str | None, parts: int) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(".")]
    except ValueError:
        values = []
    if len(values) != parts or any(not 0 <= v < 2**63 for v in values):
        raise Problem(422, f"not a cursor of this list: {text!r}")
    return values


def _utf8(header: str) -> str:
    """A header as the client wrote it: ASGI gives its bytes as latin-1, so "é" would be
    booked as "Ã©" and never match the same reference given to the CLI."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise Problem(422, "Idempotency-Key (header): not UTF-8") from None


def _micros(value: str | None, name: str, negative: bool = False) -> int | None:
    if value is None:
        return None
    try:
        return parse_amount(value, allow_negative=negative)
    except ValueError as exc:
        raise Problem(422, f"{name.replace('_', '-')}: {exc}") from None


def routes(app: service.App) -> APIRouter:
    api = APIRouter(prefix="/v1", responses=COMMON, dependencies=[Depends(known_query)])
    read, money, admin = require("read"), require("money"), require("admin")

    # -- accounts ---------------------------------------------------------------
    @api.get("/accounts", response_model=m.AccountPage, tags=["accounts"])
    def list_accounts(caller: Annotated[Caller, Depends(read)], limit: Limit = 100,
                      after: AccountAfter = None):
        """Accounts in order of their id, a page at a time."""
        operator_only(caller)
        query = select(AccountRow).order_by(AccountRow.id).limit(limit + 1)
        if after is not None:
            query = query.where(AccountRow.id > after)
        with app.books.session() as db:
            rows = list(db.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [views.account_of(app, r) for r in rows],
                "next": rows[-1].id if more else None}

    @api.post("/accounts", status_code=201, response_model=m.Account, tags=["accounts"],
              responses=_problems(409))
    def create_account(body: m.AccountCreate, caller: Annotated[Caller, Depends(admin)]):
        """Create an account; `account` is the PBX accountcode."""
        operator_only(caller)
        if body.kind == "prepaid" and (body.credit_limit or body.warn_at):
            raise Problem(422, "a prepaid account has no credit limit (use balance, "
                               "warn_below)")
        if body.kind == "postpaid" and (body.balance or body.warn_below):
            raise Problem(422, "a postpaid account has no balance to set (use credit_limit, "
                               "warn_at)")
        row, _ = service.create_account(
            app, body.account, opening_balance=_micros(body.balance, "balance") or 0,
            kind=body.kind, currency=body.currency.upper(),
            credit_limit=_micros(body.credit_limit, "credit_limit") or 0,
            warn_below=_micros(body.warn_below, "warn_below"),
            warn_at=_micros(body.warn_at, "warn_at"), max_channels=body.max_channels,
            cps_limit=body.cps_limit, plan=body.plan, email=body.email,
            actor=actors.api(caller.name))
        log.info("account %s created by token %s", row.id, caller.name)
        return views.account_of(app, row)

    @api.get("/accounts/{account}", response_model=m.AccountLive, tags=["accounts"],
             responses=_problems(404))
    def get_account(account: AccountPath, caller: Annotated[Caller, Depends(read)]):
        """An account's money and status, live from Redis, its calls in progress, and who
        did what to it lately."""
        _own(caller, account)
        row = app.books.get_account(account)
        who = views.who_and_why(app, row)
        return {**views.account_of(app, row), "live_calls": views.live_calls(app, account),
                "blocked_by": _as_seen(caller, who["blocked_by"]),
                "recent_actions": [_as_seen(caller, a) for a in who["recent_actions"]]}

    @api.patch("/accounts/{account}", response_model=m.Account, tags=["accounts"],
               responses=_problems(404))
    def change_account(account: AccountPath, body: m.AccountChange,
                       caller: Annotated[Caller, Depends(admin)]):
        """Change limits, plan, contact, auto top-up or fraud controls. A token bound to
        the account may change its warning levels, contact and auto top-up only."""
        _own(caller, account)
        given = body.model_fields_set - {"reason"}
        if caller.account is not None and given - m.CUSTOMER_FIELDS:
            raise Problem(403, f"token {caller.name} may not change "
                               f"{', '.join(sorted(given - m.CUSTOMER_FIELDS))}: the operator "
                               "sets those")
        changes = {}
        for name in given - {"block_prefixes", "unblock_prefixes", "auto_topup"}:
            value = getattr(body, name)
            if value is None:
                raise Problem(422, f"{name}: give a value, or leave it out")
            changes[name] = _micros(value, name) if name in MONEY_SETTINGS else value
        if body.auto_topup is False:
            changes.update(auto_topup_below=None, auto_topup_amount=None)
        if not changes and not body.block_prefixes and not body.unblock_prefixes:
            raise Problem(422, "nothing to change: give at least one field")
        row, _ = service.update_account(app, account, block=body.block_prefixes,
                                        unblock=body.unblock_prefixes,
                                        actor=actors.api(caller.name), reason=body.reason,
                                        **changes)
        log.info("account %s changed by token %s: %s", account, caller.name,
                 ", ".join(sorted(given)))
        return views.account_of(app, row)

    @api.post("/accounts/{account}/block", response_model=m.Blocked, tags=["accounts"],
              responses=_problems(404))
    def block_account(account: AccountPath, body: m.Block,
                      caller: Annotated[Caller, Depends(admin)]):
        """Block calls both ways; `hangup` also ends its calls in progress."""
        operator_only(caller)
        row, _, hung_up = service.block_account(app, account, body.reason, body.hangup,
                                                actor=actors.api(caller.name))
        log.info("account %s blocked by token %s (%s)%s", account, caller.name, body.reason,
                 f"; hanging up {hung_up} call(s)" if body.hangup and hung_up else "")
        return {**views.account_of(app, row), "hung_up": hung_up}

    @api.post("/accounts/{account}/unblock", response_model=m.Account, tags=["accounts"],
              responses=_problems(404))
    def unblock_account(account: AccountPath, caller: Annotated[Caller, Depends(admin)],
                        body: m.Unblock | None = None):
        """Lift an operator's (or the fraud controls') block."""
        operator_only(caller)
        row, _ = service.unblock_account(app, account, actor=actors.api(caller.name),
                                         reason=body.reason if body else None)
        log.info("account %s unblocked by token %s", account, caller.name)
        return views.account_of(app, row)

    # -- money ------------------------------------------------------------------
    def movement(kind: str, summary: str):
        def book(account: AccountPath, body: m.Movement, key: IdempotencyKey,
                 caller: Annotated[Caller, Depends(money)], response: Response):
            # Money moved by a customer's own token would be money nobody paid: a top-up
            # or payment is booked by billing (or the auto top-up), with an operator's.
            operator_only(caller)
            key = _utf8(key)
            micros = _micros(body.amount, "amount", negative=kind == "adjustment")
            if micros == 0:
                raise Problem(422, f"amount must be greater than zero: {body.amount!r}")
            booking, applied = service.move_money(app, account, kind, micros, key,
                                                  actor=actors.api(caller.name),
                                                  reason=body.reason)
            if not booking.created and booking.amount != micros:
                raise Problem(422, f"already booked as entry {booking.entry_id} for "
                                   f"{format_display(booking.amount)}, not "
                                   f"{format_display(micros)} (Idempotency-Key {key!r})")
            log.info("%s of %s on %s by token %s: %s entry %d", kind, format_display(micros),
                     account, caller.name, "booked" if booking.created else "already booked",
                     booking.entry_id)
            response.status_code = 201 if booking.created else 200
            return {"entry": booking.entry_id, "account": account, "kind": kind,
                    "amount": format_full(booking.amount), "created": booking.created,
                    "in_redis": applied.in_redis, "actor": booking.actor,
                    "reason": booking.reason}

        book.__doc__ = summary
        return book

    for path, kind, summary in (
            ("topups", "topup", "Add prepaid credit; lifts a NO_FUNDS block."),
            ("payments", "payment", "Book a payment on a postpaid account: lowers what is "
                                    "outstanding and lifts a credit-limit block."),
            ("adjustments", "adjustment", "Correct a balance either way (a refund, a "
                                          "chargeback); negative lowers it.")):
        api.post(f"/accounts/{{account}}/{path}", response_model=m.Booked, status_code=201,
                 tags=["money"], name=f"book_{kind}", responses={
                     200: {"model": m.Booked, "description": "Booked before, with this "
                                                             "Idempotency-Key"},
                     **_problems(404)})(movement(kind, summary))

    @api.get("/accounts/{account}/ledger", response_model=m.LedgerPage, tags=["money"],
             responses=_problems(404))
    def ledger(account: AccountPath, caller: Annotated[Caller, Depends(read)],
               since: Since = None, until: Until = None, limit: Limit = 100,
               after: After = None):
        """Ledger entries with the running balance, oldest first."""
        _own(caller, account)
        app.books.get_account(account)
        query = views.ledger_query(account, views.moment(since), views.moment(until, end=True))
        if (cursor := _cursor(after, 1)) is not None:
            query = query.where(LedgerRow.id > cursor[0])
        with app.books.session() as db:
            entries = list(db.scalars(query.limit(limit + 1)))
            more = len(entries) > limit
            entries = entries[:limit]
            start = views.balance_before(db, account, entries[0].id) if entries else 0
        return {"items": [_as_seen(caller, e) for e in views.ledger_views(entries, start)],
                "next": str(entries[-1].id) if more else None}

    @api.get("/accounts/{account}/actions", response_model=m.ActionPage, tags=["accounts"],
             responses=_problems(404))
    def actions(account: AccountPath, caller: Annotated[Caller, Depends(read)],
                limit: Limit = 100, after: After = None):
        """Who created, changed, blocked or unblocked the account or hung up its calls, and
        why, oldest first (money movements: the ledger)."""
        _own(caller, account)
        app.books.get_account(account)
        query = views.actions_query(account)
        if (cursor := _cursor(after, 1)) is not None:
            query = query.where(ActionRow.id > cursor[0])
        with app.books.session() as db:
            rows = list(db.scalars(query.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [_as_seen(caller, views.action_view(a)) for a in rows],
                "next": str(rows[-1].id) if more else None}

    # -- calls, CDRs, notices -------------------------------------------------
    @api.get("/calls", response_model=list[m.Call], tags=["calls"])
    def calls(caller: Annotated[Caller, Depends(read)],
              account: Annotated[str | None, Query(pattern=f"^{ACCOUNT_ID.pattern}$")] = None):
        """Calls in progress (an account's, or all)."""
        if caller.account is not None:
            account = account or caller.account
            _own(caller, account)
        return views.live_calls(app, account)

    @api.delete("/calls/{session:path}", status_code=202, response_model=m.Hangup,
                tags=["calls"], responses=_problems(404))
    def hang_up(session: Annotated[str, Path(max_length=200)],
                caller: Annotated[Caller, Depends(admin)],
                reason: Annotated[str | None, Query(min_length=1, max_length=200, description=(
                    "Why: recorded in the books with the token's name."))] = None):
        """Hang a call up now, on whichever serve process holds it."""
        try:
            account = SessionId.parse(session).account
        except ValueError:
            raise Problem(404, f"no call in progress with session {session}") from None
        _own(caller, account)
        if not any(s["session"] == session for s in service.live_sessions(app, account)):
            raise Problem(404, f"no call in progress with session {session}")
        listeners = service.kill(app, [session], actors.api(caller.name), reason)
        if not listeners:
            raise Problem(503, "no serve process is listening; the PBX's own timeout will "
                               "end the call")
        log.info("call %s hung up by token %s", session, caller.name)
        return {"session": session, "listeners": listeners}

    @api.get("/cdrs", response_model=m.CdrPage, tags=["calls"], responses=_problems(404))
    def cdrs(caller: Annotated[Caller, Depends(read)],
             account: Annotated[str | None, Query(pattern=f"^{ACCOUNT_ID.pattern}$")] = None,
             since: Since = None, until: Until = None, limit: Limit = 100,
             after: After = None):
        """Finished calls by the time they ended, oldest first."""
        if caller.account is not None:
            account = account or caller.account
            _own(caller, account)
        if account:
            app.books.get_account(account)
        query = views.cdr_query(account, views.epoch_ms(since),
                                views.epoch_ms(until, end=True))
        if (cursor := _cursor(after, 2)) is not None:
            end_ms, row_id = cursor
            query = query.where((CdrRow.end_ms > end_ms)
                                | ((CdrRow.end_ms == end_ms) & (CdrRow.id > row_id)))
        with app.books.session() as db:
            rows = list(db.scalars(query.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [views.cdr_view(c) for c in rows],
                "next": f"{rows[-1].end_ms}.{rows[-1].id}" if more else None}

    @api.get("/notices", response_model=m.NoticePage, tags=["calls"],
             responses=_problems(404))
    def notices(caller: Annotated[Caller, Depends(read)],
                account: Annotated[str | None,
                                   Query(pattern=f"^{ACCOUNT_ID.pattern}$")] = None,
                limit: Limit = 100, after: After = None):
        """Notices to customers and how their delivery stands, newest first."""
        if caller.account is not None:
            account = account or caller.account
            _own(caller, account)
        cursor = _cursor(after, 1)
        rows = notify.notice_rows(app, account, limit + 1, cursor[0] if cursor else None)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": rows, "next": str(rows[-1]["seq"]) if more else None}

    return api


def _problem_media_type(web: FastAPI) -> dict:
    """FastAPI documents every response as application/json: problems are not."""
    if web.openapi_schema is None:
        document = get_openapi(title=web.title, version=web.version,
                               description=web.description, routes=web.routes)
        for operation in (op for path in document["paths"].values() for op in path.values()):
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and "application/json" in answer.get("content", {}):
                    answer["content"] = {MEDIA_TYPE: answer["content"]["application/json"]}
        web.openapi_schema = document
    return web.openapi_schema


def create(app: service.App, console: bool = True) -> FastAPI:
    """The ASGI application: the API under /v1, the console at /."""
    @asynccontextmanager
    async def lifespan(_web):
        # Fewer routes at once than SQL connections kept open (server.configure sizes the
        # pool): none waits for one, none opens one of its own.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        # The engine loads the rate plans on first use, from inside a booking's open
        # transaction: done once here, not by 16 threads at once each holding a
        # connection while they wait for it.
        app.books  # noqa: B018
        app.engine  # noqa: B018
        yield

    web = FastAPI(title="callguard", version=version("callguard"), lifespan=lifespan,
                  openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None,
                  description="Live credit control: accounts, money and calls. Money is a "
                              "decimal string, times ISO 8601 UTC, errors RFC 9457 "
                              "problem details.")
    web.state.verify = Verifier(app.books, pepper=app.settings.api_token_pepper)
    install(web)
    web.include_router(routes(app))
    web.openapi = lambda: _problem_media_type(web)
    if console:
        from .console import mount

        mount(web, app, require("read"))
    return web

