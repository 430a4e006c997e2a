"""The AMI link (link.EventLink): login, actions matched by ActionID, events,
a Ping keepalive that also reads Asterisk's clock.

Not panoramisk's Manager: it buffers a message without bound until it sees
`\\r\\n\\r\\n`, reconnects on a fixed timer, and re-sends actions that were
queued while the link was down (see link.py for why callguard must not).

`amis://` is AMI over TLS (manager.conf `tlsenable`, port 5039): the same bytes inside a
TLS connection whose certificate must chain to the system's CAs or CALLGUARD_AMI_TLS_CA
and name the URL's host. There is no client certificate: Asterisk's AMI ignores
`tlscafile` and `tlsverifyclient` (main/manager.c refuses to read them), so the secret is
the client's only credential and TLS keeps it, and the calls, from the wire.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit

from ..protocol import ami
from .link import EventLink, LinkError, client_tls

PORTS = {"ami": 5038, "amis": 5039}


class AMIError(LinkError):
    pass


def parse_ami_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, user, secret); the message never repeats the URL (its secret)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts = port = None
    if parts is None or parts.scheme not in PORTS or not parts.hostname or not parts.username:
        raise ValueError("AMI URL must look like ami://user:secret@host:5038 or, over TLS, "
                         "amis://user:secret@host:5039")
    secret = unquote(parts.password or "")
    return parts.hostname, port or PORTS[parts.scheme], unquote(parts.username), secret


class AMIClient(EventLink):
    protocol = "AMI"
    peer = "Asterisk"
    error = AMIError

    def __init__(self, url: str, on_event: Callable[[ami.AMIEvent], None],
                 on_login: Callable[[], Awaitable[None]] | None = None,
                 events: str = "call", timeout: float = 3.0, keepalive: float = 2.0,
                 on_pong: Callable[[ami.AMIResponse], None] | None = None,
                 tls_ca: str | None = None):
        host, port, self.username, self._secret = parse_ami_url(url)
        over_tls = urlsplit(url).scheme == "amis"
        if tls_ca and not over_tls:
            raise ValueError("CALLGUARD_AMI_TLS_CA is set but CALLGUARD_AMI_URL is ami:// "
                             "(plain text): use amis:// for AMI over TLS")
        tls = client_tls("CALLGUARD_AMI_TLS_CA", tls_ca) if over_tls else None
        super().__init__(host, port, on_login, timeout, keepalive, tls)
        self.on_event = on_event
        self.on_pong = on_pong  # each Ping's reply: it carries the PBX's clock
        self.events = events
        self._ids = (f"cg{n}" for n in itertools.count(1))
        self._pending: dict[str, asyncio.Future] = {}
        self._lists: dict[str, list[ami.AMIEvent]] = {}

    def __repr__(self) -> str:  # never shows the secret
        return f"AMIClient({self.username}@{self.host}:{self.port})"

    async def _login(self) -> None:
        reply = await self.action(ami.login, self.username, self._secret, self.events,
                                  require_connected=False)
        if reply.name != "Success":
            raise AMIError(f"login refused: {reply.get('Message')}")
        await self._ping(require_connected=False)  # the PBX's clock, before anything else

    async def _ping(self, require_connected: bool = True) -> None:
        reply = await self.action(ami.ping, require_connected=require_connected)
        if self.on_pong:
            self.on_pong(reply)

    def _begin(self) -> None:
        self._parser = ami.AMIReader()

    def _feed(self, data: bytes) -> None:
        for message in self._parser.feed(data):
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

    def _fail_pending(self, error: LinkError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._lists.clear()

    async def action(self, build: Callable[..., bytes], *args, require_connected: bool = True,
                     collect: bool = False):
        """Send one action; returns its Response (or the list's events with collect=True).
        An action left unanswered drops the link: the client reconnects."""
        writer = self._writer_for(require_connected)
        action_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[action_id] = future
        if collect:
            self._lists[action_id] = []
        writer.write(build(action_id, *args))
        try:
            return await self._reply(writer, future)
        finally:
            self._pending.pop(action_id, None)
            self._lists.pop(action_id, None)
