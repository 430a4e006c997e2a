"""What one authorize (or a whole call's scripts) costs inside Redis, this tree against a commit.

Each variant runs N authorizes (each on a new channel, on one of --accounts prepaid
accounts, so every one reserves a slice, as a call setup does) against a private
redis-server of its own, from a pipeline of EVALSHAs so the client's cost stays out of it,
and reads Redis's own accounting: `INFO commandstats` (usec_per_call of EVALSHA, the script
alone) and the server process's CPU time per call (the script plus protocol and I/O).
The variants run interleaved, --runs times each, so drift hits them alike.

  .venv/bin/python bench/authorize_cost.py --before 12d999c --calls 20000 --runs 5

--call: a whole call instead: the N authorizes, then their N answers, two rounds of N
extends (each one reserving the next slice) and the N commits, each step a phase measured
and reported on its own, and their sum per call.

--instructions: count instructions instead of time, with the private redis-server run
under `valgrind --tool=callgrind` (deterministic, blind to the machine's load; about 50x
slower, so fewer --calls by default). Collection is on only inside `processCommand`
(`--collect-atstart=no --toggle-collect=processCommand`: the command's whole work, i.e.
lookup, the script and every command it calls, the AOF feed and the reply, but neither the
socket reads, the parsing and writes nor the server's timers), and each phase is isolated
by `callgrind_control --zero` before it and `callgrind_control --dump` after it: the dump
holds that phase's instructions only (setup and warm-up are left out), divided by its calls.

  .venv/bin/python bench/authorize_cost.py --call --instructions --before HEAD

Variants: `before` (the scripts of --before, default HEAD, on accounts made by this tree),
`after` (this tree), and both again `+controls` (every fraud control set on the accounts,
none tripping, so every check runs); ratios are against `before` with the same controls.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from callguard.engine.core import SCRIPTS, script_sources  # noqa: E402
from callguard.simulator.faults import RedisServer, answers  # noqa: E402

CONTROLS = {"max_calls_per_minute": 10**6, "max_spend_per_hour": 10**15,
            "blocked_prefixes": "41900 882 881", "on_fraud": "block"}
T0 = 1_900_000_000_000
ANSWER_MS, EXTEND_MS, COMMIT_MS = 1_000, (31_000, 91_000), 151_000  # after the authorize
REDIS_CONFIG: list[tuple[str, str]] = []  # --redis-config NAME VALUE


def sources_at(rev: str) -> dict[str, str]:
    def show(name):
        return subprocess.run(["git", "show", f"{rev}:callguard/engine/lua/{name}.lua"],
                              check=True, capture_output=True, text=True).stdout
    common_lua = show("common")
    return {name: common_lua + "\n" + show(name) for name in SCRIPTS if name != "settings"}


class CallgrindRedis(RedisServer):
    """The private redis-server under callgrind, counting inside processCommand only."""

    def start(self) -> CallgrindRedis:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             "--toggle-collect=processCommand", f"--callgrind-out-file={self.home}/cg.out",
             self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.home), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not answers("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private redis-server under callgrind did not start")
            time.sleep(0.2)
        return self

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "--zero", str(self.proc.pid)], check=True,
                       capture_output=True)

    def dump(self) -> int:
        """Instructions since the last zero or dump."""
        seen = set(self.home.glob("cg.out.*"))
        subprocess.run(["callgrind_control", "--dump", str(self.proc.pid)], check=True,
                       capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in set(self.home.glob("cg.out.*")) - seen:
                for line in path.read_text().splitlines():
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
            time.sleep(0.1)
        raise RuntimeError("no callgrind dump")


def run_variant(home: Path, sources: dict[str, str], controls: bool, calls: int,
                accounts: int, whole_call: bool, instructions: bool) -> dict[str, float]:
    """{step: cost per script call}: (usec in the script by INFO commandstats, server CPU
    usec), or instructions."""
    server = (CallgrindRedis if instructions else RedisServer)(home)
    server.start()
    try:
        for name, value in REDIS_CONFIG:
            server.client().config_set(name, value)
        with common.BenchEnv(server.url) as env:
            env.setup(accounts=accounts, **(CONTROLS if controls else {}))
            return _measure(env, server, sources, calls, accounts, whole_call, instructions)
    finally:
        server.stop()


def _measure(env, server, sources, calls, accounts, whole_call, instructions):
    ops, client = env.app.engine.ops, env.app.redis
    scripts = {name: client.register_script(sources[name])
               for name in ("authorize", "answer", "extend", "commit")}
    sessions: list[str] = []

    def authorize(i, channel="ch"):
        return ops.authorize(env.accounts[i % accounts], common.PREMIUM_NUMBER, "outbound",
                             f"{channel}{i}", now_ms=T0 + i)

    def allowed(i, reply):
        sessions.append(reply[2])
        return int(reply[0]) == 1

    steps = [("authorize", authorize, allowed)]
    if whole_call:
        steps += [
            ("answer", lambda i: ops.answer(sessions[i], now_ms=T0 + i + ANSWER_MS),
             lambda i, r: r[0] == "ans"),
            ("extend", lambda i: ops.extend(sessions[i], 60, now_ms=T0 + i + EXTEND_MS[0]),
             lambda i, r: r[0] == "ans" and int(r[1]) == 120),
            ("extend 2", lambda i: ops.extend(sessions[i], 120, now_ms=T0 + i + EXTEND_MS[1]),
             lambda i, r: r[0] == "ans" and int(r[1]) == 180),
            ("commit", lambda i: ops.commit(sessions[i], "16", now_ms=T0 + i + COMMIT_MS),
             lambda i, r: r[0] == "done" and int(r[1]) > 0)]
    # Warm-up: every script loaded and run once, on a call of its own.
    warm = authorize(0, "warm")
    session = scripts["authorize"](keys=warm.keys, args=warm.args)[2]
    for call in (ops.answer(session, now_ms=T0 + ANSWER_MS),
                 ops.extend(session, 60, now_ms=T0 + EXTEND_MS[0]),
                 ops.commit(session, "16", now_ms=T0 + COMMIT_MS)):
        scripts[call.script](keys=call.keys, args=call.args)
    costs = {}
    for step, build, check in steps:
        meter = server.dump if instructions else lambda: (*_evalsha(client), _cpu(server))
        if instructions:
            server.zero()
        start = None if instructions else meter()
        for first in range(0, calls, 500):
            batch = [build(i) for i in range(first, min(calls, first + 500))]
            pipe = client.pipeline(transaction=False)
            for call in batch:
                pipe.evalsha(scripts[call.script].sha, len(call.keys), *call.keys, *call.args)
            for i, reply in enumerate(pipe.execute(), first):
                assert check(i, reply), (step, reply)
        end = meter()
        if instructions:
            costs[step] = end / calls
        else:
            n = end[0] - start[0]
            costs[step] = ((end[1] - start[1]) / n, (end[2] - start[2]) * 1e6 / n)
    return costs


def _evalsha(client) -> tuple[int, int]:
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return stats["calls"], stats["usec"]


def _cpu(server) -> float:
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / common.CLK_TCK  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="commit to compare with")
    parser.add_argument("--calls", type=int, help="default 20000, 2000 with --instructions")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--runs", type=int, help="default 5, 1 with --instructions")
    parser.add_argument("--call", action="store_true",
                        help="a whole call: authorize, answer, extend x2, commit")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions under callgrind instead of time")
    parser.add_argument("--redis-config", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"),
                        help="CONFIG SET on the private Redis first, e.g. "
                             "hash-max-listpack-entries 0 (hashes as hash tables)")
    args = parser.parse_args()
    calls = args.calls or (2000 if args.instructions else 20000)
    runs = args.runs or (1 if args.instructions else 5)
    if args.instructions and not shutil.which("callgrind_control"):
        sys.exit("--instructions needs valgrind (callgrind_control) on PATH")
    REDIS_CONFIG.extend(args.redis_config)
    common.print_machine()
    old, new = sources_at(args.before), script_sources()
    variants = {"before": (old, False), "after": (new, False),
                "before+controls": (old, True), "after+controls": (new, True)}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for run in range(runs):
        for name, (sources, controls) in variants.items():
            with tempfile.TemporaryDirectory(prefix="cg-authcost-") as tmp:
                results[name].append(run_variant(Path(tmp), sources, controls, calls,
                                                 args.accounts, args.call, args.instructions))
            print(f"run {run + 1} {name}: {_row(results[name][-1], args.instructions)}",
                  flush=True)
    if args.call:
        for row in (r for rows in results.values() for r in rows):
            row["call"] = _sum(row.values())
    print()
    for name, rows in results.items():
        base = results[name.replace("after", "before")]
        print(f"{name}:")
        for step in rows[0]:
            print(f"  {step:<10} {_summary(rows, base, step, args.instructions)}")


def _sum(values):
    values = list(values)
    if isinstance(values[0], tuple):
        return tuple(map(sum, zip(*values, strict=True)))
    return sum(values)


def _row(costs: dict, instructions: bool) -> str:
    if instructions:
        return ", ".join(f"{step} {ir:,.0f}" for step, ir in costs.items()) + " instructions"
    return ", ".join(f"{step} {us:.2f}/{cpu:.2f}" for step, (us, cpu) in costs.items()) + \
        " us (script/redis-server CPU)"


def _summary(rows, base, step, instructions) -> str:
    if instructions:
        ir, was = statistics.median(r[step] for r in rows), statistics.median(
            r[step] for r in base)
        return f"{ir:>10,.0f} instructions per call   {ir / was:.3f}x"
    script_us = [r[step][0] for r in rows]
    cpu_us = [r[step][1] for r in rows]
    was = statistics.median(r[step][0] for r in base)
    return (f"script {statistics.median(script_us):6.2f} us ({min(script_us):.2f}-"
            f"{max(script_us):.2f}), redis-server CPU {statistics.median(cpu_us):6.2f} us "
            f"({min(cpu_us):.2f}-{max(cpu_us):.2f})   {statistics.median(script_us) / was:.2f}x")


if __name__ == "__main__":
    main()
