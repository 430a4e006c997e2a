"""The seeds' fraud scenario: overshoot with callguard vs rating after the call.

A prepaid account with CHF 50; a hacked PBX places 30 simultaneous calls to a
CHF 3.00/min premium number (1/1 increments), quota 60 s. Two ways to run it:

  engine (default): the quota engine against real Redis with simulated time;
      the PBX side is the pure Supervisor driving extends and cut-offs, and
      `--crash-at S` lets callguard die at S seconds, leaving the calls to the
      PBX's own deadline (the AbsoluteTimeout it was given).
  --e2e: end to end through a real `serve asterisk` adapter and the simulated
      Asterisk over FastAGI and AMI (what `callguard demo` runs).

    python bench/fraud.py [--redis-url redis://127.0.0.1:6379/0] [--runs 5] [--e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from callguard import demo, service
from callguard.config import load_settings
from callguard.engine import state
from callguard.supervision import Extend, Hangup, PushDeadline, Supervisor


def engine_run(app, sc: demo.Scenario, hangup_latency_ms: int, crash_at: float | None,
               seed: int) -> dict:
    """Simulated time in ms; every call wants to talk `sc.talk` seconds."""
    rnd = random.Random(seed)
    eng, now = app.engine, 1_900_000_000_000
    s = app.settings
    sup = Supervisor(quota=sc.quota, grace=s.grace_seconds)
    allowed, ends, pbx_deadline = [], {}, {}
    for i in range(sc.calls):
        d = eng.authorize(demo.ACCOUNT, demo.NUMBER, "outbound", f"c{i}", now_ms=now)
        if d.allow:
            # Given up if never answered, as the serve process does (callguard/control.py).
            expires = now / 1000 + s.ring_seconds + d.grant + 2 * s.grace_seconds
            sup.track(d.session, f"c{i}", d.session, expires)
            allowed.append(d.session)
    answer_at = now + int(sc.ring * 1000)
    for session in allowed:
        grant = eng.answer(session, now_ms=answer_at)
        for action in sup.granted(session, grant, answer_at / 1000):
            if isinstance(action, PushDeadline):
                pbx_deadline[session] = answer_at + int(action.seconds * 1000)
        ends[session] = answer_at + int(sc.talk * 1000)  # the fraudster's own hang-up
    t = answer_at
    alive = set(allowed)
    while alive:
        due = sup.next_due()
        t = min(ends[s] for s in alive)
        if due is not None:
            t = min(t, int(due * 1000))
        if crash_at is not None and t >= now + crash_at * 1000:
            # callguard is gone: each call runs until the PBX's own deadline.
            for s in alive:
                eng.commit(s, "16", now_ms=min(ends[s], pbx_deadline[s]))
            break
        for s in [s for s in alive if ends[s] <= t]:
            eng.commit(s, "16", now_ms=ends[s])
            alive.discard(s)
            sup.forget(s)
        for action in sup.due(t / 1000):
            if isinstance(action, Extend):
                grant = eng.extend(action.session, action.seen_grant, now_ms=t)
                for a in sup.granted(action.session, grant, t / 1000):
                    if isinstance(a, PushDeadline):
                        pbx_deadline[action.session] = t + int(a.seconds * 1000)
            elif isinstance(action, Hangup) and action.channel in alive:
                end = t + rnd.randint(0, hangup_latency_ms)
                eng.commit(action.channel, "16", now_ms=end)
                alive.discard(action.channel)
                sup.forget(action.channel)
    live = state.account_state(app.redis, app.keys, demo.ACCOUNT)
    charged = sc.balance - live["balance"]
    unprotected = sc.calls * demo.PREMIUM.cost(int(sc.talk))
    return {"allowed": len(allowed), "charged": charged,
            "overshoot": max(0, charged - sc.balance),
            "unprotected_loss": max(0, unprotected - sc.balance),
            "reserved_left": live["reserved"], "channels_left": live["channels"]}


def fresh_app(redis_url: str | None, tmp: Path, index: int):
    settings = load_settings(env={}, home=str(tmp), redis_url=redis_url,
                             database_url=f"sqlite:///{tmp / f'fraud{index}.db'}",
                             key_prefix=f"fraud-{uuid.uuid4().hex[:8]}", node="bench")
    return service.App(settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="'' for the embedded Redis")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--e2e", action="store_true", help="through serve asterisk + simulator")
    parser.add_argument("--speed", type=float, default=10.0, help="--e2e: PBX speed-up")
    parser.add_argument("--hangup-latency-ms", type=int, default=500,
                        help="engine: how late after the grant end a cut-off takes effect")
    parser.add_argument("--crash-at", type=float, default=None,
                        help="engine: callguard dies this many PBX seconds into the calls")
    args = parser.parse_args()
    sc = demo.Scenario(speed=args.speed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            app = fresh_app(args.redis_url or None, Path(tmp), run)
            try:
                demo.prepare(app, sc)
                if args.e2e:
                    o = asyncio.run(demo.run_fraud(app, sc))
                    r = {"allowed": o.allowed, "charged": o.charged, "overshoot": o.overshoot,
                         "unprotected_loss": o.unprotected_loss,
                         "setup_p50_ms": statistics.median(o.setup_ms),
                         "wall_s": o.wall_seconds}
                else:
                    r = engine_run(app, sc, args.hangup_latency_ms, args.crash_at, seed=run)
            finally:
                demo.cleanup(app)
            results.append(r)
            print(f"run {run + 1}: " + ", ".join(
                f"{k}={demo.money(v) if k in ('charged', 'overshoot', 'unprotected_loss') else v}"
                for k, v in r.items()))
    over = [r["overshoot"] for r in results]
    print(f"\novershoot with callguard: median {demo.money(int(statistics.median(over)))}, "
          f"max {demo.money(max(over))} over {len(over)} runs")
    print(f"loss when rated after the call (same traffic): "
          f"{demo.money(results[0]['unprotected_loss'])}")
    return 0 if max(over) < 100_000 else 1


if __name__ == "__main__":
    sys.exit(main())
