"""One inbound ESL connection per process: auth, event subscription, api commands
with bounded waits, a keepalive, and reconnection with backoff.

Not greenswitch: its `send()` waits for a reply without a timeout, it does not
reconnect, and its event handlers run one after another in one greenlet, under
gevent's monkey-patching (see the README, "Why not greenswitch or Genesis").
This is the AMI client's shape on the ESL parser: commands fail fast while the
link is down, any command unanswered for `timeout` seconds drops the link, and
whatever ends a session, the client logs it and reconnects.

ESL replies carry no id: FreeSWITCH answers the commands of one connection in
order, and events come between replies, never inside one (the transcripts), so
replies are matched first in, first out and events are routed apart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

from ..protocol import esl

log = logging.getLogger(__name__)


class ESLError(RuntimeError):
    pass


def parse_esl_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "esl" or not parts.hostname or not parts.password:
        raise ValueError("ESL URL must look like esl://:password@host:8021")
    return parts.hostname, parts.port or 8021, unquote(parts.password)


class ESLClient:
    def __init__(self, url: str, on_event: Callable[[esl.Event], None],
                 on_login: Callable[[], Awaitable[None]] | None = None,
                 events: tuple[str, ...] = ("CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE"),
                 timeout: float = 3.0, keepalive: float = 2.0):
        self.host, self.port, self._password = parse_esl_url(url)
        self.on_event, self.on_login = on_event, on_login
        self.events = events
        self.timeout, self.keepalive = timeout, keepalive
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        self._writer: asyncio.StreamWriter | None = None
        self._greeted: asyncio.Future | None = None
        self.connected = asyncio.Event()

    def __repr__(self) -> str:  # never shows the password
        return f"ESLClient({self.host}:{self.port})"

    async def run(self) -> None:
        """Stay connected for ever: reconnect with exponential backoff."""
        backoff = 0.5
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: drop the link, come back
                log.warning("ESL %s:%s: %s; reconnecting in %.1f s", self.host, self.port,
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
        self._greeted = asyncio.get_running_loop().create_future()
        tasks = {asyncio.ensure_future(self._read(reader, esl.ESLReader()))}
        try:
            await asyncio.wait_for(asyncio.shield(self._greeted), self.timeout)
            reply = await self.send(esl.auth(self._password), require_connected=False)
            if not reply.ok:
                raise ESLError(f"auth refused: {reply.text}")
            reply = await self.send(esl.command("event plain " + " ".join(self.events)),
                                    require_connected=False)
            if not reply.ok:
                raise ESLError(f"event subscription refused: {reply.text}")
            log.info("ESL logged in to %s:%s", self.host, self.port)
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
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: what ended the session is logged above

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            await self.api("status")

    async def _read(self, reader: asyncio.StreamReader, parser: esl.ESLReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                raise ESLError("connection closed by FreeSWITCH")
            for message in parser.feed(data):
                if isinstance(message, esl.Event):
                    self.on_event(message)
                elif isinstance(message, esl.CommandReply | esl.ApiResponse):
                    if not self._pending:
                        raise ESLError(f"a reply nobody asked for: {message!r}")
                    future = self._pending.popleft()
                    if not future.done():
                        future.set_result(message)
                elif isinstance(message, esl.AuthRequest):
                    if self._greeted and not self._greeted.done():
                        self._greeted.set_result(None)
                elif isinstance(message, esl.DisconnectNotice):
                    raise ESLError("FreeSWITCH ended the connection")
                elif message.content_type == "text/rude-rejection":
                    raise ESLError("refused by FreeSWITCH (apply-inbound-acl): "
                                   + message.body.decode("ascii", "replace").strip())

    def _drop(self) -> None:
        self.connected.clear()
        if self._writer:
            self._writer.transport.abort()
            self._writer = None
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(ESLError("ESL connection lost"))

    async def api(self, *words: str) -> esl.ApiResponse:
        return await self.send(esl.api(*words))

    async def send(self, *commands: bytes, require_connected: bool = True):
        """Write the commands in one go and return their replies (one reply for one
        command). A command left unanswered drops the link: the client reconnects."""
        if self._writer is None or (require_connected and not self.connected.is_set()):
            raise ESLError("ESL not connected")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._pending.extend(futures)
        writer = self._writer
        writer.write(b"".join(commands))
        try:
            replies = await asyncio.wait_for(asyncio.gather(*futures), self.timeout)
        except TimeoutError:
            if writer is self._writer:
                log.warning("ESL %s:%s: no reply within %.1f s; dropping the link", self.host,
                            self.port, self.timeout)
                writer.transport.abort()  # the reader sees the end and the session reconnects
            raise ESLError(f"no reply within {self.timeout} s") from None
        return replies[0] if len(replies) == 1 else replies
