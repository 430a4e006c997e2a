"""Execute the engine's Calls on Redis, from blocking code (CLI, worker)
or from asyncio. Both only run what `core.Ops` builds; neither holds a rule."""

from __future__ import annotations

import asyncio
from time import perf_counter

from .core import Call, Ops, script_sources

OPERATIONS = ("authorize", "answer", "extend", "commit", "release", "release_channel", "credit",
              "settings")


class _Engine:
    def __init__(self, client, ops: Ops):
        self.client = client
        self.ops = ops
        self.keys = ops.keys
        self.scripts = {name: client.register_script(src) for name, src in script_sources().items()}

    def __getattr__(self, name):
        # engine.authorize(...) == engine.run(ops.authorize(...)), and so on for OPERATIONS.
        if name not in OPERATIONS:
            raise AttributeError(name)
        build = getattr(self.ops, name)
        return lambda *args, **kwargs: self.run(build(*args, **kwargs))


class SyncEngine(_Engine):
    def script(self, name: str, keys: list, args: list):
        """A script that is not a call step (settle, lease, restore)."""
        return self.scripts[name](keys=keys, args=args)

    def run(self, call):
        result = call
        while isinstance(result, Call):  # a reply may ask for a second script (plan retry)
            result = result.parse(self.scripts[result.script](keys=result.keys, args=result.args))
        return result


class AsyncEngine(_Engine):
    """`pipelined` (a PipelinedRedis to the same single Redis) carries the scripts when
    given; `client` (redis-py) does everything else, and all of it on a cluster."""

    def __init__(self, client, ops: Ops, pipelined=None):
        super().__init__(client, ops)
        self.pipelined = pipelined
        self.round_trip: dict = {}  # script name -> a histogram to observe its round trip in

    async def warm(self, connections: int = 8) -> None:
        """Open connections and load the scripts before the first call needs them."""
        await asyncio.gather(*(self.client.ping() for _ in range(connections)))
        for script in self.scripts.values():
            await self.client.script_load(script.script)
        if self.pipelined:
            await self.pipelined.execute("PING")

    async def run(self, call):
        result = call
        while isinstance(result, Call):
            script = self.scripts[result.script]
            started = perf_counter()
            if self.pipelined:
                reply = await self.pipelined.evalsha(script.sha, script.script, result.keys,
                                                     result.args)
            else:
                reply = await script(keys=result.keys, args=result.args)
            timing = self.round_trip.get(result.script)
            if timing is not None:
                timing.observe(perf_counter() - started)
            result = result.parse(reply)
        return result
