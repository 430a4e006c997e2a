"""Whole calls, open loop, through `callguard serve asterisk` and through the floor,
played by a compiled Asterisk 22 (bench/cgload.c).

cgload is the PBX: it places calls at --rate per second for --duration seconds over
FastAGI (Asterisk 22's headers, each command answered as res_agi does) and is the AMI
server the serve process logs in to: Newchannel as each call is placed, after --ring
the callee answers (DialEnd ANSWER, Newstate Up), after --talk both hang up; every
AbsoluteTimeout the server pushes is honoured (a deadline that passes first cuts the
call off, counted) and answered, and so are Ping, CoreShowChannels, Getvar, Hangup.
Built on demand (cc, libc only) into bench/.build/, it costs the generator core a few
tens of microseconds of user time per call, so the server is what is measured.

Targets (--target):
  callguard    `callguard serve asterisk` on a throwaway installation (--accounts
               prepaid accounts, real authorize, answer, extends, commit) and a
               `callguard worker` booking the finished calls (--no-worker: none)
  minimal      bench/minimal_calls.py: the same six SET VARIABLEs per setup, no Redis,
               and per answered call the AbsoluteTimeouts callguard would send, at the
               same times: the floor for a whole call
  minimal_agi  bench/minimal_agi.py: FastAGI only, no AMI link (agi_load.py's floor
               for setups; use with --talk 0)
  both         callguard, then minimal, the same load, and the ratio (default)

Pinned by default where there are two CPUs or more: the server on CPU 1, cgload on
CPU 0 (--no-pin: neither). The worker is not pinned; Redis is whatever --redis-url
points at, measured when it runs on this machine (a shared Redis: others' load counts).

Per run: serve, Redis, worker and generator CPU per call (us), setup latency, AMI
AbsoluteTimeout pushes and extends per answered call, their lateness, cut-offs. At the
end, the books: no money reserved, no channel held, no live session in Redis, and with
the worker every allowed call booked (CDR count, Redis balances == SQL balances ==
opening balances - cost of the CDRs).

Examples:
  .venv/bin/python bench/calls.py --quick
  .venv/bin/python bench/calls.py --rate 400 --duration 50 --ring 0.5 --talk 45 \\
      --quota 20 --runs 1                      # the reference workload of issue 14
  .venv/bin/python bench/calls.py --rate 1000 --duration 10 --talk 2 --quota 20
  .venv/bin/python bench/calls.py --talk 0 --rate 2000 --duration 10   # setups only
  .venv/bin/python bench/calls.py --talk 2 --find-max --target callguard
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    BenchEnv,
    CpuMeter,
    Subprocess,
    emit_json,
    free_port,
    print_machine,
    print_table,
    serve_asterisk,
    spread,
)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cgload.c"
BUILD = HERE / ".build"
AMI_USER, AMI_SECRET = "callguard", "bench-secret"


def build_cgload() -> Path:
    """bench/.build/cgload, compiled again when the source is newer."""
    exe = BUILD / "cgload"
    if not exe.exists() or exe.stat().st_mtime < SOURCE.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(SOURCE)],
                       check=True)
    return exe


class CGLoad:
    """cgload in --control mode: runs on demand, its stdout lines read in a thread."""

    def __init__(self, agi_port: int, ring: float, talk: float, accounts: int, lead: float,
                 cpu: int | None, events: str = "full", drain: float = 10.0):
        self.ami_port = free_port()
        argv = [str(build_cgload()), "--control", "--agi-port", str(agi_port),
                "--ami-port", str(self.ami_port), "--ring", str(ring), "--talk", str(talk),
                "--accounts", str(accounts), "--lead", str(lead), "--user", AMI_USER,
                "--secret", AMI_SECRET, "--events", events, "--drain", str(drain)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.wait_for("# listening")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ami_url(self) -> str:
        return f"ami://{AMI_USER}:{AMI_SECRET}@127.0.0.1:{self.ami_port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"cgload: no {prefix!r} line within {timeout:g} s")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def run(self, rate: float, duration: float, talk: float, timeout: float) -> dict:
        self.proc.stdin.write(f"run {rate:g} {duration:g} {talk:g}\n")
        self.proc.stdin.flush()
        return json.loads(self.wait_for("{", timeout))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


# -- the servers under test ----------------------------------------------------------------

class Target:
    """A server under test with its cgload; for callguard also the worker."""

    def __init__(self, args, name: str, env: BenchEnv):
        self.args, self.name, self.env = args, name, env
        self.server = self.worker = self.gen = None
        self.http_port = None

    def start(self) -> Target:
        args = self.args
        port = free_port()
        lead = min(5.0, args.quota / 2) + self.env.settings.grace_seconds
        self.gen = CGLoad(port, args.ring, args.talk, args.accounts, lead,
                          0 if args.pin else None, args.events, args.drain)
        cpu = 1 if args.pin else None
        if self.name == "callguard":
            self.http_port = free_port()
            workers = args.serve_workers
            if workers > 1:
                # N processes on one port: they may use both CPUs (the generator keeps CPU
                # 0 to itself only with one server process).
                cpu = None
                self.http_port = free_port_range(workers)
            self.server = serve_asterisk(self.env, port, ami_url=self.gen.ami_url, cpu=cpu,
                                         CALLGUARD_HTTP_BIND=f"127.0.0.1:{self.http_port}",
                                         **common.server_env(args))
            if workers > 1:
                self.server.argv += ["--workers", str(workers)]
            self.server.start()
            # Logged in and reconciled (its CoreShowChannels): it now supervises calls.
            self.gen.wait_for("# coreshowchannels")
            if not args.no_worker:
                wport = free_port()
                self.worker = Subprocess(
                    common.callguard_argv("worker"),
                    self.env.env(CALLGUARD_NODE=f"{self.env.settings.node}-worker",
                                 CALLGUARD_HTTP_BIND=f"127.0.0.1:{wport}"),
                    self.env.tmp / "worker.log", wport).start()
        else:
            argv = [sys.executable, str(HERE / "minimal_calls.py"), "--port", str(port),
                    "--ami-url", self.gen.ami_url, "--quota", str(args.quota),
                    "--grace", str(self.env.settings.grace_seconds)]
            if self.name == "minimal_agi":
                argv = [sys.executable, str(HERE / "minimal_agi.py"), "--port", str(port)]
            extra = common.server_env(args)
            self.server = Subprocess(argv, {**os.environ, **extra} if extra else None,
                                     self.env.tmp / f"{self.name}-{port}.log", port, cpu=cpu)
            self.server.start()
            if self.name == "minimal":
                self.gen.wait_for("# login")
        return self

    def pids(self) -> dict:
        # With --serve-workers the serve processes are the parent's children: each metered.
        workers = {f"serve{n}": pid for n, pid in enumerate(children(self.server.pid), 1)}
        return {**workers, "serve": self.server.pid,
                "worker": self.worker.pid if self.worker else None,
                "redis": common.redis_pid(self.args.redis_url) if self.name == "callguard"
                else None, "gen": self.gen.pid}

    def stop(self) -> None:
        for part in (self.server, self.worker):
            if part:
                part.stop()
        if self.gen:
            self.gen.stop()


def settle(target: Target, timeout: float = 60.0) -> float:
    """Wait until Redis holds nothing for the calls (every Hangup committed); seconds."""
    t0 = time.monotonic()
    if target.name != "callguard":
        time.sleep(0.5)  # the floor's last AMI actions
        return time.monotonic() - t0
    while time.monotonic() - t0 < timeout:
        totals = target.env.redis_totals()
        if not (totals["reserved"] or totals["channels"] or totals["live"]):
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def free_port_range(count: int) -> int:
    """A first port whose next count-1 are free too (the workers' HTTP ports)."""
    while True:
        first = free_port()
        if first + count < 65536 and all(_port_free(first + n) for n in range(1, count)):
            return first


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_once(target: Target, rate: float, duration: float, talk: float) -> dict:
    args = target.args
    meter = CpuMeter(target.pids()).start()
    r = target.gen.run(rate, duration, talk, timeout=duration + args.ring + talk
                       + args.drain + 60)
    r["settle_s"] = settle(target)
    cpu = meter.stop()
    wall = cpu["wall"]
    sent = max(r["sent"], 1)
    for name in [n for n in cpu if n.startswith("serve") and n[5:].isdigit()]:
        cpu["serve"] += cpu.pop(name)  # --serve-workers: the parent and its processes
        cpu["serve_sys"] += cpu.pop(name + "_sys")
    r.update({f"cpu_{k}": v for k, v in cpu.items() if k != "wall"})
    for name in ("serve", "redis", "worker", "gen"):
        if name in cpu:
            r[f"{name}_us_per_call"] = cpu[name] * wall / sent * 1e6
    r["serve_redis_us_per_call"] = r["serve_us_per_call"] + r.get("redis_us_per_call", 0.0)
    answered = max(r["answered"], 1)
    r["pushes_per_call"] = r["pushes"] / answered
    r["extends_per_call"] = r["extends"] / answered
    r["lat_p50_ms"] = r["lat_ms"]["median"]
    r["lat_p99_ms"] = r["lat_ms"]["p99"]
    r["lat_max_ms"] = r["lat_ms"]["max"]
    r["lag_p99_ms"] = r["lag_ms"]["p99"]
    r["late_p99_ms"] = r["late_ms"]["p99"]
    r["achieved"] = r["ok"] / max(r["setup_span_s"], 1e-9)
    try:
        r["serve_rss_mb"] = common.proc_status(target.server.pid)["VmRSS"] / 1024
    except OSError:
        pass
    return r


def books(target: Target, allowed: int, placed: int) -> dict:
    """After every call hung up: nothing reserved or held in Redis; with the worker,
    every allowed call booked and the money the same in Redis and SQL. A call whose
    ALLOW never reached the generator (a reset, a timeout) was still authorised and is
    booked too: the CDRs lie between the ALLOWs seen and the calls placed."""
    env = target.env
    out = {"redis": env.redis_totals(), "worker": target.worker is not None}
    ok = not any(out["redis"].values())
    if target.worker is not None:
        from sqlalchemy import text

        from callguard.engine.core import SHARDS

        r, keys = env.app.redis, env.app.keys
        deadline = time.monotonic() + 60
        while True:  # the worker books what the streams still hold
            backlog = sum(r.xlen(keys.events(n)) for n in range(SHARDS))
            with env.app.books.engine.connect() as db:
                cdrs, cost = db.execute(text("select count(*), coalesce(sum(cost), 0) "
                                             "from cdrs")).one()
                sql_balance = db.execute(text("select coalesce(sum(balance), 0) "
                                              "from accounts")).scalar()
            if (not backlog and cdrs >= allowed) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        pipe = r.pipeline(transaction=False)
        for a in env.accounts:
            pipe.hget(keys.account(a), "balance")
        redis_balance = sum(int(b or 0) for b in pipe.execute())
        opening = len(env.accounts) * common.BIG_BALANCE
        out.update({"stream_backlog": backlog, "cdrs": cdrs, "allowed": allowed,
                    "placed": placed, "cost": cost, "redis_balance": redis_balance,
                    "sql_balance": sql_balance, "opening": opening})
        ok = ok and not backlog and allowed <= cdrs <= placed \
            and redis_balance == sql_balance == opening - cost
    out["ok"] = ok
    return out


# -- reporting -----------------------------------------------------------------------------

ROW = ["run", "rate", "sent", "ok", "errors", "cutoff", "lat_p50_ms", "lat_p99_ms",
       "lag_p99_ms", "pushes_per_call", "late_p99_ms", "serve_us_per_call",
       "redis_us_per_call", "worker_us_per_call", "gen_us_per_call", "cpu_serve",
       "cpu_other"]
SUMMARY = ["serve_us_per_call", "redis_us_per_call", "serve_redis_us_per_call",
           "worker_us_per_call", "gen_us_per_call", "us_per_call", "lat_p50_ms", "lat_p99_ms",
           "lat_max_ms", "lag_p99_ms", "pushes_per_call", "extends_per_call", "late_p99_ms",
           "cutoff", "errors", "cpu_serve", "cpu_redis", "cpu_worker", "cpu_gen", "cpu_other",
           "cpu_steal"]


def _num(value) -> float:
    return float("nan") if value is None else value


def print_runs(rows: list[dict], title: str) -> None:
    print_table(rows, ROW, title)
    for r in rows:
        if r["errors"] or r["denied"]:
            print(f"  run {r['run']}: errors {r['error_kinds']}, denied {r['denied']} "
                  f"{r['deny_reasons']}")
        if r["lag_ms"]["p99"] is not None and r["lag_ms"]["p99"] > 20:
            print(f"  run {r['run']}: GENERATOR LAGGED (p99 {r['lag_ms']['p99']:.1f} ms behind "
                  "its schedule)")


def measure(args, name: str, env: BenchEnv) -> dict:
    target = Target(args, name, env).start()
    pids = target.pids()
    print(f"# {name}: serve pid {pids['serve']}, worker {pids['worker']}, redis "
          f"{pids['redis']}, cgload {pids['gen']}" + (" (pinned: server CPU 1, cgload CPU 0)"
                                                    if args.pin else ""), flush=True)
    allowed = placed = 0
    try:
        if args.warmup > 0:
            w = target.gen.run(min(args.rate, 200.0), args.warmup, min(args.talk, 1.0),
                               timeout=args.warmup + args.drain + 60)
            allowed += w["ok"]
            placed += w["sent"]
            settle(target)
            print(f"# warm-up: {w['ok']}/{w['sent']} ok, setup p99 {w['lat_ms']['p99']} ms",
                  flush=True)
        result: dict = {"target": name}
        if args.find_max:
            result["find_max"] = find_max(args, target)
            allowed += sum(s["ok"] for s in result["find_max"]["steps"])
            placed += sum(s["sent"] for s in result["find_max"]["steps"])
        else:
            rows = []
            for run in range(args.runs):
                if run:
                    time.sleep(args.pause)
                r = run_once(target, args.rate, args.duration, args.talk)
                r["run"] = run + 1
                allowed += r["ok"]
                placed += r["sent"]
                rows.append(r)
            print_runs(rows, f"{name}: {args.rate:g}/s for {args.duration:g} s, ring "
                             f"{args.ring:g} s, talk {args.talk:g} s, quota {args.quota} s, "
                             f"{args.runs} run(s)")
            summary = {k: spread([_num(r.get(k)) for r in rows]) for k in SUMMARY}
            print_table([{"metric": k, **v} for k, v in summary.items()],
                        ["metric", "median", "min", "max"],
                        f"{name}: median and spread over runs")
            result.update({"runs": rows, "summary": summary})
        if name == "callguard":
            result["books"] = books(target, allowed, placed)
            b = result["books"]
            print(f"# books {'OK' if b['ok'] else 'WRONG'}: Redis after {b['redis']}"
                  + (f"; {b['cdrs']} CDRs for {b['allowed']} ALLOWs seen of {b['placed']} "
                     f"calls placed, balances Redis "
                     f"{b['redis_balance']} SQL {b['sql_balance']} opening - cost "
                     f"{b['opening'] - b['cost']}, stream backlog {b['stream_backlog']}"
                     if b["worker"] else " (no worker: SQL not checked)"), flush=True)
        lines = target.server.log_lines()
        if lines > 2:
            print(f"# {name} log ({lines} lines), last:\n{target.server.log_tail(5)}")
    finally:
        target.stop()
    return result


def sustained(r: dict, max_error_rate: float) -> bool:
    return (r["errors"] <= max_error_rate * r["sent"] and not r["cutoff"]
            and r["ok"] + r["errors"] == r["sent"] and r["achieved"] >= 0.95 * r["rate"])


def find_max(args, target: Target) -> dict:
    """Step the rate up until a step fails (errors, denials, cut-offs, < 95% achieved);
    then bisect between the last good and the first bad rate."""
    steps: list[dict] = []

    def step(rate: float) -> bool:
        r = run_once(target, rate, args.step_seconds, args.talk)
        r["ok_step"] = sustained(r, args.max_error_rate)
        r["run"] = len(steps) + 1
        steps.append(r)
        print(f"  [{'ok  ' if r['ok_step'] else 'FAIL'}] {rate:7.0f}/s ok {r['ok']}/{r['sent']}"
              f" errors {r['errors']} cutoff {r['cutoff']} p50 {r['lat_p50_ms']} p99 "
              f"{r['lat_p99_ms']} ms lag p99 {r['lag_p99_ms']} ms serve "
              f"{r['serve_us_per_call']:.0f} us/call ({r['cpu_serve']:.2f} core) redis "
              f"{r.get('redis_us_per_call', 0):.0f} gen {r['gen_us_per_call']:.0f}"
              + (f" {r['error_kinds']}" if r["error_kinds"] else ""), flush=True)
        time.sleep(args.pause)
        return r["ok_step"]

    best = bad = None
    rate = args.start_rate
    while rate <= args.max_rate:
        if not step(rate):
            bad = rate
            break
        best = rate
        rate += args.step
    for _ in range(args.refine if best is not None and bad is not None else 0):
        mid = round((best + bad) / 2, -1)
        if mid in (best, bad):
            break
        if step(mid):
            best = mid
        else:
            bad = mid
    p99_ok = [s["rate"] for s in steps if s["ok_step"] and s["lat_p99_ms"] < args.p99_limit]
    print(f"# {target.name}: highest sustained rate {best}/s (first failing {bad}); with "
          f"p99 < {args.p99_limit:g} ms: {max(p99_ok) if p99_ok else None}/s")
    return {"best": best, "first_bad": bad, "steps": steps, "p99_limit_ms": args.p99_limit,
            "best_p99_ok": max(p99_ok) if p99_ok else None, "step_seconds": args.step_seconds}


def compare(results: dict) -> dict | None:
    """callguard against the floor: CPU per call, medians over the runs."""
    floors = [n for n in ("minimal", "minimal_agi") if "summary" in results.get(n, {})]
    if "summary" not in results.get("callguard", {}) or not floors:
        return None
    cg, floor = results["callguard"]["summary"], results[floors[0]]["summary"]
    rows = []
    for metric in ("serve_us_per_call", "serve_redis_us_per_call", "lat_p50_ms", "lat_p99_ms",
                   "pushes_per_call"):
        a, b = cg[metric]["median"], floor[metric]["median"]
        rows.append({"metric": metric, "callguard": a, "floor": b,
                     "ratio": a / b if b else float("nan")})
    print_table(rows, ["metric", "callguard", "floor", "ratio"],
                "callguard against the floor (medians; serve_redis: callguard's serve + Redis "
                "against the floor's server alone)")
    return {r["metric"]: r for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("callguard", "minimal", "minimal_agi", "both"),
                        default="both")
    parser.add_argument("--rate", type=float, default=400.0, help="calls per second (400)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of call starts per run (10)")
    parser.add_argument("--ring", type=float, default=0.5, help="seconds before answer (0.5)")
    parser.add_argument("--talk", type=float, default=5.0,
                        help="seconds from answer to hangup (5); 0: setups only, each call "
                             "hung up right after its AGI")
    parser.add_argument("--quota", type=int, default=20,
                        help="callguard's quota_seconds: one extend each (20)")
    parser.add_argument("--accounts", type=int, default=100,
                        help="prepaid accounts the calls rotate over (100)")
    parser.add_argument("--events", choices=("full", "caller"), default="full",
                        help="AMI events per call: the caller's and the dialled channel's "
                             "(full), or the caller's only")
    parser.add_argument("--runs", type=int, default=3, help="repeat each measurement (3)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs (2)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of short calls at min(rate, 200)/s first (2)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="seconds past a run's last expected hangup before cgload gives "
                             "up on its calls (10)")
    parser.add_argument("--serve-workers", type=int, default=1, metavar="N",
                        help="callguard: `serve asterisk --workers N` (N processes on one "
                             "port, not pinned); its CPU is theirs summed (1)")
    parser.add_argument("--no-worker", action="store_true",
                        help="callguard: no `callguard worker` (the books are not checked)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the server to CPU 1 and cgload to CPU 0")
    parser.add_argument("--find-max", action="store_true",
                        help="step the rate up until a step fails; best short with --talk 2")
    parser.add_argument("--start-rate", type=float, default=500.0)
    parser.add_argument("--step", type=float, default=250.0)
    parser.add_argument("--max-rate", type=float, default=10000.0)
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--max-error-rate", type=float, default=0.0)
    parser.add_argument("--p99-limit", type=float, default=50.0,
                        help="find-max: also report the highest rate with setup p99 under "
                             "this (50 ms)")
    common.add_common_args(parser)
    common.add_server_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.talk = min(args.talk, 3.0)
        args.quota = min(args.quota, 2)
        args.runs = min(args.runs, 1)
        args.warmup = min(args.warmup, 1.0)
        args.rate = min(args.rate, 200.0)
        args.step_seconds = min(args.step_seconds, 3.0)
        args.refine = 0
    args.pin = args.pin and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")

    common.raise_fd_limit()
    info = print_machine()
    build_cgload()
    print(f"# cgload: {build_cgload()}; {args.rate:g}/s x {args.duration:g} s, ring "
          f"{args.ring:g} s, talk {args.talk:g} s, quota {args.quota} s, events {args.events}",
          flush=True)
    names = ["callguard", "minimal"] if args.target == "both" else [args.target]
    results: dict = {}
    for name in names:
        env = BenchEnv(args.redis_url, quota=args.quota, keep=args.keep)
        try:
            if name == "callguard":
                t = time.perf_counter()
                env.setup(accounts=args.accounts)
                print(f"# {args.accounts} accounts set up in {time.perf_counter() - t:.1f} s "
                      f"(prefix {env.prefix})", flush=True)
            results[name] = measure(args, name, env)
        finally:
            deleted = env.cleanup()
            if name == "callguard":
                print(f"# cleaned up {deleted} Redis key(s)")
    result = {"bench": "calls", "machine": info, "rate": args.rate, "duration": args.duration,
              "ring": args.ring, "talk": args.talk, "quota": args.quota, "events": args.events,
              "accounts": args.accounts, "pinned": args.pin, "worker": not args.no_worker,
              "server_env": args.server_env, "targets": results,
              "against_floor": compare(results)}
    emit_json(result, args.json_out)
    return 0 if all(r.get("books", {"ok": True})["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
