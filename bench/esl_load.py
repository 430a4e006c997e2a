"""Open-loop outbound-ESL load against `callguard serve freeswitch` (or a baseline).

The generator plays FreeSWITCH's `socket 127.0.0.1:8084 async full` application as
the simulated FreeSWITCH does it (callguard/simulator/freeswitch.py, `_socket`,
`_outbound_command`, `_park`; bytes as in tests/fixtures/freeswitch): connect, read
`connect`, write the connect reply (the channel's whole CHANNEL_DATA header block,
a fresh uuid per call, one of --accounts prepaid accounts as its accountcode,
callguard_direction=outbound as the shipped dialplan sets it), answer `myevents`,
each `sendmsg` (`+OK`), `api sched_hangup` (`+OK`), and `exit` (`+OK bye`, the
disconnect notice, close). With `myevents` on, each `sendmsg execute` (`set`, or
`multiset` as callguard writes since 21e27e2) is
followed by the CHANNEL_EXECUTE and CHANNEL_EXECUTE_COMPLETE events FreeSWITCH's
park loop sends (the variable set in between; one CHANNEL_PARK before the first),
but at once: the park loop's 20 ms tick is skipped, so latency here is callguard's
own, not the tick's. A `sendmsg hangup` (a deny) ends the call as FreeSWITCH does.
Frames come from the simulator's recorded templates, pre-split at the per-call
fields so the generator stays cheap; they are checked byte for byte against the
simulator's own at start-up.

A call succeeds when callguard_result=ALLOW was set before `exit`; its setup latency
is from the connect to the server's `exit`. Connection starts are scheduled at fixed
times (open loop); the generator reports how far behind its schedule it fell.

Targets (each in its own process):

  callguard  `callguard serve freeswitch` on a throwaway installation, supervising
             over inbound ESL to a simulated FreeSWITCH in a thread of this process
             (auth, events, api; without it fail_closed denies every call); after
             each run, not measured, the CHANNEL_HANGUP_COMPLETE event of every
             allowed call goes over that link and the sessions are dropped
  minimal    bench/minimal_esl.py: sends connect, reads the reply, writes the same
             five `sendmsg execute set` (--minimal-multiset: one `multiset`, as
             callguard now does) and `exit` without waiting for anything, no Redis,
             no myevents (so no events): the outbound ESL floor

Examples:
  .venv/bin/python bench/esl_load.py --rate 1000 --duration 20 --runs 3
  .venv/bin/python bench/esl_load.py --target minimal --rate 1000 --duration 20
  .venv/bin/python bench/esl_load.py --find-max
  .venv/bin/python bench/esl_load.py --quick

Pinned by default where taskset exists (--no-pin): this generator on CPU 0, the
servers on CPU 1 (and Redis, unless it is the machine's shared one). With the callguard
target the floor (minimal_esl.py --multiset, the same writes as callguard) is measured
in the same invocation, its runs in turn with callguard's, and printed beside it
(--no-floor). The RESULT and the whole output are kept in bench/results/
(--results-dir, --no-results); bench/compare.py compares two.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import os
import re
import sys
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from agi_load import (  # noqa: E402  the same meters and search as the FastAGI bench
    Side,
    Stats,
    find_max_interleaved,
    finish_run,
    gen_cpu,
    run_once,
    runs_at_rate,
)
from common import (  # noqa: E402
    BenchEnv,
    Subprocess,
    emit_json,
    print_machine,
    print_table,
)

from callguard.protocol import esl  # noqa: E402
from callguard.simulator.freeswitch import (  # noqa: E402
    CAUSES,
    GOODBYE,
    SimChannel,
    SimulatedFreeSWITCH,
)

MIN_SLEEP = 0.001  # the generator's scheduling quantum (agi_load.Generator.run)
SOCKET_DATA = "127.0.0.1:8084 async full"  # the shipped dialplan's socket line


# -- FreeSWITCH's frames, fast ------------------------------------------------------------

_SLOT = re.compile(rb"ZQ([a-z0-9]+)QZ")
_SAFE = re.compile(r"[A-Za-z0-9._/,-]*")  # what switch_url_encode leaves as it is


def _ph(name: str) -> str:
    """A placeholder that url_encode leaves alone."""
    return f"ZQ{name}QZ"


def enc(value: str) -> bytes:
    """url_encode, with a fast path for the values that need none."""
    if _SAFE.fullmatch(value):
        return value.encode()
    return esl.url_encode(value).encode()


def var_line(name: str, value: str) -> bytes:
    return b"variable_" + name.encode() + b": " + enc(value) + b"\n"


class FrameTemplates:
    """The simulator's frames (SimulatedFreeSWITCH.headers / event_frame / _connect_reply)
    as literal pieces between per-call slots: uuid, name, acct, dest, now, seq, created,
    answered, hungup (the times it rewrites), vars (the channel's variable lines) and
    the extras of each kind. Filling one is a join, not ~100 url_encodes."""

    EXTRAS = {
        "CHANNEL_CREATE": {},
        "CHANNEL_PARK": {},
        "CHANNEL_EXECUTE": {"Application": _ph("app"), "Application-Data": _ph("arg"),
                            "Application-UUID": _ph("auuid")},
        "CHANNEL_EXECUTE_COMPLETE": {"Application": _ph("app"), "Application-Data": _ph("arg"),
                                     "Application-UUID": _ph("auuid"),
                                     "Application-Response": "_none_"},
        "CHANNEL_ANSWER": {},
        "CHANNEL_HANGUP_COMPLETE": {
            "Hangup-Cause": _ph("cause"), "variable_hangup_cause": _ph("cause"),
            "variable_hangup_cause_q850": _ph("qcause"), "variable_billsec": _ph("billsec"),
            "variable_billmsec": _ph("billmsec"), "variable_billusec": _ph("billusec")},
    }
    STATE = {"CHANNEL_ANSWER": "answered", "CHANNEL_HANGUP_COMPLETE": "hangup"}
    TIMES = {"Event-Date-Timestamp": "now", "Event-Sequence": "seq",
             "Caller-Channel-Created-Time": "created", "Caller-Profile-Created-Time": "created",
             "Caller-Channel-Answered-Time": "answered", "Caller-Channel-Hangup-Time": "hungup"}

    def __init__(self, sim: SimulatedFreeSWITCH | None = None):
        self.sim = sim or SimulatedFreeSWITCH(outbound_port=0)
        self.pieces: dict[str, tuple[tuple[bytes, ...], tuple[str, ...]]] = {}
        for kind, extra in self.EXTRAS.items():
            self.pieces[kind] = self._split(self._lines(self._headers(kind, extra)) + b"\n")
        headers = [(n, v) for n, v in self._headers("CHANNEL_DATA", {}) if n not in (
            "Content-Type", "Reply-Text", "Socket-Mode", "Control")]
        headers += [("Content-Type", "command/reply"), ("Reply-Text", "+OK\n"),
                    ("Socket-Mode", "async"), ("Control", "full")]
        self.pieces["connect"] = self._split(self._lines(headers) + b"\n")
        self.seq = itertools.count(1_000_000)

    def _headers(self, kind: str, extra: dict[str, str]) -> list[tuple[str, str]]:
        channel = SimChannel(_ph("uuid"), _ph("name"), _ph("acct"), _ph("dest"),
                             {_ph("vars"): ""}, state=self.STATE.get(kind, "ringing"))
        headers = self.sim.headers(kind, channel, **extra)
        return [(n, _ph(self.TIMES[n]) if n in self.TIMES else v) for n, v in headers]

    @staticmethod
    def _lines(headers) -> bytes:
        data = "".join(f"{n}: {esl.url_encode(v)}\n" for n, v in headers).encode()
        return data.replace(b"variable_" + _ph("vars").encode() + b": \n", _ph("vars").encode())

    @staticmethod
    def _split(data: bytes):
        parts = _SLOT.split(data)
        return tuple(parts[0::2]), tuple(p.decode() for p in parts[1::2])

    def fill(self, kind: str, values: dict[str, bytes]) -> bytes:
        literals, names = self.pieces[kind]
        out = [literals[0]]
        for name, literal in zip(names, literals[1:]):  # noqa: B905 - one more literal
            out.append(values[name])
            out.append(literal)
        return b"".join(out)

    def event(self, kind: str, values: dict[str, bytes]) -> bytes:
        body = self.fill(kind, values)
        return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body

    def values(self, channel: SimChannel, now_us: int | None = None) -> dict[str, bytes]:
        """The slots of a SimChannel (as the simulator would write it now)."""
        sim = self.sim
        return {
            "uuid": channel.uuid.encode(), "name": enc(channel.name),
            "acct": enc(channel.account), "dest": enc(channel.dest),
            "now": str(now_us if now_us is not None else sim.micros(sim.clock.monotonic())
                       ).encode(),
            "seq": str(next(self.seq)).encode(),
            "created": sim.micros(channel.created_at).encode(),
            "answered": sim.micros(channel.answered_at).encode(),
            "hungup": sim.micros(channel.ended_at).encode(),
            "vars": b"".join(var_line(k, v) for k, v in channel.variables.items()),
        }

    def hangup_complete(self, channel: SimChannel, cause: str = "NORMAL_CLEARING") -> bytes:
        """CHANNEL_HANGUP_COMPLETE of a channel, as SimulatedFreeSWITCH.hangup writes it."""
        talk_ms = 0 if channel.answered_at is None or channel.ended_at is None else int(
            (channel.ended_at - channel.answered_at) * 1000)
        q850 = CAUSES.get(cause, 16)
        values = self.values(channel)
        values.update(cause=enc(cause), qcause=str(q850 if q850 <= 127 else 16).encode(),
                      billsec=str(-(-talk_ms // 1000)).encode(),
                      billmsec=str(talk_ms).encode(), billusec=str(talk_ms * 1000).encode())
        return self.event("CHANNEL_HANGUP_COMPLETE", values)

    def check(self) -> None:
        """Byte for byte against the simulator's own frames, or raise."""
        sim = self.sim
        channel = SimChannel(str(uuidlib.uuid4()), "sofia/internal/7@pbx1", "41440000007",
                             common.PREMIUM_NUMBER,
                             {"accountcode": "41440000007", "callguard_direction": "outbound",
                              "callguard_session": "41440000007/x y:z"},
                             created_at=sim.clock.monotonic() - 1.5)

        def same(kind: str, ours: bytes, theirs: bytes) -> None:
            if ours != theirs:
                raise AssertionError(f"{kind}: the generator's frame differs from the "
                                     f"simulator's:\n{ours[:300]!r}\n{theirs[:300]!r}")

        def fields(theirs: bytes) -> dict[str, bytes]:
            return {"now": re.search(rb"\nEvent-Date-Timestamp: (\d+)\n", theirs)[1],
                    "seq": re.search(rb"\nEvent-Sequence: (\d+)\n", theirs)[1]}

        from callguard.simulator.freeswitch import notice as sim_notice

        same("notice", notice(channel.uuid.encode()),
             sim_notice(("Controlled-Session-UUID", channel.uuid),
                        ("Content-Disposition", "disconnect")))
        theirs = sim._connect_reply(channel, ["async", "full"])
        same("connect", self.fill("connect", {**self.values(channel), **fields(theirs)}),
             theirs)
        for kind in ("CHANNEL_CREATE", "CHANNEL_PARK", "CHANNEL_EXECUTE",
                     "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE"):
            if kind == "CHANNEL_ANSWER":
                channel.answered_at, channel.state = sim.clock.monotonic() - 1.0, "answered"
            extra = {}
            if kind.startswith("CHANNEL_EXECUTE"):
                extra = {"Application": "set", "Application-Data": "callguard_result=ALLOW",
                         "Application-UUID": str(uuidlib.uuid4())}
                if kind == "CHANNEL_EXECUTE_COMPLETE":
                    extra["Application-Response"] = "_none_"
            if kind == "CHANNEL_HANGUP_COMPLETE":
                channel.ended_at, channel.state = sim.clock.monotonic(), "hangup"
                extra = {"Hangup-Cause": "NORMAL_CLEARING",
                         "variable_hangup_cause": "NORMAL_CLEARING",
                         "variable_hangup_cause_q850": "16", "variable_billsec": "1",
                         "variable_billmsec": "1000", "variable_billusec": "1000000"}
            theirs = esl.event_frame(sim.headers(kind, channel, **extra))
            values = {**self.values(channel), **fields(theirs)}
            values.update(app=b"set", arg=enc("callguard_result=ALLOW"),
                          auuid=extra.get("Application-UUID", "").encode(),
                          cause=b"NORMAL_CLEARING", qcause=b"16", billsec=b"1",
                          billmsec=b"1000", billusec=b"1000000")
            same(kind, self.event(kind, values), theirs)


# -- the generator: FreeSWITCH's socket application --------------------------------------

OK = esl.frame("command/reply", headers=(("Reply-Text", "+OK"),))
EVENTS_ENABLED = esl.frame("command/reply", headers=(("Reply-Text", "+OK Events Enabled"),))
LINGER = esl.frame("command/reply", headers=(("Reply-Text", "+OK will linger"),))
NOLINGER = esl.frame("command/reply", headers=(("Reply-Text", "+OK will not linger"),))
BYE = esl.frame("command/reply", headers=(("Reply-Text", "+OK bye"),))
API_OK = esl.frame("api/response", b"+OK\n")
API_DELETED_NONE = esl.frame("api/response", b"+OK Deleted: 0\n")
API_ERR = esl.frame("api/response", b"-ERR Command not found!\n")
UNKNOWN = esl.frame("command/reply", headers=(("Reply-Text", "-ERR command not found"),))


def notice(uuid: bytes) -> bytes:
    return (b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: " + uuid
            + b"\nContent-Disposition: disconnect\nContent-Length: %d\n\n" % len(GOODBYE)
            + GOODBYE)


class ESLCall(asyncio.Protocol):
    """One `socket` connection, FreeSWITCH's side."""

    __slots__ = ("gen", "stats", "scheduled", "launched", "transport", "buffer", "values",
                 "connected", "myevents", "parked", "allowed", "reason", "finished",
                 "record", "variables")

    def __init__(self, gen: Generator, stats: Stats, scheduled: float, launched: float,
                 values: dict[str, bytes], record):
        self.gen, self.stats = gen, stats
        self.scheduled, self.launched = scheduled, launched
        self.values = values
        self.record = record
        self.transport = None
        self.buffer = b""
        self.connected = self.myevents = self.parked = self.allowed = self.finished = False
        self.reason = ""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *commands, self.buffer = (self.buffer + data).split(b"\n\n")
        out = []
        events = []
        for block in commands:
            line, _, rest = block.partition(b"\n")
            if not self.connected:
                if line != b"connect":
                    self.stats.errors["esl_not_connect_first"] += 1
                    self._close("bad_first_command")
                    return
                self.connected = True
                out.append(self.gen.templates.fill("connect", self.values))
            elif line == b"myevents":
                self.myevents = True
                out.append(EVENTS_ENABLED)
            elif line == b"sendmsg":
                headers = dict(h.split(b": ", 1) for h in rest.split(b"\n") if b": " in h)
                kind = headers.get(b"call-command")
                out.append(OK)
                if kind == b"execute":
                    self._execute(headers, events)
                elif kind == b"hangup":
                    # A deny: FreeSWITCH hangs the channel up and says goodbye.
                    self.transport.write(b"".join(out + events) + notice(self.values["uuid"]))
                    self._finish("deny_" + (self.reason or "no_result"))
                    self.transport.close()
                    return
                else:
                    self.stats.errors["esl_bad_sendmsg"] += 1
            elif line.startswith(b"api "):
                # As SimulatedFreeSWITCH.api answers them for a fresh channel.
                if line.startswith(b"api sched_hangup "):
                    out.append(API_OK)
                elif line.startswith(b"api sched_del "):
                    out.append(API_DELETED_NONE)
                else:
                    self.stats.errors["esl_unknown_api"] += 1
                    out.append(API_ERR)
            elif line == b"exit":
                self._finish("" if self.allowed else
                             "deny_" + (self.reason or "no_result"))
                self.transport.write(b"".join(out + events) + BYE + notice(self.values["uuid"]))
                self.transport.close()
                return
            elif line in (b"linger", b"nolinger"):
                out.append(LINGER if line == b"linger" else NOLINGER)
            else:
                self.stats.errors["esl_unknown_command"] += 1
                out.append(UNKNOWN)
        if out or events:
            self.transport.write(b"".join(out + events))

    def _execute(self, headers: dict[bytes, bytes], events: list[bytes]) -> None:
        """The park loop runs a queued `set` or `multiset` (here at once, without the 20 ms
        tick)."""
        app = headers.get(b"execute-app-name", b"")
        arg = headers.get(b"execute-app-arg", b"").decode("utf-8", "replace")
        if app == b"multiset":
            # space-separated, or "^^X" then X-separated (mod_dptools), as the simulator
            pairs = arg[3:].split(arg[2]) if arg.startswith("^^") and len(arg) > 2 \
                else arg.split(" ")
        elif app == b"set":
            pairs = [arg]
        else:
            pairs = []
            self.stats.errors["esl_execute_not_set"] += 1
        values = self.values
        if self.myevents:
            templates = self.gen.templates
            if not self.parked:
                self.parked = True
                values["seq"] = b"%d" % next(templates.seq)
                events.append(templates.event("CHANNEL_PARK", values))
            values["app"], values["arg"] = app, enc(arg)
            values["auuid"] = self.gen.app_uuid()
            values["seq"] = b"%d" % next(templates.seq)
            events.append(templates.event("CHANNEL_EXECUTE", values))
        for pair in pairs:
            name, _, value = pair.partition("=")
            values["vars"] += var_line(name, value)
            if name == "callguard_result":
                self.allowed = value == "ALLOW"
            elif name == "callguard_reason":
                self.reason = value
        if self.myevents:
            values["seq"] = b"%d" % next(self.gen.templates.seq)
            events.append(self.gen.templates.event("CHANNEL_EXECUTE_COMPLETE", values))

    def _finish(self, error: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.outstanding.discard(self)
        if not error and self.record is not None:
            self.gen.placed.append(self.record)  # allowed: its HANGUP_COMPLETE comes later
        self.stats.done(self.scheduled, self.launched, not error, error)

    def _close(self, error: str) -> None:
        self._finish(error)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.finished:
            self._finish("closed_before_exit" if exc is None else
                         f"reset:{type(exc).__name__}")

    def abort(self) -> None:
        if not self.finished:
            self._finish("timeout")
            if self.transport is not None:
                self.transport.abort()


def tcp_counters() -> dict[str, int]:
    """The machine's TCP retransmissions and listen-queue drops (a SYN dropped at a full
    accept queue is retried after 1 s: a 1 s latency tail)."""
    out = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2]):  # noqa: B905
            kind, names = names.split(":", 1)
            for name, value in zip(names.split(), values.split(":", 1)[1].split()):  # noqa: B905
                if (kind, name) in (("Tcp", "RetransSegs"), ("TcpExt", "ListenOverflows"),
                                    ("TcpExt", "ListenDrops"), ("TcpExt", "TCPSynRetrans")):
                    out[name] = int(value)
    return out


class Generator:
    """Starts one `socket` connection at each scheduled time; never waits for one."""

    def __init__(self, args, port: int, accounts: list[str],
                 peer: common.ThreadedFreeSWITCH | None = None):
        self.args = args
        self.peer = peer  # the inbound ESL peer: sends each channel's CHANNEL_CREATE
        self.port = port
        self.accounts = accounts or ["41440000000"]
        self.templates = FrameTemplates()
        self.templates.check()
        self.seq = 0
        self._app_uuid = itertools.count(1)
        self._app_prefix = uuidlib.uuid4().hex[:8]
        self.drop_sessions = None  # set when the bench owns the accounts and the ESL peer
        self.placed: list[SimChannel] = []  # allowed calls since the last end_calls

    def app_uuid(self) -> bytes:
        return b"%s-0000-4000-8000-%012x" % (self._app_prefix.encode(), next(self._app_uuid))

    def new_call(self) -> tuple[dict[str, bytes], SimChannel]:
        self.seq += 1
        account = self.accounts[self.seq % len(self.accounts)]
        t = self.templates.sim.clock.monotonic()
        channel = SimChannel(str(uuidlib.uuid4()), f"sofia/internal/{self.seq}@pbx1", account,
                             common.PREMIUM_NUMBER,
                             {"accountcode": account, "callguard_direction": "outbound"},
                             created_at=t)
        values = self.templates.values(channel)
        return values, channel

    async def _connect(self, proto: ESLCall) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: proto, "127.0.0.1", self.port)
        except OSError as exc:
            proto._finish("connect:" + (errno.errorcode.get(exc.errno or 0)
                                        or type(exc).__name__))

    async def run(self, rate: float, duration: float) -> dict:
        loop = asyncio.get_running_loop()
        stats = Stats()
        total = max(1, int(rate * duration))
        interval = 1.0 / rate
        pending_tasks: set[asyncio.Task] = set()
        cpu0, wall0, tcp0 = gen_cpu(), time.perf_counter(), tcp_counters()
        t0 = time.perf_counter() + 0.05
        stats.first_scheduled = t0
        i = 0
        created: list[bytes] = []
        while i < total:
            now = time.perf_counter()
            due = t0 + i * interval
            if due > now:
                # 1 ms timers: a shorter sleep would spin; the lag this adds is measured.
                await asyncio.sleep(max(due - now, MIN_SLEEP))
                continue
            while i < total and t0 + i * interval <= now:
                scheduled = t0 + i * interval
                values, channel = self.new_call()
                if self.peer:
                    created.append(self.templates.event("CHANNEL_CREATE", values))
                launched = time.perf_counter()
                stats.lag.append(launched - scheduled)
                proto = ESLCall(self, stats, scheduled, launched, values, channel)
                stats.outstanding.add(proto)
                task = loop.create_task(self._connect(proto))
                pending_tasks.add(task)
                task.add_done_callback(pending_tasks.discard)
                i += 1
            if created:
                # FreeSWITCH's CHANNEL_CREATE of each channel, racing its socket connection.
                self.peer.announce(b"".join(created))
                created = []
        schedule_end = time.perf_counter()
        result = await finish_run(stats, pending_tasks, rate, duration, total, t0, wall0,
                                  schedule_end, cpu0)
        result["tcp"] = {k: v - tcp0.get(k, 0) for k, v in tcp_counters().items()}
        return result


# -- the server under test ---------------------------------------------------------------

def start_py_spy(path: str | None, server: Subprocess | None, duration: float):
    """agi_load's, with the py-spy binary from $PY_SPY when it is not next to Python."""
    if not path or server is None:
        return None
    import subprocess

    exe = os.environ.get("PY_SPY") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}.get(
        Path(path).suffix, "raw")
    proc = subprocess.Popen([exe, "record", "--pid", str(server.pid), "--output", path,
                             "--format", fmt, "--rate", "250", "--nonblocking",
                             "--duration", str(max(1, int(duration)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    return proc


def start_target(args, env: BenchEnv, peer: common.ThreadedFreeSWITCH | None,
                 target: str | None = None) -> Subprocess:
    target = target or args.target
    port = (args.port if target == args.target else 0) or common.free_port()
    cpu = args.pinning["server"]
    if target == "callguard":
        server = common.serve_freeswitch(env, port, esl_url=peer.esl_url, cpu=cpu,
                                         **common.server_env(args))
        server.start()
        deadline = time.monotonic() + 30
        while not (peer.logged_in() and peer.commands("api show channels as json")):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise RuntimeError("the serve process did not log in to ESL and reconcile:\n"
                                   + server.log_tail())
            time.sleep(0.05)
        return server
    # The floor beside callguard writes what callguard writes: one multiset.
    multiset = args.minimal_multiset or target != args.target
    argv = [sys.executable, str(Path(__file__).with_name("minimal_esl.py")),
            "--port", str(port)] + (["--myevents"] if args.minimal_myevents else []) \
        + (["--multiset"] if multiset else [])
    extra = common.server_env(args)
    server = Subprocess(argv, {**os.environ, **extra} if extra else None,
                        env.tmp / f"minimal-esl-{port}.log", port, cpu=cpu)
    return server.start()


def end_calls(gen: Generator, env: BenchEnv, peer: common.ThreadedFreeSWITCH,
              timeout: float = 120.0) -> None:
    """After a run, not measured: the CHANNEL_HANGUP_COMPLETE of each allowed call over the
    inbound link, as FreeSWITCH sends it (serve commits and stops tracking the call), then
    the sessions are dropped as agi_load does."""
    placed, gen.placed = gen.placed, []
    if placed:
        now = gen.templates.sim.clock.monotonic()
        frames = []
        for channel in placed:
            channel.ended_at, channel.state = now, "hangup"
            frames.append(gen.templates.hangup_complete(channel))
        peer.send_events(frames)
        deadline = time.monotonic() + timeout
        while env.redis_totals()["channels"]:
            if time.monotonic() > deadline:
                print(f"# {env.redis_totals()['channels']} channel(s) still held "
                      f"{timeout:g} s after the HANGUP_COMPLETE events", flush=True)
                break
            time.sleep(0.05)
    env.drop_sessions()


ROW = ["run", "rate", "sent", "ok", "errors", "achieved", "lat_med_ms", "lat_p99_ms",
       "lat_max_ms", "lag_p99_ms", "gen_cpu", "cpu_server", "cpu_server_sys",
       "srv_us_per_call", "srv_rss_mb", "cpu_redis", "redis_us_per_call", "cpu_softirq",
       "cpu_steal", "cpu_other"]


def print_runs(rows: list[dict], title: str) -> None:
    print_table(rows, ROW, title)
    for r in rows:
        if r["error_kinds"]:
            print(f"  run {r.get('run')}: errors {r['error_kinds']}")
        if any(r.get("tcp", {}).get(k) for k in ("TCPSynRetrans", "ListenOverflows")):
            print(f"  run {r.get('run')}: TCP (whole machine) {r['tcp']}")
        if r["generator_bound"]:
            print(f"  run {r.get('run')}: GENERATOR-BOUND (lag p99 {r['lag_p99_ms']:.1f} ms, "
                  f"generator CPU {r['gen_cpu']:.2f}): the figure understates the server")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("callguard", "minimal"), default="callguard")
    parser.add_argument("--no-floor", action="store_true",
                        help="callguard: do not measure the floor (minimal_esl.py --multiset) "
                             "in the same invocation (by default each callguard run is followed "
                             "by a floor run at the same rate, printed side by side)")
    parser.add_argument("--rate", type=float, default=1000.0, help="calls per second (1000)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run (20)")
    parser.add_argument("--runs", type=int, default=3, help="repeat each measurement (3)")
    parser.add_argument("--accounts", type=int, default=100,
                        help="prepaid accounts the calls rotate over (100)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of load at min(rate, 500)/s before measuring (2)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs (2)")
    parser.add_argument("--find-max", action="store_true",
                        help="step the rate up until errors or achieved < 95%% of the rate")
    parser.add_argument("--start-rate", type=float, default=500.0, help="find-max: first rate")
    parser.add_argument("--step", type=float, default=250.0,
                        help="find-max: rate increment per step (250)")
    parser.add_argument("--max-rate", type=float, default=20000.0, help="find-max: stop here")
    parser.add_argument("--step-seconds", type=float, default=10.0,
                        help="find-max: seconds per step (10)")
    parser.add_argument("--refine", type=int, default=2,
                        help="find-max: bisection steps between the last good and first bad "
                             "rate (2)")
    parser.add_argument("--max-error-rate", type=float, default=0.0,
                        help="find-max: fraction of errors still counted as sustained (0)")
    parser.add_argument("--port", type=int, default=0,
                        help="outbound ESL port (default: a free one)")
    common.add_pin_args(parser)
    parser.add_argument("--no-uvloop", action="store_true", help="generator: plain asyncio")
    parser.add_argument("--minimal-myevents", action="store_true",
                        help="minimal target and the floor: send myevents too (the "
                             "generator then sends the park loop's events, which the server "
                             "reads and drops)")
    parser.add_argument("--minimal-multiset", action="store_true",
                        help="minimal target: one `sendmsg execute multiset` instead of five "
                             "`set` (what callguard writes since 21e27e2)")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="profile the server with py-spy during the first measured run "
                             "(FILE.svg, FILE.txt for bench/pyspy_top.py, FILE.json); "
                             "py-spy next to this Python, or set PY_SPY")
    common.add_common_args(parser)
    common.add_server_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 5.0)
        args.runs = min(args.runs, 2)
        args.step_seconds = min(args.step_seconds, 3.0)
        args.refine = 0
        args.warmup = min(args.warmup, 1.0)
        args.pause = min(args.pause, 1.0)
        if args.find_max:
            args.runs = 1
            args.step = max(args.step, 500.0)
            args.max_rate = min(args.max_rate, args.start_rate + 3 * args.step)

    floor = args.target == "callguard" and not args.no_floor

    common.keep_results(args)
    common.raise_fd_limit()
    args.pinning = common.pin_processes(args, args.redis_url)
    info = print_machine(pinning=args.pinning)
    uv = False if args.no_uvloop else common.install_uvloop()
    print(f"# generator event loop: {'uvloop' if uv else 'asyncio'}; target {args.target}; "
          "park loop tick skipped (events follow each sendmsg at once)"
          + ("; the floor (minimal_esl.py --multiset) measured in turn with it" if floor else "")
          + (f"; server env {' '.join(args.server_env)}" if args.server_env else ""))

    env = BenchEnv(args.redis_url, keep=args.keep)
    servers = []
    server = None
    peer = None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    result: dict = {}
    try:
        try:
            if args.target == "callguard":
                t = time.perf_counter()
                env.setup(accounts=args.accounts)
                print(f"# {args.accounts} accounts set up in {time.perf_counter() - t:.1f} s "
                      f"(prefix {env.prefix})")
                peer = common.ThreadedFreeSWITCH()
            server = start_target(args, env, peer)
            servers.append(server)
            gen = Generator(args, server.port, env.accounts, peer)
            if peer is not None:
                gen.drop_sessions = lambda: end_calls(gen, env, peer)
            else:
                gen.drop_sessions = gen.placed.clear
            redis = common.redis_pid(args.redis_url)
            sides = [Side(args.target, gen, {"server": server.pid, "redis": redis}, server)]
            if floor:
                floor_server = start_target(args, env, None, target="minimal")
                servers.append(floor_server)
                floor_gen = Generator(args, floor_server.port, env.accounts, None)
                floor_gen.drop_sessions = floor_gen.placed.clear
                sides.append(Side("floor", floor_gen, {"server": floor_server.pid,
                                                       "redis": redis}, floor_server))
            log_before = server.log_lines()

            if args.warmup > 0:
                warm = 500.0 if args.find_max else min(args.rate, 500.0)
                for side in sides:
                    w = run_once(side.gen, side.pids, warm, args.warmup, loop.run_until_complete)
                    print(f"# warm-up {side.label}: {w['ok']}/{w['sent']} ok, "
                          f"p99 {w['lat_p99_ms']:.2f} ms"
                          + (f" {w['error_kinds']}" if w["error_kinds"] else ""))

            result = {"bench": "esl_load", "target": args.target, "machine": info,
                      "park_tick": False, "minimal_myevents": args.minimal_myevents,
                      "minimal_multiset": args.minimal_multiset,
                      "server_env": args.server_env}
            if args.find_max:
                found = find_max_interleaved(args, sides, loop)
                for search in found["find_max"]["searches"]:
                    for step in search["steps"]:
                        if any(step["tcp"].get(k) for k in ("TCPSynRetrans", "ListenOverflows")):
                            print(f"#   step {step['run']} at {step['rate']:g}/s: TCP (whole "
                                  f"machine) {step['tcp']}")
                    best = search.get("best_step") or {}
                    print(f"# search best {search['best']}: server "
                          f"{best.get('srv_us_per_call', float('nan')):.0f} us/call, Redis "
                          f"{best.get('redis_us_per_call', float('nan')):.0f} us/call")
                result.update(found)
            else:
                result.update(runs_at_rate(args, sides, loop, start_py_spy, print_runs, SUMMARY,
                                           "bench/minimal_esl.py --multiset"))
            new_lines = server.log_lines() - log_before
            if new_lines:
                print(f"# server log: {new_lines} new line(s); last:\n{server.log_tail(5)}")
            result["server_log_lines"] = new_lines
        finally:
            for running in servers:
                running.stop()
            if peer:
                peer.stop()
        if peer is not None and peer.sim.violations:
            print(f"# simulated FreeSWITCH (inbound) violations: {peer.sim.violations[:5]}")
            result["violations"] = peer.sim.violations[:20]
        if server and args.gc_probe:
            gc_summary = common.gcprobe_summary(server.log_path)
            print(f"# server GC: {gc_summary}")
            result["server_gc"] = gc_summary
        emit_json(result, args.json_out)
    finally:
        deleted = env.cleanup()
        print(f"# cleaned up {deleted} Redis key(s)")
        loop.close()
    return 0


SUMMARY = ("achieved", "lat_med_ms", "lat_p99_ms", "lat_max_ms", "errors", "cpu_server",
           "cpu_server_sys", "srv_us_per_call", "cpu_redis", "redis_us_per_call", "gen_cpu",
           "gen_us_per_call", "cpu_softirq", "cpu_steal", "cpu_other", "lag_p99_ms",
           "srv_rss_mb")


if __name__ == "__main__":
    sys.exit(main())
