"""What both PBX adapters share besides the call control: who may connect, the
process around the adapter, and the run loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

from .. import sdnotify, service
from ..clock import Clock
from ..config import split_hostport
from ..control import CallControl
from ..health import DEFAULT_BIND, Health
from ..logs import Throttled

log = logging.getLogger(__name__)


class PeerFilter:
    """Which addresses may open a call-setup connection (FastAGI, outbound ESL)."""

    def __init__(self, networks):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._verdicts: dict[str, bool] = {}  # PBXs are few: remember each verdict

    def __call__(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            verdict = any(address in net for net in self.networks)
            if len(self._verdicts) < 1024:
                self._verdicts[host] = verdict
        return verdict


class PBXAdapter:
    """What an adapter's process holds besides its protocol: the call control, the
    call-setup server, the event link's task. A subclass sets `name`, `link` (its
    AMIClient or ESLClient, None when not configured), `link_setting`, and `connection`
    (the asyncio.Protocol of one call-setup connection)."""

    name = "PBX"
    link_setting = ""  # the setting that configures the event link
    bind_setting = ""  # the setting naming where call setups are served
    setup_protocol = ""
    link = None

    def __init__(self, app: service.App, node: str, allow, clock: Clock | None):
        self.app = app
        self.settings = app.settings
        self.peer_allowed = PeerFilter(allow)
        self.control = CallControl(app, self, node, clock)
        self.metrics = self.control.metrics
        self.warn_refused = Throttled(log)
        self.warn_bad_request = Throttled(log)
        self.server: asyncio.AbstractServer | None = None
        self._link_task: asyncio.Task | None = None

    @property
    def supervisor(self):
        return self.control.supervisor

    @property
    def engine(self):
        return self.control.engine

    @property
    def supervising(self) -> bool:
        return self.link is not None and self.link.connected.is_set()

    async def start(self, host: str, port: int) -> None:
        await self.control.start()
        loop = asyncio.get_running_loop()
        # reuse_port: several serve processes on this port, the kernel spreads the
        # connections (workers.py); each process acts on its own sessions only.
        self.server = await loop.create_server(lambda: self.connection(self), host, port,
                                               reuse_address=True, backlog=1024,
                                               reuse_port=self.settings.reuse_port)
        if self.link:
            self._link_task = asyncio.ensure_future(self.link.run())
        else:
            log.warning("no %s: nothing can supervise calls, so they get the failure policy "
                        "(%s)", self.link_setting, self.settings.failure_policy)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop taking calls, finish the call steps under way (commits), then stop."""
        if self.server:
            self.server.close()
        await self.control.stop()
        if self._link_task:
            self._link_task.cancel()
            await asyncio.wait([self._link_task], timeout=2)

    def refuse(self, transport) -> bool:
        """Drop a call-setup connection from an address not allowed; True if dropped."""
        peer = transport.get_extra_info("peername")
        if self.peer_allowed(peer[0] if peer else ""):
            return False
        self.warn_refused("%s connection from %s refused (not allowed by the settings)",
                          self.name, peer)
        self.metrics.refused.inc()
        transport.abort()
        return True

    async def _logged_in(self) -> None:
        await self.control.reconcile()

    def readiness_checks(self) -> dict:
        """What /readyz asks (from the HTTP thread): Redis answers, this process holds
        its node identity, the PBX event link is up."""

        def pbx_link():
            if self.link is None:
                return f"{self.link_setting} is not set: no event link"
            return None if self.supervising else f"{self.name} event link is down"

        return {"redis": lambda: self.app.redis.ping() and None,
                "node_identity": lambda: None if self.control.identity else (
                    "node identity not held yet (Redis away since the start)"),
                "pbx_link": pbx_link}


class SetupConnection(asyncio.Protocol):
    """One call-setup connection (FastAGI, outbound ESL): its adapter, its transport and
    the one timer that bounds whatever it waits for."""

    def __init__(self, adapter: PBXAdapter):
        self.adapter = adapter
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        """The address the setup came from."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return peer[0] if peer else ""

    def arm(self, seconds: float) -> None:
        """Abort the connection in `seconds` unless armed again."""
        if self.timer:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.transport.abort)

    def connection_lost(self, exc) -> None:
        # A running authorize is left to finish: its session is then tracked, and the
        # channel's hangup event (sent once we close) releases it.
        if self.timer:
            self.timer.cancel()


def serve(adapter: PBXAdapter) -> int:
    """Run an adapter until SIGINT/SIGTERM (or until its identity is taken); the exit
    status."""
    host, port = split_hostport(getattr(adapter.settings, adapter.bind_setting))

    health = Health(f"serve {adapter.name.lower()}", adapter.metrics.registry,
                    adapter.readiness_checks())

    async def main():
        await adapter.start(host, port)
        health.start(adapter.settings.http_bind or DEFAULT_BIND["serve"])
        adapter.app.serving()  # from now on the embedded Redis, if used, stays up for us
        log.info("callguard serving %s on %s:%d (node %s)", adapter.setup_protocol, host, port,
                 adapter.control.node)
        sdnotify.ready(f"serving {adapter.setup_protocol} on {host}:{port}")
        pinging = asyncio.ensure_future(sdnotify.watchdog_loop())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda sig=sig: (signals.append(sig), stop.set()))
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, adapter.control.failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in (*waits, pinging):
            waiting.cancel()
        sdnotify.stopping()
        why = signal.Signals(signals[0]).name if signals else "node identity taken"
        log.info("stopping (%s): no new calls; finishing %d call step(s) under way", why,
                 len(adapter.control.steps_under_way))
        await adapter.stop()
        health.stop()
        log.info("stopped; %d call(s) stay in Redis for the next start to reconcile",
                 len(adapter.supervisor.sessions))
        return 1 if adapter.control.failed.is_set() else 0

    return run_loop(main())


def run_loop(coro):
    """uvloop where installed: it halves the event loop's share of a call setup."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


