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
from collections import Counter

import redis

from . import nodes, notify, sdnotify, service, topup
from .books.ledger import BooksError
from .engine import state
from .health import DEFAULT_BIND, Health, store_checks
from .logs import Throttled
from .metrics import Readings, cached, new_registry
from .sync import SQL_OUTAGES, Drain, Outage

log = logging.getLogger(__name__)
_warn_outboxes = Throttled(log, logging.ERROR, interval=300.0)

CLAIM_EVERY = 10.0  # look for entries a dead worker left, this often
SWEEP_EVERY = 5.0
OUTBOXES_EVERY = 1.0  # auto top-ups to charge, notices to deliver
OUTBOXES_FAILED = 30.0
SUMMARY_EVERY = 60.0  # what the worker did, at INFO


def run(app: service.App, node: str, once: bool = False, idle: float = 0.2) -> None:
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    drain = Drain(app, node)
    health = None if once else observe(app, drain)
    if health:  # from the start: /readyz tells what a start is waiting for
        health.start(app.settings.http_bind or DEFAULT_BIND["worker"])
    outage = Outage()
    lease = None
    watchdog = Watchdog()
    while lease is None and not stopping:
        watchdog()
        try:
            state.check_layout(app.redis, app.keys)
            state.ensure_groups(app.redis, app.keys)
            lease = nodes.NodeLease(app.engine, node)
            lease.acquire()
        except (redis.RedisError, OSError) as exc:
            lease = None
            time.sleep(outage.failed("Redis", exc))
        except SQL_OUTAGES as exc:  # the rate plans come from the books
            if once:
                raise  # a script's --once: one line now, not a wait for ever
            lease = None
            time.sleep(outage.failed("the books", exc))
    if lease is None:
        log.info("worker %s stopped (signal) before it could start", node)
        if health:
            health.stop()
        return
    url = app.books.engine.url  # named without user, password or query (it may hold one)
    log.info("worker %s started: booking calls into %s", node,
             f"{url.get_backend_name()}:{url.host or ''}/{url.database or ''}")
    if not once:
        app.serving()  # from now on the embedded Redis, if used, stays up for us
        sdnotify.ready(f"worker {node} booking")
    last = {"renew": time.monotonic(), "claim": 0.0, "sweep": 0.0,
            "summary": time.monotonic()}
    done: Counter[str] = Counter()  # since the last summary
    stop_outboxes = threading.Event()
    beside = threading.Thread(target=outboxes, args=(app, stop_outboxes), daemon=True,
                              name="outboxes")
    if not once:
        beside.start()
    try:
        while not stopping:
            watchdog()
            try:
                did = outage.attempt(lambda: step(app, drain, lease, last))
            except BooksError as exc:  # an outbox row Redis cannot take (account lost)
                log.error("%s", exc)
                did = Counter()
            if did is None:
                continue
            busy = sum(did.values())
            if busy:
                log.debug("pass: %s", describe(did))
                done.update(did)
            if time.monotonic() - last["summary"] >= SUMMARY_EVERY:
                log.info("last minute: %s", describe(done) or "nothing to do")
                done.clear()
                last["summary"] = time.monotonic()
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
        if stopping:
            sdnotify.stopping()
            log.info("worker %s stopping (signal): finishing the pass and the outboxes", node)
        stop_outboxes.set()
        if beside.is_alive():
            beside.join(timeout=15)
        try:
            lease.release()
        except (redis.RedisError, OSError):
            pass  # it expires by itself
        if health:
            health.stop()
        log.info("worker %s stopped; %s since the last summary", node,
                 describe(done) or "nothing booked")


class Watchdog:
    """WATCHDOG=1 from the main loop, at most every half of the unit's WatchdogSec=."""

    def __init__(self):
        self.every, self.last = sdnotify.watchdog_interval(), float("-inf")

    def __call__(self) -> None:
        if self.every and time.monotonic() - self.last >= self.every:
            sdnotify.watchdog()
            self.last = time.monotonic()


def step(app: service.App, drain: Drain, lease: nodes.NodeLease, last: dict) -> Counter:
    """One pass; what it did (empty: idle)."""
    now = time.monotonic()
    if now - last["renew"] > nodes.RENEW_EVERY:
        lease.renew()
        last["renew"] = now
    did = Counter({"changes applied to Redis": service.apply_outbox(app)})
    if now - last["claim"] > CLAIM_EVERY:
        did["entries taken over"] = drain.claim()
        last["claim"] = now
    before = drain.booked.copy()
    drain.run_once()
    did.update(drain.booked - before)
    if now - last["sweep"] > SWEEP_EVERY:
        did["stale sessions closed"] = len(service.sweep(app))
        last["sweep"] = now
    return +did  # without the zeros


def describe(did: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(did.items()) if n)


def observe(app: service.App, drain: Drain) -> Health:
    """The worker's /metrics and /readyz (ready: Redis and the books answer)."""
    registry = new_registry()
    r = Readings(registry)
    r.counter("callguard_calls_booked", "Finished calls booked into SQL by this worker",
              lambda: drain.booked["calls"])
    r.counter("callguard_limit_events_booked", "Limit crossings booked by this worker",
              lambda: drain.booked["limit events"])

    streams = cached(lambda: state.stream_backlog(app.redis, app.keys))
    notices = cached(lambda: notify.backlog(app))

    def backlog(column: int):
        return lambda: [((str(row[0]),), row[column]) for row in streams()]

    r.gauge("callguard_stream_lag_entries", "Event stream entries the worker has not read",
            backlog(1), ("shard",))
    r.gauge("callguard_stream_pending_entries",
            "Event stream entries read and not yet booked", backlog(2), ("shard",))
    r.gauge("callguard_dead_letters", "Stream entries set aside as unbookable (see "
            "`callguard reconcile`)",
            lambda: sum(row[3] for row in streams()))
    r.gauge("callguard_notices_pending", "Notices waiting to be delivered",
            lambda: notices()["pending"])
    r.gauge("callguard_notices_failed", "Notices given up in the last 24 hours",
            lambda: notices()["failed"])
    r.gauge("callguard_topups_pending", "Auto top-ups requested and not charged yet",
            lambda: topup.pending_count(app))

    return Health("worker", registry, store_checks(app))


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
