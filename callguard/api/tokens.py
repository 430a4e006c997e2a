"""Bearer tokens of the HTTP API: made by the operator (`callguard api token create`), kept
as SHA-256 digests, revocable. A token is 256 random bits: a fast digest is enough (no
password to stretch), and a lookup by digest never compares secrets byte by byte."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select

from ..books.ledger import Books, BooksError, check_text
from ..books.models import SCOPES, ApiToken, utcnow

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


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(books: Books, name: str, scope: str, account: str | None = None
           ) -> tuple[ApiToken, str]:
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
        row = ApiToken(name=name, scope=scope, account=account, digest=digest(token))
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

    def __init__(self, books: Books, ttl: float = 2.0, size: int = 1024):
        self.books, self.ttl, self.size = books, ttl, size
        self._known: dict[str, tuple[float, Caller | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Caller | None | bool:
        """The answer without asking SQL: a Caller, None (refused), or False (ask)."""
        if not SHAPE.fullmatch(token):  # not one of ours: no digest, no lookup
            return None
        with self._lock:
            hit = self._known.get(digest(token))
        return hit[1] if hit and hit[0] > time.monotonic() else False

    def __call__(self, token: str) -> Caller | None:
        found = self.cached(token)
        if found is not False:
            return found
        key = digest(token)
        now = time.monotonic()
        with self.books.session() as db:
            row = db.scalar(select(ApiToken).where(ApiToken.digest == key))
        if row is None:
            return None
        caller = None if row.revoked_at else Caller(row.name, row.scope, row.account)
        with self._lock:
            if len(self._known) >= self.size:
                self._known.clear()
            self._known[key] = (now + self.ttl, caller)
        return caller
