"""Writes to one connection made in one event-loop iteration go out in one send.

A send on loopback costs the sender the receiver's side of TCP too (and a wake-up of
the receiving process); under load many calls write to Redis and to the PBX's event link
in the same iteration, so joining them saves most of those sends. The cost is one
`call_soon` per iteration with something to send, and no added wait: the flush runs
before the loop next polls.
"""

from __future__ import annotations

import asyncio


class CoalescedWrites:
    __slots__ = ("transport", "_chunks", "_loop")

    def __init__(self, transport: asyncio.WriteTransport):
        self.transport = transport
        self._chunks: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data)

    def flush(self) -> None:
        chunks, self._chunks = self._chunks, []
        if chunks and not self.transport.is_closing():
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
