"""`callguard worker`: books the shards' call commits into SQL, applies the books'
outbox to Redis, and closes sessions of nodes that died. It never gives up: an
outage of SQL or Redis is waited out, a poisoned entry is set aside, a SIGKILL
at any point is taken up again by the next start under the same node identity."""

from __future__ import annotations

import logging
import signal
import time

import redis

from . import nodes, service
from .books.ledger import BooksError
from .engine import state
from .sync import SQL_OUTAGES, Drain, Outage

log = logging.getLogger(__name__)

CLAIM_EVERY = 10.0  # look for entries a dead worker left, this often
SWEEP_EVERY = 5.0


def run(app: service.App, node: str, once: bool = False, idle: float = 0.2) -> None:
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    outage = Outage()
    lease = None
    while lease is None and not stopping:
        try:
            state.check_layout(app.redis, app.keys)
            state.ensure_groups(app.redis, app.keys)
            lease = nodes.NodeLease(app.engine, node)
            lease.acquire()
        except (redis.RedisError, OSError) as exc:
            lease = None
            time.sleep(outage.failed("Redis", exc))
    if lease is None:
        return
    log.info("worker %s started", node)
    drain = Drain(app, node)
    last = {"renew": time.monotonic(), "claim": 0.0, "sweep": 0.0}
    try:
        while not stopping:
            try:
                busy = step(app, drain, lease, last)
                outage.ok()
            except (redis.RedisError, OSError) as exc:
                time.sleep(outage.failed("Redis", exc))
                continue
            except SQL_OUTAGES as exc:
                time.sleep(outage.failed("the SQL database", exc))
                continue
            except BooksError as exc:  # an outbox row Redis cannot take (account lost)
                log.error("%s", exc)
                busy = 0
            if once and not busy:
                return
            if not busy:
                time.sleep(idle)
    finally:
        try:
            lease.release()
        except (redis.RedisError, OSError):
            pass  # it expires by itself
        log.info("worker %s stopped", node)


def step(app: service.App, drain: Drain, lease: nodes.NodeLease, last: dict) -> int:
    """One pass; returns how much work it found (0: idle)."""
    now = time.monotonic()
    if now - last["renew"] > nodes.RENEW_EVERY:
        lease.renew()
        last["renew"] = now
    busy = service.apply_outbox(app)
    if now - last["claim"] > CLAIM_EVERY:
        drain.claim()
        last["claim"] = now
    busy += drain.run_once()
    if now - last["sweep"] > SWEEP_EVERY:
        busy += len(service.sweep(app))
        last["sweep"] = now
    return busy
