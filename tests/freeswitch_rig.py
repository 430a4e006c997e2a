"""The rig of the FreeSWITCH tests: a simulated FreeSWITCH running the shipped dialplan
and `serve freeswitch` adapters in this process, sharing one clock, on this test's
Redis and books."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from callguard.adapters.freeswitch import FreeSWITCHAdapter
from callguard.clock import Clock
from callguard.service import App
from callguard.simulator.freeswitch import SimulatedFreeSWITCH

from asterisk_rig import ACCT, PREMIUM, app_with, run, settle, until  # noqa: F401


@contextlib.asynccontextmanager
async def fs_rig(app: App, speed: float = 1.0, esl: bool = True, nodes=("node-a",),
                 clock=None, esl_timing=None, **settings):
    """A simulated FreeSWITCH and N `serve freeswitch` adapters sharing one clock."""
    clock = clock or Clock(speed)
    sim = SimulatedFreeSWITCH(outbound_port=0, clock=clock)
    await sim.start()
    adapters = []
    settings.setdefault("agi_budget_ms", 2000)  # a loaded CI box is slow, not down
    for node in nodes:
        s = dataclasses.replace(app.settings, esl_url=sim.esl_url if esl else None, node=node,
                                **settings)
        adapter = FreeSWITCHAdapter(app_with(app, s), clock)
        if esl_timing and adapter.esl:  # (keepalive, command timeout), wall seconds
            adapter.esl.keepalive, adapter.esl.timeout = esl_timing
        await adapter.start("127.0.0.1", 0)
        adapters.append(adapter)
    sim.outbound_port = adapters[0].port
    if esl:
        await asyncio.gather(*(asyncio.wait_for(a.esl.connected.wait(), 5) for a in adapters))
    try:
        yield sim, adapters
    finally:
        await settle(adapters, lambda: sim.calls)
        for adapter in adapters:
            await adapter.stop()
        await sim.stop()
    assert sim.violations == []
