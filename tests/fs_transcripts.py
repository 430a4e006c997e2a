"""Wire transcripts recorded from a real FreeSWITCH 1.10.12 (tests/fixtures/freeswitch/*.jsonl).

One JSON line per chunk: {"t": seconds, "dir": "from_fs" | "to_fs", "conn": name, "data": str},
plus {"eof": true, "data": ""} where a side closed its write direction. A scenario may hold
several TCP connections (`conn`): "outbound" is FreeSWITCH's `socket` app connecting to us,
every other name is a client connected to FreeSWITCH's port 8021. All bytes are 7-bit ASCII.
Chunk boundaries are real but incidental: parsers must work on any split of the stream.
Notes: /work/shared/protocol/freeswitch/README.md.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

FIXTURES = Path(__file__).parent / "fixtures" / "freeswitch"
FROM = "from_fs"
TO = "to_fs"


class Chunk(NamedTuple):
    t: float
    dir: str
    conn: str
    data: bytes
    eof: bool = False


def load(name: str) -> list[Chunk]:
    chunks = []
    # Split on b"\n" only: str.splitlines() would also split on U+2028 and friends.
    for line in (FIXTURES / name).read_bytes().split(b"\n"):
        if line.strip():
            row = json.loads(line)
            chunks.append(Chunk(row["t"], row["dir"], row["conn"], row["data"].encode("utf-8"),
                                bool(row.get("eof"))))
    return chunks


def names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.jsonl"))


def conns(name: str) -> list[str]:
    """The connections of one scenario, in order of first appearance."""
    return list(dict.fromkeys(chunk.conn for chunk in load(name)))


def chunks(name: str, conn: str, dir: str) -> list[bytes]:
    """The recorded data chunks of one connection in one direction (eof markers left out)."""
    return [c.data for c in load(name) if c.conn == conn and c.dir == dir and not c.eof]


def stream(name: str, conn: str, dir: str) -> bytes:
    """All bytes sent on one connection in one direction, concatenated."""
    return b"".join(chunks(name, conn, dir))


def streams(dir: str = FROM) -> list[tuple[str, str]]:
    """(file, conn) of every connection of every fixture that carries bytes in `dir`."""
    return [(name, conn) for name in names() for conn in conns(name)
            if stream(name, conn, dir)]


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """data cut at the given offsets (taken modulo len(data) + 1, so any ints will do)."""
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def raw_frames(data: bytes) -> list[bytes]:
    """The stream cut into frames the simple way (header block, then Content-Length bytes),
    independently of ESLReader."""
    frames, pos = [], 0
    while pos < len(data):
        end = data.index(b"\n\n", pos)
        length = re.search(rb"^Content-Length: (\d+)$", data[pos:end], re.M)
        stop = end + 2 + (int(length.group(1)) if length else 0)
        frames.append(data[pos:stop])
        pos = stop
    return frames
