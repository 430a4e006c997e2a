"""Real servers that fault tests and drills start, stop and kill themselves: a
private redis-server (never a shared one) and a TCP proxy that can cut or
black-hole the way to a server (PostgreSQL, Redis)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import redis

from ..engine.connect import redis_binary


def free_port(low: int = 10000, high: int = 32000) -> int:
    """A free loopback port for a server another process starts later: drawn below the
    kernel's ephemeral range (32768-60999), where no outgoing connection takes it first."""
    import random

    for port in random.sample(range(low, high), 200):
        if bindable(port):
            return port
    raise RuntimeError("no free port")


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def answers(host: str, port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3) as s:
            if password:
                s.sendall(b"AUTH %s\r\n" % password.encode())
                if not s.recv(5).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(7).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of our own on loopback, with its data (AOF, fsync always) in `home`:
    a SIGKILL loses nothing it acknowledged. `password`: it requires one (given in a file
    of its own, not on its command line)."""

    def __init__(self, home: Path, password: str | None = None):
        self.home = home
        self.password = password
        self.port = free_port()
        self.binary = shutil.which("redis-server") or redis_binary()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=5)

    def start(self) -> RedisServer:
        self.home.mkdir(parents=True, exist_ok=True)
        config = []
        if self.password:
            conf = self.home / "auth.conf"
            conf.touch(mode=0o600)
            conf.write_text(f'requirepass "{self.password}"\n')
            config = [str(conf)]
        self.proc = subprocess.Popen(
            [self.binary, *config, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.home), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", self.port, self.password):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Proxy:
    """TCP proxy on loopback in front of `target`: `cut()` closes every connection and
    refuses new ones (the server stopped), `blackhole()` keeps them open and forwards
    nothing (a dead network), `heal()` lets traffic through again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "up"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == "blackhole" and not self._stop:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self.mode = "cut"
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass
            self._conns.clear()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def heal(self) -> None:
        self.mode = "up"

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()

