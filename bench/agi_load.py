"""Open-loop FastAGI load against `callguard serve asterisk` (or a baseline).

The generator speaks FastAGI as Asterisk 22 does (tests/fixtures/asterisk): the
request headers in Asterisk's order in two writes, one `200 result=1` per
command read, and after the server's half-close the rest of the replies,
`HANGUP`, close. Connection starts are scheduled at fixed times (open loop): a
slow server does not slow the generator down, it shows as latency and errors.
The generator reports how far behind its own schedule it fell, so a saturated
generator is visible rather than mistaken for a fast server.

The server runs in a separate process. Targets:

  callguard  `callguard serve asterisk` (subprocess) on a throwaway installation:
             each call is a real authorize (Lua on Redis) on one of --accounts
             prepaid accounts; only ALLOW counts as a success
  minimal    bench/minimal_agi.py (subprocess): headers in, the same six SET
             VARIABLEs out, no Redis: the FastAGI floor
  redis      no FastAGI: one EVALSHA per "call" from this process with
             callguard's own call-path client (engine/pipelined.py: one
             connection, hiredis; --client redis-py for redis-py's pooled
             asyncio client): --lua trivial (`return 1`) or --lua authorize
             (the real script on the same accounts)

Examples:
  .venv/bin/python bench/agi_load.py --rate 1000 --duration 20 --runs 3
  .venv/bin/python bench/agi_load.py --target minimal --rate 1000 --duration 20
  .venv/bin/python bench/agi_load.py --find-max --target callguard
  .venv/bin/python bench/agi_load.py --target redis --lua authorize --find-max
  .venv/bin/python bench/agi_load.py --quick

Pinned by default where taskset exists (--no-pin): this generator on CPU 0, the
servers on CPU 1 (and Redis, unless it is the machine's shared one). With the callguard
target the floor (minimal_agi.py) is measured in the same invocation, its runs in turn
with callguard's, and printed beside it (--no-floor). The RESULT and the whole output
are kept in bench/results/ (--results-dir, --no-results); bench/compare.py compares two.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    BenchEnv,
    CpuMeter,
    Subprocess,
    emit_json,
    print_machine,
    print_table,
    serve_asterisk,
    spread,
    summarize,
)

MIN_SLEEP = 0.001  # the generator's scheduling quantum (see Generator.run)
# Limits no benchmark call reaches, so every check runs and none denies.
FRAUD_CONTROLS = {"max_calls_per_minute": 10**6, "max_spend_per_hour": 10**15,
                  "blocked_prefixes": "41900 882 881", "on_fraud": "block"}
DRAIN_TIMEOUT = 10.0  # seconds to wait for the last calls after the schedule ends
HEADERS_SCRIPT = "authorize"
ALLOW = b'SET VARIABLE CALLGUARD_RESULT "ALLOW"'


def gen_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Stats:
    def __init__(self):
        self.latency: list[float] = []  # connect started -> EOF (or EVALSHA reply), seconds
        self.from_schedule: list[float] = []  # scheduled start -> EOF
        self.lag: list[float] = []  # scheduled start -> actual start
        self.errors: Counter = Counter()
        self.ok = 0
        self.first_scheduled = 0.0
        self.last_done = 0.0
        self.outstanding: set = set()

    def done(self, scheduled: float, launched: float, ok: bool, error: str = "") -> None:
        now = time.perf_counter()
        if ok:
            self.ok += 1
            self.latency.append(now - launched)
            self.from_schedule.append(now - scheduled)
        else:
            self.errors[error] += 1
        self.last_done = max(self.last_done, now)


async def finish_run(stats: Stats, pending_tasks: set, rate: float, duration: float,
                     total: int, t0: float, wall0: float, schedule_end: float,
                     cpu0: float) -> dict:
    """Drain a run (wait for the calls under way, then give up on the stragglers) and
    sum it up; the same for every generator of these benchmarks."""
    deadline = schedule_end + DRAIN_TIMEOUT
    while (stats.outstanding or pending_tasks) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for proto in list(stats.outstanding):
        proto.abort()
    for task in list(pending_tasks):
        task.cancel()
    if pending_tasks:
        await asyncio.wait(pending_tasks, timeout=2)
        stats.errors["timeout"] += sum(1 for t in pending_tasks if t.cancelled())
    wall = time.perf_counter() - wall0
    span = max(stats.last_done - t0, 1e-9)
    lat = summarize(stats.latency)
    sched = summarize(stats.from_schedule)
    lag = summarize(stats.lag)
    errors = sum(stats.errors.values())
    return {
        "rate": rate, "duration": duration, "sent": total, "ok": stats.ok,
        "errors": errors, "error_kinds": dict(stats.errors.most_common(6)),
        "achieved": stats.ok / span,
        "schedule_span": schedule_end - t0,
        "lat_med_ms": lat["median"] * 1e3, "lat_p90_ms": lat["p90"] * 1e3,
        "lat_p99_ms": lat["p99"] * 1e3, "lat_p999_ms": lat["p999"] * 1e3,
        "lat_max_ms": lat["max"] * 1e3,
        "sched_p99_ms": sched["p99"] * 1e3, "sched_max_ms": sched["max"] * 1e3,
        "lag_p99_ms": lag["p99"] * 1e3, "lag_max_ms": lag["max"] * 1e3,
        "gen_cpu": (gen_cpu() - cpu0) / wall,
    }


class AGICall(asyncio.Protocol):
    """One FastAGI session, client side, as res_agi runs it."""

    __slots__ = ("stats", "chunks", "scheduled", "launched", "transport", "buffer",
                 "pending", "allowed", "finished", "reason")

    def __init__(self, stats: Stats, chunks: list[bytes], scheduled: float, launched: float):
        self.stats, self.chunks = stats, chunks
        self.scheduled, self.launched = scheduled, launched
        self.transport = None
        self.buffer = b""
        self.pending: list[bytes] = []
        self.allowed = False
        self.finished = False
        self.reason = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        for chunk in self.chunks:  # two writes, as Asterisk does
            transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            if line.startswith(b"SET VARIABLE CALLGUARD_RESULT "):
                self.allowed = line == ALLOW
            elif line.startswith(b"SET VARIABLE CALLGUARD_REASON "):
                self.reason = line[30:].strip(b'"')
        self.pending += lines
        # res_agi runs one buffered command each time the socket turns readable.
        if self.pending:
            self.transport.write(self._answer(self.pending.pop(0)))

    def _answer(self, line: bytes) -> bytes:
        if line.startswith(b"SET VARIABLE ") or line.startswith(b"NOOP") \
                or line.startswith(b"VERBOSE "):
            return b"200 result=1\n"
        self.stats.errors["agi_unknown_command"] += 1
        return b"510 Invalid or unknown command\n"

    def eof_received(self) -> bool:
        # The server half-closed: Asterisk runs what is left, then HANGUP, then closes.
        if self.buffer:
            self.pending.append(self.buffer)
            self.buffer = b""
        self.transport.write(b"".join(self._answer(line) for line in self.pending)
                             + b"HANGUP\n")
        self.pending = []
        self.finish("" if self.allowed else
                    "deny_" + (self.reason.decode(errors="replace") or "no_result"))
        self.transport.close()
        return True

    def finish(self, error: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.stats.outstanding.discard(self)
        self.stats.done(self.scheduled, self.launched, not error, error)

    def connection_lost(self, exc) -> None:
        if not self.finished:
            self.finish("closed_before_eof" if exc is None else f"reset:{type(exc).__name__}")

    def abort(self) -> None:
        if not self.finished:
            self.finish("timeout")
            if self.transport is not None:
                self.transport.abort()


class Generator:
    """Starts one call at each scheduled time; never waits for an earlier call."""

    def __init__(self, args, target: str, port: int | None, accounts: list[str],
                 engine=None, pbx: common.ThreadedAsterisk | None = None):
        from callguard.simulator.asterisk import SimulatedAsterisk

        self.args = args
        self.target = target
        self.port = port
        self.accounts = accounts or ["41440000000"]
        self.sim = SimulatedAsterisk(agi_port=port or 0)  # for its header format only
        self.engine = engine  # redis target
        self.pbx = pbx  # the AMI peer: announces each channel (Newchannel) as it is placed
        self.created: list[bytes] = []  # Newchannel events of this tick's calls
        self.base = int(time.time())
        self.seq = 0
        self.drop_sessions = None  # set when the bench owns the accounts
        self.placed: list[SimpleNamespace] = []  # FastAGI calls since the last drop_sessions

    def headers(self, i: int) -> list[bytes]:
        self.seq += 1
        call = SimpleNamespace(
            channel=f"PJSIP/bench-{self.seq:08x}", uniqueid=f"{self.base}.{self.seq}",
            account=self.accounts[self.seq % len(self.accounts)], exten=common.PREMIUM_NUMBER)
        self.placed.append(call)
        if self.pbx:
            self.created.append(self.sim._event("Newchannel", call, state="Ring"))
        return self.sim.agi_headers(call, HEADERS_SCRIPT)

    async def _connect(self, proto: AGICall) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: proto, "127.0.0.1", self.port)
        except OSError as exc:
            proto.finish("connect:" + (errno.errorcode.get(exc.errno or 0) or type(exc).__name__))

    async def _redis_op(self, stats: Stats, scheduled: float, launched: float) -> None:
        self.seq += 1
        try:
            if self.args.lua == "trivial":
                account = self.accounts[self.seq % len(self.accounts)]
                await self.trivial([self.engine.keys.account(account)], [self.seq])
                ok, error = True, ""
            else:
                account = self.accounts[self.seq % len(self.accounts)]
                decision = await self.engine.authorize(
                    account, common.PREMIUM_NUMBER, "outbound", f"{self.base}.{self.seq}")
                ok, error = decision.allow, "deny_" + decision.reason.value
        except Exception as exc:  # noqa: BLE001 - counted, the load goes on
            ok, error = False, f"redis:{type(exc).__name__}"
        stats.done(scheduled, launched, ok, error)

    async def run(self, rate: float, duration: float) -> dict:
        loop = asyncio.get_running_loop()
        stats = Stats()
        total = max(1, int(rate * duration))
        interval = 1.0 / rate
        pending_tasks: set[asyncio.Task] = set()
        cpu0, wall0 = gen_cpu(), time.perf_counter()
        t0 = time.perf_counter() + 0.05
        stats.first_scheduled = t0
        i = 0
        while i < total:
            now = time.perf_counter()
            due = t0 + i * interval
            if due > now:
                # The event loop's timers have 1 ms resolution: a shorter sleep would spin
                # (epoll with timeout 0) and eat the CPU the server needs. Wake at least 1 ms
                # later and start what is due then; the lag this adds is measured.
                await asyncio.sleep(max(due - now, MIN_SLEEP))
                continue
            # Start everything that is due now (after a late wake-up: a burst).
            while i < total and t0 + i * interval <= now:
                scheduled = t0 + i * interval
                launched = time.perf_counter()
                stats.lag.append(launched - scheduled)
                if self.target == "redis":
                    task = loop.create_task(self._redis_op(stats, scheduled, launched))
                else:
                    proto = AGICall(stats, self.headers(i), scheduled, launched)
                    stats.outstanding.add(proto)
                    task = loop.create_task(self._connect(proto))
                pending_tasks.add(task)
                task.add_done_callback(pending_tasks.discard)
                i += 1
            if self.created:
                # Asterisk's Newchannel of each channel, racing its FastAGI connection.
                self.pbx.announce(b"".join(self.created))
                self.created = []
        schedule_end = time.perf_counter()
        return await finish_run(stats, pending_tasks, rate, duration, total, t0, wall0,
                                schedule_end, cpu0)


# -- the server under test ---------------------------------------------------------------------

def start_target(args, env: BenchEnv | None, pbx: common.ThreadedAsterisk | None = None,
                 target: str | None = None) -> Subprocess | None:
    target = target or args.target
    if target == "redis":
        return None
    port = (args.port if target == args.target else 0) or common.free_port()
    cpu = args.pinning["server"]
    if target == "callguard":
        # An AMI peer: without an event link the serve process denies every call
        # (fail_closed); nothing is answered here, so it only tracks the calls it allows.
        args.http_port = common.free_port()  # /metrics, scraped with --scrape-every
        server = serve_asterisk(env, port, ami_url=pbx.ami_url, cpu=cpu,
                                CALLGUARD_HTTP_BIND=f"127.0.0.1:{args.http_port}",
                                **common.server_env(args))
        server.start()
        deadline = time.monotonic() + 30
        while not (pbx.logged_in() and pbx.actions("coreshowchannels")):
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise RuntimeError("the serve process did not log in to AMI and reconcile:\n"
                                   + server.log_tail())
            time.sleep(0.05)
        return server
    else:
        argv = [sys.executable, str(Path(__file__).with_name("minimal_agi.py")),
                "--port", str(port)] + (["--no-uvloop"] if args.no_uvloop_server else [])
        extra = common.server_env(args)
        server = Subprocess(argv, {**os.environ, **extra} if extra else None,
                            env.tmp / f"minimal-{port}.log", port, cpu=cpu)
    return server.start()


def start_py_spy(path: str | None, server: Subprocess | None, duration: float):
    if not path or server is None:
        return None
    import subprocess

    exe = Path(sys.executable).with_name("py-spy")
    fmt = {".svg": "flamegraph", ".txt": "raw", ".json": "speedscope"}.get(
        Path(path).suffix, "raw")
    proc = subprocess.Popen([str(exe), "record", "--pid", str(server.pid), "--output", path,
                             "--format", fmt, "--rate", "250", "--nonblocking",
                             "--duration", str(max(1, int(duration)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    return proc


def run_once(gen: Generator, meter_pids: dict, rate: float, duration: float,
             loop_runner) -> dict:
    meter = CpuMeter(meter_pids).start()
    result = loop_runner(gen.run(rate, duration))
    cpu = meter.stop()
    if gen.drop_sessions is not None:
        gen.drop_sessions()  # not measured: what the PBX's Hangup events would have closed
    result.update({f"cpu_{k}": v for k, v in cpu.items() if k != "wall"})
    if meter_pids.get("server"):
        try:
            result["srv_rss_mb"] = common.proc_status(meter_pids["server"])["VmRSS"] / 1024
        except OSError:
            pass
    if "cpu_server" in result and result["achieved"] > 0:
        # Server CPU per call: comparable across targets whatever the generator could do.
        result["srv_us_per_call"] = result["cpu_server"] / result["achieved"] * 1e6
    if "cpu_redis" in result and result["achieved"] > 0:
        result["redis_us_per_call"] = result["cpu_redis"] / result["achieved"] * 1e6
    result["gen_us_per_call"] = result["gen_cpu"] / max(result["achieved"], 1e-9) * 1e6
    result["generator_bound"] = bool(result["lag_p99_ms"] > 20 or result["gen_cpu"] > 0.9)
    return result


def end_calls(gen: Generator, env: BenchEnv, pbx: common.ThreadedAsterisk,
              timeout: float = 120.0) -> None:
    """After a run, not measured: the PBX's Hangup events for the calls placed, as a real
    Asterisk sends them (the serve process commits and stops tracking each call it
    allowed), then the sessions are dropped as before."""
    placed, gen.placed = gen.placed, []
    if placed:
        pbx.hang_up(placed)
        deadline = time.monotonic() + timeout
        while env.redis_totals()["channels"]:
            if time.monotonic() > deadline:
                print(f"# {env.redis_totals()['channels']} channel(s) still held "
                      f"{timeout:g} s after the Hangup events", flush=True)
                break
            time.sleep(0.05)
    env.drop_sessions()


def sustained(result: dict, max_error_rate: float) -> bool:
    allowed_errors = max_error_rate * result["sent"]
    return result["errors"] <= allowed_errors and result["achieved"] >= 0.95 * result["rate"]


ROW = ["run", "rate", "sent", "ok", "errors", "achieved", "lat_med_ms", "lat_p99_ms",
       "lat_max_ms", "sched_p99_ms", "lag_p99_ms", "gen_cpu", "cpu_server", "cpu_server_sys",
       "srv_us_per_call", "srv_rss_mb", "cpu_redis", "cpu_softirq", "cpu_steal", "cpu_other"]


def print_runs(rows: list[dict], title: str) -> None:
    print_table([{**r, "gen_cpu": r["gen_cpu"], "run": r.get("run", "")} for r in rows],
                ROW, title)
    for r in rows:
        if r["error_kinds"]:
            print(f"  run {r.get('run')}: errors {r['error_kinds']}")
        if r["generator_bound"]:
            print(f"  run {r.get('run')}: GENERATOR-BOUND (lag p99 {r['lag_p99_ms']:.1f} ms, "
                  f"generator CPU {r['gen_cpu']:.2f}): the figure understates the server")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("callguard", "minimal", "redis"),
                        default="callguard")
    parser.add_argument("--no-floor", action="store_true",
                        help="callguard: do not measure the floor (minimal_agi.py) in the same "
                             "invocation (by default each callguard run is followed by a floor "
                             "run at the same rate, and the two are printed side by side)")
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
    parser.add_argument("--fraud-controls", action="store_true",
                        help="callguard: every account with each fraud control set, none "
                             "tripping (the authorize script's every check runs)")
    parser.add_argument("--lua", choices=("trivial", "authorize"), default="authorize",
                        help="redis target: which script each operation runs (authorize)")
    parser.add_argument("--client", choices=("pipelined", "redis-py"), default="pipelined",
                        help="redis target: callguard's call-path client (pipelined, one "
                             "connection, hiredis) or redis-py's pooled asyncio client")
    parser.add_argument("--port", type=int, default=0, help="FastAGI port (default: a free one)")
    common.add_pin_args(parser)
    parser.add_argument("--no-uvloop", action="store_true", help="generator: plain asyncio")
    parser.add_argument("--py-spy", metavar="FILE",
                        help="profile the server with py-spy during the first measured run "
                             "(FILE.svg flame graph, FILE.txt collapsed stacks for "
                             "bench/pyspy_top.py, FILE.json speedscope)")
    parser.add_argument("--scrape-every", type=float, default=0.0, metavar="SECONDS",
                        help="callguard: a scraper GETs the server's /metrics this often "
                             "while measuring (Prometheus scrapes every 15-60 s; 1 is harsh)")
    parser.add_argument("--no-uvloop-server", action="store_true",
                        help="minimal target: plain asyncio in the server")
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
    print(f"# generator event loop: {'uvloop' if uv else 'asyncio'}; target {args.target}"
          + (f" (--lua {args.lua}, --client {args.client})" if args.target == "redis" else "")
          + ("; the floor (minimal_agi.py) measured in turn with it" if floor else ""))

    env = BenchEnv(args.redis_url, keep=args.keep)  # a temp dir; Redis/SQL only if set up
    servers = []
    pbx = None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        try:
            if args.target != "minimal":
                t = time.perf_counter()
                env.setup(accounts=args.accounts, **(FRAUD_CONTROLS if args.fraud_controls else {}))
                print(f"# {args.accounts} accounts set up in {time.perf_counter() - t:.1f} s "
                      f"(prefix {env.prefix})")
            if args.target == "callguard":
                pbx = common.ThreadedAsterisk()
            server = start_target(args, env, pbx)
            servers.append(server)
            engine = None
            if args.target == "redis":
                from callguard.engine.connect import connect_async
                from callguard.engine.runner import AsyncEngine

                pipelined = None
                if args.client == "pipelined":
                    from callguard.engine.pipelined import PipelinedRedis

                    pipelined = PipelinedRedis(env.redis_url)
                engine = AsyncEngine(connect_async(env.redis_url), env.app.ops(), pipelined)

            gen = Generator(args, args.target, server.port if server else None,
                            env.accounts if env else [], engine, pbx)
            if env.accounts:
                gen.drop_sessions = (lambda: end_calls(gen, env, pbx)) if pbx else \
                    env.drop_sessions
            else:
                gen.drop_sessions = gen.placed.clear
            if engine is not None:
                script = engine.client.register_script("return 1")
                gen.trivial = (lambda keys, args: script(keys=keys, args=args))
                if engine.pipelined is not None:
                    source, sha = "return 1", script.sha
                    gen.trivial = (lambda keys, args: engine.pipelined.evalsha(
                        sha, source, keys, args))
            redis = common.redis_pid(args.redis_url)
            sides = [Side(args.target, gen, {"server": server.pid if server else None,
                                             "redis": redis}, server)]
            if floor:
                floor_server = start_target(args, env, target="minimal")
                servers.append(floor_server)
                floor_gen = Generator(args, "minimal", floor_server.port, env.accounts)
                floor_gen.drop_sessions = floor_gen.placed.clear
                sides.append(Side("floor", floor_gen, {"server": floor_server.pid,
                                                       "redis": redis}, floor_server))
            log_before = server.log_lines() if server else 0

            scraper = common.Scraper(args.http_port, args.scrape_every) if (
                args.scrape_every and args.target == "callguard") else None
            if args.warmup > 0:
                warm = 500.0 if args.find_max else min(args.rate, 500.0)
                for side in sides:
                    w = run_once(side.gen, side.pids, warm, args.warmup, loop.run_until_complete)
                    print(f"# warm-up {side.label}: {w['ok']}/{w['sent']} ok, "
                          f"p99 {w['lat_p99_ms']:.2f} ms")

            result = {"bench": "agi_load", "target": args.target, "machine": info,
                      "lua": args.lua if args.target == "redis" else None,
                      "client": args.client if args.target == "redis" else None}
            if args.find_max:
                result.update(find_max_interleaved(args, sides, loop))
            else:
                result.update(runs_at_rate(args, sides, loop, start_py_spy, print_runs, SUMMARY,
                                           "bench/minimal_agi.py"))
            if scraper:
                result["scrapes"] = scraper.stop()
                print(f"# scraper: {result['scrapes']}")
            if server:
                new_lines = server.log_lines() - log_before
                if new_lines:
                    print(f"# server log: {new_lines} new line(s); last:\n{server.log_tail(5)}")
                result["server_log_lines"] = new_lines
        finally:
            for running in servers:
                if running:
                    running.stop()
            if pbx:
                pbx.stop()
        if servers and servers[0] and args.gc_probe:
            gc_summary = common.gcprobe_summary(servers[0].log_path)
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
           "gen_us_per_call", "cpu_softirq", "cpu_steal", "cpu_other", "lag_p99_ms")


class Side(SimpleNamespace):
    """One server measured in an invocation: the target, or the floor beside it."""

    def __init__(self, label: str, gen, pids: dict, server: Subprocess | None):
        super().__init__(label=label, gen=gen, pids=pids, server=server)


def summarize_runs(rows: list[dict], keys) -> dict:
    summary = {k: spread([r.get(k, float("nan")) for r in rows]) for k in keys}
    print_table([{"metric": k, **v} for k, v in summary.items()],
                ["metric", "median", "min", "max"], "median and spread over runs")
    return summary


def runs_at_rate(args, sides: list[Side], loop, start_spy, print_runs, summary_keys,
                 floor_server: str) -> dict:
    """The runs at one rate, each side in turn: their tables printed, the result's fields
    (the floor's beside callguard's when it ran)."""
    rows = interleaved_runs(args, sides, loop, start_spy)
    for side in sides:
        name = "minimal (the floor)" if side.label == "floor" else args.target
        print_runs(rows[side.label], f"{name} at {args.rate:g}/s for "
                                     f"{args.duration:g} s, {args.runs} run(s)")
    summaries = {label: summarize_runs(r, summary_keys) for label, r in rows.items()}
    result = {"rate": args.rate, "duration": args.duration,
              "runs": rows[args.target], "summary": summaries[args.target]}
    if "floor" in rows:
        result["floor"] = {"target": "minimal", "server": floor_server,
                           "runs": rows["floor"], "summary": summaries["floor"]}
        result["vs_floor"] = vs_floor(rows[args.target], rows["floor"])
        print_vs_floor(rows[args.target], rows["floor"], args.target)
    return result


def interleaved_runs(args, sides: list[Side], loop, start_spy) -> dict[str, list[dict]]:
    """--runs runs of each side in turn (target run 1, floor run 1, target run 2, ...), so
    a change in the machine's load during the invocation hits both alike."""
    rows: dict[str, list[dict]] = {side.label: [] for side in sides}
    for run in range(args.runs):
        for side in sides:
            if run or side is not sides[0]:
                time.sleep(args.pause)
            first = run == 0 and side is sides[0]
            spy = start_spy(args.py_spy, side.server, args.duration) if first else None
            r = run_once(side.gen, side.pids, args.rate, args.duration, loop.run_until_complete)
            if spy is not None:
                spy.wait(30)
                print(f"# py-spy profile of the server in run 1: {args.py_spy}")
            r["run"] = run + 1
            rows[side.label].append(r)
    return rows


def vs_floor(rows: list[dict], floor_rows: list[dict]) -> dict:
    """(serve + Redis) CPU per setup over the floor's CPU per setup, each run against the
    floor run that followed it (the floor uses no Redis)."""
    ratios = [(r["srv_us_per_call"] + r.get("redis_us_per_call", 0.0)) / f["srv_us_per_call"]
              for r, f in zip(rows, floor_rows, strict=False)
              if r.get("srv_us_per_call") and f.get("srv_us_per_call")]
    return {"ratios": ratios, "ratio": spread(ratios)}


def _mm(values, digits: int = 0) -> str:
    """median (min-max) of per-run values."""
    s = spread(values)
    if s["median"] != s["median"]:
        return "-"
    return (f"{common.fmt(float(s['median']), digits)} ({common.fmt(float(s['min']), digits)}-"
            f"{common.fmt(float(s['max']), digits)})")


def print_vs_floor(rows: list[dict], floor_rows: list[dict], target: str,
                   unit: str = "setup") -> None:
    ratios = vs_floor(rows, floor_rows)["ratios"]
    table = []
    for label, runs in ((target, rows), ("floor", floor_rows)):
        table.append({
            "": label,
            f"serve us/{unit}": _mm([r.get("srv_us_per_call", float("nan")) for r in runs]),
            f"redis us/{unit}": _mm([r.get("redis_us_per_call", float("nan")) for r in runs]),
            "(serve+redis)/floor": _mm(ratios, 2) if runs is rows else "1",
            "achieved/s": _mm([r["achieved"] for r in runs]),
            "p50 ms": _mm([r["lat_med_ms"] for r in runs], 2),
            "p99 ms": _mm([r["lat_p99_ms"] for r in runs], 2),
            "errors": _mm([r["errors"] for r in runs]),
        })
    print_table(table, list(table[0]), f"{target} beside the floor, same invocation, runs "
                                       "interleaved: median (min-max)")
    print("  the floor's Redis figure is other clients' use of the same Redis (the floor "
          "uses none): the noise in the Redis column")


def find_max_interleaved(args, sides: list[Side], loop) -> dict:
    """find_max for the target and, search by search in turn, the floor beside it."""
    searches: dict[str, list[dict]] = {side.label: [] for side in sides}
    for search in range(args.runs):
        for side in sides:
            print(f"# search {search + 1}: {side.label}", flush=True)
            searches[side.label].append(find_max_search(args, side.gen, side.pids, loop,
                                                        search))
    target = sides[0].label
    out = find_max_report(args, searches[target], target)
    if len(sides) > 1:
        out["floor"] = {"target": "minimal",
                        **find_max_report(args, searches["floor"], "minimal (the floor)")}
        ratios = [(t["best"] or 0.0) / f["best"] for t, f in
                  zip(searches[target], searches["floor"], strict=True) if f["best"]]
        out["vs_floor"] = {"max_ratios": ratios, "max_ratio": spread(ratios)}
        print(f"# highest sustained rate over the floor's, search by search: "
              f"{', '.join(f'{r:.2f}' for r in ratios) or '-'}")
    return out


def find_max(args, gen: Generator, pids: dict, loop) -> dict:
    """Step up the rate; report the highest rate sustained (each of --runs searches)."""
    searches = [find_max_search(args, gen, pids, loop, search) for search in range(args.runs)]
    return find_max_report(args, searches, args.target)


def find_max_search(args, gen: Generator, pids: dict, loop, search: int) -> dict:
    """One search: step the rate up from --start-rate to the first failing step, then
    bisect between the last good and that (--refine times)."""
    steps, best, bad = [], None, None

    def step(rate: float, label: str) -> dict:
        """One measured step of this search, printed and kept."""
        r = run_once(gen, pids, rate, args.step_seconds, loop.run_until_complete)
        r["ok_step"] = sustained(r, args.max_error_rate)
        r["run"] = label
        steps.append(r)
        _step_line(r)
        time.sleep(args.pause)
        return r

    rate = args.start_rate
    while rate <= args.max_rate:
        r = step(rate, f"{search + 1}")
        if not r["ok_step"]:
            bad = rate
            break
        best = rate
        rate += args.step
    lo, hi = best, bad
    for _ in range(args.refine if lo is not None and hi is not None else 0):
        mid = round((lo + hi) / 2, -1)
        if mid in (lo, hi):
            break
        r = step(mid, f"{search + 1}b")
        if r["ok_step"]:
            lo = mid
        else:
            hi = mid
    best = lo
    good = [s for s in steps if s["ok_step"] and s["rate"] == best]
    p99_ok = [st["rate"] for st in steps if st["ok_step"] and st["lat_p99_ms"] < 10]
    print(f"# search {search + 1}: highest sustained rate {best} /s (first failing {hi})")
    return {"best": best, "first_bad": hi, "steps": steps,
            "best_step": good[-1] if good else None,
            "best_p99_under_10ms": max(p99_ok) if p99_ok else None}


def find_max_report(args, searches: list[dict], target: str) -> dict:
    bests = [s["best"] or 0.0 for s in searches]
    top = spread(bests)
    print_table([{"search": i + 1, "best": s["best"] or 0.0, "first_bad": s["first_bad"] or "-",
                  "best_p99<10ms": s["best_p99_under_10ms"] or "-",
                  "us_per_call_at_best": (s["best_step"] or {}).get("srv_us_per_call",
                                                                    float("nan")),
                  "p99_at_best": (s["best_step"] or {}).get("lat_p99_ms", float("nan")),
                  "cpu_server": (s["best_step"] or {}).get("cpu_server", float("nan")),
                  "cpu_redis": (s["best_step"] or {}).get("cpu_redis", float("nan")),
                  "gen_cpu": (s["best_step"] or {}).get("gen_cpu", float("nan")),
                  "cpu_other": (s["best_step"] or {}).get("cpu_other", float("nan"))}
                 for i, s in enumerate(searches)],
                ["search", "best", "first_bad", "best_p99<10ms", "p99_at_best",
                 "us_per_call_at_best", "cpu_server", "cpu_redis", "gen_cpu", "cpu_other"],
                f"find-max {target}")
    print(f"# {target}: highest sustained rate: median {top['median']:g}/s "
          f"(min {top['min']:g}, max {top['max']:g})")
    return {"find_max": {"searches": searches, "best": top, "step_seconds": args.step_seconds,
                         "max_error_rate": args.max_error_rate}}


def _step_line(r: dict) -> None:
    flag = "ok  " if r["ok_step"] else "FAIL"
    extra = " GENERATOR-BOUND" if r["generator_bound"] else ""
    print(f"  [{flag}] {r['rate']:7.0f}/s achieved {r['achieved']:8.1f}/s errors {r['errors']:5d}"
          f" p50 {r['lat_med_ms']:6.2f} p99 {r['lat_p99_ms']:7.2f} max {r['lat_max_ms']:7.1f} ms"
          f" lag p99 {r['lag_p99_ms']:6.2f} ms cpu srv {r.get('cpu_server', 0):.2f}"
          f" ({r.get('srv_us_per_call', 0):.0f} us/call, sys {r.get('cpu_server_sys', 0):.2f},"
          f" RSS {r.get('srv_rss_mb', 0):.0f} MB)"
          f" redis {r.get('cpu_redis', 0):.2f} gen {r['gen_cpu']:.2f}"
          f" other {r.get('cpu_other', 0):.2f}{extra}"
          + (f" {r['error_kinds']}" if r["error_kinds"] else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
