"""The event link to a PBX (AMI, inbound ESL): one connection per process, kept up
for ever, never silently absent.

Commands fail fast while the link is down: replaying an old timeout or hangup
later is wrong for callguard, so the supervisor decides again instead. A
keepalive every `keepalive` seconds, and any command left unanswered for
`timeout` seconds, drops the connection (a black-holed link sends no FIN);
whatever goes wrong in a session, the link logs it and reconnects with backoff.
A subclass speaks its protocol: `_login`, `_begin` (a new parser), `_feed` (bytes as they
come, in the event loop's own callback: no reader task and no stream buffer between the
socket and the parser), `_ping`, `_fail_pending`.
With a TLS context the link speaks TLS, checking the certificate and that it names the
host it connects to; a handshake that fails is one more link failure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from ..coalesce import CoalescedWrites

log = logging.getLogger(__name__)


class LinkError(RuntimeError):
    pass


def client_tls(setting: str, cafile: str | None) -> ssl.SSLContext:
    """A client context that checks the peer's certificate and host name: against the CAs
    in `cafile` alone when given (an operator's own CA, or a self-signed certificate
    itself), else the system's."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:  # before OSError: it is one
        raise ValueError(f"{setting} {cafile}: not a PEM file of CA certificates "
                         f"({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"{setting} {cafile}: {exc.strerror or exc}") from None


def why(exc: BaseException) -> str:
    """What ended a session, in one line (an SSL error's text is OpenSSL's, with codes)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {(exc.verify_message or exc.reason).rstrip('.')}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").replace("_", " ").lower()
        return f"TLS handshake failed: {reason or exc}"
    return str(exc) or type(exc).__name__


def quiet(future: asyncio.Future) -> None:
    """A done callback: the future's error is handled elsewhere (or of no interest), so
    asyncio does not log it as never retrieved."""
    future.cancelled() or future.exception()


def _task(coro) -> asyncio.Task:
    """A task of a session: what ends one is raised by the session and logged by run();
    the others' errors, left behind as it ends, are of no interest."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(quiet)
    return task


class _Stream(asyncio.Protocol):
    """A link's connection: bytes to the link as they come; the end (EOF, a reset, or what
    the link raised on the bytes) to `ended`."""

    def __init__(self, link: EventLink):
        self.link = link
        self.ended = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        try:
            self.link._feed(data)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends the session
            self._end(exc)

    def eof_received(self) -> bool:
        self._end(self.link.error(f"connection closed by {self.link.peer}"))
        return False

    def connection_lost(self, exc) -> None:
        self._end(exc or self.link.error(f"connection closed by {self.link.peer}"))

    def _end(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)
        self.transport.abort()


class EventLink:
    protocol = "PBX"
    peer = "the PBX"
    error: type[LinkError] = LinkError

    def __init__(self, host: str, port: int, on_login: Callable[[], Awaitable[None]] | None,
                 timeout: float, keepalive: float, tls: ssl.SSLContext | None = None):
        self.host, self.port = host, port
        self.tls = tls
        self.on_login = on_login
        self.timeout, self.keepalive = timeout, keepalive
        self._transport: asyncio.Transport | None = None
        self._out: CoalescedWrites | None = None  # what commands are written to
        self.connected = asyncio.Event()
        self.logins = 0  # every login since the start (the metrics count reconnects)

    def __repr__(self) -> str:  # never shows a secret
        return f"{type(self).__name__}({self.host}:{self.port})"

    async def run(self) -> None:
        """Stay connected for ever: reconnect with exponential backoff."""
        backoff = 0.5
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: drop the link, come back
                log.warning("%s %s:%s: %s; reconnecting in %.1f s", self.protocol, self.host,
                            self.port, why(exc), backoff)
                if self.connected.is_set():
                    backoff = 0.5  # it was up: the next try comes soon
            finally:
                self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _session(self) -> None:
        tls = {"ssl": self.tls, "server_hostname": self.host} if self.tls else {}
        self._begin()
        loop = asyncio.get_running_loop()
        transport, stream = await asyncio.wait_for(  # the handshake, if any, within it too
            loop.create_connection(lambda: _Stream(self), self.host, self.port, **tls),
            self.timeout)
        self._transport = transport
        self._out = CoalescedWrites(transport)
        stream.ended.add_done_callback(quiet)
        tasks = {stream.ended}
        try:
            await self._login()
            log.info("%s logged in to %s:%s%s", self.protocol, self.host, self.port,
                     " over TLS" if self.tls else "")
            self.logins += 1
            self.connected.set()
            tasks.add(_task(self._keepalive()))
            if self.on_login:
                # Beside the reader: a link that dies while on_login waits is still noticed.
                tasks.add(_task(self.on_login()))
            while True:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended the session; on_login may just end
        finally:
            for task in tasks:
                task.cancel()

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            await self._ping()

    def _drop(self) -> None:
        self.connected.clear()
        if self._transport:
            self._transport.abort()
            self._transport = self._out = None
        self._fail_pending(self.error(f"{self.protocol} connection lost"))

    def _writer_for(self, require_connected: bool) -> CoalescedWrites:
        if self._out is None or (require_connected and not self.connected.is_set()):
            raise self.error(f"{self.protocol} not connected")
        return self._out

    async def _reply(self, writer: CoalescedWrites, waiting: asyncio.Future,
                     timeout: float | None = None):
        """What the future `waiting` gives within the timeout; else the link is dropped
        (the reader sees the end and the session reconnects). A timer, not wait_for: this
        runs for every command, and wait_for costs a task's worth of objects each time."""
        timeout = timeout or self.timeout
        timer = asyncio.get_running_loop().call_later(timeout, self._overdue, writer, waiting,
                                                      timeout)
        try:
            return await waiting
        finally:
            timer.cancel()

    def _overdue(self, writer: CoalescedWrites, waiting: asyncio.Future,
                 timeout: float) -> None:
        if waiting.done():
            return
        if writer is self._out:
            log.warning("%s %s:%s: no reply within %.1f s; dropping the link",
                        self.protocol, self.host, self.port, timeout)
            writer.transport.abort()
        waiting.set_exception(self.error(f"no reply within {timeout} s"))

    # -- the protocol's part -----------------------------------------------------------
    async def _login(self) -> None:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    async def _ping(self) -> None:
        raise NotImplementedError

    def _fail_pending(self, error: LinkError) -> None:
        raise NotImplementedError
