"""One AMI connection per process: login, actions with futures, events, a
keepalive, and reconnection with backoff.

Not panoramisk's Manager: it buffers a message without bound until it sees
`\\r\\n\\r\\n`, reconnects on a fixed timer, and re-sends actions that were
queued while the link was down. Replaying an old `AbsoluteTimeout` or
`Hangup` later is wrong for callguard, so actions here fail fast when the link
is down and the supervisor decides what to do again.

The link is never silently absent: a Ping every `keepalive` seconds, and any
action left unanswered for `timeout` seconds, drops the connection (a
black-holed link sends no FIN); whatever goes wrong in a session, the client
logs it and reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

from ..protocol import ami

log = logging.getLogger(__name__)


class AMIError(RuntimeError):
    pass


def parse_ami_url(url: str) -> tuple[str, int, str, str]:
    parts = urlsplit(url)
    if parts.scheme != "ami" or not parts.hostname or not parts.username:
        raise ValueError("AMI URL must look like ami://user:secret@host:5038")
    secret = unquote(parts.password or "")
    return parts.hostname, parts.port or 5038, unquote(parts.username), secret


class AMIClient:
    def __init__(self, url: str, on_event: Callable[[ami.AMIEvent], None],
                 on_login: Callable[[], Awaitable[None]] | None = None,
                 events: str = "call", timeout: float = 3.0, keepalive: float = 2.0,
                 on_pong: Callable[[ami.AMIResponse], None] | None = None):
        self.host, self.port, self.username, self._secret = parse_ami_url(url)
        self.on_event = on_event
        self.on_login = on_login
        self.on_pong = on_pong  # each Ping's reply: it carries the PBX's clock
        self.events = events
        self.timeout = timeout
        self.keepalive = keepalive
        self._ids = (f"cg{n}" for n in itertools.count(1))
        self._pending: dict[str, asyncio.Future] = {}
        self._lists: dict[str, list[ami.AMIEvent]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    def __repr__(self) -> str:  # never shows the secret
        return f"AMIClient({self.username}@{self.host}:{self.port})"

    async def run(self) -> None:
        """Stay connected for ever: reconnect with exponential backoff."""
        backoff = 0.5
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: drop the link, come back
                log.warning("AMI %s:%s: %s; reconnecting in %.1f s", self.host, self.port,
                            str(exc) or type(exc).__name__, backoff)
                if self.connected.is_set():
                    backoff = 0.5  # it was up: the next try comes soon
            finally:
                self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout)
        self._writer = writer
        tasks = {asyncio.ensure_future(self._read(reader, ami.AMIReader()))}
        try:
            reply = await self.action(ami.login, self.username, self._secret, self.events,
                                      require_connected=False)
            if reply.name != "Success":
                raise AMIError(f"login refused: {reply.get('Message')}")
            log.info("AMI logged in to %s:%s as %s", self.host, self.port, self.username)
            await self._ping(require_connected=False)  # the PBX's clock, before anything else
            self.connected.set()
            tasks.add(asyncio.ensure_future(self._keepalive()))
            if self.on_login:
                # Beside the reader: a link that dies while on_login waits is still noticed.
                tasks.add(asyncio.ensure_future(self.on_login()))
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

    async def _ping(self, require_connected: bool = True) -> None:
        reply = await self.action(ami.ping, require_connected=require_connected)
        if self.on_pong:
            self.on_pong(reply)

    async def _read(self, reader: asyncio.StreamReader, parser: ami.AMIReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise AMIError("connection closed by Asterisk")
            for message in parser.feed(data):
                if isinstance(message, ami.AMIResponse):
                    self._answer(message)
                elif isinstance(message, ami.AMIEvent):
                    collected = self._lists.get(message.action_id or "")
                    if collected is not None:
                        collected.append(message)
                        if message.get("EventList") == "Complete":
                            self._finish(message.action_id, collected)
                    else:
                        self.on_event(message)

    def _answer(self, response: ami.AMIResponse) -> None:
        if response.action_id in self._lists and response.get("EventList") == "start":
            return  # the list's items follow as events
        self._finish(response.action_id, response)

    def _finish(self, action_id: str | None, value) -> None:
        self._lists.pop(action_id or "", None)
        future = self._pending.pop(action_id or "", None)
        if future and not future.done():
            future.set_result(value)

    def _drop(self) -> None:
        self.connected.clear()
        if self._writer:
            self._writer.transport.abort()
            self._writer = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(AMIError("AMI connection lost"))
        self._pending.clear()
        self._lists.clear()

    async def action(self, build: Callable[..., bytes], *args, require_connected: bool = True,
                     collect: bool = False):
        """Send one action; returns its Response (or the list's events with collect=True).
        An action left unanswered drops the link: the client reconnects."""
        if self._writer is None or (require_connected and not self.connected.is_set()):
            raise AMIError("AMI not connected")
        action_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[action_id] = future
        if collect:
            self._lists[action_id] = []
        writer = self._writer
        writer.write(build(action_id, *args))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            if writer is self._writer:
                log.warning("AMI %s:%s: no reply within %.1f s; dropping the link", self.host,
                            self.port, self.timeout)
                writer.transport.abort()  # the reader sees the end and the session reconnects
            raise AMIError(f"no reply within {self.timeout} s") from None
        finally:
            self._pending.pop(action_id, None)
            self._lists.pop(action_id, None)
