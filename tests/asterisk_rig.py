"""The rig of the Asterisk tests: a simulated Asterisk and `serve asterisk` adapters
in this process, sharing one clock, on this test's Redis and books."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from callguard.adapters.asterisk import AsteriskAdapter
from callguard.clock import Clock
from callguard.service import App
from callguard.simulator.asterisk import SimulatedAsterisk

ACCT = "41441234567"
PREMIUM = "41901234567"  # CHF 3.00/min, 1/1 (engine_helpers.PREMIUM)


@contextlib.asynccontextmanager
async def rig(app: App, speed: float = 1.0, ami: bool = True, nodes=("node-a",), clock=None,
              timestamp_events: bool = False, ami_timing=None, ami_tls=None, **settings):
    """A simulated Asterisk and N `serve asterisk` adapters sharing one clock; AMI over
    TLS with the server context `ami_tls`."""
    clock = clock or Clock(speed)
    sim = SimulatedAsterisk(agi_port=0, clock=clock, timestamp_events=timestamp_events,
                            ami_tls=ami_tls)
    async with pbx_rig(app, sim, AsteriskAdapter, "ami_url" if ami else None, "agi_port",
                       nodes, clock, ami_timing, settings) as adapters:
        yield sim, adapters


@contextlib.asynccontextmanager
async def pbx_rig(app: App, sim, adapter_class, url_setting, port_attr, nodes, clock, timing,
                  settings):
    """`sim` started, N adapters of `adapter_class` on it (event link from the sim's
    `url_setting`, none if None), the sim's call setups pointed at the first one."""
    await sim.start()
    adapters = []
    settings.setdefault("agi_budget_ms", 2000)  # a loaded CI box is slow, not down
    for node in nodes:
        link = {url_setting: getattr(sim, url_setting)} if url_setting else {}
        s = dataclasses.replace(app.settings, node=node, **link, **settings)
        adapter = adapter_class(app_with(app, s), clock)
        if timing and adapter.link:  # (keepalive, command timeout), wall seconds
            adapter.link.keepalive, adapter.link.timeout = timing
        await adapter.start("127.0.0.1", 0)
        adapters.append(adapter)
    setattr(sim, port_attr, adapters[0].port)
    if url_setting:
        await asyncio.gather(*(asyncio.wait_for(a.link.connected.wait(), 5) for a in adapters))
    try:
        yield adapters
    finally:
        await settle(adapters, lambda: sim.calls)
        for adapter in adapters:
            await adapter.stop()
        await sim.stop()
    assert sim.violations == []


async def settle(adapters, live) -> None:
    """Let the last hangup events arrive and commit."""
    for waited in range(200):
        if not any(a.supervisor.sessions for a in adapters) or (not live() and waited > 20):
            return
        await asyncio.sleep(0.01)


def app_with(app: App, settings) -> App:
    """Another App on the same books and Redis, with other settings."""
    other = App(settings)
    other.__dict__.update({k: v for k, v in app.__dict__.items()
                           if k in ("books", "redis_url", "redis")})
    return other


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(predicate, what: str, timeout: float = 5.0, diagnose=lambda: "") -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what} {diagnose()}")
