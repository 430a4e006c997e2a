"""`callguard worker`: drains every account's event stream into the SQL books
and closes sessions whose PBX went silent."""

from __future__ import annotations

import logging
import os
import signal
import time

import redis

from . import service

log = logging.getLogger(__name__)


def run(app: service.App, once: bool = False, idle: float = 0.2, sweep_every: float = 5.0) -> None:
    consumer = f"{app.settings.node}-{os.getpid()}"
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # What this node's earlier workers took but never acknowledged (a crash between
    # the SQL commit and the XACK) is booked again; the books recognise it.
    service.claim_abandoned(app, consumer)
    service.drain(app, consumer, pending=True)
    last_sweep = 0.0
    while not stopping:
        try:
            booked = service.drain(app, consumer)
            if time.monotonic() - last_sweep > sweep_every:
                service.sweep(app)
                last_sweep = time.monotonic()
        except (redis.RedisError, OSError) as exc:
            log.warning("worker: %s; retrying", exc)
            booked = 0
            time.sleep(1)
        if once and not booked:
            return
        if not booked:
            time.sleep(idle)
