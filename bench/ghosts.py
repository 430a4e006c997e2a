"""Ghost sessions: a local user floods FastAGI with made-up setups for one account.

A real `callguard serve asterisk` (its own process, settings at their defaults) logs in
to the simulated Asterisk's AMI (a thread of this process) and uses real Redis. This
process plays two clients of its FastAGI port, both from 127.0.0.1:

  the attacker  --fakes sessions (10,000) as fast as it can, --concurrency at a time,
                each for a channel id Asterisk never reports (no Newchannel, not in
                CoreShowChannels), all for the one account;
  the PBX       a real call every --real-every seconds on that account: Asterisk
                reports its channel (Newchannel, racing the FastAGI connection as a
                real Asterisk's does, and CoreShowChannels), it rings --ring seconds and
                hangs up unanswered.

A thread samples the account's reserved credit in Redis every 10 ms, and how long each
allowed fake kept its reservation (its session's state, every 50 ms). Reported: the most
the account had reserved at once and what that is in one-slice holds, in share of its
balance and in seconds of calling at the number's rate; the longest and median time a
fake held money; fakes and real calls allowed and denied (by reason); the serve
process's ghost counter. `--off` runs the same with CALLGUARD_GHOST_SECONDS=0 (the
checks and limits off), for the figure before.

    .venv/bin/python bench/ghosts.py [--no-pin] [--fakes 10000] [--off] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from callguard.simulator.asterisk import SimCall, SimulatedAsterisk  # noqa: E402

RATE_PER_MIN = 3_000_000  # the premium number: CHF 3.00/min, 1/1
HOLD = RATE_PER_MIN  # what one setup reserves: its first 60 s slice


class Sampler(threading.Thread):
    """The account's reserved credit every 10 ms, and when each allowed fake's session
    stopped holding money (its state leaves `auth`), checked every 50 ms."""

    def __init__(self, env: common.BenchEnv, account: str):
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(env.redis_url, decode_responses=True)
        self.key = env.app.keys.account(account)
        self.keys = env.app.keys
        self.samples: list[tuple[float, int]] = []
        self.pending: dict[str, float] = {}  # session id -> when it was allowed
        self.held: list[float] = []  # seconds each fake held its reservation
        self.most_fakes = 0  # allowed fakes holding money at once, at most
        self.lock = threading.Lock()
        self.done = threading.Event()

    def allowed(self, session: str, at: float) -> None:
        with self.lock:
            self.pending[session] = at

    def run(self) -> None:
        last_check = 0.0
        while not self.done.wait(0.01):
            now = time.perf_counter()
            self.samples.append((now, int(self.client.hget(self.key, "reserved") or 0)))
            if now - last_check >= 0.05:
                last_check = now
                self._check(now)

    def _check(self, now: float) -> None:
        with self.lock:
            pending = list(self.pending.items())
        if not pending:
            return
        pipe = self.client.pipeline(transaction=False)
        for session, _ in pending:
            account, channel, _n = session.split("/")
            pipe.hget(self.keys.session(account, channel), "st")
        states = pipe.execute()
        self.most_fakes = max(self.most_fakes, states.count("auth"))
        for (session, at), state in zip(pending, states, strict=True):
            if state != "auth":
                with self.lock:
                    self.pending.pop(session, None)
                self.held.append(now - at)

    def stop(self) -> None:
        self.done.set()
        self.join(5)
        self._check(time.perf_counter())


async def flood(agi: SimulatedAsterisk, account: str, fakes: int, concurrency: int,
                sampler: Sampler, results: collections.Counter) -> float:
    """`fakes` FastAGI sessions for channels nobody reports, `concurrency` at a time."""
    ids = itertools.count(1)
    started = time.perf_counter()

    async def one() -> None:
        n = next(ids)
        call = SimCall(f"PJSIP/fake-{n:08x}", f"1600000000.{n}", account,
                       common.PREMIUM_NUMBER)
        status = await agi.fastagi(call, "authorize")
        if call.timeout:
            call.timeout.cancel()
        if call.allowed:
            sampler.allowed(call.variables["CALLGUARD_SESSION"], time.perf_counter())
        results[call.reason or f"no result ({status})"] += 1

    launched = itertools.count()

    async def worker() -> None:
        while next(launched) < fakes:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def real_calls(agi: SimulatedAsterisk, pbx: common.ThreadedAsterisk, account: str,
                     every: float, ring: float, stop: asyncio.Event,
                     results: collections.Counter, latency: list[float]) -> None:
    """A call Asterisk reports every `every` seconds until `stop`; each rings `ring` s."""
    ids = itertools.count(1)
    calls = set()

    async def one() -> None:
        n = next(ids)
        call = SimCall(f"PJSIP/real-{n:08x}", f"1700000000.{n}", account,
                       common.PREMIUM_NUMBER)
        pbx.loop.call_soon_threadsafe(place, call)  # Newchannel, racing the FastAGI
        started = time.perf_counter()
        await agi.fastagi(call, "authorize")
        latency.append(time.perf_counter() - started)
        if call.timeout:
            call.timeout.cancel()
        results[call.reason or "no result"] += 1
        await asyncio.sleep(ring)
        pbx.loop.call_soon_threadsafe(pbx.sim.hangup, call, 16)  # unanswered: released

    def place(call: SimCall) -> None:
        pbx.sim.calls[call.uniqueid] = call
        pbx.sim.emit(pbx.sim._event("Newchannel", call, state="Ring"))

    while not stop.is_set():
        task = asyncio.ensure_future(one())
        calls.add(task)
        task.add_done_callback(calls.discard)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
    if calls:
        await asyncio.wait(calls)


def ghost_count(port: int) -> float | None:
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("callguard_ghost_sessions_total{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fakes", type=int, default=10_000, help="fake sessions (10,000)")
    parser.add_argument("--concurrency", type=int, default=256,
                        help="fake sessions open at once (256)")
    parser.add_argument("--balance", type=int, default=100, help="the account's CHF (100)")
    parser.add_argument("--real-every", type=float, default=0.2,
                        help="seconds between real calls (0.2)")
    parser.add_argument("--ring", type=float, default=0.5,
                        help="seconds each real call rings before it hangs up (0.5)")
    parser.add_argument("--after", type=float, default=8.0,
                        help="seconds of real calls after the flood (8)")
    parser.add_argument("--off", action="store_true",
                        help="CALLGUARD_GHOST_SECONDS=0: the checks and limits off")
    common.add_pin_args(parser)
    common.add_common_args(parser)
    common.add_server_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.fakes, args.after = min(args.fakes, 1000), min(args.after, 5.0)

    common.keep_results(args)
    common.raise_fd_limit()
    pinning = common.pin_processes(args, args.redis_url)
    info = common.print_machine(pinning=pinning)
    common.install_uvloop()
    env = common.BenchEnv(args.redis_url, keep=args.keep)
    pbx = server = None
    try:
        env.setup(accounts=1, balance=args.balance * 1_000_000)
        [account] = env.accounts
        pbx = common.ThreadedAsterisk()
        port, http_port = common.free_port(), common.free_port()
        extra = {"CALLGUARD_HTTP_BIND": f"127.0.0.1:{http_port}", **common.server_env(args)}
        if args.off:
            extra["CALLGUARD_GHOST_SECONDS"] = "0"
        server = common.serve_asterisk(env, port, ami_url=pbx.ami_url,
                                       cpu=pinning["server"], **extra)
        server.start()
        deadline = time.monotonic() + 30
        while not (pbx.logged_in() and pbx.actions("coreshowchannels")):
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not log in to AMI:\n" + server.log_tail())
            time.sleep(0.05)
        result = asyncio.run(measure(args, env, account, pbx, port))
        result["ghosts_counted"] = ghost_count(http_port)
        result.update(bench="ghosts", machine=info, off=args.off, fakes=args.fakes,
                      concurrency=args.concurrency, balance=args.balance,
                      real_every=args.real_every, ring=args.ring, pinned=pinning["pinned"],
                      server_log_lines=server.log_lines())
        report(result)
        common.emit_json(result, args.json_out)
        return 0
    finally:
        if server:
            server.stop()
        if pbx:
            pbx.stop()
        print(f"# cleaned up {env.cleanup()} Redis key(s)")


async def measure(args, env, account: str, pbx, port: int) -> dict:
    agi = SimulatedAsterisk(agi_port=port)  # its FastAGI client side only
    agi.agi_wait = 30.0
    sampler = Sampler(env, account)
    sampler.start()
    fakes, reals, latency = collections.Counter(), collections.Counter(), []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    calling = asyncio.ensure_future(real_calls(agi, pbx, account, args.real_every, args.ring,
                                               stop, reals, latency))
    flood_seconds = await flood(agi, account, args.fakes, args.concurrency, sampler, fakes)
    during = dict(reals)
    await asyncio.sleep(args.after)
    stop.set()
    await calling
    # Until every allowed fake has given its money back (or 200 s: the ring allowance).
    deadline = time.perf_counter() + 200
    while sampler.pending and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    sampler.stop()
    reserved = [r for _, r in sampler.samples]
    held = sorted(sampler.held)
    peak = max(reserved) if reserved else 0
    return {
        "flood_seconds": flood_seconds, "fakes_per_second": args.fakes / flood_seconds,
        "fakes_allowed": fakes.get("OK", 0), "fakes_denied": dict(
            (k, v) for k, v in fakes.items() if k != "OK"),
        "reals_allowed": reals.get("OK", 0),
        "reals_denied": {k: v for k, v in reals.items() if k != "OK"},
        "reals_during_flood": during,
        "real_setup_ms": {"median": 1000 * statistics.median(latency),
                          "p99": 1000 * common.percentile(latency, 99),
                          "max": 1000 * max(latency)} if latency else {},
        "max_reserved": peak, "max_reserved_holds": peak / HOLD,
        "max_fakes_holding": sampler.most_fakes,
        "max_reserved_share": peak / (args.balance * 1_000_000),
        "max_reserved_call_seconds": peak * 60 / RATE_PER_MIN,
        "fake_held_seconds": {"median": statistics.median(held), "max": held[-1],
                              "n": len(held)} if held else {},
        "fakes_still_holding": len(sampler.pending),
        "samples": len(reserved), "wall_seconds": time.perf_counter() - t0,
    }


def report(r: dict) -> None:
    chf = r["max_reserved"] / 1_000_000
    print(f"\n{'feature OFF' if r['off'] else 'defaults'}: {r['fakes']} fake sessions in "
          f"{r['flood_seconds']:.1f} s ({r['fakes_per_second']:.0f}/s), {r['concurrency']} "
          "at a time, one account")
    print(f"  fakes: allowed {r['fakes_allowed']}, denied {r['fakes_denied']}")
    print(f"  real calls: allowed {r['reals_allowed']}, denied {r['reals_denied']} "
          f"(during the flood: {r['reals_during_flood']}); setup {r['real_setup_ms']}")
    print(f"  most reserved at once (fakes and real calls): CHF {chf:.2f} = "
          f"{r['max_reserved_holds']:.1f} one-slice holds, {100 * r['max_reserved_share']:.1f} % "
          f"of CHF {r['balance']}, {r['max_reserved_call_seconds']:.0f} s of calling at "
          f"CHF 3.00/min; fakes holding at once: {r['max_fakes_holding']} at most")
    print(f"  a fake held its money: {r['fake_held_seconds']} s; still holding at the end: "
          f"{r['fakes_still_holding']}; serve counted {r['ghosts_counted']} ghost(s)")


if __name__ == "__main__":
    sys.exit(main())
