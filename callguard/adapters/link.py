"""The event link to a PBX (AMI, inbound ESL): one connection per process, kept up
for ever, never silently absent.

Commands fail fast while the link is down: replaying an old timeout or hangup
later is wrong for callguard, so the supervisor decides again instead. A
keepalive every `keepalive` seconds, and any command left unanswered for
`timeout` seconds, drops the connection (a black-holed link sends no FIN);
whatever goes wrong in a session, the link logs it and reconnects with backoff.
A subclass speaks its protocol: `_login`, `_read`, `_ping`, `_fail_pending`.
With a TLS context the link speaks TLS, checking the certificate and that it names the
host it connects to; a handshake that fails is one more link failure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

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


def _task(coro) -> asyncio.Task:
    """A task of a session: what ends one is raised by the session and logged by run();
    the others' errors, left behind as it ends, are of no interest."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


class EventLink:
    protocol = "PBX"
    error: type[LinkError] = LinkError

    def __init__(self, host: str, port: int, on_login: Callable[[], Awaitable[None]] | None,
                 timeout: float, keepalive: float, tls: ssl.SSLContext | None = None):
        self.host, self.port = host, port
        self.tls = tls
        self.on_login = on_login
        self.timeout, self.keepalive = timeout, keepalive
        self._writer: asyncio.StreamWriter | None = None
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
        reader, writer = await asyncio.wait_for(  # the handshake, if any, within it too
            asyncio.open_connection(self.host, self.port, **tls), self.timeout)
        self._writer = writer
        tasks = {_task(self._read(reader))}
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
        if self._writer:
            self._writer.transport.abort()
            self._writer = None
        self._fail_pending(self.error(f"{self.protocol} connection lost"))

    def _writer_for(self, require_connected: bool) -> asyncio.StreamWriter:
        if self._writer is None or (require_connected and not self.connected.is_set()):
            raise self.error(f"{self.protocol} not connected")
        return self._writer

    async def _reply(self, writer: asyncio.StreamWriter, waiting: Awaitable,
                     timeout: float | None = None):
        """What `waiting` gives within the timeout; else the link is dropped (the reader
        sees the end and the session reconnects)."""
        timeout = timeout or self.timeout
        try:
            return await asyncio.wait_for(waiting, timeout)
        except TimeoutError:
            if writer is self._writer:
                log.warning("%s %s:%s: no reply within %.1f s; dropping the link",
                            self.protocol, self.host, self.port, timeout)
                writer.transport.abort()
            raise self.error(f"no reply within {timeout} s") from None

    # -- the protocol's part -----------------------------------------------------------
    async def _login(self) -> None:
        raise NotImplementedError

    async def _read(self, reader: asyncio.StreamReader) -> None:
        raise NotImplementedError

    async def _ping(self) -> None:
        raise NotImplementedError

    def _fail_pending(self, error: LinkError) -> None:
        raise NotImplementedError
