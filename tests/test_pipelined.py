"""The lean call-path connection against real Redis: order, errors, reconnects."""

from __future__ import annotations

import asyncio

import pytest
import redis

from callguard.engine.pipelined import PipelinedRedis, _pack


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
