"""Bearer tokens of the HTTP API: made by the operator (`callguard api token create`), kept
as digests, revocable. A token is 256 random bits: a fast digest is enough (no password to
stretch), and a lookup by digest never compares secrets byte by byte.

The digest is SHA-256, or HMAC-SHA256 keyed with the pepper (CALLGUARD_API_TOKEN_PEPPER)
when one is set: then whoever can write to the books' api_tokens table (a leaked database
password) still cannot make a token of their own, and a copy of the table is no use
without the pepper. With a pepper only peppered digests verify: a token made without it,
or with another pepper, is refused and must be made again (accepting the plain digest too
would give that writer their way in back)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select

from ..books.ledger import Books, BooksError, check_text
from ..books.models import SCOPES, ApiToken, utcnow

log = logging.getLogger(__name__)

PREFIX = "cg_"  # says what it is to a secret scanner, and in a config file
SHAPE = re.compile(r"cg_[A-Za-z0-9_-]{43}")  # PREFIX and 32 random bytes, base64url


@dataclass(frozen=True)
class Caller:
    """Who is asking: a token's name (what the logs say), scope and account (None: all)."""

    name: str
    scope: str
    account: str | None = None

    def may(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    def sees(self, account: str) -> bool:
        return self.account is None or self.account == account


def digest(token: str, pepper: str | None = None) -> str:
    """What the books keep of a token: the one function `token create` and the API's
    verifier both use."""
    if pepper is None:
        return hashlib.sha256(token.encode()).hexdigest()
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def create(books: Books, name: str, scope: str, account: str | None = None,
           pepper: str | None = None) -> tuple[ApiToken, str]:
    """A new token; the token itself is returned once and never kept."""
    if scope not in SCOPES:
        raise BooksError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if not name or not name.isprintable() or " " in name:
        raise BooksError(f"token name {name!r}: printable, no spaces")
    check_text(ApiToken.name, name, "token name")
    if account is not None:
        if scope == "money":
            raise BooksError("a token bound to an account cannot move money: top-ups and "
                             "payments are booked with an operator's token (billing), or by "
                             "auto top-up")
        books.get_account(account)
    token = PREFIX + secrets.token_urlsafe(32)
    with books.session.begin() as db:
        if db.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
            raise BooksError(f"a token named {name} exists already (revoke it first)")
        row = ApiToken(name=name, scope=scope, account=account, digest=digest(token, pepper))
        db.add(row)
    return row, token


def revoke(books: Books, name: str) -> ApiToken:
    with books.session.begin() as db:
        row = db.scalar(select(ApiToken).where(ApiToken.name == name))
        if row is None:
            raise BooksError(f"no token named {name}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    return row


def listed(books: Books) -> list[ApiToken]:
    with books.session() as db:
        return list(db.scalars(select(ApiToken).order_by(ApiToken.name)))


class Verifier:
    """Token to Caller, from the books, each answer kept `ttl` seconds: a revocation takes
    effect within that, and a busy API does not ask SQL on every request. Unknown tokens
    are not kept (a flood of made-up ones must not grow the cache)."""

    def __init__(self, books: Books, ttl: float = 2.0, size: int = 1024,
                 pepper: str | None = None):
        self.books, self.ttl, self.size, self.pepper = books, ttl, size, pepper
        self._known: dict[str, tuple[float, Caller | None]] = {}
        self._lock = threading.Lock()
        self._unpeppered: set[str] = set()  # tokens already warned about

    def cached(self, token: str) -> Caller | None | bool:
        """The answer without asking SQL: a Caller, None (refused), or False (ask)."""
        if not SHAPE.fullmatch(token):  # not one of ours: no digest, no lookup
            return None
        with self._lock:
            hit = self._known.get(digest(token, self.pepper))
        return hit[1] if hit and hit[0] > time.monotonic() else False

    def __call__(self, token: str) -> Caller | None:
        found = self.cached(token)
        if found is not False:
            return found
        key = digest(token, self.pepper)
        # With a pepper, the same query also finds a token made before it (refused).
        keys = [key] if self.pepper is None else [key, digest(token)]
        now = time.monotonic()
        with self.books.session() as db:
            row = db.scalar(select(ApiToken).where(ApiToken.digest.in_(keys)))
        if row is None:
            return None
        if row.digest != key:
            if row.name not in self._unpeppered:
                self._unpeppered.add(row.name)
                log.warning("API token %s was made without the API token pepper: refused; "
                            "revoke it and make it again", row.name)
            return None
        caller = None if row.revoked_at else Caller(row.name, row.scope, row.account)
        with self._lock:
            if len(self._known) >= self.size:
                self._known.clear()
            self._known[key] = (now + self.ttl, caller)
        return caller
