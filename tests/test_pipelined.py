"""The lean call-path connection against real Redis: order, errors, reconnects."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import redis

from callguard.books.database import upgrade
from callguard.engine.connect import connect_async
from callguard.engine.pipelined import PipelinedRedis, _pack
from callguard.engine.runner import AsyncEngine
from callguard.service import App

from engine_helpers import T0, prepaid, setup_plan


def test_pack_is_resp():
    assert _pack("EVALSHA", "ab", 2, b"k") == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$1\r\nk\r\n")


def test_many_in_flight_resolve_in_order_and_errors_reach_their_caller(private_redis):
    """On a Redis of its own: it flushes the script cache, which no shared Redis should see."""

    async def scenario():
        conn = PipelinedRedis(private_redis.url)
        echoes = await asyncio.gather(*(conn.execute("ECHO", f"m{i}") for i in range(500)))
        with pytest.raises(redis.ResponseError, match="unknown command"):
            await conn.execute("NOSUCHCOMMAND")
        source = "return ARGV[1] .. '-' .. KEYS[1]"
        import hashlib
        sha = hashlib.sha1(source.encode()).hexdigest()
        await conn.execute("SCRIPT", "FLUSH")
        reloaded = await conn.evalsha(sha, source, ["k"], ["v"])  # NOSCRIPT, then loaded
        conn._protocol.transport.abort()  # the link breaks
        await asyncio.sleep(0.01)
        again = await conn.execute("ECHO", "back")  # reconnects by itself
        conn.close()
        return echoes, reloaded, again

    echoes, reloaded, again = asyncio.run(scenario())
    assert echoes == [f"m{i}" for i in range(500)]
    assert (reloaded, again) == ("v-k", "back")


def test_unreachable_redis_is_a_connection_error():
    async def scenario():
        with pytest.raises(redis.ConnectionError):
            await PipelinedRedis("redis://127.0.0.1:1/0").execute("PING")

    asyncio.run(scenario())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_call_path_logs_in_as_callguards_acl_user(acl_redis_url, settings):
    """serve's two connections (redis-py's asyncio client, and this one for the scripts)
    authenticate as the `callguard` user of contrib/redis/callguard.acl and set up a call
    with its rights alone; a key outside its pattern is refused."""
    app = App(dataclasses.replace(settings, redis_url=acl_redis_url))
    upgrade(app.books.engine)
    setup_plan(app)
    prepaid(app)

    async def scenario():
        engine = AsyncEngine(connect_async(app.redis_url), app.ops("n1"),
                             PipelinedRedis(app.redis_url))
        await engine.warm(connections=1)
        decision = await engine.authorize("41441234567", "41901234567", "outbound", "c1",
                                          now_ms=T0)
        with pytest.raises(redis.ResponseError, match="NOPERM"):
            await engine.pipelined.execute("GET", "not-callguards")
        engine.pipelined.close()
        await engine.client.aclose()
        return decision

    try:
        assert asyncio.run(scenario()).allow
    finally:
        app.close()
