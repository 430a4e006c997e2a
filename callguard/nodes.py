"""Node identities: every `serve` and `worker` process holds its own, as a lease in Redis.

A serve process acts only on the sessions it authorised (they carry its node), and a
worker's name is its consumer name on the event streams, so the identity must be
unique among the living and stable across a restart: the restarted process takes
its sessions and its unacknowledged stream entries back. A second process that
claims a live identity is refused at start.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .config import NODE_NAME

log = logging.getLogger(__name__)

TTL_MS = 15_000  # a SIGKILLed holder on another host frees its identity this long after
RENEW_EVERY = 5.0


class NodeClash(RuntimeError):
    """Another live process holds this node identity."""


def default_node(role: str, port: int | None = None) -> str:
    """`host:port` for a server, `host:worker` for a worker. Servers sharing a port
    (SO_REUSEPORT) need CALLGUARD_NODE each; `serve --workers` names its own (workers.py)."""
    host = socket.gethostname().split(".")[0] or "localhost"
    return f"{host}:{port}" if port else f"{host}:{role}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), '' if there is none: a pid
    that was reused (a container's pid 1 restarted) shows another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class Holder:
    host: str
    boot: str
    pid: int
    started: str
    token: str

    @classmethod
    def parse(cls, token: str) -> Holder:
        host, boot, pid, started = (token.split(" ") + ["", "", "0", ""])[:4]
        return cls(host, boot, int(pid) if pid.isdigit() else 0, started, token)

    def dead_here(self) -> bool:
        """True when the holder was a process on this machine that no longer runs."""
        if self.host != socket.gethostname():
            return False
        if self.boot != _boot_id():
            return True  # it ran before this machine rebooted
        return _started(self.pid) != self.started

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


class NodeLease:
    """Hold `name` for as long as this process lives: acquire() once, renew() every few
    seconds, release() on a clean stop. Scripts run through a SyncEngine."""

    def __init__(self, engine, name: str):
        if not NODE_NAME.fullmatch(name or ""):
            raise ValueError(f"node name {name!r}: 1-64 letters, digits and . _ : @ -")
        self.engine, self.name = engine, name
        self.key = engine.keys.node(name)
        pid = os.getpid()
        self.token = (f"{socket.gethostname()} {_boot_id()} {pid} {_started(pid)} "
                      f"{uuid.uuid4().hex[:8]}")

    def _claim(self, ttl_ms: int, replaceable: str = "") -> str:
        return self.engine.script("lease", [self.key], [self.token, ttl_ms, replaceable])

    def acquire(self, wait: float = TTL_MS / 1000) -> None:
        """Take the identity; a dead holder on this host is replaced at once, one on another
        host once its lease ran out (within `wait` seconds); a live one is refused."""
        deadline = time.monotonic() + wait
        while True:
            holder = self._claim(TTL_MS)
            if not holder:
                return
            other = Holder.parse(holder)
            if other.dead_here() and not self._claim(TTL_MS, holder):
                log.info("node %s: took over from %s, which is gone", self.name, other)
                return
            if other.host == socket.gethostname() or time.monotonic() > deadline:
                raise NodeClash(f"node {self.name} is in use by {other}: give each serve and "
                                "worker process its own CALLGUARD_NODE")
            time.sleep(0.5)

    def renew(self) -> None:
        """Keep the identity; NodeClash if another process took it (then stop acting)."""
        holder = self._claim(TTL_MS)
        if holder:
            raise NodeClash(f"node {self.name} was taken over by {Holder.parse(holder)}")

    def release(self) -> None:
        self._claim(0)


def live_nodes(client, keys, names: set[str]) -> set[str]:
    """Which of these node identities are held by a running process."""
    names = sorted(n for n in names if n)
    if not names:
        return set()
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.node(name))
    return {name for name, held in zip(names, pipe.execute(), strict=True) if held}
