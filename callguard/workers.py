"""`serve asterisk|freeswitch --workers N`: N serve processes sharing one call-setup port.

One Python process uses one core. With `--workers N` the command becomes a small parent
that binds nothing and opens neither Redis nor the books: it starts N child `serve`
processes (its own command line, less `--workers`) that all listen on the FastAGI or
outbound ESL port with SO_REUSEPORT, so the kernel spreads new connections among them
and the dialplan stays as it is. Each child is a whole serve process, with its own node
identity, PBX event link, HTTP port and sessions.

- Worker k (1..N) is node BASE for k = 1 and BASE.k after it, BASE being CALLGUARD_NODE
  or the default HOST:PORT: worker 1 is what a single serve would be, so going from one
  process to several resumes its calls. Its HTTP port is CALLGUARD_HTTP_BIND's plus k-1.
- A worker that dies is started again under the same node after a back-off (0.5 s,
  doubled each time it dies within STABLE of its start, at most 10 s). It takes its
  lease over at once (nodes.py: the holder was a process of this host that is gone) and
  the reconcile after its PBX login resumes its calls (control.py), as a restarted
  single serve does. Meanwhile the PBX's own deadline bounds them, as for a single one.
- The parent hears its workers the way systemd hears a unit: their NOTIFY_SOCKET is the
  parent's own socket (sdnotify.py), and the kernel says which process sent each
  datagram. It sends READY=1 to systemd once every worker has, keeps a STATUS= line of
  how many serve, pings systemd's watchdog from its own loop and passes the watchdog
  on: a ready worker that stops pinging is killed, then started again.
- SIGTERM or SIGINT: STOPPING=1, the signal goes on to every worker, each drains as a
  single serve does, and the parent exits once all have stopped, 0 if they all stopped
  cleanly. A worker that dies before all were ready once is a start that failed (a node
  clash, a port taken): the others are stopped and the parent exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import uuid
from dataclasses import dataclass

from . import sdnotify
from .config import NODE_NAME, ConfigError, split_hostport
from .health import DEFAULT_BIND
from .nodes import default_node

log = logging.getLogger(__name__)

STABLE = 30.0  # seconds: a worker that ran this long before it died is restarted quickly
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
# The HTTP ports of the shipped units (contrib/systemd/): a worker's there would take the
# port from that process or lose it to it, its metrics gone either way.
SHIPPED_HTTP = {9464: "callguard-asterisk", 9465: "callguard-worker",
                9466: "callguard-freeswitch", 9467: "callguard-api"}
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
PR_SET_PDEATHSIG = 1
# How a worker that was asked to stop may end, as systemd counts a clean stop: drained
# (0), or killed by the signal itself while it was still starting (nothing to drain).
CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)


@dataclass(frozen=True)
class Slot:
    """What worker `number` is, in every one of its lives."""

    number: int
    node: str
    http_bind: str


def plan(settings, pbx: str, bind_setting: str, workers: int) -> list[Slot]:
    """The workers' nodes and HTTP binds; ConfigError when they cannot work."""
    host, port = split_hostport(getattr(settings, bind_setting))
    if port == 0:
        raise ConfigError(f"--workers shares one port: CALLGUARD_{bind_setting.upper()} "
                          "needs a port other than 0")
    base = settings.node or default_node(pbx, port)
    http = settings.http_bind or DEFAULT_BIND["serve"]
    first = None if http == "off" else split_hostport(http)
    if first and first[1]:
        last = first[1] + workers - 1
        clash = [p for p in range(first[1] + 1, last + 1) if p in SHIPPED_HTTP]
        if clash or last > 65535:
            why = (f"{clash[0]} is {SHIPPED_HTTP[clash[0]]}'s in contrib/systemd/" if clash
                   else "the last is past 65535")
            raise ConfigError(f"--workers {workers} serves HTTP on ports {first[1]}-{last} "
                              f"(worker k on CALLGUARD_HTTP_BIND's port + k - 1), and {why}: "
                              f"set CALLGUARD_HTTP_BIND to the first of {workers} free ports "
                              "(e.g. 127.0.0.1:9470), or to off")
    slots = []
    for number in range(1, workers + 1):
        node = base if number == 1 else f"{base}.{number}"
        if not NODE_NAME.fullmatch(node):
            raise ConfigError(f"node name {node!r} of worker {number}: at most 64 letters, "
                              "digits and . _ : @ - (set a shorter CALLGUARD_NODE)")
        slots.append(Slot(number, node, _http_bind(first, number)))
    return slots


def _http_bind(first: tuple[str, int] | None, number: int) -> str:
    if first is None:
        return "off"
    host, port = first
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + number - 1 if port else 0}"


def child_of(parent: int) -> bool:
    """In a worker: a SIGTERM (a drain) when the parent dies, however it dies; False when
    it is gone already (nobody would restart this worker)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's stop only
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


class Worker:
    """One slot's process, restarted as it dies."""

    def __init__(self, slot: Slot):
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0  # loop time of this life's start
        self.ready = False  # this life said READY=1
        self.pinged = 0.0  # loop time of its last watchdog ping
        self.young_deaths = 0  # deaths in a row, each within STABLE of its start
        self.stopped: int | None = None  # exit status once stopped by the parent

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def __str__(self) -> str:
        pid = f", pid {self.proc.pid}" if self.proc else ""
        return f"worker {self.slot.number} (node {self.slot.node}{pid})"


def exited(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


class Parent:
    """Runs `command` (the serve command line, less --workers) once per slot."""

    def __init__(self, command: list[str], slots: list[Slot], serving: str):
        self.command, self.serving = command, serving
        self.workers = [Worker(slot) for slot in slots]
        self.watchdog = sdnotify.watchdog_timeout()
        self.stopping = asyncio.Event()
        self.all_ready = False  # every worker was ready once: the start is over
        self.failed = False
        self.name = f"callguard-workers-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.sock: socket.socket | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        # The abstract namespace: no file to leave behind; anyone on the host may send to
        # it, so a datagram counts only from a worker's own pid, as the kernel tells it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + self.name.encode())
        loop.add_reader(self.sock.fileno(), self._heard)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        beside = [asyncio.ensure_future(sdnotify.watchdog_loop())]
        if self.watchdog:
            beside.append(asyncio.ensure_future(self._watch()))
        try:
            await asyncio.gather(*(self._keep(w) for w in self.workers))
        finally:
            for task in beside:
                task.cancel()
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if self.failed:
            return 1
        return 0 if all(w.stopped in (*CLEAN, None) for w in self.workers) else 1

    def stop(self, sig: int | None = None) -> None:
        if not self.stopping.is_set():
            if sig is not None:
                log.info("stopping (%s): every worker drains its calls and stops",
                         signal.Signals(sig).name)
            sdnotify.stopping(f"stopping {len(self.workers)} workers")
            self.stopping.set()
        for worker in self.workers:
            self._terminate(worker)

    @staticmethod
    def _terminate(worker: Worker) -> None:
        if worker.running:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)

    async def _keep(self, worker: Worker) -> None:
        """Run the worker until the parent stops; each death, a restart after a back-off."""
        loop = asyncio.get_running_loop()
        while True:
            await self._start(worker)
            status = await worker.proc.wait()
            worker.ready = False
            if status in CLEAN and not self.stopping.is_set():
                # A clean stop the parent did not ask for is most likely systemd's SIGTERM
                # to the whole unit, the parent's own on its way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), BACKOFF_FIRST)
            if self.stopping.is_set():
                worker.stopped = status
                if status not in CLEAN:
                    log.warning("%s %s while stopping", worker, exited(status))
                return
            if not self.all_ready:
                log.error("%s %s before every worker was ready: stopping the others",
                          worker, exited(status))
                self.failed = True
                self.stop()
                return
            ran = loop.time() - worker.started
            if ran >= STABLE:
                worker.young_deaths = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** worker.young_deaths)
            worker.young_deaths += 1
            log.error("%s %s after %.1f s; starting it again in %.1f s under the same node "
                      "(it resumes its calls; the others' are not touched)",
                      worker, exited(status), ran, delay)
            self._status()
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return  # stopped during the back-off
            except TimeoutError:
                pass

    async def _start(self, worker: Worker) -> None:
        slot = worker.slot
        env = dict(os.environ)
        env.update(CALLGUARD_NODE=slot.node, CALLGUARD_HTTP_BIND=slot.http_bind,
                   CALLGUARD_REUSE_PORT="1", NOTIFY_SOCKET="@" + self.name)
        env.pop("WATCHDOG_PID", None)  # systemd's names the parent: the worker would not ping
        env.pop("WATCHDOG_USEC", None)
        if self.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.watchdog * 1_000_000))
        worker.proc = await asyncio.create_subprocess_exec(
            *self.command, "--slot", str(slot.number), "--parent", str(os.getpid()), env=env)
        worker.started = worker.pinged = asyncio.get_running_loop().time()
        worker.stopped = None
        log.info("%s started (HTTP %s)", worker, slot.http_bind)
        if self.stopping.is_set():
            self._terminate(worker)  # the stop came while it was being started

    def _heard(self) -> None:
        """Datagrams from the workers' sdnotify: READY=1, WATCHDOG=1 (the rest is theirs)."""
        now = asyncio.get_running_loop().time()
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = next((UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                        and len(d) >= UCRED.size), None)
            worker = next((w for w in self.workers if w.running and w.proc.pid == pid), None)
            if worker is None:
                continue  # not from one of ours
            lines = data.decode(errors="replace").split("\n")
            if "WATCHDOG=1" in lines:
                worker.pinged = now
            if "READY=1" in lines and not worker.ready:
                worker.ready, worker.pinged = True, now
                self._ready(worker)

    def _ready(self, worker: Worker) -> None:
        if self.all_ready:
            log.info("%s serves again", worker)
            self._status()
        elif all(w.ready for w in self.workers):
            self.all_ready = True
            log.info("callguard serving %s with %d workers (nodes %s)", self.serving,
                     len(self.workers), ", ".join(w.slot.node for w in self.workers))
            sdnotify.ready(self._line())

    def _line(self) -> str:
        ready = sum(w.ready for w in self.workers)
        line = f"serving {self.serving} with {ready} of {len(self.workers)} workers"
        down = [str(w.slot.number) for w in self.workers if not w.ready]
        return line + (f" (not ready: {', '.join(down)})" if down else "")

    def _status(self) -> None:
        if self.all_ready and not self.stopping.is_set():
            sdnotify.status(self._line())

    async def _watch(self) -> None:
        """systemd's watchdog, passed on: a ready worker silent that long is killed."""
        while True:
            await asyncio.sleep(self.watchdog / 4)
            now = asyncio.get_running_loop().time()
            for worker in self.workers:
                if worker.running and worker.ready and now - worker.pinged > self.watchdog:
                    log.error("%s sent no watchdog ping for %g s: killing it", worker,
                              self.watchdog)
                    worker.ready = False
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.kill()


def serve(command: list[str], slots: list[Slot], serving: str) -> int:
    """Run the workers until SIGTERM/SIGINT; the exit status."""
    return asyncio.run(Parent(command, slots, serving).run())
