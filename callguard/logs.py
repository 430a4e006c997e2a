"""Logging for things that can happen once per call: a flood must not bury the log."""

from __future__ import annotations

import logging
import time

# httpx logs each request's full URL at INFO (`callguard -v`), credentials and all: a
# payment or webhook URL may carry them. callguard's own lines say what it sent, without.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)


class Throttled:
    """Logs at most one line per `interval` seconds; the next line says how many it held
    back. Redis down at 1,000 setups/s is then one warning a second, not a thousand."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING,
                 interval: float = 1.0, clock=time.monotonic) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self.last = float("-inf")
        self.held = 0

    def __call__(self, msg: str, *args) -> None:
        now = self.clock()
        if now - self.last < self.interval:
            self.held += 1
            return
        if self.held:
            msg += f" (and {self.held} more like it since the last such line)"
        self.logger.log(self.level, msg, *args)
        self.last, self.held = now, 0
