"""`callguard demo`: the seeds' fraud scenario, end to end, on this machine.

A hacked PBX fires 30 simultaneous calls at a premium number from a prepaid
account holding CHF 50. The real `serve asterisk` (or `serve freeswitch`)
adapter authorises and supervises them over real FastAGI and AMI (or ESL)
sockets; a simulated Asterisk (or FreeSWITCH) places the calls. PBX time runs
`speed` times faster than wall time so the minute-long calls take seconds; both
sides share that clock.
Everything lives under a throwaway key prefix and SQLite file and is removed
at the end.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import statistics
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import notify, service, sync
from .adapters.asterisk import AsteriskAdapter
from .adapters.freeswitch import FreeSWITCHAdapter
from .books.database import upgrade
from .clock import Clock
from .engine import state
from .engine.connect import stop_embedded
from .money import format_display
from .rating import Rate
from .simulator.asterisk import SimulatedAsterisk
from .simulator.freeswitch import SimulatedFreeSWITCH

# PBX: its simulation, its adapter, the setting naming the event link, the adapter's
# client of that link, the simulation's attribute naming our call-setup port.
PBXS = {
    "asterisk": (SimulatedAsterisk, AsteriskAdapter, "ami_url", "ami", "agi_port"),
    "freeswitch": (SimulatedFreeSWITCH, FreeSWITCHAdapter, "esl_url", "esl", "outbound_port"),
}

ACCOUNT = "41440000001"
PREMIUM = Rate("4190", "premium CH", 3_000_000, 0, 1, 1)  # CHF 3.00/min, 1/1
NUMBER = "41901234567"


@dataclass
class Scenario:
    calls: int = 30
    balance: int = 50_000_000  # CHF 50
    talk: float = 600.0  # how long the fraudster keeps each call up if nobody cuts it
    ring: float = 2.0
    quota: int = 60
    speed: float = 10.0
    pbx: str = "asterisk"
    # The second seed's controls: spend per hour counted from live calls, and on a
    # suspicion, block the account and hang its calls up. None: credit alone bounds it.
    max_spend_per_hour: int | None = 20_000_000


@dataclass
class Outcome:
    scenario: Scenario
    allowed: int
    denied: dict[str, int]
    setup_ms: list[float]
    talk_seconds: float
    charged: int
    unprotected: int  # what the same traffic costs when rated after the call
    balance: int
    books_agree: bool
    wall_seconds: float
    notices: list[str]

    @property
    def overshoot(self) -> int:
        return max(0, self.charged - self.scenario.balance)

    @property
    def unprotected_loss(self) -> int:
        return max(0, self.unprotected - self.scenario.balance)


async def run_fraud(app: service.App, sc: Scenario, progress=None) -> Outcome:
    """Place the scenario's calls through a real adapter; `progress(snapshot)` is called
    twice a second of wall time with the account's live state."""
    clock = Clock(sc.speed)
    loop = asyncio.get_running_loop()
    started = loop.time()
    simulation, adapter_class, url_setting, link, port_attr = PBXS[sc.pbx]
    sim = simulation(0, clock=clock)
    await sim.start()
    settings = dataclasses.replace(app.settings, quota_seconds=sc.quota,
                                   **{url_setting: getattr(sim, url_setting)})
    adapter_app = service.App(settings)
    adapter_app.__dict__.update(books=app.books, redis_url=app.redis_url, redis=app.redis)
    adapter = adapter_class(adapter_app, clock)
    await adapter.start("127.0.0.1", 0)
    setattr(sim, port_attr, adapter.port)
    await asyncio.wait_for(getattr(adapter, link).connected.wait(), 10)
    ticker = asyncio.ensure_future(_report(app, sim, progress)) if progress else None
    worker = asyncio.ensure_future(_worker(app))
    try:
        calls = await asyncio.gather(*(sim.call(ACCOUNT, NUMBER, ring=sc.ring, talk=sc.talk)
                                       for _ in range(sc.calls)))
        for _ in range(200):  # the last hangup events reach the adapter and commit
            if not adapter.supervisor.sessions:
                break
            await asyncio.sleep(0.01)
    finally:
        worker.cancel()
        if ticker:
            ticker.cancel()
        await adapter.stop()
        await sim.stop()
        if progress:
            await _report(app, sim, progress, once=True)
    await asyncio.to_thread(sync.drain, app, "demo")
    live = state.account_state(app.redis, app.keys, ACCOUNT)
    agree = not await asyncio.to_thread(sync.reconcile, app)
    denied = collections.Counter(c.reason or "NO_ANSWER" for c in calls if not c.allowed)
    return Outcome(
        scenario=sc, allowed=sum(c.allowed for c in calls), denied=dict(denied),
        setup_ms=[c.setup_latency * 1000 for c in calls],
        talk_seconds=sum(c.talk_seconds for c in calls),
        charged=sc.balance - live["balance"],
        unprotected=sc.calls * PREMIUM.cost(int(sc.talk)),
        balance=live["balance"], books_agree=agree and live["reserved"] == 0,
        wall_seconds=loop.time() - started,
        notices=[n["type"] for n in await asyncio.to_thread(notify.notice_rows, app)],
    )


async def _worker(app) -> None:
    """What `callguard worker` does for the demo: books the engine's events as they come,
    so a fraud block hangs the calls up while they run."""
    while True:
        await asyncio.to_thread(sync.drain, app, "demo")
        await asyncio.sleep(0.05)


async def _report(app, sim, progress, once: bool = False) -> None:
    while True:
        if not once:
            await asyncio.sleep(0.5)
        snap = await asyncio.to_thread(state.account_state, app.redis, app.keys, ACCOUNT)
        cut = sum(1 for c in sim.finished if c.cut_off)
        progress(snap, len(sim.calls), cut, sim.clock.monotonic())
        if once:
            return


def prepare(app: service.App, sc: Scenario) -> None:
    upgrade(app.books.engine)
    service.import_plan(app, "default", "outbound", [PREMIUM])
    app.plans.replace(app.books.load_plans())
    controls = ({"max_spend_per_hour": sc.max_spend_per_hour, "on_fraud": "block"}
                if sc.max_spend_per_hour else {})
    service.create_account(app, ACCOUNT, opening_balance=sc.balance, kind="prepaid",
                           max_channels=0, email="fraud-demo@example.net", **controls)


def cleanup(app: service.App) -> None:
    for key in app.redis.scan_iter(f"{app.keys.prefix}:*", count=1000):
        app.redis.delete(key)
    app.books.engine.dispose()
    if app.settings.redis_url is None:
        stop_embedded(app.settings.home)


def throwaway_app(settings) -> tuple[service.App, tempfile.TemporaryDirectory]:
    """Our own keys and books in a temporary directory; with no Redis configured, our
    own embedded Redis there too, stopped at the end."""
    tmp = tempfile.TemporaryDirectory(prefix="callguard-demo-")
    home = Path(tmp.name)
    settings = dataclasses.replace(
        settings, database_url=f"sqlite:///{home / 'demo.db'}",
        home=home if settings.redis_url is None else settings.home,
        key_prefix=f"demo-{uuid.uuid4().hex[:8]}", node="demo")
    return service.App(settings), tmp


def money(micros: int) -> str:
    return f"CHF {format_display(micros)}"


def summary(o: Outcome) -> list[tuple[str, str, str]]:
    sc = o.scenario
    setup = sorted(o.setup_ms)
    p99 = setup[min(len(setup) - 1, int(len(setup) * 0.99))]
    denied = ", ".join(f"{n} {reason}" for reason, n in sorted(o.denied.items())) or "none"
    return [
        ("calls placed", str(sc.calls), str(sc.calls)),
        ("calls allowed / denied", f"{o.allowed} / {sc.calls - o.allowed} ({denied})",
         f"{sc.calls} / 0"),
        ("talk time", f"{o.talk_seconds:,.0f} s", f"{sc.calls * sc.talk:,.0f} s"),
        ("charged", money(o.charged), money(o.unprotected)),
        ("loss beyond the CHF balance", money(o.overshoot), money(o.unprotected_loss)),
        ("final balance", money(o.balance), money(sc.balance - o.unprotected)),
        ("setup latency median / p99",
         f"{statistics.median(setup):.1f} / {p99:.1f} ms", "-"),
        ("notices", ", ".join(f"{n} {t}" for t, n in collections.Counter(o.notices).items())
         or "none", "a mail after the bill"),
        ("books agree with Redis", "yes" if o.books_agree else "NO", "-"),
    ]
