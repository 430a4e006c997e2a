"""The worker's and the sweeper's cost follows the calls, not the number of accounts.

Two installations in one run, each on its own throwaway Redis key prefix and SQLite
file: the baseline with --baseline-accounts (1,000) and the measured one with
--accounts (1,000,000). The account hashes go straight into Redis (pipelined HSET of
the fields `state.account_fields` gives, plus balance/reserved/channels, and SADD to
the accounts set, in batches); only the --calls (100) accounts that get calls are
created through `service.create_account` (SQL books, then Redis from the outbox),
because `sync.Drain` books each commit into SQL. Those calls are authorised and
answered through `app.engine` on a simulated clock (`now_ms`).

Measured in this process, per repetition:
  drain, idle    one `sync.Drain(app, "scale").run_once()` with nothing in the streams
                 (the --calls calls up)
  sweep          one `service.sweep(app, now_ms=...)` with the calls up, none overdue
  drain, busy    one run_once() right after the calls were committed: it books --calls
                 CDRs into SQLite (the time spent inside `books.record_calls` is shown
                 apart: "sql")
each as wall time, this process's CPU (time.process_time) and the Redis server's CPU
(/proc/PID/task/*/schedstat, nanoseconds; Redis is shared, so other clients' work in
the same window counts too: see min-max). Then a real `callguard worker` process is
left idle for --worker-seconds (30) with the calls still up: utime+stime from
/proc/PID/stat before and after.

Pinning: this process and the worker are pinned (sched_setaffinity, `taskset -c`) to
one core, the one Redis did not last run on when Redis itself is not pinned; Redis is
never moved. Where Redis ran is sampled after every pass and reported.

Everything is deleted at the end (SCAN of each prefix, UNLINK in batches).

Examples:
  .venv/bin/python bench/scale.py                   # 1,000,000 accounts against 1,000
  .venv/bin/python bench/scale.py --quick           # 100,000 accounts, few repetitions
  .venv/bin/python bench/scale.py --accounts 200000 --json-out /tmp/scale.jsonl
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import emit_json, machine_busy, print_machine, print_table  # noqa: E402

from callguard import service, sync  # noqa: E402
from callguard.books.database import upgrade  # noqa: E402
from callguard.config import load_settings  # noqa: E402
from callguard.engine import state  # noqa: E402
from callguard.rating import Rate  # noqa: E402

PASSES = ("drain_idle", "sweep", "drain_busy")
LABELS = {"drain_idle": "drain, idle", "sweep": "sweep", "drain_busy": "drain, busy"}


# -- meters ---------------------------------------------------------------------------------

class RedisCpu:
    """CPU time of the Redis server's threads in ms, from schedstat (ns resolution)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.tasks = []
        if pid:
            with_tasks = Path(f"/proc/{pid}/task")
            try:
                self.tasks = [with_tasks / t / "schedstat" for t in os.listdir(with_tasks)]
            except OSError:
                self.tasks = []

    def ms(self) -> float:
        if not self.tasks:
            return float("nan")
        total = 0
        for path in self.tasks:
            try:
                with open(path) as fh:
                    total += int(fh.read().split()[0])
            except OSError:
                pass
        return total / 1e6

    def last_cpu(self) -> int | None:
        """The core the Redis main thread last ran on (field 39 of /proc/PID/stat)."""
        if not self.pid:
            return None
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                return int(fh.read().rpartition(")")[2].split()[36])
        except (OSError, IndexError, ValueError):
            return None


def schedstat_ms(pid: int) -> float:
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except OSError:
            pass
    return total / 1e6


class Timer:
    """Wraps one method of one object of this process (as an instance attribute: the
    package is not touched) to tell its share of a pass apart: `books.record_calls`
    (the SQL booking of the pass, one transaction)."""

    def __init__(self, obj, name: str):
        self.inner = getattr(obj, name)
        self.wall = self.cpu = 0.0
        self.calls = 0
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - t
            self.cpu += time.process_time() - c
            self.calls += 1

    def reset(self) -> None:
        self.wall = self.cpu = 0.0
        self.calls = 0


def pick_core(redis: RedisCpu, wanted: int | None) -> tuple[int, str]:
    cores = sorted(os.sched_getaffinity(0))
    if wanted is not None:
        return wanted, f"--cpu {wanted}"
    note = ""
    try:
        redis_cores = sorted(os.sched_getaffinity(redis.pid)) if redis.pid else []
    except OSError:
        redis_cores = []
    last = redis.last_cpu()
    if redis_cores and len(redis_cores) < len(cores):
        others = [c for c in cores if c not in redis_cores]
        if others:
            return others[0], f"Redis pinned to {redis_cores}: we take core {others[0]}"
    if redis_cores:
        note = (f"Redis (pid {redis.pid}) is not pinned (allowed cores "
                f"{','.join(map(str, redis_cores))}), last ran on core {last}; left as it is")
    choice = next((c for c in cores if c != last), cores[0])
    return choice, note or "Redis not visible on this machine"


def spread(values) -> dict[str, float]:
    data = [v for v in values if v == v]
    if not data:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(data), "min": min(data), "max": max(data),
            "n": len(data)}


# -- one installation --------------------------------------------------------------------------

class Installation:
    def __init__(self, args, label: str, accounts: int, prefix: str, core: int,
                 redis: RedisCpu):
        self.args, self.label, self.n, self.prefix = args, label, accounts, prefix
        self.core, self.redis = core, redis
        self.tmp = Path(tempfile.mkdtemp(prefix=f"callguard-scale-{label}-"))
        self.db_url = f"sqlite:///{self.tmp / 'books.db'}"
        settings = load_settings(env={}, home=str(self.tmp / "home"), redis_url=args.redis_url,
                                 database_url=self.db_url, key_prefix=prefix, node="scale")
        self.app = service.App(settings)
        upgrade(self.app.books.engine)
        self.called: list[str] = []
        self.redis_cores: collections.Counter = collections.Counter()
        self.t_ms = 0

    @staticmethod
    def account_id(i: int) -> str:
        return f"41{i:09d}"

    # setup
    def load(self) -> dict:
        app, r, keys = self.app, self.app.redis, self.app.keys
        state.check_layout(r, keys)
        state.ensure_groups(r, keys)
        rates = [Rate(common.PREMIUM_PREFIX, "premium", 3_000_000, 0, 1, 1),
                 Rate("41", "Switzerland", 100_000, 0, 60, 60)]
        service.import_plan(app, "default", "outbound", rates)
        app.plans.replace(app.books.load_plans())
        step = max(1, self.n // self.args.calls)
        self.called = [self.account_id(i * step) for i in range(min(self.args.calls, self.n))]
        t = time.perf_counter()
        for account in self.called:
            _row, applied = service.create_account(app, account,
                                                   opening_balance=common.BIG_BALANCE,
                                                   kind="prepaid", max_channels=0)
            if not applied.in_redis:
                raise RuntimeError(f"{account}: booked, not in Redis: {applied.error}")
        t_sql = time.perf_counter() - t
        # The rest straight into Redis, as the books' outbox would have put them.
        row = SimpleNamespace(kind="prepaid", status="active", block_reason=None,
                              credit_limit=0, max_channels=0, plan="default", cps_limit=0,
                              currency="CHF", warn_below=None, warn_at=None,
                              payment_method=None, auto_topup_amount=None,
                              auto_topup_below=None, max_calls_per_minute=None,
                              max_spend_per_hour=None, blocked_prefixes=None, on_fraud=None,
                              unblocked_at=None)
        fields = {**state.account_fields(row), "balance": common.BIG_BALANCE, "reserved": 0,
                  "channels": 0}
        called = set(self.called)
        batch = self.args.batch
        t = time.perf_counter()
        for start in range(0, self.n, batch):
            ids = [a for a in (self.account_id(i) for i in range(start, min(self.n,
                                                                             start + batch)))
                   if a not in called]
            pipe = r.pipeline(transaction=False)
            for a in ids:
                pipe.hset(keys.account(a), mapping=fields)
            if ids:
                pipe.sadd(keys.accounts, *ids)
            pipe.execute()
        t_raw = time.perf_counter() - t
        count = r.scard(keys.accounts)
        if count != self.n:
            raise RuntimeError(f"{count} accounts in Redis, {self.n} wanted")
        self.t_ms = service.redis_now_ms(r)
        return {"accounts": count, "sql_accounts": len(self.called), "sql_seconds": t_sql,
                "redis_seconds": t_raw}

    # calls on the simulated clock
    def put_up(self, tag: str) -> list[str]:
        eng, t = self.app.engine, self.t_ms
        sessions = []
        for i, account in enumerate(self.called):
            d = eng.authorize(account, common.PREMIUM_NUMBER, "outbound", f"{tag}c{i}", now_ms=t)
            if not d.allow:
                raise RuntimeError(f"authorize {account}: {d.reason}")
            g = eng.answer(d.session, now_ms=t + 2000)
            if g.state != "ans":
                raise RuntimeError(f"answer {d.session}: {g.state}")
            sessions.append(d.session)
        return sessions

    def commit_all(self, sessions: list[str]) -> None:
        eng, end = self.app.engine, self.t_ms + 32_000  # 30 s talked
        for session in sessions:
            c = eng.commit(session, "16", now_ms=end)
            if c.state != "done":
                raise RuntimeError(f"commit {session}: {c.state}")

    def timed(self, fn) -> tuple[object, dict]:
        r0 = self.redis.ms()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        c1 = time.process_time()
        r1 = self.redis.ms()
        self.redis_cores[self.redis.last_cpu()] += 1
        client, redis_ms = (c1 - c0) * 1e3, r1 - r0
        return out, {"wall_ms": (t1 - t0) * 1e3, "client_cpu_ms": client,
                     "redis_cpu_ms": redis_ms, "cpu_ms": client + redis_ms}

    def redis_background(self, seconds: float = 2.0) -> float:
        """Redis CPU as a fraction of a core while this process sends nothing: the other
        clients of a shared Redis, counted in every pass's Redis CPU too."""
        r0, t0 = self.redis.ms(), time.monotonic()
        time.sleep(seconds)
        return (self.redis.ms() - r0) / 1e3 / (time.monotonic() - t0)

    # the passes
    def measure_passes(self) -> dict:
        args, app = self.args, self.app
        drain = sync.Drain(app, "scale")
        sql = Timer(app.books, "record_calls")
        samples = {p: [] for p in PASSES}
        # Warm-up, not measured: scripts loaded, the consumer's pending list read once,
        # SQLAlchemy's statements compiled.
        sessions = self.put_up("w")
        service.sweep(app, now_ms=self.t_ms + 3000)
        drain.run_once()
        self.commit_all(sessions)
        while drain.run_once():
            pass
        self.t_ms += 60_000
        for rep in range(args.reps):
            sessions = self.put_up(f"r{rep}")
            closed, m = self.timed(lambda: service.sweep(app, now_ms=self.t_ms + 3000))
            if closed:
                raise RuntimeError(f"the sweep closed {len(closed)} live session(s)")
            samples["sweep"].append(m)
            done, m = self.timed(drain.run_once)
            if done:
                raise RuntimeError(f"an idle drain settled {done} entries")
            samples["drain_idle"].append(m)
            self.commit_all(sessions)
            sql.reset()
            done, m = self.timed(drain.run_once)
            if done != len(sessions):
                raise RuntimeError(f"a busy drain settled {done} of {len(sessions)} commits")
            m.update(sql_wall_ms=sql.wall * 1e3, sql_cpu_ms=sql.cpu * 1e3,
                     redis_side_wall_ms=m["wall_ms"] - sql.wall * 1e3,
                     redis_side_client_cpu_ms=m["client_cpu_ms"] - sql.cpu * 1e3,
                     booked=sql.calls)
            samples["drain_busy"].append(m)
            self.t_ms += 60_000
        # More idle passes, calls up: these two are cheap, so many more samples.
        self.live = self.put_up("live")
        for _ in range(args.idle_reps):
            closed, m = self.timed(lambda: service.sweep(app, now_ms=self.t_ms + 3000))
            samples["sweep"].append(m)
            _done, m = self.timed(drain.run_once)
            samples["drain_idle"].append(m)
        self.drain = drain
        return samples

    def measure_worker(self, seconds: float) -> dict:
        """A real `callguard worker`, pinned, idle for `seconds` with the calls up."""
        keys = self.app.keys
        node = "scale-worker"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
        env.update({"CALLGUARD_HOME": str(self.tmp / "home"),
                    "CALLGUARD_REDIS_URL": self.args.redis_url,
                    "CALLGUARD_DATABASE_URL": self.db_url, "CALLGUARD_KEY_PREFIX": self.prefix,
                    "CALLGUARD_NODE": node})
        argv = ["taskset", "-c", str(self.core), *common.callguard_argv("worker")]
        log_path = self.tmp / "worker.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not self.app.redis.exists(keys.node(node)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker did not start:\n"
                                       + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.05)
            time.sleep(self.args.worker_settle)  # past its start-up and first passes
            affinity = sorted(os.sched_getaffinity(proc.pid))
            busy0 = machine_busy()
            cpu0, s0 = common.proc_cpu_seconds(proc.pid), schedstat_ms(proc.pid)
            r0, t0 = self.redis.ms(), time.monotonic()
            time.sleep(seconds)
            cpu1, s1 = common.proc_cpu_seconds(proc.pid), schedstat_ms(proc.pid)
            r1, t1 = self.redis.ms(), time.monotonic()
            busy1 = machine_busy()
            wall = t1 - t0
            rss = common.proc_status(proc.pid)["VmRSS"] / 1024
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        log_lines = [line for line in log_path.read_text(errors="replace").splitlines()
                     if line.strip()]
        worker = (cpu1 - cpu0) / wall
        redis = (r1 - r0) / 1e3 / wall
        machine = (busy1[0] - busy0[0]) / wall
        return {"seconds": wall, "cpu_core": worker, "schedstat_core": (s1 - s0) / 1e3 / wall,
                "redis_core": redis, "machine_core": machine,
                "other_core": max(0.0, machine - worker - (redis if redis == redis else 0)),
                "rss_mb": rss, "affinity": affinity, "exit": proc.returncode,
                "log_lines": len(log_lines), "log_tail": log_lines[-3:]}

    def finish(self) -> None:
        """Commit the calls still up and book them: the installation ends quiet."""
        if getattr(self, "live", None):
            self.commit_all(self.live)
            while self.drain.run_once():
                pass
            self.live = []

    def cleanup(self) -> int:
        if self.args.keep:
            print(f"# kept {self.tmp} and Redis keys {self.prefix}:*", file=sys.stderr)
            return 0
        deleted = delete_prefix(self.app.redis, self.prefix)
        self.app.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return deleted


def delete_prefix(client, prefix: str, batch: int = 10_000) -> int:
    deleted, keys = 0, []
    for key in client.scan_iter(match=f"{prefix}:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            deleted += client.unlink(*keys)
            keys = []
    if keys:
        deleted += client.unlink(*keys)
    return deleted


# -- report ---------------------------------------------------------------------------------

def cell(s: dict, digits: int = 3) -> str:
    if not s["n"]:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def summarize_passes(samples: dict) -> dict:
    out = {}
    for p, rows in samples.items():
        keys = rows[0].keys() if rows else ()
        out[p] = {k: spread([r[k] for r in rows]) for k in keys}
    return out


def report(result: dict) -> None:
    base, big = result["baseline"], result["scale"]
    nb, nn = base["load"]["accounts"], big["load"]["accounts"]
    rows = []
    for p in PASSES:
        for inst in (base, big):
            s = inst["passes"][p]
            rows.append({"pass": LABELS[p], "accounts": inst["load"]["accounts"],
                         "n": s["wall_ms"]["n"], "wall ms": cell(s["wall_ms"]),
                         "client CPU ms": cell(s["client_cpu_ms"]),
                         "Redis CPU ms": cell(s["redis_cpu_ms"]),
                         "client+Redis CPU ms": cell(s["cpu_ms"])})
    print_table(rows, ["pass", "accounts", "n", "wall ms", "client CPU ms", "Redis CPU ms",
                       "client+Redis CPU ms"],
                f"one pass, median (min-max) over n repetitions, {result['calls']} calls up; "
                f"busy drain books {result['calls']} commits")
    print("# Redis CPU counts the shared Redis's other clients too; with none of ours it used "
          + ", ".join(f"{inst['redis_background_core'] * 100:.1f} % of a core "
                      f"({inst['load']['accounts']:,}-account phase)" for inst in (base, big))
          + ", i.e. that many us per ms of a pass")
    rows = []
    for inst in (base, big):
        s = inst["passes"]["drain_busy"]
        rows.append({"accounts": inst["load"]["accounts"], "wall ms": cell(s["wall_ms"]),
                     "of which SQL ms": cell(s["sql_wall_ms"]),
                     "without SQL ms": cell(s["redis_side_wall_ms"]),
                     "client CPU without SQL ms": cell(s["redis_side_client_cpu_ms"]),
                     "Redis CPU ms": cell(s["redis_cpu_ms"])})
    print_table(rows, ["accounts", "wall ms", "of which SQL ms", "without SQL ms",
                       "client CPU without SQL ms",
                       "Redis CPU ms"],
                f"busy drain: the SQLite booking ({result['calls']} CDR transactions) apart")
    rows = []
    for p, metric in [(p, m) for p in PASSES for m in ("wall_ms", "cpu_ms")] + [
            ("drain_busy", "redis_side_wall_ms")]:
        b, n = base["passes"][p][metric]["median"], big["passes"][p][metric]["median"]
        rows.append({"pass": LABELS[p], "metric": metric.replace("_ms", " ms (median)")
                     .replace("redis_side_wall", "wall without SQL")
                     .replace("cpu", "client+Redis CPU"),
                     f"{nb:,} accounts": f"{b:.3f}", f"{nn:,} accounts": f"{n:.3f}",
                     "ratio": f"{n / b:.2f}" if b else "-"})
    wb, wn = base.get("worker"), big.get("worker")
    if wb and wn:
        rows.append({"pass": "worker idle", "metric": "CPU % of a core",
                     f"{nb:,} accounts": f"{wb['cpu_core'] * 100:.3f}",
                     f"{nn:,} accounts": f"{wn['cpu_core'] * 100:.3f}",
                     "ratio": f"{wn['cpu_core'] / wb['cpu_core']:.2f}"
                     if wb["cpu_core"] else "-"})
    print_table(rows, ["pass", "metric", f"{nb:,} accounts", f"{nn:,} accounts", "ratio"],
                f"ratio {nn:,} / {nb:,} accounts ({nn // max(nb, 1):,}x the accounts)")
    rows = []
    for inst in (base, big):
        w = inst.get("worker")
        if not w:
            continue
        rows.append({"accounts": inst["load"]["accounts"], "seconds": f"{w['seconds']:.1f}",
                     "worker CPU % (utime+stime)": f"{w['cpu_core'] * 100:.3f}",
                     "worker CPU % (schedstat)": f"{w['schedstat_core'] * 100:.3f}",
                     "Redis CPU %": f"{w['redis_core'] * 100:.3f}",
                     "other load %": f"{w['other_core'] * 100:.1f}",
                     "RSS MB": f"{w['rss_mb']:.1f}", "pinned to": ",".join(map(str,
                                                                                w["affinity"]))})
    if rows:
        print_table(rows, ["accounts", "seconds", "worker CPU % (utime+stime)",
                           "worker CPU % (schedstat)", "Redis CPU %", "other load %", "RSS MB",
                           "pinned to"],
                    "callguard worker left idle (calls up, nothing to book); Redis CPU counts "
                    "every client of the shared Redis")
    lim = result["targets"]
    print("\n# targets at {:,} accounts: drain idle {:.3f} ms, sweep {:.3f} ms, busy drain "
          "without SQL {:.3f} ms (with SQL {:.3f} ms) against < 10 ms; worker idle {} against "
          "< 5 % of a core".format(nn, lim["drain_idle_ms"], lim["sweep_ms"],
                                   lim["drain_busy_without_sql_ms"], lim["drain_busy_ms"],
                                   f"{lim['worker_idle_pct']:.3f} %"
                                   if lim["worker_idle_pct"] == lim["worker_idle_pct"]
                                   else "-"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1_000_000,
                        help="accounts of the measured installation (1,000,000)")
    parser.add_argument("--baseline-accounts", type=int, default=1000,
                        help="accounts of the baseline installation (1,000)")
    parser.add_argument("--calls", type=int, default=100,
                        help="calls up, one per account, and commits per busy drain (100)")
    parser.add_argument("--reps", type=int, default=50,
                        help="repetitions of the cycle calls up, sweep, idle drain, commit, "
                             "busy drain (50)")
    parser.add_argument("--idle-reps", type=int, default=300,
                        help="further idle drain and sweep passes (300)")
    parser.add_argument("--worker-seconds", type=float, default=30.0,
                        help="how long the idle worker is measured (30)")
    parser.add_argument("--worker-settle", type=float, default=3.0,
                        help="seconds between the worker's start and its measurement (3)")
    parser.add_argument("--batch", type=int, default=10_000,
                        help="accounts per pipelined load batch (10,000)")
    parser.add_argument("--cpu", type=int, default=None,
                        help="core for this process and the worker (default: the one Redis "
                             "did not last run on)")
    common.add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.accounts = min(args.accounts, 100_000)
        args.reps = min(args.reps, 10)
        args.idle_reps = min(args.idle_reps, 40)
        args.worker_seconds = min(args.worker_seconds, 10.0)
    if args.accounts < args.calls or args.baseline_accounts < args.calls:
        parser.error("--accounts and --baseline-accounts must be at least --calls")

    common.keep_results(args)
    info = print_machine()
    redis = RedisCpu(common.redis_pid(args.redis_url))
    core, note = pick_core(redis, args.cpu)
    os.sched_setaffinity(0, {core})
    print(f"# pinning: this process and the worker on core {core} "
          f"(sched_setaffinity / taskset -c {core}); {note}", flush=True)
    run = "scale" + uuid.uuid4().hex[:8]
    result: dict = {"bench": "scale", "machine": info, "calls": args.calls, "reps": args.reps,
                    "idle_reps": args.idle_reps, "core": core, "pinning": note,
                    "redis_pid": redis.pid, "prefix": run}
    installs = []
    try:
        for label, n in (("baseline", args.baseline_accounts), ("scale", args.accounts)):
            inst = Installation(args, label, n, f"{run}-{label}", core, redis)
            installs.append(inst)
            try:
                load = inst.load()
                print(f"# {label}: {load['accounts']:,} accounts in Redis ({load['sql_accounts']} "
                      f"through the books in {load['sql_seconds']:.1f} s, the rest pipelined in "
                      f"{load['redis_seconds']:.1f} s), prefix {inst.prefix}", flush=True)
                used = inst.app.redis.info("memory")["used_memory"] / 2**20
                background = inst.redis_background()
                samples = inst.measure_passes()
                passes = summarize_passes(samples)
                print(f"# {label}: passes done (Redis used memory {used:,.0f} MB, Redis CPU "
                      f"with no client of ours {background * 100:.1f} % of a core); "
                      f"drain idle {passes['drain_idle']['wall_ms']['median']:.3f} ms, "
                      f"sweep {passes['sweep']['wall_ms']['median']:.3f} ms, "
                      f"busy drain {passes['drain_busy']['wall_ms']['median']:.3f} ms",
                      flush=True)
                worker = inst.measure_worker(args.worker_seconds)
                print(f"# {label}: idle worker {worker['cpu_core'] * 100:.3f} % of a core over "
                      f"{worker['seconds']:.1f} s", flush=True)
                inst.finish()
                result[label] = {"load": load, "passes": passes, "worker": worker,
                                 "redis_used_mb": used, "redis_background_core": background,
                                 "redis_last_core": {str(k): v for k, v in
                                                     inst.redis_cores.items()}}
            finally:
                deleted = inst.cleanup()
                print(f"# {label}: cleaned up {deleted:,} Redis key(s)", flush=True)
    finally:
        if not args.keep:
            import redis as redis_py

            client = redis_py.Redis.from_url(args.redis_url)
            left = delete_prefix(client, run)
            client.close()
            print(f"# keys of prefix {run} left at the end: {left} (deleted)")

    big = result["scale"]["passes"]
    result["targets"] = {
        "drain_idle_ms": big["drain_idle"]["wall_ms"]["median"],
        "sweep_ms": big["sweep"]["wall_ms"]["median"],
        "drain_busy_ms": big["drain_busy"]["wall_ms"]["median"],
        "drain_busy_without_sql_ms": big["drain_busy"]["redis_side_wall_ms"]["median"],
        "worker_idle_pct": result["scale"]["worker"]["cpu_core"] * 100,
    }
    cores = {label: result[label]["redis_last_core"] for label in ("baseline", "scale")}
    print(f"# Redis main thread last ran on (core: passes): {cores}")
    report(result)
    emit_json(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
