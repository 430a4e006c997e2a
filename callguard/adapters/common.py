"""What both PBX adapters' processes share: who may connect, and the run loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

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


def serve(adapter, host: str, port: int, what: str) -> int:
    """Run an adapter until SIGINT/SIGTERM (or until its identity is taken); the exit
    status."""

    async def main():
        await adapter.start(host, port)
        log.info("callguard serving %s on %s:%d (node %s)", what, host, port,
                 adapter.control.node)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, adapter.control.failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        await adapter.stop()
        return 1 if adapter.control.failed.is_set() else 0

    return run_loop(main())


def run_loop(coro):
    """uvloop where installed: it halves the event loop's share of a call setup."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
