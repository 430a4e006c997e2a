"""`callguard worker`: books the shards' call commits and limit events into SQL,
applies the books' outbox to Redis, closes sessions of nodes that died, charges
auto top-ups and delivers notices. It never gives up: an outage of SQL or Redis is
waited out, a poisoned entry is set aside, a SIGKILL at any point is taken up again
by the next start under the same node identity."""

from __future__ import annotations

import logging
import signal
import threading
import time

import redis

from . import nodes, notify, service, topup
from .books.ledger import BooksError
from .engine import state
from .logs import Throttled
from .sync import Drain, Outage

log = logging.getLogger(__name__)
_warn_outboxes = Throttled(log, logging.ERROR, interval=300.0)

CLAIM_EVERY = 10.0  # look for entries a dead worker left, this often
SWEEP_EVERY = 5.0
OUTBOXES_EVERY = 1.0  # auto top-ups to charge, notices to deliver
OUTBOXES_FAILED = 30.0


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
    stop_outboxes = threading.Event()
    beside = threading.Thread(target=outboxes, args=(app, stop_outboxes), daemon=True,
                              name="outboxes")
    if not once:
        beside.start()
    try:
        while not stopping:
            try:
                busy = outage.attempt(lambda: step(app, drain, lease, last))
            except BooksError as exc:  # an outbox row Redis cannot take (account lost)
                log.error("%s", exc)
                busy = 0
            if busy is None:
                continue
            if once and not busy:
                try:
                    outage.attempt(lambda: charge_and_deliver(app), lambda _delay: None)
                except Exception as exc:  # noqa: BLE001 - one line; the details at -vv
                    log.error("top-ups and notices: %s", exc, exc_info=log.isEnabledFor(
                        logging.DEBUG))
                return
            if not busy:
                time.sleep(idle)
    finally:
        stop_outboxes.set()
        if beside.is_alive():
            beside.join(timeout=15)
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


def charge_and_deliver(app: service.App) -> int:
    return (topup.charge_due(app) if app.settings.payment_url else 0) + notify.deliver_due(app)


def outboxes(app: service.App, stopping: threading.Event) -> None:
    """Charge auto top-ups and deliver notices, beside the drain: a payment provider or a
    mail server that hangs for its timeout must not hold up the books (nor a fraud
    block's hang-up)."""
    outage = Outage()
    while not stopping.is_set():
        try:
            busy = outage.attempt(lambda: charge_and_deliver(app), stopping.wait)
        except Exception as exc:  # noqa: BLE001 - a bad notice or setting must not end it
            _warn_outboxes("top-ups and notices: %s; trying again every %d s", exc,
                           int(OUTBOXES_FAILED))
            log.debug("top-ups and notices", exc_info=True)
            stopping.wait(OUTBOXES_FAILED)
            continue
        if busy == 0:
            stopping.wait(OUTBOXES_EVERY)
