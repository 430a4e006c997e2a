"""What the live console costs the `callguard api` process with 1,000 calls in progress.

Puts --calls live sessions in Redis with the real engine (authorize + answer, on Redis'
own clock, over --accounts prepaid accounts; CHF 3.00/min billed 1/1, so every answered
call's cost moves every second: the costliest case for the feed), starts `callguard api`
pinned to one CPU (taskset), and measures the API process's CPU (utime + stime from
/proc/PID/stat) over --duration seconds in three phases of each run, in this order:

* idle: no console open (the baseline, the same process);
* 1 client: one console event stream (/v1/console/events) open;
* 3 clients: three streams.

With --churn N, N calls a second end and N new ones start and are answered during
every phase (1,000 calls of about 200 s each: N = 5), so the feed sends upserts and
removes as well as costs. It also times the poll itself in this process (the read, the
diff and the JSON of an update): CPU ms per poll with --calls sessions.

    .venv/bin/python bench/console_cpu.py                      # 3 runs x 3 x 30 s
    .venv/bin/python bench/console_cpu.py --quick
    .venv/bin/python bench/console_cpu.py --json-out bench/results.jsonl

Nothing asserts on the figures: it prints them (% of one core) and a RESULT line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time

import common
from common import (
    BenchEnv,
    CpuMeter,
    Subprocess,
    callguard_argv,
    free_port,
    print_machine,
    print_table,
    spread,
)

API_CPU, LOAD_CPU = 1, 0


class Client:
    """One console: an event stream read in a thread, its events and bytes counted."""

    def __init__(self, base: str, token: str):
        import httpx

        self.events = self.bytes = 0
        self.kinds: dict[str, int] = {}
        self.error: str | None = None
        self.done = threading.Event()
        self.client = httpx.Client(timeout=httpx.Timeout(5, read=30))
        self.thread = threading.Thread(target=self._run, args=(base, token), daemon=True)
        self.thread.start()

    def _run(self, base: str, token: str) -> None:
        try:
            with self.client.stream("GET", base + "/v1/console/events",
                                    headers={"Authorization": f"Bearer {token}"}) as reply:
                if reply.status_code != 200:
                    self.error = f"HTTP {reply.status_code}: {reply.read()[:200]!r}"
                    return
                for line in reply.iter_lines():
                    self.bytes += len(line) + 1
                    if line.startswith("event: "):
                        self.events += 1
                        kind = line[7:]
                        self.kinds[kind] = self.kinds.get(kind, 0) + 1
                    if self.done.is_set():
                        return
        except Exception as exc:  # noqa: BLE001 - reported with the figures
            if not self.done.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> dict:
        self.done.set()
        self.client.close()
        self.thread.join(10)
        return {"events": self.events, "bytes": self.bytes, "kinds": self.kinds,
                "error": self.error}


class Calls:
    """The live sessions, and the churn that ends and starts some every second."""

    def __init__(self, env: BenchEnv, calls: int):
        self.env, self.app = env, env.app
        self.n = 0
        self.live: list[str] = []
        for _ in range(calls):
            self.start()
        self.stop_churn = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        eng = self.app.engine
        account = self.env.accounts[self.n % len(self.env.accounts)]
        d = eng.authorize(account, common.PREMIUM_NUMBER, "outbound", f"1795236355.{self.n}")
        self.n += 1
        if not d.allow:
            raise RuntimeError(f"authorize {account}: {d.reason}")
        g = eng.answer(d.session)
        if g.state != "ans":
            raise RuntimeError(f"answer {d.session}: {g.state}")
        self.live.append(d.session)

    def end_one(self) -> None:
        self.app.engine.commit(self.live.pop(0), "16")

    def churn(self, per_second: int) -> None:
        if per_second <= 0:
            return
        self.stop_churn.clear()

        def run():
            while not self.stop_churn.wait(1.0):
                for _ in range(per_second):
                    self.end_one()
                    self.start()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def pause(self) -> None:
        self.stop_churn.set()
        if self.thread:
            self.thread.join(10)


def poll_cost(app, polls: int) -> dict:
    """CPU ms of one poll in this process: the read (Redis, SQL when due), the diff, the
    update's JSON for one subscriber."""
    from callguard.api import console

    poller = console.Poller(app)
    before = poller.read(frozenset())
    reads, diffs = [], []
    for _ in range(polls):
        time.sleep(1.0)  # a second on: the costs have moved, as in the server
        c0 = time.process_time()
        after = poller.read(frozenset())
        c1 = time.process_time()
        part = console.update_for(console.diff(before, after), None)
        if part is not None:
            console.sse("update", part)
        c2 = time.process_time()
        reads.append((c1 - c0) * 1000)
        diffs.append((c2 - c1) * 1000)
        before = after
    snapshot = len(console.sse("snapshot", console.snapshot_for(before, None)))
    return {"read_ms": spread(reads), "diff_json_ms": spread(diffs),
            "calls": len(before.calls), "accounts": len(before.accounts),
            "snapshot_bytes": snapshot}


def measure(proc: Subprocess, duration: float) -> dict:
    meter = CpuMeter({"api": proc.pid}).start()
    time.sleep(duration)
    cpu = meter.stop()
    return {"api": cpu["api"], "api_sys": cpu["api_sys"], "other": cpu["other"],
            "steal": cpu["steal"], "wall": cpu["wall"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="live calls (1000)")
    parser.add_argument("--accounts", type=int, default=100,
                        help="accounts the calls are spread over (100)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds a phase (30)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the three phases (3)")
    parser.add_argument("--churn", type=int, default=0,
                        help="calls ended and started a second during the phases (0)")
    parser.add_argument("--polls", type=int, default=10, help="polls timed in-process (10)")
    parser.add_argument("--label", default="console_cpu", help="the 'file' of --json-out")
    common.add_common_args(parser)
    args = parser.parse_args()
    # SIGTERM as Ctrl-C: the finally below stops the API process and removes the keys.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.duration, args.runs, args.polls = 5.0, 1, 3
    pin = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) > 1
    common.keep_results(args)
    info = print_machine()
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
    pinning = (f"pinned to CPU {API_CPU} (taskset), this script on CPU {LOAD_CPU}" if pin
               else "not pinned")
    print(f"# {args.calls} live calls over {args.accounts} accounts, churn {args.churn}/s; "
          f"API {pinning}; "
          f"{args.runs} run(s) x 3 phases x {args.duration:g} s", flush=True)
    env = BenchEnv(args.redis_url, quota=3600, keep=args.keep)
    proc = None
    calls = None
    try:
        env.setup(accounts=args.accounts)
        t0 = time.perf_counter()
        calls = Calls(env, args.calls)
        print(f"# {args.calls} calls put up in {time.perf_counter() - t0:.1f} s", flush=True)
        poll = poll_cost(env.app, args.polls)
        print(f"# one poll in-process: read {poll['read_ms']['median']:.1f} ms CPU, diff + "
              f"JSON {poll['diff_json_ms']['median']:.1f} ms; snapshot "
              f"{poll['snapshot_bytes']:,} bytes", flush=True)
        from callguard.api import tokens

        secret = tokens.create(env.app.books, "bench-console", "read")[1]
        port = free_port()
        argv = callguard_argv("api", "--bind", f"127.0.0.1:{port}")
        if pin:
            argv = ["taskset", "-c", str(API_CPU), *argv]
        proc = Subprocess(argv, env.env(CALLGUARD_HTTP_BIND="off"), env.tmp / "api.log",
                          port).start()
        base = f"http://127.0.0.1:{port}"
        time.sleep(2.0)  # settled after its start
        rows = []
        for run in range(1, args.runs + 1):
            calls.churn(args.churn)
            row = {"run": run}
            idle = measure(proc, args.duration)
            row.update(idle=idle["api"], idle_other=idle["other"])
            for n in (1, 3):
                clients = [Client(base, secret) for _ in range(n)]
                time.sleep(1.5)  # the snapshot sent, the poller running
                got = measure(proc, args.duration)
                seen = [c.stop() for c in clients]
                errors = [s["error"] for s in seen if s["error"]]
                if errors:
                    raise RuntimeError(f"a console stream failed: {errors[0]}")
                row.update({f"c{n}": got["api"], f"c{n}_sys": got["api_sys"],
                            f"c{n}_other": got["other"],
                            f"c{n}_events": sum(s["events"] for s in seen) / n,
                            f"c{n}_kbps": sum(s["bytes"] for s in seen) / n / 1024
                            / got["wall"]})
                time.sleep(1.5)  # the poller stopped before the next phase
            calls.pause()
            rows.append(row)
            print_table([{k: (v * 100 if k[:2] in ("id", "c1", "c3") and "events" not in k
                              and "kbps" not in k else v) for k, v in row.items()}],
                        list(row), title=f"run {run} (% of one core; events and KiB/s a "
                                         "client)")
        summary = {k: spread([r[k] for r in rows]) for k in rows[0] if k != "run"}
        print(f"\n# API process, % of one core (median, min-max over {len(rows)} runs):")
        for key in ("idle", "c1", "c3"):
            s = summary[key]
            print(f"#   {key:5s} {s['median'] * 100:5.2f} %  ({s['min'] * 100:.2f}-"
                  f"{s['max'] * 100:.2f})")
        print(f"#   console, 1 client, over idle: "
              f"{(summary['c1']['median'] - summary['idle']['median']) * 100:.2f} %; "
              f"3 clients: {(summary['c3']['median'] - summary['idle']['median']) * 100:.2f} %")
        log_lines = proc.log_lines()
        result = {"bench": "console_cpu", "calls": args.calls, "accounts": args.accounts,
                  "churn": args.churn, "duration": args.duration, "machine": info,
                  "pinning": {"api": API_CPU, "script": LOAD_CPU} if pin else None,
                  "poll": poll, "runs": rows, "summary": summary,
                  "server_log_lines": log_lines}
        common.emit_json(result)
        if args.json_out:
            with open(args.json_out, "a") as fh:
                fh.write(json.dumps({"file": args.label, "result": result}, sort_keys=True,
                                    default=common._json_default) + "\n")
        return 0
    finally:
        if calls is not None:
            calls.pause()
        if proc is not None:
            proc.stop()
        deleted = env.cleanup()
        print(f"# removed {deleted} Redis keys under {env.prefix}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
