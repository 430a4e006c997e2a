"""Auto top-up: the worker charges a stored payment method through the payment provider
(CONTRACT.md, "Payment provider") and books what it took.

A top-up is an `AutoTopup` row, created with the engine's crossing event (`request_topup`)
and charged by `charge_due` with the row's key as Idempotency-Key, the same on every
retry. Money is booked once: SQL first (the ledger key `autotopup:<key>` is the final
guard), then Redis from the books' outbox.

Once a request may have reached the provider, the row follows it to a definite answer:
it is retried with the same key whatever happened to the account since (a lost reply may
have charged the card), and a success is booked. A top-up sent but not answered within
GIVE_UP of its request is given up (declined, `topup_failed` "provider unreachable"):
providers forget idempotency keys after about a day, and a retry past that could charge
twice. If the provider did charge, the operator reconciles it by hand (logged).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from . import service
from .books import actors
from .books.models import Account, AutoTopup, as_utc
from .books.notices import add_notice
from .engine import state
from .logs import Throttled
from .money import format_display

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=2)  # a claimed row is not due again for this long (> any request)
BACKOFF_FIRST = timedelta(seconds=10)  # after a failed attempt, doubling per attempt...
BACKOFF_CAP = timedelta(minutes=15)  # ...up to this
GIVE_UP = timedelta(hours=24)  # since the request, for a row that was sent
BATCH = 50  # rows per pass

_warn_unconfigured = Throttled(log, logging.WARNING, interval=300.0)


def request_topup(db: Session, row: Account, key: str, now: datetime | None = None
                  ) -> AutoTopup | None:
    """A pending top-up for `row`, in the caller's transaction; None when `key` was
    requested before (a replay), one is pending already, or auto top-up is off."""
    if db.scalar(select(AutoTopup.id).where(AutoTopup.key == key)) is not None:
        return None
    if not state.topup_below(row):
        return None
    # A write on the account: two requests for it at once wait for each other here, so
    # the second one sees the first one's pending row.
    db.execute(update(Account).where(Account.id == row.id)
               .values(updated_at=Account.updated_at)
               .execution_options(synchronize_session=False))
    pending = select(AutoTopup.id).where(AutoTopup.account == row.id,
                                         AutoTopup.state == "pending")
    if db.scalar(pending) is not None:
        return None
    topup = AutoTopup(key=key, account=row.id, amount=row.auto_topup_amount,
                      currency=row.currency, payment_method=row.payment_method,
                      state="pending", attempts=0, created_at=as_utc(now))
    db.add(topup)
    db.flush()
    return topup


def charge_due(app: service.App, now: datetime | None = None, timeout: float = 10.0) -> int:
    """Charge, skip or give up every pending top-up that is due; returns how many it
    handled (0: idle). Provider failures are kept for a retry, never raised."""
    now = as_utc(now)
    with app.books.session() as db:
        due = list(db.scalars(select(AutoTopup.id).where(*_due(now))
                              .order_by(AutoTopup.id).limit(BATCH)))
    if not due:
        return 0
    url = app.settings.payment_url
    if not url:
        _warn_unconfigured("%d auto top-up(s) wait: no payment URL is configured", len(due))
        return 0
    handled = 0
    with httpx.Client(timeout=timeout) as client:
        for topup_id in due:
            handled += _handle(app, client, url, topup_id, now)
    return handled


def _due(now: datetime) -> tuple:
    return (AutoTopup.state == "pending",
            or_(AutoTopup.next_attempt_at.is_(None), AutoTopup.next_attempt_at <= now))


def _handle(app: service.App, client: httpx.Client, url: str, topup_id: int,
            now: datetime) -> int:
    with app.books.session() as db:
        row = db.get(AutoTopup, topup_id)
        acct = db.get(Account, row.account)
    if row.state != "pending":
        return 0  # another worker has just settled it
    # Skipping, giving up and claiming all change the row only as this pass saw it: due,
    # and not claimed since. One writer wins; the others change nothing.
    unclaimed = (AutoTopup.attempts == row.attempts, *_due(now))
    if row.attempts == 0:
        why = _unwanted(app, acct, row)
        if why:
            ended = _end(app, row, now, "skipped", why, unclaimed)
            # Re-armed: the next crossing below the threshold asks again.
            app.redis.hdel(app.keys.account(acct.id), "tp")
            return ended
    elif now - as_utc(row.created_at) >= GIVE_UP:
        log.error("auto top-up %s: no answer from the payment provider since %s; given up "
                  "(if the provider charged it, book it by hand)", row.key, row.created_at)
        return _end(app, row, now, "declined", "provider unreachable", unclaimed, notice=True)
    with app.books.session.begin() as db:
        claimed = db.execute(update(AutoTopup).where(AutoTopup.id == row.id, *unclaimed)
                             .values(attempts=row.attempts + 1,
                                     next_attempt_at=now + LEASE)).rowcount
    if not claimed:
        return 0
    outcome, detail = _send(client, url, row)
    if outcome == "succeeded":
        _book(app, row, detail, now)
    elif outcome == "declined":
        _end(app, row, now, "declined", detail, (AutoTopup.state == "pending",), notice=True)
    else:
        delay = min(BACKOFF_FIRST * 2 ** min(row.attempts, 10), BACKOFF_CAP)
        log.warning("auto top-up %s: %s; retry in %ds", row.key, detail, delay.total_seconds())
        with app.books.session.begin() as db:
            db.execute(update(AutoTopup).where(
                AutoTopup.id == row.id, AutoTopup.state == "pending",
                AutoTopup.attempts == row.attempts + 1)
                .values(last_error=detail, next_attempt_at=now + delay))
    return 1


def _unwanted(app: service.App, acct: Account, row: AutoTopup) -> str:
    """Why a top-up never sent is no longer wanted ("" when it is)."""
    if not state.topup_below(acct):
        return "auto top-up is off for the account"
    if acct.payment_method != row.payment_method:
        return "the payment method changed"
    live = state.account_state(app.redis, app.keys, acct.id)
    if live is None:
        return "the account is not in Redis"
    if acct.status == "blocked" or int(live.get("fb") or 0) > int(live.get("ub") or 0):
        return "the account is blocked"  # a hacked account is not refilled from the card
    if live["available"] >= acct.auto_topup_below:
        return f"available credit {format_display(live['available'])} is not below " \
               f"{format_display(acct.auto_topup_below)} any more"
    return ""


def _send(client: httpx.Client, url: str, row: AutoTopup) -> tuple[str, str]:
    """("succeeded", provider id), ("declined", reason) or ("retry", what went wrong)."""
    body = {"account": row.account, "amount": format_display(row.amount),
            "currency": row.currency, "payment_method": row.payment_method,
            "reference": row.key}
    try:
        reply = client.post(url, json=body, headers={"Idempotency-Key": row.key})
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:
        return "retry", _line(_redact(f"{type(exc).__name__}: {exc}", url))
    if reply.status_code != 200:
        return "retry", f"the payment provider answered HTTP {reply.status_code}"
    try:
        answer = reply.json()
        status = answer.get("status")
    except (ValueError, AttributeError):
        return "retry", "the payment provider's reply is not a JSON object"
    if status == "succeeded":
        return "succeeded", _line(str(answer.get("id") or ""), 180)
    if status == "declined":
        return "declined", _line(str(answer.get("reason") or "declined"))
    return "retry", _line(f"the payment provider answered status {status!r}")


def _book(app: service.App, row: AutoTopup, provider_id: str, now: datetime) -> None:
    with app.books.session.begin() as db:
        # Whatever the row says (given up meanwhile?): the provider took the money.
        if not _close(db, row, now, "succeeded", (AutoTopup.state != "succeeded",),
                      provider_id=provider_id or None):
            return  # another worker has just booked it
        booking = app.books.book(row.account, "topup", row.amount, f"autotopup:{row.key}",
                                 reference=f"auto top-up {provider_id}".strip(), db=db,
                                 actor=actors.AUTO_TOPUP)
        db.execute(update(AutoTopup).where(AutoTopup.id == row.id)
                   .values(entry=booking.entry_id))
        acct = db.get(Account, row.account, populate_existing=True)
        add_notice(db, f"{row.key}:succeeded", acct, "topup_succeeded", at=now,
                   amount=row.amount, balance=acct.balance, provider_id=provider_id)
    log.info("auto top-up %s: %s %s booked", row.key, row.currency, format_display(row.amount))
    applied = service.apply_now(app, row.account)
    if not applied.in_redis:
        log.warning("auto top-up %s is booked; Redis gets it later (%s)", row.key,
                    applied.error)


def _end(app: service.App, row: AutoTopup, now: datetime, outcome: str, why: str,
         where: tuple, notice: bool = False) -> int:
    with app.books.session.begin() as db:
        if not _close(db, row, now, outcome, where, last_error=why):
            return 0
        if notice:
            acct = db.get(Account, row.account)
            add_notice(db, f"{row.key}:failed", acct, "topup_failed", at=now,
                       amount=row.amount, balance=acct.balance, reason=why)
    log.info("auto top-up %s %s: %s", row.key, outcome, why)
    return 1


def _close(db: Session, row: AutoTopup, now: datetime, outcome: str, where: tuple,
           **values) -> bool:
    """Settle the row if it still is as `where` says, with a write first: it locks the row
    (the database on SQLite) for the rest of the transaction. False: it was not."""
    return db.execute(update(AutoTopup).where(AutoTopup.id == row.id, *where)
                      .values(state=outcome, done_at=now, **values)).rowcount == 1


def _redact(text: str, url: str) -> str:
    """The payment URL may carry credentials: it never goes into a log or a column."""
    try:
        parts = urlsplit(url)
        secrets = (url, parts.netloc, parts.password, parts.query)
    except ValueError:  # not even a URL: hide it all
        secrets = (url, url.partition("//")[2])
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _line(text: str, limit: int = 300) -> str:
    """One line of printable text: it goes into logs, notices and String(N) columns."""
    text = "".join(c for c in text if ord(c) >= 32 and ord(c) != 127 or c.isspace())
    return " ".join(text.split())[:limit]


def pending_count(app) -> int:
    """Auto top-ups requested and not charged yet (the metrics)."""
    with app.books.session() as db:
        return db.scalar(select(func.count()).select_from(AutoTopup)
                         .where(AutoTopup.state == "pending"))
