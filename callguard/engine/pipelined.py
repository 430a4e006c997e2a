"""A lean asyncio Redis connection for the call path: EVALSHA only, many in flight.

redis-py's asyncio client takes a pooled connection, a retry wrapper and a
timeout context for every command; on one core that was most of a call
setup's CPU (bench/README.md). Here every request is written to one
connection as it comes and the replies, which Redis returns in order, resolve
a queue of futures; hiredis parses them. Everything else (pub/sub, the CLI,
Redis Cluster) keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from urllib.parse import unquote, urlsplit

import hiredis
import redis

from ..coalesce import CoalescedWrites
from .connect import NO_TLS, RedisTLS


def _pack(*parts) -> bytes:
    """One RESP command (str, bytes and int parts), packed by hiredis in C."""
    return hiredis.pack_command(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self):
        self.reader = hiredis.Reader(encoding="utf-8", replyError=redis.ResponseError)
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.writes: CoalescedWrites | None = None  # a call setup's EVALSHA joins the others'
        self.lost: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.writes = CoalescedWrites(transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if future.done():
                continue  # its caller gave up (timeout); the reply is dropped in order
            if isinstance(reply, redis.ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc) -> None:
        self.lost = redis.ConnectionError(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)


class PipelinedRedis:
    """One connection to a single Redis (redis://, rediss://, unix://)."""

    def __init__(self, url: str, tls: RedisTLS = NO_TLS):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a single-node Redis URL: {parts.scheme}://")
        self.scheme = parts.scheme
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.path = parts.path
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        self.db = int(query.get("db") or db or 0)
        self.tls = tls.context() if parts.scheme == "rediss" else None
        self._protocol: _Protocol | None = None
        self._lock = asyncio.Lock()

    @property
    def _live(self) -> _Protocol | None:
        """The connection, if it is up: the call path's fast way past _connection()."""
        protocol = self._protocol
        return protocol if protocol is not None and protocol.lost is None else None

    async def _connection(self) -> _Protocol:
        async with self._lock:  # one reconnect for everybody waiting
            if self._live is None:
                self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            if self.scheme == "unix":
                _, protocol = await loop.create_unix_connection(_Protocol, self.path)
            else:
                _, protocol = await loop.create_connection(_Protocol, self.host, self.port,
                                                           ssl=self.tls)
        except OSError as exc:  # ssl.SSLError too: the server's certificate refused
            where = self.path if self.scheme == "unix" else f"{self.host}:{self.port}"
            raise redis.ConnectionError(f"cannot connect to Redis at {where}: {exc}") from None
        if self.password:
            auth = (self.username, self.password) if self.username else (self.password,)
            await self._call(protocol, "AUTH", *auth)
        if self.db:
            await self._call(protocol, "SELECT", self.db)
        return protocol

    @staticmethod
    def _call(protocol: _Protocol, *parts) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        protocol.writes.write(_pack(*parts))
        return future

    async def execute(self, *parts):
        return await self._call(self._live or await self._connection(), *parts)

    async def evalsha(self, sha: str, source: str, keys: list, args: list):
        """EVALSHA, loading the script once if Redis does not know it (restart, flush)."""
        protocol = self._live or await self._connection()  # not execute(): a coroutine less
        try:
            return await self._call(protocol, "EVALSHA", sha, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self.execute("SCRIPT", "LOAD", source)
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        if self._protocol and self._protocol.transport:
            self._protocol.transport.close()
