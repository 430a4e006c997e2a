"""The fault drill: random traffic through the real `serve asterisk` against the
simulated Asterisk, while every part is killed or cut at random, then the books
are checked to the micro-unit.

    .venv/bin/python bench/chaos.py                 # 180 s of faults, ~300 accounts
    .venv/bin/python bench/chaos.py --quick         # 40 s
    .venv/bin/python bench/chaos.py --seconds 600 --seed 7 --json-out chaos.jsonl

Parts: a redis-server of its own (append-only file, fsync always, so a SIGKILL
loses nothing Redis acknowledged), PostgreSQL behind a TCP proxy the drill can
cut (a schema of its own on 127.0.0.1:5432; SQLite, without that fault, when
there is no PostgreSQL), `callguard serve asterisk` and `callguard worker` as
real processes, the simulated Asterisk (FastAGI client, AMI server) here.

Faults, one every few seconds at random: SIGKILL of serve (restarted after
0-3 s), SIGKILL of the worker, SIGKILL of Redis (restarted after 1-3 s), the
database cut off for 2-8 s, the AMI link dropped, the AMI link black-holed for
2-10 s. Operators top accounts up meanwhile (with a reference, retried when a
command fails).

At the end, everything healed and every call over: `callguard reconcile` must
exit 0, every answered call must have exactly one CDR, no account may have
spent more than its credit plus one increment per call, and nothing may be
left in the streams, the pending lists, the outbox or the dead letters.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

from callguard import service  # noqa: E402
from callguard.books.database import upgrade  # noqa: E402
from callguard.books.models import Cdr, RedisOutbox  # noqa: E402
from callguard.clock import Clock  # noqa: E402
from callguard.config import load_settings  # noqa: E402
from callguard.engine.core import SHARDS  # noqa: E402
from callguard.money import format_full  # noqa: E402
from callguard.rating import Rate  # noqa: E402
from callguard.simulator.asterisk import SimulatedAsterisk  # noqa: E402
from callguard.simulator.faults import Proxy, RedisServer, free_port  # noqa: E402

RATES = [
    Rate("4190", "premium 1/1", 3_000_000, 0, 1, 1),
    Rate("41", "national 60/60", 100_000, 0, 60, 60),
    Rate("417", "mobile 30/6", 400_000, 50_000, 30, 6),
]
NUMBERS = ["41901234567", "41441234567", "41791234567"]
GRACE = 1  # seconds the PBX's own deadline lies past a grant: within one 1 s increment
QUOTA = 6


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Part:
    """A callguard process the drill kills and restarts."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path):
        self.name, self.argv, self.env = name, argv, env
        self.log = open(logdir / f"{name}.log", "a")  # noqa: SIM115 - for the whole drill
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=self.log)
        self.starts += 1

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Drill:
    def __init__(self, args):
        self.args = args
        self.rnd = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="callguard-chaos-"))
        self.faults: collections.Counter[str] = collections.Counter()
        self.calls: list = []
        self.topups: list[tuple[str, int, str]] = []
        self.topups_refused = 0
        self.redis = RedisServer(self.tmp / "redis").start()
        self.prefix = "chaos" + uuid.uuid4().hex[:6]
        self.schema = None
        self.proxy = None
        self.direct_url, self.served_url = self._database()
        self.settings = load_settings(
            env={}, home=str(self.tmp / "home"), redis_url=self.redis.url,
            database_url=self.direct_url, key_prefix=self.prefix, node="chaos-cli",
            quota_seconds=QUOTA, grace_seconds=GRACE)
        self.app = service.App(self.settings)
        self.clock = Clock()
        self.sim = SimulatedAsterisk(agi_port=free_port(), clock=self.clock)
        self.accounts: dict[str, dict] = {}

    def _database(self) -> tuple[str, str]:
        url = self.args.database_url
        if not url.startswith("postgresql"):
            path = self.tmp / "books.db"
            return f"sqlite:///{path}", f"sqlite:///{path}"
        self.schema = "chaos_" + uuid.uuid4().hex[:8]
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {self.schema}")
        admin.dispose()
        sep = "&" if "?" in url else "?"
        direct = f"{url}{sep}options=-csearch_path%3D{self.schema}"
        parts = urlsplit(direct)
        self.proxy = Proxy((parts.hostname, parts.port or 5432))
        user = f"{parts.username}@" if parts.username else ""
        served = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.proxy.port}"))
        return direct, served

    # -- set-up ------------------------------------------------------------------------
    def prepare(self) -> None:
        upgrade(self.app.books.engine)
        service.import_plan(self.app, "default", "outbound", RATES)
        self.app.plans.replace(self.app.books.load_plans())
        for i in range(self.args.accounts):
            account = f"7{i:05d}"
            if i % 4 == 3:
                credit = self.rnd.choice([2_000_000, 10_000_000, 50_000_000])
                service.create_account(self.app, account, kind="postpaid", credit_limit=credit,
                                       max_channels=self.rnd.choice([0, 2, 4]))
            else:
                credit = self.rnd.choice([300_000, 1_000_000, 5_000_000, 20_000_000])
                service.create_account(self.app, account, opening_balance=credit,
                                       kind="prepaid", max_channels=self.rnd.choice([0, 2, 4]))
            self.accounts[account] = {"credit": credit, "calls": 0}
        env = {**os.environ, "CALLGUARD_HOME": str(self.tmp / "home"),
               "CALLGUARD_REDIS_URL": self.redis.url, "CALLGUARD_DATABASE_URL": self.served_url,
               "CALLGUARD_KEY_PREFIX": self.prefix, "CALLGUARD_QUOTA_SECONDS": str(QUOTA),
               "CALLGUARD_GRACE_SECONDS": str(GRACE), "CALLGUARD_RING_SECONDS": "10",
               "CALLGUARD_AGI_BUDGET_MS": "1000", "PYTHONUNBUFFERED": "1"}
        serve_env = {**env, "CALLGUARD_NODE": "chaos-serve", "CALLGUARD_AMI_URL": self.sim.ami_url,
                     "CALLGUARD_AGI_BIND": f"127.0.0.1:{self.sim.agi_port}"}
        python = [sys.executable, "-m", "callguard", "-v"]
        self.serve = Part("serve", [*python, "serve", "asterisk"], serve_env, self.tmp)
        self.worker = Part("worker", [*python, "worker"],
                           {**env, "CALLGUARD_NODE": "chaos-worker"}, self.tmp)

    # -- traffic -----------------------------------------------------------------------
    async def traffic(self, until: float) -> None:
        tasks = []
        while time.monotonic() < until:
            await asyncio.sleep(self.rnd.expovariate(self.args.cps))
            account = self.rnd.choice(list(self.accounts))
            ring = self.rnd.choice([0.2, 1.0, 3.0])
            talk = self.rnd.choice([1.0, 4.0, 9.0, 25.0, 60.0]) if self.rnd.random() < 0.85 \
                else 10_000.0  # never answered: rings until the PBX gives up
            if talk == 10_000.0:
                ring, talk = 30.0, 0.0
            tasks.append(asyncio.ensure_future(
                self.sim.call(account, self.rnd.choice(NUMBERS), ring=ring, talk=talk)))
            self.accounts[account]["calls"] += 1
            if self.rnd.random() < 0.03:
                tasks.append(asyncio.ensure_future(asyncio.to_thread(self.topup, account)))
        self.calls = [c for c in await asyncio.gather(*tasks) if c is not None]

    def topup(self, account: str) -> None:
        kind = "payment" if self.app.books.get_account(account).kind == "postpaid" else "topup"
        amount = self.rnd.choice([500_000, 2_000_000])
        ref = f"chaos-{uuid.uuid4().hex[:10]}"
        for _ in range(20):  # an operator retries a failed command, with the same reference
            try:
                booking, _applied = service.move_money(self.app, account, kind, amount, ref)
                if booking.created:
                    self.topups.append((account, amount, ref))
                return
            except Exception:  # noqa: BLE001 - the books away: the operator tries again
                self.topups_refused += 1
                time.sleep(1)

    # -- faults ------------------------------------------------------------------------
    async def faults_loop(self, until: float) -> None:
        kinds = ["serve", "worker", "redis", "ami_drop", "ami_blackhole"]
        if self.proxy:
            kinds.append("sql")
        while time.monotonic() < until:
            await asyncio.sleep(self.rnd.uniform(*self.args.fault_every))
            kind = self.rnd.choice(kinds)
            self.faults[kind] += 1
            log(f"fault: {kind}")
            if kind == "serve":
                self.serve.kill()
                await asyncio.sleep(self.rnd.uniform(0, 3))
                self.serve.start()
            elif kind == "worker":
                self.worker.kill()
                await asyncio.sleep(self.rnd.uniform(0, 2))
                self.worker.start()
            elif kind == "redis":
                self.redis.kill()
                await asyncio.sleep(self.rnd.uniform(1, 3))
                self.redis.start()
            elif kind == "sql":
                self.proxy.cut()
                await asyncio.sleep(self.rnd.uniform(2, 8))
                self.proxy.heal()
            elif kind == "ami_drop":
                self.sim.drop_ami()
            else:
                self.sim.blackhole_ami()
                await asyncio.sleep(self.rnd.uniform(2, 10))
                self.sim.restore_ami()

    # -- the end -------------------------------------------------------------------------
    def settled(self) -> dict[str, int]:
        r, keys = self.app.redis, self.app.keys
        streams = sum(r.xlen(keys.events(n)) for n in range(SHARDS))
        dead = sum(r.xlen(keys.dead(n)) for n in range(SHARDS))
        live = sum(r.zcard(keys.live(n)) for n in range(SHARDS))
        pending = sum(r.xpending(keys.events(n), "books")["pending"] for n in range(SHARDS)
                      if r.exists(keys.events(n)))
        outbox = len(self.app.books.outbox(limit=100_000))
        return {"stream": streams, "pending": pending, "dead": dead, "live": live,
                "outbox": outbox}

    async def heal_and_settle(self) -> dict[str, int]:
        for part in (self.serve, self.worker):
            if not part.alive():
                part.start()
        deadline = time.monotonic() + 180
        while True:
            try:
                state = await asyncio.to_thread(self.settled)
            except Exception as exc:  # noqa: BLE001 - Redis may still be coming back
                state = {"error": str(exc)}
            if state.get("error") is None and not any(state.values()) and not self.sim.calls:
                return state
            if time.monotonic() > deadline:
                log(f"not settled after 180 s: {state}, {len(self.sim.calls)} calls up")
                return state
            await asyncio.sleep(0.5)

    def check(self, settled: dict) -> dict:
        app = self.app
        reconcile = subprocess.run(
            [sys.executable, "-m", "callguard", "reconcile"], capture_output=True, text=True,
            env={**os.environ, "CALLGUARD_HOME": str(self.tmp / "home"),
                 "CALLGUARD_REDIS_URL": self.redis.url,
                 "CALLGUARD_DATABASE_URL": self.direct_url, "CALLGUARD_KEY_PREFIX": self.prefix})
        with app.books.session() as db:
            cdrs = list(db.scalars(select(Cdr)))
            outbox = len(list(db.scalars(select(RedisOutbox))))
        by_session = collections.Counter(c.session for c in cdrs)
        allowed = [c for c in self.calls if c.allowed]
        answered = [c for c in allowed if c.answered_at is not None]
        sessions = {c.variables["CALLGUARD_SESSION"] for c in allowed
                    if c.variables.get("CALLGUARD_SESSION")}
        missing = [c for c in answered if by_session[c.variables["CALLGUARD_SESSION"]] != 1]
        strangers = [s for s in by_session if s not in sessions]
        rate_of = {n: r for n, r in zip(NUMBERS, RATES, strict=True)}
        true_cost = sum(rate_of[c.exten].cost(int(c.talk_seconds)) for c in answered)
        charged = sum(c.cost for c in cdrs)
        increment = max(r.cost_of_billed(r.subsequent_increment) - r.connect_fee for r in RATES)
        over = {}
        for account, info in self.accounts.items():
            mine = [c for c in cdrs if c.account == account]
            topped = sum(a for acct, a, _ in self.topups if acct == account)
            spent = sum(c.cost for c in mine)
            if spent > info["credit"] + topped + len(mine) * increment:
                over[account] = format_full(spent - info["credit"] - topped)
        cdr_of = {c.session: c for c in cdrs}
        unseen = [c for c in answered
                  if cdr_of.get(c.variables["CALLGUARD_SESSION"]) is not None
                  and cdr_of[c.variables["CALLGUARD_SESSION"]].answer_ms is None]
        return {
            "reconcile_exit": reconcile.returncode,
            "reconcile_output": reconcile.stdout.strip().splitlines()[:10],
            "calls_placed": len(self.calls), "calls_allowed": len(allowed),
            "calls_answered": len(answered),
            "denied": dict(collections.Counter(c.variables.get("CALLGUARD_REASON", "NO_AGI")
                                               for c in self.calls if not c.allowed)),
            "cdrs": len(cdrs), "answered_without_exactly_one_cdr": len(missing),
            "cdrs_of_no_allowed_call": len(strangers),
            "answered_billed_as_unanswered": len(unseen),
            "charged": format_full(charged), "true_cost_of_talk": format_full(true_cost),
            "charged_minus_true": format_full(charged - true_cost),
            "accounts_over_bound": over, "topups": len(self.topups),
            "topup_attempts_refused": self.topups_refused,
            "faults": dict(self.faults), "settled": {**settled, "outbox_rows": outbox},
            "serve_starts": self.serve.starts, "worker_starts": self.worker.starts,
        }

    async def run(self) -> dict:
        await self.sim.start(port=free_port())
        self.prepare()
        self.serve.start()
        self.worker.start()
        started = time.monotonic()
        await asyncio.sleep(3)
        until = started + self.args.seconds
        log(f"traffic at {self.args.cps}/s on {len(self.accounts)} accounts for "
            f"{self.args.seconds} s, a fault every {self.args.fault_every} s")
        await asyncio.gather(self.traffic(until), self.faults_loop(until))
        log("faults over; healing and waiting for every call and booking to settle")
        if self.proxy:
            self.proxy.heal()
        self.sim.restore_ami()
        if not self.redis.proc or self.redis.proc.poll() is not None:
            self.redis.start()
        settled = await self.heal_and_settle()
        result = self.check(settled)
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        return result

    def cleanup(self) -> None:
        for part in (self.serve, self.worker):
            part.stop()
        self.redis.kill()
        self.app.close()
        if self.proxy:
            self.proxy.close()
        if self.schema:
            admin = create_engine(self.args.database_url)
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {self.schema} CASCADE")
            admin.dispose()


def verdict(result: dict) -> list[str]:
    failures = []
    if result["reconcile_exit"] != 0:
        failures.append(f"reconcile exited {result['reconcile_exit']}")
    if result["answered_without_exactly_one_cdr"]:
        failures.append(f"{result['answered_without_exactly_one_cdr']} answered call(s) "
                        "without exactly one CDR")
    if result["cdrs_of_no_allowed_call"]:
        failures.append(f"{result['cdrs_of_no_allowed_call']} CDR(s) of no allowed call")
    if result["accounts_over_bound"]:
        failures.append(f"accounts over credit + one increment per call: "
                        f"{result['accounts_over_bound']}")
    if any(result["settled"].values()):
        failures.append(f"left over: {result['settled']}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--cps", type=float, default=15, help="call setups per second")
    parser.add_argument("--fault-every", type=float, nargs=2, default=(3.0, 8.0),
                        metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1/test")
    parser.add_argument("--quick", action="store_true", help="40 s, 100 accounts")
    parser.add_argument("--json-out")
    common.add_results_args(parser)
    args = parser.parse_args()
    common.keep_results(args)
    if args.quick:
        args.seconds, args.accounts = 40, 100
    if args.database_url.startswith("postgresql"):
        try:
            create_engine(args.database_url).connect().close()
        except Exception:  # noqa: BLE001
            log("no PostgreSQL: SQLite, without the database fault")
            args.database_url = "sqlite"
    drill = Drill(args)
    log(f"seed {args.seed}, state in {drill.tmp}")
    try:
        result = asyncio.run(drill.run())
    finally:
        drill.cleanup()
    result["seed"] = args.seed
    failures = verdict(result)
    result["failures"] = failures
    print(json.dumps(result, indent=2))
    common.emit_json(result)
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
