"""Shared helpers for the benchmark scripts in bench/.

* `BenchEnv`: a fresh callguard installation on a throwaway Redis key prefix and a
  throwaway SQLite file under a temp dir (keys and files removed at the end), with a
  rate plan and N prepaid accounts set up the way the CLI does it.
* `ServeProcess`: `callguard serve asterisk` as a subprocess of that installation
  (`serve_freeswitch` for `callguard serve freeswitch`).
* Process and machine meters (/proc), percentiles, a result table and a JSON line.

Nothing here asserts on timings: the scripts print figures, people judge them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AFFINITY = len(os.sched_getaffinity(0))  # CPUs this process may use, before any pinning
PAGE = os.sysconf("SC_PAGE_SIZE")

PREMIUM_PREFIX = "4190"
PREMIUM_NUMBER = "41901234567"  # matches the premium row: CHF 3.00/min, 1/1
BIG_BALANCE = 1_000_000 * 1_000_000  # CHF 1,000,000 in micro-units


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help=f"Redis to use (default {DEFAULT_REDIS_URL}); keys go under a "
                             "throwaway prefix that is deleted at the end")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (well under 30 s of load)")
    parser.add_argument("--json-out", metavar="FILE",
                        help="also append the result JSON line to FILE")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (serve logs, SQLite file) and the Redis keys")
    add_results_args(parser)


# -- the installation under test ------------------------------------------------------------

class BenchEnv:
    """A throwaway callguard installation: temp home, SQLite books, Redis key prefix."""

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, quota: int = 60, keep: bool = False,
                 node: str = "bench", **settings):
        from callguard.config import load_settings

        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix="callguard-bench-"))
        self.prefix = "bench" + uuid.uuid4().hex[:10]
        self.redis_url = redis_url
        self.db_url = f"sqlite:///{self.tmp / 'books.db'}"
        self.quota = quota
        self.settings = load_settings(
            env={}, home=str(self.tmp / "home"), redis_url=redis_url, database_url=self.db_url,
            key_prefix=self.prefix, node=node, quota_seconds=quota, **settings)
        self.accounts: list[str] = []
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from callguard.books.database import upgrade
            from callguard.service import App

            self._app = App(self.settings)
            upgrade(self._app.books.engine)
        return self._app

    def setup(self, accounts: int = 100, balance: int = BIG_BALANCE,
              rate_per_min: int = 3_000_000, **values) -> BenchEnv:
        """Import a plan (premium 4190 at CHF 3.00/min, 1/1 by default; rate 0 makes calls
        free) and create `accounts` prepaid accounts with `balance` and unlimited channels
        (and `values`: more account settings)."""
        from callguard import service
        from callguard.rating import Rate

        app = self.app
        rates = [Rate(PREMIUM_PREFIX, "premium", rate_per_min, 0, 1, 1),
                 Rate("41", "Switzerland", 100_000, 0, 60, 60)]
        service.import_plan(app, "default", "outbound", rates)
        app.plans.replace(app.books.load_plans())
        for n in range(accounts):
            account = f"4144{n:07d}"
            _row, applied = service.create_account(app, account, opening_balance=balance,
                                                   kind="prepaid", max_channels=0, **values)
            if not applied.in_redis:
                raise RuntimeError(f"account {account} booked but not in Redis: {applied.error}")
            self.accounts.append(account)
        return self

    def env(self, **extra) -> dict[str, str]:
        """The environment for a callguard subprocess of this installation."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
        env.update({
            "CALLGUARD_HOME": str(self.tmp / "home"),
            "CALLGUARD_REDIS_URL": self.redis_url,
            "CALLGUARD_DATABASE_URL": self.db_url,
            "CALLGUARD_KEY_PREFIX": self.prefix,
            "CALLGUARD_NODE": self.settings.node,
            "CALLGUARD_QUOTA_SECONDS": str(self.quota),
        })
        env.update({k: str(v) for k, v in extra.items() if v is not None})
        return env

    def redis_totals(self) -> dict[str, int]:
        """Sum of reserved and channels over the accounts, and live session count (the
        shards' live sets; every one under this prefix is ours)."""
        from callguard.engine.core import SHARDS

        r, keys = self.app.redis, self.app.keys
        pipe = r.pipeline(transaction=False)
        for a in self.accounts:
            pipe.hmget(keys.account(a), "reserved", "channels")
        for shard in range(SHARDS):
            pipe.zcard(keys.live(shard))
        out = pipe.execute()
        accounts, live = out[:len(self.accounts)], out[len(self.accounts):]
        reserved = sum(int(x[0] or 0) for x in accounts)
        channels = sum(int(x[1] or 0) for x in accounts)
        return {"reserved": reserved, "channels": channels, "live": sum(live)}

    def drop_sessions(self) -> int:
        """Forget every session (no PBX commits them here): the next measurement starts from
        idle accounts, and the server's sweeper never closes old ones while it is measured.
        The shards' live sets and event streams go too (nobody books these calls)."""
        from callguard.engine.core import SHARDS

        client = self.app.redis
        sessions = list(client.scan_iter(match=f"{self.prefix}:*:s:*", count=5000))
        pipe = client.pipeline(transaction=False)
        for start in range(0, len(sessions), 5000):
            pipe.unlink(*sessions[start:start + 5000])
        keys = self.app.keys
        for shard in range(SHARDS):
            pipe.unlink(keys.live(shard), keys.events(shard))
        for a in self.accounts:
            pipe.hset(keys.account(a), mapping={"reserved": 0, "channels": 0})
        pipe.execute()
        return len(sessions)

    def cleanup(self) -> int:
        """Delete every key under the prefix and the temp dir; returns keys deleted."""
        if self.keep:
            print(f"# kept {self.tmp} and Redis keys {self.prefix}:*", file=sys.stderr)
            return 0
        from callguard.engine.connect import connect

        deleted = 0
        client = connect(self.redis_url)  # a cluster too: keys one by one (slots differ)
        batch = []
        for key in client.scan_iter(match=f"{self.prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += _unlink(client, batch)
                batch = []
        if batch:
            deleted += _unlink(client, batch)
        client.close()
        if self._app is not None:
            self._app.books.engine.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return deleted

    def __enter__(self) -> BenchEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 30.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


class Subprocess:
    """A server subprocess with its stderr in a log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None, log_path: Path,
                 port: int, host: str = "127.0.0.1", cpu: int | None = None):
        self.argv, self.env, self.log_path = argv, env, log_path
        self.host, self.port, self.cpu = host, port, cpu
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Subprocess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.cpu is not None:
            os.sched_setaffinity(self.proc.pid, {self.cpu})
        # A probe connection: both servers count it as a request that never came.
        wait_port(self.host, self.port, timeout, self.proc)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def log_lines(self) -> int:
        try:
            return len(self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _unlink(client, keys) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
    return sum(pipe.execute())


GCPROBE_DIR = Path(__file__).resolve().parent / "gcprobe"


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server process (repeatable), e.g. "
                             "PYTHONPATH=/tmp/scratch to try a patched copy of callguard")
    parser.add_argument("--gc-probe", action="store_true",
                        help="record the server's garbage-collector pauses "
                             "(bench/gcprobe/sitecustomize.py) and print them")


def server_env(args) -> dict[str, str]:
    extra = dict(item.split("=", 1) for item in args.server_env)
    if args.gc_probe:
        path = [str(GCPROBE_DIR)] + [p for p in (extra.get("PYTHONPATH")
                                                 or os.environ.get("PYTHONPATH", "")).split(":")
                                      if p]
        extra["PYTHONPATH"] = ":".join(path)
        extra["CALLGUARD_BENCH_GC_PROBE"] = "1"
    return extra


def gcprobe_summary(log_path: Path) -> dict | None:
    """The last GCPROBE line of a server log, as a dict."""
    last = None
    try:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("GCPROBE "):
                last = line[8:]
    except OSError:
        return None
    return json.loads(last) if last else None


class Scraper:
    """GETs a server's /metrics every `every` seconds in a thread, as Prometheus would."""

    def __init__(self, port: int, every: float):
        import httpx

        self.url, self.every = f"http://127.0.0.1:{port}/metrics", every
        self.client = httpx.Client(timeout=10)
        self.times: list[float] = []
        self.sizes: list[int] = []
        self.errors = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            started = time.perf_counter()
            try:
                self.sizes.append(len(self.client.get(self.url).content))
                self.times.append(time.perf_counter() - started)
            except Exception:  # noqa: BLE001 - counted, the load goes on
                self.errors += 1

    def stop(self) -> dict:
        self.done.set()
        self.thread.join(timeout=15)
        times = sorted(self.times) or [float("nan")]
        return {"scrapes": len(self.times), "errors": self.errors,
                "median_ms": round(1000 * times[len(times) // 2], 2),
                "max_ms": round(1000 * times[-1], 2),
                "bytes": self.sizes[-1] if self.sizes else 0}


def callguard_argv(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("callguard")
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-m", "callguard", *args]


def serve_asterisk(env: BenchEnv, port: int, ami_url: str | None = None,
                   cpu: int | None = None, **extra_env) -> Subprocess:
    """`callguard serve asterisk` for this installation, FastAGI on 127.0.0.1:port, with
    its own node identity. Without `ami_url` it denies every call (fail_closed)."""
    e = env.env(CALLGUARD_AGI_BIND=f"127.0.0.1:{port}", CALLGUARD_AMI_URL=ami_url,
                CALLGUARD_NODE=f"{env.settings.node}-serve-{port}", **extra_env)
    return Subprocess(callguard_argv("serve", "asterisk"), e,
                      env.tmp / f"serve-{port}.log", port, cpu=cpu)


class ThreadedPeer:
    """A simulated PBX's event-link server on its own event loop in a thread: it keeps
    answering a serve process (keepalives) while this process's own loop is stopped or
    busy, e.g. between the runs of a load generator."""

    def __init__(self, sim, name: str):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()
        self.sim = sim
        self._call(self.sim.start())

    def _call(self, coro, timeout: float | None = 30.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def logged_in(self) -> int:
        """Event-link sessions that logged in and listen for events."""
        return len(self.sim._listeners)

    def announce(self, data: bytes) -> None:
        """Write event bytes (the channel-creation events of calls a load generator is about
        to place, as the PBX sends them) to every listener, without waiting: from the
        peer's thread, so they race the call setups as a real PBX's do."""
        def write():
            for writer in list(self.sim._listeners):
                if not writer.is_closing():
                    writer.write(data)

        self.loop.call_soon_threadsafe(write)

    def stop(self) -> None:
        try:
            self._call(self.sim.stop(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class ThreadedAsterisk(ThreadedPeer):
    """The simulated Asterisk's AMI server as a ThreadedPeer. It also ends calls the
    generator placed, with the Hangup events a real Asterisk sends."""

    def __init__(self):
        from callguard.simulator.asterisk import SimulatedAsterisk

        super().__init__(SimulatedAsterisk(agi_port=0), "ami-peer")

    @property
    def ami_url(self) -> str:
        return self.sim.ami_url

    def actions(self, name: str) -> int:
        return sum(1 for a in self.sim.actions if a.get("Action", "").lower() == name)

    def hang_up(self, calls) -> int:
        """Send a Hangup event (cause 16) for each call (anything with the SimCall fields
        channel, uniqueid, account, exten); returns how many."""
        calls = list(calls)

        async def send():
            for start in range(0, len(calls), 1000):
                self.sim.emit(b"".join(
                    self.sim._event("Hangup", c, extra=["Cause: 16", "Cause-txt: Normal Clearing"])
                    for c in calls[start:start + 1000]))
                for writer in list(self.sim._listeners):
                    if not writer.is_closing():
                        try:
                            await writer.drain()
                        except ConnectionError:
                            pass
            return len(calls)

        return self._call(send(), timeout=None)



def serve_freeswitch(env: BenchEnv, port: int, esl_url: str | None = None,
                     cpu: int | None = None, **extra_env) -> Subprocess:
    """`callguard serve freeswitch` for this installation, outbound ESL on 127.0.0.1:port,
    with its own node identity. Without `esl_url` it denies every call (fail_closed)."""
    e = env.env(CALLGUARD_ESL_BIND=f"127.0.0.1:{port}", CALLGUARD_ESL_URL=esl_url,
                CALLGUARD_NODE=f"{env.settings.node}-serve-fs-{port}", **extra_env)
    return Subprocess(callguard_argv("serve", "freeswitch"), e,
                      env.tmp / f"serve-fs-{port}.log", port, cpu=cpu)


class ThreadedFreeSWITCH(ThreadedPeer):
    """The simulated FreeSWITCH's inbound ESL server as a ThreadedPeer: auth, `event
    plain`, `api status`, `show channels as json`, sched_hangup / sched_del / uuid_kill,
    answered as the simulator does. `send_events` writes ready-made event frames (the
    CHANNEL_HANGUP_COMPLETE of calls a load generator placed) to every listener."""

    def __init__(self, sim=None):
        from callguard.simulator.freeswitch import SimulatedFreeSWITCH

        super().__init__(sim or SimulatedFreeSWITCH(outbound_port=0), "esl-peer")

    @property
    def esl_url(self) -> str:
        return self.sim.esl_url

    def commands(self, prefix: str) -> int:
        """Inbound commands received that start with `prefix` ("api show channels")."""
        return sum(1 for c in list(self.sim.commands) if c.startswith(prefix))

    def send_events(self, frames) -> int:
        """Write event frames (bytes) to every event listener, 1,000 at a time, draining
        between; returns how many."""
        frames = list(frames)

        async def send():
            for start in range(0, len(frames), 1000):
                data = b"".join(frames[start:start + 1000])
                for writer in list(self.sim._listeners):
                    if not writer.is_closing():
                        writer.write(data)
                        try:
                            await writer.drain()
                        except ConnectionError:
                            pass
            return len(frames)

        return self._call(send(), timeout=None)



# -- meters -----------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    # After the ")" of comm, field 3 (state) is index 0: utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds: user space, and the kernel on its behalf."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and Threads of a process, in kB / count."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def machine_busy() -> tuple[float, float, float, float]:
    """(busy, total, softirq, steal) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    values = [int(v) for v in parts]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return ((total - idle) / CLK_TCK, total / CLK_TCK, values[6] / CLK_TCK,
            values[7] / CLK_TCK)


def redis_pid(redis_url: str) -> int | None:
    """The Redis server's pid, if it runs on this machine and we can see it."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url)
        pid = int(client.info("server")["process_id"])
        client.close()
    except Exception:  # noqa: BLE001 - a meter; the bench goes on without it
        return None
    return pid if Path(f"/proc/{pid}/stat").exists() else None


class CpuMeter:
    """CPU used by named processes and by the whole machine between start() and stop().

    `other` is what the rest of the machine used: a large figure means something else
    ran at the same time (another test run) and the timings are noisy.
    """

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {name: pid for name, pid in pids.items() if pid}

    def _read(self):
        cpu = {}
        for name, pid in self.pids.items():
            try:
                cpu[name] = proc_cpu_split(pid)
            except OSError:
                cpu[name] = (0.0, 0.0)
        return time.monotonic(), cpu, machine_busy()

    def start(self) -> CpuMeter:
        self.t0, self.cpu0, self.m0 = self._read()
        return self

    def stop(self) -> dict[str, float]:
        """Fraction of one core for each process, the machine ('all') and the rest ('other')."""
        t1, cpu1, m1 = self._read()
        wall = max(t1 - self.t0, 1e-9)
        out = {name: (sum(cpu1[name]) - sum(self.cpu0[name])) / wall for name in self.pids}
        # The kernel's share (syscalls, loopback TCP) of each process's CPU.
        out.update({f"{name}_sys": (cpu1[name][1] - self.cpu0[name][1]) / wall
                    for name in self.pids})
        out["all"] = (m1[0] - self.m0[0]) / wall
        # softirq: mostly loopback TCP of the processes measured, not charged to them.
        # steal: the hypervisor ran something else on our virtual CPUs.
        out["softirq"] = (m1[2] - self.m0[2]) / wall
        out["steal"] = (m1[3] - self.m0[3]) / wall
        out["other"] = max(0.0, out["all"] - sum(out[n] for n in self.pids)
                           - out["softirq"] - out["steal"])
        out["wall"] = wall
        return out


# -- statistics and output ---------------------------------------------------------------------

def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summarize(values) -> dict[str, float]:
    """count, median, p90, p99, p99.9, max (in the values' unit)."""
    data = sorted(values)
    return {
        "n": len(data),
        "median": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
        "p999": percentile(data, 99.9),
        "max": data[-1] if data else float("nan"),
    }


def spread(values) -> dict[str, float]:
    """median, min, max over repeated runs."""
    data = [v for v in values if v == v]  # drop nan
    if not data:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(data), "min": min(data), "max": max(data)}


def fmt(value, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(rows: list[dict], columns: list[str], title: str | None = None,
                digits: int = 2) -> None:
    if title:
        print(f"\n{title}")
    cells = [[fmt(row.get(c, ""), digits) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def emit_json(result: dict, json_out: str | None = None) -> None:
    line = json.dumps(result, sort_keys=True, default=_json_default)
    print("RESULT " + line)
    if json_out:
        with open(json_out, "a") as fh:
            fh.write(line + "\n")
    if _KEPT:
        _write_kept(result)
    sys.stdout.flush()


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return round(value, 6)
    return repr(value)


def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = None
    try:
        import hiredis
        hi = hiredis.__version__
    except ImportError:
        hi = None
    git = git_state()
    return {
        **git,
        "nproc": os.cpu_count(),
        "affinity": AFFINITY,
        "cpu_model": model,
        "python": platform.python_version(),
        "uvloop": uv,
        "hiredis": hi,
        "loadavg": os.getloadavg()[0],
        "loadavg_5_15": list(os.getloadavg()[1:]),
        "kernel": platform.release(),
    }


def git_state() -> dict:
    """The commit measured, and the files of callguard/ and bench/ changed from it (the
    code under test and the generator; not the figures kept in bench/)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True,
                              text=True, timeout=5).stdout

    try:
        full = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "callguard",
                      "bench", ":!bench/results.jsonl", ":!bench/*.md")
    except (OSError, subprocess.SubprocessError):
        full, changed = "", ""
    full = full.strip()
    return {"git": full[:7], "git_full": full,
            "dirty": [line[3:] for line in changed.splitlines() if line.strip()]}


def print_machine(info: dict | None = None, pinning: dict | None = None) -> dict:
    """Print the machine line (and where the processes are pinned, when the script pins:
    `pinning` from `pin_processes`) and return the description, pinning included."""
    info = info or machine_info()
    if pinning is not None:
        info["pinning"] = pinning
    print(f"# machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
          f"uvloop {info['uvloop']}, hiredis {info['hiredis']}, "
          f"load average {info['loadavg']:.2f}; callguard at {info['git']}"
          + (f" with local changes in {', '.join(info['dirty'])}" if info["dirty"] else "")
          + ("" if pinning is None else "; pinned" if pinning["pinned"] else "; not pinned"))
    if pinning is not None:
        print(f"# pinning: {pinning['note']}")
    sys.stdout.flush()
    return info


def install_uvloop() -> bool:
    """Use uvloop for asyncio.run() in this process where installed."""
    try:
        import uvloop
    except ImportError:
        return False
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class LoopLag:
    """How late this process's event loop wakes up (a busy loop delays every measurement)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.samples: list[float] = []
        self.task = None

    async def _run(self) -> None:
        import asyncio

        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(time.perf_counter() - t - self.interval)

    def start(self) -> LoopLag:
        import asyncio

        self.samples = []
        self.task = asyncio.ensure_future(self._run())
        return self

    def stop(self) -> dict[str, float]:
        if self.task:
            self.task.cancel()
        return {k: (v * 1000 if k != "n" else v) for k, v in summarize(self.samples).items()}


def raise_fd_limit() -> int:
    """Soft limit of open files up to the hard limit (inherited by the servers we start)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- pinning ----------------------------------------------------------------------------------

GENERATOR_CPU, SERVER_CPU = 0, 1
SHARED_REDIS = ("127.0.0.1", 6379)  # the machine's Redis: other work uses it too


def add_pin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-pin", dest="pin", action="store_false", default=True,
                        help=f"leave the scheduler alone (default: pinned where taskset exists "
                             f"and CPUs {GENERATOR_CPU} and {SERVER_CPU} are ours: this "
                             f"generator on CPU {GENERATOR_CPU}, the server on CPU "
                             f"{SERVER_CPU}, and its Redis there too unless it is the "
                             f"machine's shared one on port {SHARED_REDIS[1]})")
    parser.add_argument("--pin", dest="pin", action="store_true",
                        help="the default; accepted so old command lines still run")


def pin_processes(args, redis_url: str | None = None) -> dict:
    """Pin this process (the generator, and the threads it starts later) to GENERATOR_CPU
    unless --no-pin or the machine cannot; the caller starts its server on `server`. A
    Redis on this machine other than the shared one goes to SERVER_CPU beside the server
    (its affinity given back at exit); the shared one is left where it is: moving it would
    move everybody's Redis. Returns where each process goes, with a note saying so."""
    why = ("--no-pin" if not args.pin
           else "no taskset on this machine" if shutil.which("taskset") is None
           else f"CPUs {GENERATOR_CPU} and {SERVER_CPU} are not both ours"
           if not {GENERATOR_CPU, SERVER_CPU} <= os.sched_getaffinity(0) else "")
    if why:
        return {"pinned": False, "generator": None, "server": None, "redis": None,
                "note": f"none ({why})"}
    os.sched_setaffinity(0, {GENERATOR_CPU})
    redis_cpu, redis_note = None, "Redis not pinned (not one of this machine's)"
    pid = redis_pid(redis_url) if redis_url else None
    if pid and is_shared_redis(redis_url):
        redis_note = f"Redis not pinned (the machine's shared one, pid {pid})"
    elif pid and _pin_threads(pid, SERVER_CPU):
        redis_cpu, redis_note = SERVER_CPU, f"Redis (pid {pid}) on CPU {SERVER_CPU}"
    return {"pinned": True, "generator": GENERATOR_CPU, "server": SERVER_CPU,
            "redis": redis_cpu,
            "note": f"this generator on CPU {GENERATOR_CPU}, the server on CPU {SERVER_CPU}, "
                    + redis_note}


def is_shared_redis(redis_url: str) -> bool:
    from urllib.parse import urlsplit

    url = urlsplit(redis_url)
    return url.hostname in ("127.0.0.1", "localhost") and (url.port or 6379) == SHARED_REDIS[1]


def _pin_threads(pid: int, cpu: int) -> bool:
    """Every thread of `pid` on `cpu`, their own affinity given back when this one exits."""
    import atexit

    saved: dict[int, set[int]] = {}

    def restore():
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)

    atexit.register(restore)
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            tid = int(task.name)
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
    except OSError as exc:
        print(f"# cannot pin Redis (pid {pid}): {exc}")
        restore()
        return False
    return True


# -- results kept ---------------------------------------------------------------------------

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_KEPT: dict = {}  # this run's files: base path, argv, start time, results written


def add_results_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), metavar="DIR",
                        help="keep this run's RESULT and its whole output in DIR as "
                             "<UTC time>-<commit>[-dirty]-<script>.json and .out (default "
                             "bench/results/; read them with bench/compare.py)")
    parser.add_argument("--no-results", action="store_true", help="keep no result files")


class _Tee:
    """A text stream that also writes to a file: the run's output as it was printed."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def keep_results(args, script: str | None = None) -> Path | None:
    """From here on, this process's stdout and stderr also go to the run's .out file, and
    each emit_json writes its result, the machine and the command line to its .json.
    Call it once, right after parsing the arguments."""
    if getattr(args, "no_results", False) or _KEPT:
        return None
    script = script or Path(sys.argv[0]).stem
    git = git_state()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{started}-{git['git'] or 'nogit'}{'-dirty' if git['dirty'] else ''}-{script}"
    folder = Path(getattr(args, "results_dir", None) or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    base, n = folder / name, 1
    while base.with_suffix(".out").exists():  # two runs in the same second
        n += 1
        base = folder / f"{name}-{n}"
    out = open(base.with_suffix(".out"), "w", buffering=1)  # noqa: SIM115 - open until exit
    out.write(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    sys.stdout, sys.stderr = _Tee(sys.stdout, out), _Tee(sys.stderr, out)
    _KEPT.update(base=base, script=script, argv=list(sys.argv), started=started, written=0)
    print(f"# results kept in {base}.out (and .json)")
    return base


def _write_kept(result: dict) -> None:
    _KEPT["written"] += 1
    base = _KEPT["base"]
    if _KEPT["written"] > 1:  # a script that prints more than one RESULT
        base = base.with_name(f"{base.name}-{_KEPT['written']}")
    record = {"script": _KEPT["script"], "argv": _KEPT["argv"], "started": _KEPT["started"],
              "finished": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
              "out": _KEPT["base"].name + ".out",
              "machine": result.get("machine") or machine_info(), "result": result}
    base.with_suffix(".json").write_text(
        json.dumps(record, sort_keys=True, indent=1, default=_json_default) + "\n")
