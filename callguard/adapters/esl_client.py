"""The inbound ESL link (link.EventLink): auth, one event subscription, api
commands, an `api status` keepalive.

Not greenswitch: its `send()` waits for a reply without a timeout, it does not
reconnect, and its event handlers run one after another in one greenlet, under
gevent's monkey-patching (README, "Why not greenswitch or Genesis").

ESL replies carry no id: FreeSWITCH answers the commands of one connection in
order, and events come between replies, never inside one (the transcripts), so
replies are matched first in, first out and events are routed apart.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

from ..protocol import esl
from .link import EventLink, LinkError, quiet


class ESLError(LinkError):
    pass


def parse_esl_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "esl" or not parts.hostname or not parts.password:
        raise ValueError("ESL URL must look like esl://:password@host:8021")
    return parts.hostname, parts.port or 8021, unquote(parts.password)


class ESLClient(EventLink):
    protocol = "ESL"
    peer = "FreeSWITCH"
    error = ESLError

    def __init__(self, url: str, on_event: Callable[[esl.Event], None],
                 on_login: Callable[[], Awaitable[None]] | None = None,
                 events: tuple[str, ...] = ("CHANNEL_CREATE", "CHANNEL_ANSWER",
                                            "CHANNEL_HANGUP_COMPLETE"),
                 timeout: float = 3.0, keepalive: float = 2.0):
        host, port, self._password = parse_esl_url(url)
        super().__init__(host, port, on_login, timeout, keepalive)
        self.on_event = on_event
        self.events = events
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        self._greeted: asyncio.Future | None = None

    async def _session(self) -> None:
        self._greeted = asyncio.get_running_loop().create_future()
        await super()._session()

    async def _login(self) -> None:
        await self._reply(self._out, self._greeted)  # auth/request first
        reply = await self.send(esl.auth(self._password), require_connected=False)
        if not reply.ok:
            raise ESLError(f"auth refused: {reply.text}")
        reply = await self.send(esl.command("event plain " + " ".join(self.events)),
                                require_connected=False)
        if not reply.ok:
            raise ESLError(f"event subscription refused: {reply.text}")

    async def _ping(self) -> None:
        await self.api("status")

    def _begin(self) -> None:
        self._parser = esl.ESLReader()

    def _feed(self, data: bytes) -> None:
        for message in self._parser.feed(data):
            if isinstance(message, esl.Event):
                self.on_event(message)
            elif isinstance(message, esl.CommandReply | esl.ApiResponse):
                if not self._pending:
                    raise ESLError(f"a reply nobody asked for: {message!r}")
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(message)
            elif isinstance(message, esl.AuthRequest):
                if not self._greeted.done():
                    self._greeted.set_result(None)
            elif isinstance(message, esl.DisconnectNotice):
                raise ESLError("FreeSWITCH ended the connection")
            elif message.content_type == "text/rude-rejection":
                raise ESLError("refused by FreeSWITCH (apply-inbound-acl): "
                               + message.body.decode("ascii", "replace").strip())

    def _fail_pending(self, error: LinkError) -> None:
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def api(self, *words: str, timeout: float | None = None) -> esl.ApiResponse:
        return await self.send(esl.api(*words), timeout=timeout)

    async def send(self, *commands: bytes, require_connected: bool = True,
                   timeout: float | None = None):
        """Write the commands in one go and return their replies (one reply for one
        command). A command left unanswered drops the link: the client reconnects."""
        writer = self._writer_for(require_connected)
        futures = [asyncio.get_running_loop().create_future() for _ in commands]
        self._pending.extend(futures)
        writer.write(b"".join(commands))
        for future in futures[:-1]:  # failed with the link, they are not awaited: no noise
            future.add_done_callback(quiet)
        # Replies come in order: the last one's arrival means all are in.
        await self._reply(writer, futures[-1], timeout)
        replies = [future.result() for future in futures]
        return replies[0] if len(replies) == 1 else replies
