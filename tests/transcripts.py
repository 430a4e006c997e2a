"""Wire transcripts recorded from a real Asterisk 22 (tests/fixtures/asterisk/*.jsonl).

One JSON line per chunk: {"t": seconds, "dir": "from_asterisk" | "to_asterisk", "data": str}.
Chunk boundaries are real but incidental: parsers must work on any split of the stream.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk"
FROM = "from_asterisk"
TO = "to_asterisk"


class Chunk(NamedTuple):
    t: float
    dir: str
    data: bytes


def load(name: str) -> list[Chunk]:
    chunks = []
    # Split on b"\n" only: str.splitlines() would also split on U+2028 and friends.
    for line in (FIXTURES / name).read_bytes().split(b"\n"):
        if line.strip():
            row = json.loads(line)
            chunks.append(Chunk(row["t"], row["dir"], row["data"].encode("utf-8")))
    return chunks


def stream(name: str, dir: str) -> bytes:
    """All bytes sent in one direction, concatenated."""
    return b"".join(chunk.data for chunk in load(name) if chunk.dir == dir)


def kind(name: str) -> str:
    """ "agi" (FastAGI session) or "ami" (AMI connection)."""
    if name.endswith(".agi.jsonl"):
        return "agi"
    if name.endswith(".ami.jsonl") or name.startswith("ami-"):
        return "ami"
    return "agi"


def names(of_kind: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.jsonl") if kind(p.name) == of_kind)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """data cut at the given offsets (taken modulo len(data) + 1, so any ints will do)."""
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
