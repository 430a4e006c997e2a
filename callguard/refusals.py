"""Expected failures, worded once for the operator: the CLI prints the line, the HTTP API
answers it as a problem's `detail`. Anything not here is a bug, with its traceback."""

from __future__ import annotations

import logging

import redis
import sqlalchemy.exc

from .books.ledger import BooksError
from .config import ConfigError
from .engine.connect import RedisUnavailable
from .engine.state import LayoutMismatch
from .money import AmountError
from .nodes import NodeClash
from .rating import NumberError

log = logging.getLogger("callguard")

REFUSED = (BooksError, AmountError, NumberError, ConfigError, NodeClash, LayoutMismatch,
           ValueError)

# A Redis Cluster that no node of answers (RedisClusterException) is no RedisError.
REDIS_DOWN = (redis.RedisError, redis.exceptions.RedisClusterException, RedisUnavailable)

EXPECTED = (*REFUSED, *REDIS_DOWN, sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.TimeoutError)


def explain(exc: BaseException) -> tuple[bool, str] | None:
    """(unavailable, line): `unavailable` when a service callguard needs is away (Redis,
    the SQL database) rather than the request being refused; None for a bug."""
    if isinstance(exc, REFUSED):
        return False, str(exc)
    if isinstance(exc, REDIS_DOWN):
        log.debug("redis failure", exc_info=exc)
        return True, f"Redis unavailable: {exc}"
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # no pooled connection came in time
        return True, "the SQL database is busy: no connection free (try again)"
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.ProgrammingError):
        log.debug("database failure", exc_info=exc)
        text = str(exc.orig).splitlines()[0] if str(exc.orig) else type(exc.orig).__name__
        # SQLite, PostgreSQL, MariaDB: a table the migrations have not made yet.
        if any(m in text for m in ("no such table", "does not exist", "doesn't exist")):
            return True, f"the books are not set up (run `callguard db upgrade`): {text}"
        if "permission denied" in text.lower() or "command denied" in text.lower():
            return True, f"the SQL database refused this user: {text}"
        if isinstance(exc, sqlalchemy.exc.ProgrammingError):
            return None  # a bug in callguard: the traceback is what its report needs
        return True, f"the SQL database is unavailable: {text}"
    return None
