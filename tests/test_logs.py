"""Per-call warnings are throttled: a flood is one line a second that counts the rest."""

from __future__ import annotations

import logging

from callguard.logs import Throttled


def test_throttled_logs_once_per_interval_and_counts_what_it_held(caplog):
    now = [100.0]
    warn = Throttled(logging.getLogger("t"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(1000):  # a thousand failed setups within the same second
            warn("authorize %s failed", "A")
        now[0] += 1.0
        warn("authorize %s failed", "B")
        now[0] += 5.0
        warn("authorize %s failed", "C")
    assert [r.getMessage() for r in caplog.records] == [
        "authorize A failed",
        "authorize B failed (and 999 more like it since the last such line)",
        "authorize C failed",
    ]
