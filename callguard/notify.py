"""Delivering the notices outbox (written by `callguard.books.notices`): an email over SMTP
to the account's address and a signed webhook, by `callguard worker` calling `deliver_due`
every pass.

A notice goes out on each channel that is configured for it: email when
CALLGUARD_SMTP_URL is set and the account has an address, the webhook when
CALLGUARD_WEBHOOK_URL is set. With neither it is *kept*: never attempted, never failed,
and delivered as soon as a channel is configured.

Delivery is at least once, with one stable id: the notice key is the webhook's `id` and
the mail's Message-ID, on every attempt. A pass's notices are claimed before they are sent,
in one transaction (a conditional UPDATE per notice that also sets `next_attempt_at` a
lease ahead, so two workers never both take one, and one killed after claiming leaves
them to be retried when the lease ends); a channel that took the notice is marked before
the next channel is tried, the last one with the notice's own final write, so a retry
never repeats a channel that has it. What remains: a worker killed after the receiver
took the notice and before the mark was written sends it again after the lease (and a
kept SMTP connection that drops after the DATA is sent is opened again and the mail sent
once more), with the same id and Message-ID, which is how receivers tell it is the same
notice.

Failures: the notice keeps its `last_error` (one line, no secret in it) and is retried
after 30 s, doubling to at most an hour; after MAX_ATTEMPTS attempts (about 13 hours of
trying) it is given up (`failed_at`). It fails at once when a receiver refuses this very
notice: an SMTP 5xx to its recipient or its data, a webhook 4xx other than 408 and 429.
Trouble with our own setup (connection, TLS, login, sender, no webhook secret) is
retried, so fixing the setup delivers the backlog. When one channel fails for good, the
notice is failed; its other channels still had their try. A failure that may pass ends
the pass, so a receiver that is down costs one timeout a pass, not one a notice.

One SMTP session and one HTTP client serve a whole pass (bench/notify_rate.py measures it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import smtplib
import socket
import ssl
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from sqlalchemy import func, or_, select, update

from .books.models import Account, Notification, as_utc, utcnow
from .config import Settings
from .money import AmountError, format_display, parse_amount

LEASE = timedelta(minutes=5)  # a claimed notice is its worker's for this long
FIRST_RETRY = 30.0  # seconds; doubling on every failed attempt ...
MAX_RETRY = 3600.0  # ... up to this
MAX_ATTEMPTS = 20  # then it is given up: 30 s .. 32 min, then hourly: about 13 h in all
_HOSTNAME = socket.gethostname() or "localhost"  # EHLO and From; getfqdn() can wait on DNS


class DeliveryError(Exception):
    """A channel did not take the notice; `permanent`: it never will."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt."""
    return timedelta(seconds=min(FIRST_RETRY * 2 ** (attempts - 1), MAX_RETRY))


def message_id(key: str) -> str:
    """The mail's Message-ID for a notice: the key with every character but letters,
    digits, `-` and `_` written as =XX (UTF-8 bytes), so distinct keys stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9_-]", lambda m: "".join(
        f"={b:02X}" for b in m.group().encode()), key)
    if len(safe) > 200:  # keep the header line short; no encoded key has a "."
        safe = "sha256." + hashlib.sha256(key.encode()).hexdigest()
    return f"<{safe}@callguard>"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Callguard-Signature value: HMAC-SHA256 of "<timestamp>.<body>"."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def channels(settings: Settings, email: str | None) -> list[str]:
    """The channels a notice to an account with this address goes out on."""
    return ((["mail"] if settings.smtp_url and email else [])
            + (["webhook"] if settings.webhook_url else []))


# -- the worker's pass --------------------------------------------------------------------

def deliver_due(app, now: datetime | None = None, limit: int = 100,
                timeout: float = 10.0) -> int:
    """Deliver up to `limit` notices that are due, oldest first; returns how many were
    fully delivered. A failure that may pass ends the pass (the rest wait for the next
    one); one for good does not. `now` (tests) fixes the clock for the pass; `timeout`
    bounds every network step. SQL errors propagate (the notice stays due, or claimed
    until its lease ends)."""
    settings = app.settings
    if not (settings.smtp_url or settings.webhook_url):
        return 0
    start = as_utc(now or utcnow())
    due = (select(Notification.id).join(Account, Account.id == Notification.account)
           .where(Notification.sent_at.is_(None), Notification.failed_at.is_(None),
                  or_(Notification.next_attempt_at.is_(None),
                      Notification.next_attempt_at <= start))
           .order_by(Notification.created_at, Notification.id).limit(limit))
    if not settings.webhook_url:  # mail only: the accounts without an address keep theirs
        due = due.where(Account.email.is_not(None), Account.email != "")
    with app.books.session() as db:
        ids = list(db.scalars(due))
    claimed = _claim(app, ids, start)
    delivered = 0
    with Couriers(settings, timeout) as couriers:
        for n, (notice, email) in enumerate(claimed):
            at = start if now is not None else as_utc(utcnow())
            if at - start > LEASE / 2:  # a slow server: let the rest go well before their
                _release(app, [rest.id for rest, _ in claimed[n:]], start)  # lease ends
                break
            outcome = _deliver(app, couriers, notice, email, at)
            delivered += outcome == "sent"
            if outcome == "retry":  # the rest wait for the next pass, due again at once
                _release(app, [rest.id for rest, _ in claimed[n + 1:]], start)
                break
    return delivered


def _claim(app, ids: list[int], now: datetime) -> list[tuple[Notification, str | None]]:
    """Claim the pass's notices in one transaction (one commit, however many), each only
    if it is still due: another worker may have just claimed or delivered it."""
    mine = []
    with app.books.session.begin() as db:
        for row_id in ids:
            taken = db.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.sent_at.is_(None),
                       Notification.failed_at.is_(None),
                       or_(Notification.next_attempt_at.is_(None),
                           Notification.next_attempt_at <= now))
                .values(attempts=Notification.attempts + 1, next_attempt_at=now + LEASE)
                .execution_options(synchronize_session=False)).rowcount
            if taken:
                mine.append(row_id)
        if not mine:
            return []
        return [tuple(row) for row in db.execute(
            select(Notification, Account.email)
            .join(Account, Account.id == Notification.account)
            .where(Notification.id.in_(mine)).order_by(Notification.created_at,
                                                        Notification.id))]


def _release(app, ids: list[int], at: datetime) -> None:
    if ids:
        with app.books.session.begin() as db:
            db.execute(update(Notification).where(Notification.id.in_(ids))
                       .values(attempts=Notification.attempts - 1, next_attempt_at=at)
                       .execution_options(synchronize_session=False))


def _deliver(app, couriers: Couriers, notice: Notification, email: str | None,
             now: datetime) -> str:
    """Send on the channels that do not have it yet: "sent", "failed", "retry" or
    "kept"."""
    wanted = channels(app.settings, email)
    if not wanted:  # its address went since the pass began: kept again
        _set(app, notice.id, next_attempt_at=None)
        return "kept"
    done = {"mail": notice.mail_sent_at, "webhook": notice.webhook_sent_at}
    todo = [c for c in wanted if done[c] is None]
    errors, permanent, taken = [], False, {}
    for n, channel in enumerate(todo):
        try:
            if channel == "mail":
                couriers.mail(notice, email)
            else:
                couriers.webhook(notice)
        except DeliveryError as exc:
            errors.append(f"{channel}: {exc}")
            permanent |= exc.permanent
            continue
        if n < len(todo) - 1:  # marked before the next channel's wait, however long
            _set(app, notice.id, **{f"{channel}_sent_at": now})
        else:  # the last one goes with the notice's own write below
            taken[f"{channel}_sent_at"] = now
    if not errors:
        _set(app, notice.id, **taken, sent_at=now, next_attempt_at=None)
        return "sent"
    error = couriers.scrub("; ".join(errors))
    if permanent or notice.attempts >= MAX_ATTEMPTS:
        _set(app, notice.id, **taken, last_error=error, failed_at=now, next_attempt_at=None)
        return "failed"
    _set(app, notice.id, **taken, last_error=error,
         next_attempt_at=now + backoff(notice.attempts))
    return "retry"


def _set(app, row_id: int, **values) -> None:
    with app.books.session.begin() as db:
        db.execute(update(Notification).where(Notification.id == row_id).values(**values)
                   .execution_options(synchronize_session=False))


# -- the channels ------------------------------------------------------------------------

@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    security: str  # "plain", "starttls" or "tls" (implicit, smtps://)
    user: str | None
    password: str | None
    verify: bool
    timeout: float | None


def parse_smtp_url(url: str) -> SmtpTarget:
    """`smtp://user:pass@host:587?starttls=1`, `smtps://user:pass@host:465`,
    `smtp://host:25`; `?verify=0` skips certificate checks (labs), `?timeout=S`."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("CALLGUARD_SMTP_URL must look like smtp://host:25, "
                         "smtp://user:pass@host:587?starttls=1 or smtps://user:pass@host:465")
    security = "tls" if parts.scheme == "smtps" else (
        "starttls" if query.get("starttls", "0") not in ("0", "", "false", "no") else "plain")
    user = unquote(parts.username) if parts.username else None
    if user and security == "plain":
        raise ValueError("CALLGUARD_SMTP_URL: credentials need TLS "
                         "(smtps:// or ?starttls=1)")
    try:
        port = parts.port or {"tls": 465, "starttls": 587, "plain": 25}[security]
        timeout = float(query["timeout"]) if "timeout" in query else None
    except ValueError:
        raise ValueError("CALLGUARD_SMTP_URL: bad port or timeout") from None
    return SmtpTarget(parts.hostname, port, security, user,
                      unquote(parts.password) if parts.password else None,
                      query.get("verify", "1") not in ("0", "false", "no"), timeout)


class Couriers:
    """One pass's senders: they open their connections on first use and close them at the
    end, so a pass sends all its mail over one SMTP session and its webhooks over one
    HTTP connection."""

    def __init__(self, settings: Settings, timeout: float):
        self.settings = settings
        self.timeout = timeout
        self.sender = settings.mail_from or f"callguard@{_HOSTNAME}"
        self._smtp: smtplib.SMTP | None = None
        self._http: httpx.Client | None = None
        self._secrets = [settings.webhook_secret, settings.webhook_url, settings.smtp_url]
        for url in (settings.smtp_url, settings.webhook_url):
            password = urlsplit(url).password if url else None
            self._secrets += [password, unquote(password)] if password else []

    def __enter__(self) -> Couriers:
        return self

    def __exit__(self, *_) -> None:
        self._drop_smtp(quit=True)
        if self._http is not None:
            self._http.close()

    def scrub(self, text: str) -> str:
        """One line, at most 500 characters, with no secret or URL of ours in it."""
        for secret in sorted(filter(None, self._secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return " ".join(text.split())[:500]

    # -- email

    def mail(self, notice: Notification, to: str) -> None:
        message = compose(notice, self.sender, to)
        try:
            target = parse_smtp_url(self.settings.smtp_url)
        except ValueError as exc:
            raise DeliveryError(str(exc)) from None
        while True:
            reused = self._smtp is not None
            try:
                self._connection(target).send_message(message, self.sender, [to])
                return
            except smtplib.SMTPServerDisconnected as exc:
                self._drop_smtp()
                if not reused:  # else a kept connection the server closed: once more, anew
                    raise DeliveryError(f"SMTP server disconnected: {exc}") from None
            except smtplib.SMTPRecipientsRefused as exc:
                self._drop_smtp()
                codes = list(exc.recipients.values())
                raise DeliveryError(f"recipient refused: {_reply(*codes[0])}",
                                    permanent=all(code >= 500 for code, _ in codes)) from None
            except smtplib.SMTPDataError as exc:
                self._drop_smtp()
                raise DeliveryError(f"message refused: {_reply(exc.smtp_code, exc.smtp_error)}",
                                    permanent=exc.smtp_code >= 500) from None
            except smtplib.SMTPResponseException as exc:  # login, sender, TLS: our setup
                self._drop_smtp()
                raise DeliveryError(_reply(exc.smtp_code, exc.smtp_error)) from None
            except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
                self._drop_smtp()
                raise DeliveryError(f"SMTP: {_describe(exc)}") from None

    def _connection(self, t: SmtpTarget) -> smtplib.SMTP:
        if self._smtp is not None:
            return self._smtp
        context = ssl.create_default_context()
        if not t.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        timeout = t.timeout or self.timeout
        if t.security == "tls":
            conn = smtplib.SMTP_SSL(t.host, t.port, local_hostname=_HOSTNAME, timeout=timeout,
                                    context=context)
        else:
            conn = smtplib.SMTP(t.host, t.port, local_hostname=_HOSTNAME, timeout=timeout)
        try:
            if t.security == "starttls":
                conn.starttls(context=context)
            if t.user:
                conn.login(t.user, t.password or "")
        except BaseException:
            conn.close()
            raise
        self._smtp = conn
        return conn

    def _drop_smtp(self, quit: bool = False) -> None:
        conn, self._smtp = self._smtp, None
        if conn is None:
            return
        try:
            if quit:
                conn.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            conn.close()

    # -- webhook

    def webhook(self, notice: Notification) -> None:
        secret = self.settings.webhook_secret
        if not secret:
            raise DeliveryError("CALLGUARD_WEBHOOK_SECRET is not set")
        if self._http is None:
            self._http = httpx.Client(timeout=self.timeout, follow_redirects=False)
        body = notice.payload.encode()
        timestamp = str(int(time.time()))
        try:
            reply = self._http.post(self.settings.webhook_url, content=body, headers={
                "Content-Type": "application/json", "X-Callguard-Timestamp": timestamp,
                "X-Callguard-Signature": sign(secret, timestamp, body)})
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryError(_describe(exc)) from None
        except (httpx.InvalidURL, ValueError, UnicodeError):  # the setting, not the notice
            raise DeliveryError("CALLGUARD_WEBHOOK_URL is not a usable URL") from None
        if not 200 <= reply.status_code < 300:
            code = reply.status_code
            raise DeliveryError(f"HTTP {code} {reply.reason_phrase}".strip(),
                                permanent=400 <= code < 500 and code not in (408, 429))


def _reply(code: int, text: bytes | str) -> str:
    return f"{code} {text.decode(errors='replace') if isinstance(text, bytes) else text}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- the words ---------------------------------------------------------------------------

# Per type: subjects, then paragraphs; each a list of alternatives, the first whose facts
# the notice has is taken ({account} and {zero} it always has). Facts: money as "CHF 9.50";
# `level` the warning level, `limit` a postpaid account's credit limit.
TEMPLATES: dict[str, list[list[str]]] = {
    "low_balance": [
        ["Low balance on account {account}: {available} left", "Low balance on account "
         "{account}"],
        ["Your account {account} has {available} of credit left, below your warning level "
         "of {level}.", "The balance of your account {account} is {balance}.",
         "The balance of your account {account} is low."],
        ["Please top up soon: when the credit reaches {zero}, calls are refused until the "
         "account is topped up."]],
    "exhausted": [
        ["Account {account} is out of credit"],
        ["The credit of your account {account} has run out ({available} left).",
         "The credit of your account {account} has run out."],
        ["Calls are refused until the account is topped up. Please top up: calls work again "
         "as soon as the top-up is booked."]],
    "credit_warning": [
        ["Account {account} is nearing its credit limit"],
        ["Your account {account} has {outstanding} outstanding, past your warning level "
         "of {level}; its credit limit is {limit}.",
         "Your account {account} has {outstanding} outstanding; its credit limit is {limit}.",
         "Your account {account} is nearing its credit limit."],
        ["Please check that all open and overdue invoices are paid: calls are refused once "
         "the credit limit is reached. If your calls regularly need more, ask us to review "
         "the limit."]],
    "credit_limit": [
        ["Account {account} has reached its credit limit"],
        ["Your account {account} has {outstanding} outstanding and has reached its credit "
         "limit of {limit}.", "Your account {account} has reached its credit limit."],
        ["Calls are refused until the open invoices are paid. Please pay all open and "
         "overdue invoices; calls work again as soon as the payment is booked."]],
    "unblocked": [
        ["Account {account} can make calls again"],
        ["Your account {account} can make calls again."],
        ["Nothing more is needed from you."]],
    "topup_succeeded": [
        ["Top-up of {amount} on account {account}", "Top-up on account {account}"],
        ["{amount} was charged to the payment method on file and added to your account "
         "{account}; the balance is now {balance}.",
         "{amount} was charged to the payment method on file and added to your account "
         "{account}.", "Your account {account} was topped up."],
        ["Nothing more is needed from you."]],
    "topup_failed": [
        ["Automatic top-up failed on account {account}"],
        ["We could not charge {amount} to the payment method on file for your account "
         "{account}: {reason}.", "We could not charge {amount} to the payment method on "
         "file for your account {account}.", "The automatic top-up of your account "
         "{account} failed: {reason}.", "The automatic top-up of your account {account} "
         "failed."],
        ["Please check your payment method, or top up by hand, so that calls are not "
         "refused when the credit runs out."]],
    "fraud_suspected": [
        ["Unusual calling on account {account}"],
        ["We noticed unusual calling on your account {account}: {reason}.",
         "We noticed unusual calling on your account {account}."],
        ["This can mean that your telephone system or one of its extensions has been broken "
         "into. Please check the system and its passwords at once, and contact support "
         "straight away if you did not make these calls."]],
    "blocked": [
        ["Account {account} is blocked"],
        ["Your account {account} has been blocked: {reason}.",
         "Your account {account} has been blocked."],
        ["Calls are refused until it is unblocked. Please contact support to have it "
         "unblocked."]],
}
OTHER = [["Notice for account {account}"], ["There is news about your account {account}."]]
STANDING = [("Account", "account_kind"), ("Balance", "balance"), ("Outstanding", "outstanding"),
            ("Credit limit", "limit"), ("Warning level", "level"), ("Available", "available"),
            ("Amount", "amount"), ("Time", "time"), ("Notice id", "id")]


def render(payload: dict) -> tuple[str, str]:
    """The subject and plain-text body of a notice, from its payload: what happened, how
    the account stands, what to do next."""
    facts = _facts(payload)
    subject, *paragraphs = (_first(alternatives, facts)
                            for alternatives in TEMPLATES.get(payload.get("type"), OTHER))
    paragraphs = [textwrap.fill(text, 72, break_on_hyphens=False) for text in paragraphs]
    standing = "\n".join(f"{label + ':':<15}{facts[name]}" for label, name in STANDING
                         if name in facts)
    return subject, "\n\n".join([*paragraphs, standing,
                                 "This message was sent automatically by callguard."]) + "\n"


def _facts(payload: dict) -> dict:
    currency = payload.get("currency") or ""
    account = str(payload.get("account", "?"))
    facts = {"account": account, "zero": f"{currency} 0.00".strip(),
             "account_kind": f"{account} ({payload['kind']})" if payload.get("kind") else account}
    money = {name: payload.get(name) for name in ("balance", "outstanding", "available",
                                                   "amount")}
    if payload.get("kind") == "postpaid":  # its `limit` is the credit limit
        money |= {"limit": payload.get("limit"), "level": payload.get("warn_at")}
    else:  # a prepaid account's `limit` is its warning level
        money["level"] = payload.get("limit", payload.get("warn_below"))
    for name, value in money.items():
        if value is None or value == "":
            continue
        try:
            value = format_display(parse_amount(str(value), allow_negative=True))
        except AmountError:
            pass
        facts[name] = f"{currency} {value}".strip()
    for name in ("reason", "id"):
        if payload.get(name):
            facts[name] = str(payload[name])
    try:
        facts["time"] = as_utc(datetime.fromisoformat(payload["at"].replace("Z", "+00:00"))
                             ).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (KeyError, AttributeError, ValueError):
        pass
    return facts


def _first(alternatives: list[str], facts: dict) -> str:
    for text in alternatives:
        try:
            return text.format_map(facts)
        except KeyError:
            continue
    return ""


def compose(notice: Notification, sender: str, to: str) -> EmailMessage:
    payload = json.loads(notice.payload)
    subject, body = render(payload)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(as_utc(notice.created_at))
    message["Message-ID"] = message_id(notice.key)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    message["X-Callguard-Notice-Type"] = notice.type
    message.set_content(body)
    return message


# -- the operator's view -----------------------------------------------------------------

FAILED_WINDOW = timedelta(hours=24)


def backlog(app) -> dict[str, int]:
    """Notices waiting for delivery (none while no channel is configured: they are kept)
    and notices given up in the last FAILED_WINDOW, for the metrics: an alert on the given
    up ends by itself, rather than for ever after one refused mailbox."""
    settings = app.settings
    waiting = (select(func.count()).select_from(Notification)
               .join(Account, Account.id == Notification.account)
               .where(Notification.sent_at.is_(None), Notification.failed_at.is_(None)))
    if not settings.webhook_url:  # as deliver_due: mail only skips accounts without one
        waiting = waiting.where(Account.email.is_not(None), Account.email != "")
    with app.books.session() as db:
        failed = db.scalar(select(func.count()).select_from(Notification).where(
            Notification.failed_at >= as_utc(utcnow()) - FAILED_WINDOW))
        pending = db.scalar(waiting) if settings.smtp_url or settings.webhook_url else 0
    return {"pending": pending, "failed": failed}


def notice_rows(app, account: str | None = None, limit: int = 100,
                before: int | None = None) -> list[dict]:
    """The newest notices (one account's, or all; those before `seq` `before` to page on),
    with their delivery state: `sent`,
    `failed` (given up), `kept` (no channel configured for it), `retrying` (attempted,
    due again at `next_attempt_at`) or `pending` (not attempted yet)."""
    if account is not None:
        app.books.get_account(account)  # BooksError for an unknown account
    query = (select(Notification, Account.email)
             .join(Account, Account.id == Notification.account)
             .order_by(Notification.id.desc()).limit(limit))
    if account is not None:
        query = query.where(Notification.account == account)
    if before is not None:
        query = query.where(Notification.id < before)
    with app.books.session() as db:
        rows = db.execute(query).all()
    return [_row(app.settings, n, email) for n, email in rows]


def _row(settings: Settings, n: Notification, email: str | None) -> dict:
    if n.sent_at:
        state = "sent"
    elif n.failed_at:
        state = "failed"
    elif not channels(settings, email):
        state = "kept"
    else:
        state = "retrying" if n.attempts else "pending"
    return {"id": n.key, "seq": n.id, "account": n.account, "type": n.type,
            "at": _iso(n.created_at),
            "state": state, "attempts": n.attempts, "next_attempt_at": _iso(n.next_attempt_at),
            "last_error": n.last_error, "mail_sent_at": _iso(n.mail_sent_at),
            "webhook_sent_at": _iso(n.webhook_sent_at), "sent_at": _iso(n.sent_at),
            "failed_at": _iso(n.failed_at)}




def _iso(at: datetime | None) -> str | None:
    return as_utc(at).isoformat().replace("+00:00", "Z") if at else None


__all__ = ["DeliveryError", "LEASE", "MAX_ATTEMPTS", "backoff", "channels",
           "compose", "deliver_due", "message_id", "notice_rows", "parse_smtp_url", "render",
           "sign"]
