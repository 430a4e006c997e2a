"""What one authorize costs inside Redis, for this tree's script and an older commit's.

Each variant runs N authorizes (each on a new channel, on one of --accounts prepaid
accounts, so every one reserves a slice, as a call setup does) against a private
redis-server of its own, from a pipeline so the client's cost stays out of it, and
reads Redis's own accounting: `INFO commandstats` (usec_per_call of EVALSHA, the script
alone) and the server process's CPU time per call (the script plus protocol and I/O).
The variants run interleaved, --runs times each, so drift hits them alike.

  .venv/bin/python bench/authorize_cost.py --before 12d999c --calls 20000 --runs 5

Variants: `before` (the script of --before, on accounts made by this tree), `after`
(this tree), `after+controls` (every fraud control set on the accounts, none tripping,
so every check runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from callguard.engine.core import SCRIPTS  # noqa: E402
from callguard.simulator.faults import RedisServer  # noqa: E402

CONTROLS = {"max_calls_per_minute": 10**6, "max_spend_per_hour": 10**15,
            "blocked_prefixes": "41900 882 881", "on_fraud": "block"}
T0 = 1_900_000_000_000
REDIS_CONFIG: list[tuple[str, str]] = []  # --redis-config NAME VALUE


def sources_at(rev: str) -> dict[str, str]:
    def show(name):
        return subprocess.run(["git", "show", f"{rev}:callguard/engine/lua/{name}.lua"],
                              check=True, capture_output=True, text=True).stdout
    common_lua = show("common")
    return {name: common_lua + "\n" + show(name) for name in SCRIPTS if name != "settings"}


def run_variant(home: Path, script_source: str | None, controls: bool, calls: int,
                accounts: int) -> tuple[float, float]:
    """(usec per call by INFO commandstats, server CPU usec per call)."""
    server = RedisServer(home)
    server.start()
    try:
        for name, value in REDIS_CONFIG:
            server.client().config_set(name, value)
        with common.BenchEnv(server.url) as env:
            env.setup(accounts=accounts, **(CONTROLS if controls else {}))
            return _measure(env, server, script_source, calls, accounts)
    finally:
        server.stop()


def _measure(env, server, script_source, calls, accounts) -> tuple[float, float]:
    app = env.app
    ops = app.engine.ops
    script = app.redis.register_script(script_source or
                                       app.engine.scripts["authorize"].script)
    client = app.redis
    batches = [[ops.authorize(env.accounts[i % accounts], common.PREMIUM_NUMBER,
                              "outbound", f"ch{i}", now_ms=T0 + i)
                for i in range(start, min(calls, start + 500))]
               for start in range(0, calls, 500)]
    script(keys=batches[0][0].keys, args=batches[0][0].args)  # loaded, warm
    before_stats, before_cpu = _evalsha(client), _cpu(server.proc.pid)
    for batch in batches:
        pipe = client.pipeline(transaction=False)
        for call in batch:
            script(keys=call.keys, args=call.args, client=pipe)
        replies = pipe.execute()
        assert all(int(r[0]) == 1 for r in replies), replies[:3]
    after_stats, after_cpu = _evalsha(client), _cpu(server.proc.pid)
    n = after_stats[0] - before_stats[0]
    return (after_stats[1] - before_stats[1]) / n, (after_cpu - before_cpu) * 1e6 / n


def _evalsha(client) -> tuple[int, int]:
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return stats["calls"], stats["usec"]


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="12d999c", help="commit to compare with")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-config", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"),
                        help="CONFIG SET on the private Redis first, e.g. "
                             "hash-max-listpack-entries 0 (hashes as hash tables)")
    args = parser.parse_args()
    REDIS_CONFIG.extend(args.redis_config)
    common.print_machine()
    old = sources_at(args.before)["authorize"]
    variants = {"before": (old, False), "after": (None, False), "after+controls": (None, True)}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for run in range(args.runs):
        for name, (source, controls) in variants.items():
            with tempfile.TemporaryDirectory(prefix="cg-authcost-") as tmp:
                results[name].append(run_variant(Path(tmp), source, controls, args.calls,
                                                 args.accounts))
            print(f"run {run + 1} {name}: {results[name][-1][0]:.2f} us in the script, "
                  f"{results[name][-1][1]:.2f} us of redis-server CPU per authorize",
                  flush=True)
    base = statistics.median(r[0] for r in results["before"])
    print(f"\n{'variant':<16} {'script us (median, min-max)':<30} {'redis-server CPU us':<24}"
          " vs before")
    for name, rows in results.items():
        script_us = [r[0] for r in rows]
        cpu_us = [r[1] for r in rows]
        print(f"{name:<16} {statistics.median(script_us):6.2f} ({min(script_us):.2f}-"
              f"{max(script_us):.2f}){'':<12} {statistics.median(cpu_us):6.2f} ({min(cpu_us):.2f}-"
              f"{max(cpu_us):.2f}){'':<4} {statistics.median(script_us) / base:.2f}x")


if __name__ == "__main__":
    main()
