"""The rig of the FreeSWITCH tests: a simulated FreeSWITCH running the shipped dialplan
and `serve freeswitch` adapters in this process, sharing one clock, on this test's
Redis and books."""

from __future__ import annotations

import contextlib

from callguard.adapters.freeswitch import FreeSWITCHAdapter
from callguard.clock import Clock
from callguard.service import App
from callguard.simulator.freeswitch import SimulatedFreeSWITCH

from asterisk_rig import ACCT, PREMIUM, app_with, pbx_rig, run, until  # noqa: F401


@contextlib.asynccontextmanager
async def fs_rig(app: App, speed: float = 1.0, esl: bool = True, nodes=("node-a",),
                 clock=None, esl_timing=None, **settings):
    """A simulated FreeSWITCH and N `serve freeswitch` adapters sharing one clock."""
    clock = clock or Clock(speed)
    sim = SimulatedFreeSWITCH(outbound_port=0, clock=clock)
    async with pbx_rig(app, sim, FreeSWITCHAdapter, "esl_url" if esl else None,
                       "outbound_port", nodes, clock, esl_timing, settings) as adapters:
        yield sim, adapters
