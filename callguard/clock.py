"""Time for the adapters: local timers, and the time the Redis scripts use.

In production the scripts read Redis's own TIME (one clock for all nodes), so
`redis_now()` is None. A demo or benchmark may run the PBX faster than wall
time; then both sides share this scaled clock and pass it to the scripts.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    def __init__(self, speed: float = 1.0, start_ms: int | None = None):
        self.speed = speed
        self._t0 = time.monotonic()
        self._start_ms = start_ms if start_ms is not None else int(time.time() * 1000)

    @property
    def simulated(self) -> bool:
        return self.speed != 1.0

    def monotonic(self) -> float:
        """Seconds of PBX time, for local timers."""
        return (time.monotonic() - self._t0) * self.speed

    def epoch_ms(self, pbx_seconds: float) -> int:
        """Wall-clock (epoch) milliseconds of a moment of PBX time."""
        return self._start_ms + int(pbx_seconds * 1000)

    def redis_now(self) -> int | None:
        if not self.simulated:
            return None
        return self._start_ms + int(self.monotonic() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)

    def real(self, seconds: float) -> float:
        """Wall seconds for `seconds` of PBX time."""
        return seconds / self.speed
