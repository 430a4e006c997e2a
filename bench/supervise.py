"""N concurrent supervised calls through one `callguard serve asterisk` process
(or `serve freeswitch`, --pbx freeswitch).

The serve process runs as a subprocess; the simulated Asterisk (FastAGI client,
AMI server: callguard/simulator/asterisk.py) runs in this process. Calls are
placed at --ramp per second (real FastAGI), answered after --ring seconds and
kept up; callguard extends each one shortly before its slice ends and pushes
the new deadline with AMI AbsoluteTimeout. Real time throughout: the serve
process cannot share a simulated clock with this one.

Measured on the serve process:
  idle CPU      before any call (the floor: AMI link, housekeeping)
  memory        VmRSS after a warm-up and after all N calls are up: per session
  steady CPU    utime+stime over --duration seconds with all N calls up, as a
                fraction of one core (mean, and the busiest 1 s)
  lateness      per channel, each AbsoluteTimeout should arrive
                `previous Timeout - grace - lead` after the previous one
                (lead = min(5, quota/2), callguard/supervision.py); lateness is
                arrival minus that
At the end all calls hang up (AMI Hangup events) and the script waits until
Redis shows no reserved money and no channels: every session was committed.

With --pbx freeswitch the serve process is `serve freeswitch` and the PBX a simulated
FreeSWITCH (callguard/simulator/freeswitch.py) in this process, with changes for
scale only (BenchFreeSWITCH): the shipped dialplan's steps run directly instead of
through the XML interpreter, its frames come from pre-split templates, the
scheduler finds a channel's tasks in O(1). Each call runs the real `socket`
exchange (park loop tick included), is answered after --ring and kept up; callguard
pushes each new deadline with `sched_del` + `sched_hangup +N` over inbound ESL.
Lateness: push k (k >= 1 after the one at answer) is due when slice k ends less the
lead, at answer + k * quota - lead (the grants run from the answer in whole
quotas); lateness is its arrival minus that. The simulator really runs each
sched_hangup: a call cut off by ALLOTTED_TIMEOUT is counted.

Examples:
  .venv/bin/python bench/supervise.py                  # 20,000 calls, 60 s quota, 150 s
  .venv/bin/python bench/supervise.py --pbx freeswitch --calls 20000
  .venv/bin/python bench/supervise.py --calls 5000 --duration 130
  .venv/bin/python bench/supervise.py --quick          # 1,000 calls, 10 s quota, ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import math
import os
import sys
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    BenchEnv,
    CpuMeter,
    LoopLag,
    emit_json,
    free_port,
    print_machine,
    print_table,
    proc_cpu_seconds,
    proc_status,
    serve_asterisk,
    summarize,
)

from callguard.config import Settings  # noqa: E402
from callguard.protocol import esl  # noqa: E402
from callguard.simulator.asterisk import SimCall, SimulatedAsterisk  # noqa: E402
from callguard.simulator.freeswitch import SimChannel, SimulatedFreeSWITCH  # noqa: E402


class BenchAsterisk(SimulatedAsterisk):
    """The simulator, with two changes for scale and measurement only:
    channel lookup by name in O(1) (the simulator scans all calls for each AMI
    action, quadratic at 20,000 calls), and a record of every AbsoluteTimeout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.actions = collections.deque(maxlen=1000)  # not every action for ever
        self.by_name: dict[str, SimCall] = {}
        self.timeouts: dict[str, list[tuple[float, float]]] = {}  # channel -> (arrived, s)
        self.action_counts: collections.Counter = collections.Counter()

    def new_call(self, account: str, exten: str) -> SimCall:
        call = super().new_call(account, exten)
        self.by_name[call.channel] = call
        return call

    def hangup(self, call: SimCall, cause: int, quiet: bool = False) -> None:
        super().hangup(call, cause, quiet)
        self.by_name.pop(call.channel, None)

    def _channel(self, name: str) -> SimCall | None:
        return self.by_name.get(name)

    async def _act(self, a, writer, logged_in):
        name = a.get("Action", "").lower()
        self.action_counts[name] += 1
        if name == "absolutetimeout":
            try:
                seconds = float(a.get("Timeout", "0"))
            except ValueError:
                seconds = 0.0
            self.timeouts.setdefault(a.get("Channel", ""), []).append(
                (time.monotonic(), seconds))
        return await super()._act(a, writer, logged_in)


async def wait_for(predicate, timeout: float, what: str, step: float = 0.1) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - t0


async def place_calls(sim: BenchAsterisk, accounts: list[str], n: int, rate: float,
                      ring: float, talk: float) -> list[asyncio.Task]:
    """Start n calls at `rate` per second (open loop)."""
    tasks = []
    t0 = time.perf_counter()
    i = 0
    while i < n:
        due = t0 + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(max(due - now, 0.001))  # 1 ms timers: do not spin
            continue
        while i < n and t0 + i / rate <= now:
            account = accounts[i % len(accounts)]
            tasks.append(asyncio.ensure_future(
                sim.call(account, common.PREMIUM_NUMBER, ring=ring, talk=talk)))
            i += 1
    return tasks


async def hang_up_all(sim: BenchAsterisk, rate: float, cause=16) -> None:
    calls = list(sim.calls.values())
    t0 = time.perf_counter()
    i = 0
    while i < len(calls):
        now = time.perf_counter()
        due = t0 + i / rate
        if due > now:
            await asyncio.sleep(max(due - now, 0.001))
            continue
        while i < len(calls) and t0 + i / rate <= now:
            sim.hangup(calls[i], cause)
            i += 1


def lateness(sim: BenchAsterisk, grace: float, lead: float) -> tuple[list[float], int]:
    """Lateness of every AbsoluteTimeout after the first on each channel, seconds."""
    out = []
    for pushes in sim.timeouts.values():
        for (t_prev, timeout_prev), (t_next, _) in zip(pushes, pushes[1:], strict=False):
            out.append(t_next - (t_prev + timeout_prev - grace - lead))
    return out, sum(1 for p in sim.timeouts.values() if len(p) == 1)


async def scenario(args, env: BenchEnv) -> dict:
    grace = Settings().grace_seconds
    lead = min(5.0, args.quota / 2)
    sim = BenchAsterisk(agi_port=0)
    await sim.start()
    port = free_port()
    server = serve_asterisk(env, port, ami_url=sim.ami_url, **common.server_env(args))
    await asyncio.to_thread(server.start)
    sim.agi_port = port
    result: dict = {}
    try:
        pid = server.pid
        rpid = common.redis_pid(args.redis_url)
        await wait_for(lambda: sim.action_counts["coreshowchannels"] > 0, 30,
                       "the serve process to log in to AMI and reconcile")

        # Warm-up: a few short calls, so imports, scripts and pools are loaded.
        warm = await place_calls(sim, env.accounts, args.warmup_calls, 200, 0.2, 0.5)
        await asyncio.gather(*warm)
        await wait_for(lambda: env.redis_totals()["channels"] == 0, 30, "warm-up commits")
        sim.timeouts.clear()

        # Idle floor.
        meter = CpuMeter({"serve": pid, "redis": rpid}).start()
        await asyncio.sleep(args.idle)
        idle = meter.stop()
        rss_before = proc_status(pid)
        print(f"# idle {args.idle:g} s: serve CPU {idle['serve']:.4f} core, "
              f"RSS {rss_before['VmRSS'] / 1024:.1f} MB; other load {idle['other']:.2f} core",
              flush=True)

        # This process's own garbage collector would stall the simulator for hundreds of
        # ms with 20,000 calls in memory and show up as lateness: off while measuring.
        if not args.bench_gc:
            gc.collect()
            gc.freeze()
            gc.disable()

        # Ramp.
        talk = args.duration + args.calls / args.ramp + 600
        t_ramp = time.monotonic()
        ramp_meter = CpuMeter({"serve": pid, "redis": rpid, "bench": os.getpid()}).start()
        ramp_lag = LoopLag().start()
        tasks = await place_calls(sim, env.accounts, args.calls, args.ramp, args.ring, talk)
        placed = time.monotonic() - t_ramp

        def answered() -> int:
            return sum(1 for c in sim.calls.values() if c.answered_at is not None)

        def pushed() -> int:
            return len(sim.timeouts)

        try:
            # Every call either supervised (first AbsoluteTimeout seen) or over (denied).
            await wait_for(lambda: pushed() + len(sim.finished) - args.warmup_calls
                           >= args.calls, 60 + args.calls / args.ramp,
                           "every call's first AbsoluteTimeout")
        except TimeoutError as exc:
            print(f"# {exc}: {pushed()} of {args.calls}", flush=True)
        ramp_s = time.monotonic() - t_ramp
        ramp_cpu = ramp_meter.stop()
        ramp_lag_ms = ramp_lag.stop()
        setup = [c.setup_latency for c in sim.calls.values()]
        denied = [c for c in sim.finished[args.warmup_calls:] if not c.allowed]
        reasons = collections.Counter(c.variables.get("CALLGUARD_REASON", c.agi_status)
                                      for c in denied)
        up = len(sim.calls)
        rss_up = proc_status(pid)
        print(f"# ramp: {args.calls} calls placed in {placed:.1f} s, {up} up and "
              f"{pushed()} supervised after {ramp_s:.1f} s; denied {len(denied)} "
              f"{dict(reasons) if reasons else ''}; serve CPU {ramp_cpu['serve']:.2f}, "
              f"bench CPU {ramp_cpu['bench']:.2f}, bench loop lag p99 "
              f"{ramp_lag_ms['p99']:.1f} max {ramp_lag_ms['max']:.1f} ms; "
              f"RSS {rss_up['VmRSS'] / 1024:.1f} MB", flush=True)

        # Steady phase.
        series = []
        meter = CpuMeter({"serve": pid, "redis": rpid, "bench": os.getpid()}).start()
        steady_lag = LoopLag().start()
        prev, t_prev = proc_cpu_seconds(pid), time.monotonic()
        t_end = t_prev + args.duration
        while time.monotonic() < t_end:
            await asyncio.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            cur, t_cur = proc_cpu_seconds(pid), time.monotonic()
            series.append((cur - prev) / max(t_cur - t_prev, 1e-9))
            prev, t_prev = cur, t_cur
        steady = meter.stop()
        steady_lag_ms = steady_lag.stop()
        rss_after = proc_status(pid)
        still_up = len(sim.calls)
        late, single = lateness(sim, grace, lead)
        late_ms = summarize([x * 1000 for x in late])
        early = sum(1 for x in late if x < -0.05)
        counts = dict(sim.action_counts)

        # Hang up everything; every session must be committed.
        t_hang = time.monotonic()
        await hang_up_all(sim, args.ramp * 2)
        try:
            drained = await wait_for(lambda: env.redis_totals()["channels"] == 0, 120,
                                     "every session to be committed")
        except TimeoutError as exc:
            drained = float("nan")
            print(f"# {exc}", flush=True)
        totals = env.redis_totals()
        hang_s = time.monotonic() - t_hang
        await asyncio.gather(*tasks, return_exceptions=True)

        per_session = (rss_up["VmRSS"] - rss_before["VmRSS"]) * 1024 / max(up, 1)
        result = {
            "calls": args.calls, "quota": args.quota, "duration": args.duration,
            "ramp": args.ramp, "accounts": len(env.accounts), "lead": lead, "grace": grace,
            "up": up, "still_up_at_end": still_up, "denied": len(denied),
            "deny_reasons": dict(reasons),
            "setup_ms": {k: v * 1000 if k != "n" else v for k, v in summarize(setup).items()},
            "idle_cpu": idle["serve"], "idle_other": idle["other"],
            "ramp_cpu": ramp_cpu["serve"], "ramp_seconds": ramp_s,
            "ramp_bench_cpu": ramp_cpu["bench"], "ramp_bench_loop_lag_ms": ramp_lag_ms,
            "steady_bench_cpu": steady["bench"], "steady_bench_loop_lag_ms": steady_lag_ms,
            "steady_cpu": steady["serve"], "steady_cpu_peak_1s": max(series or [0.0]),
            "steady_cpu_p90_1s": common.percentile(series, 90),
            "steady_redis_cpu": steady.get("redis", float("nan")),
            "steady_other": steady["other"], "steady_wall": steady["wall"],
            "rss_before_mb": rss_before["VmRSS"] / 1024, "rss_up_mb": rss_up["VmRSS"] / 1024,
            "rss_after_mb": rss_after["VmRSS"] / 1024, "rss_peak_mb": rss_after["VmHWM"] / 1024,
            "bytes_per_session": per_session, "threads": rss_after["Threads"],
            "extends_measured": len(late), "channels_with_one_push": single,
            "lateness_ms": late_ms, "early_pushes": early,
            "ami_actions": counts, "commit_drain_s": drained, "hangup_phase_s": hang_s,
            "redis_after": totals, "violations": sim.violations[:10],
            "server_log_tail": [line for line in server.log_tail(40).splitlines()
                                if not line.startswith("GCPROBE")][-5:],
        }
    finally:
        server.stop()
        await sim.stop()
        gc.enable()
        gc.unfreeze()
    if args.gc_probe:
        result["server_gc"] = common.gcprobe_summary(server.log_path)
    return result


# -- FreeSWITCH ------------------------------------------------------------------------------

class BenchFreeSWITCH(SimulatedFreeSWITCH):
    """The simulator, with changes for scale and measurement only: the shipped dialplan's
    steps run directly (unset callguard_result, set callguard_direction, socket, then the
    callguard_checked hunt: hang up without ALLOW, else bridge), frames are built from
    esl_load's pre-split templates (checked byte for byte against the simulator's), a
    frame nobody listens to is not built, a channel's scheduler tasks are found in O(1)
    (the simulator scans them all on each sched_del and hangup, quadratic at 20,000
    calls), and each sched_hangup received over inbound ESL is recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from esl_load import FrameTemplates

        self.commands = collections.deque(maxlen=1000)  # not every command for ever
        self.templates = FrameTemplates(self)
        self.templates.check()
        self.pushes: dict[str, list[tuple[float, int]]] = {}  # uuid -> (arrived, +N)
        self.api_counts: collections.Counter = collections.Counter()
        self._by_group: dict[str, set[int]] = {}
        self._outbound_api = False

    # the dialplan, without the interpreter
    async def call(self, account: str, dest: str, ring: float = 2.0, talk: float = 30.0,
                   variables: dict[str, str] | None = None) -> SimChannel:
        channel = SimChannel(str(uuidlib.uuid4()), f"sofia/internal/{next(self._names)}@pbx1",
                             account, dest, {"accountcode": account, **(variables or {})},
                             created_at=self.clock.monotonic())
        self.calls[channel.uuid] = channel
        self.emit("CHANNEL_CREATE", channel)
        channel.variables.pop("callguard_result", None)
        channel.variables["callguard_direction"] = "outbound"
        await self._socket(channel, "127.0.0.1:8084 async full")
        if not channel.ended.is_set():
            if channel.variables.get("callguard_result") != "ALLOW":
                self.hangup(channel, "NORMAL_TEMPORARY_FAILURE")
            else:
                channel.bridged = True
                await self.clock.sleep(ring)
                if not channel.ended.is_set():
                    self.answer(channel)
                    channel.talk = asyncio.get_running_loop().call_later(
                        self.clock.real(talk), self.hangup, channel, "NORMAL_CLEARING")
                    await channel.ended.wait()
        self.hangup(channel, "NORMAL_CLEARING")
        return channel

    # frames
    _SLOTS = {"Application": "app", "Application-Data": "arg", "Application-UUID": "auuid"}

    def emit(self, kind: str, channel: SimChannel, **extra: str) -> None:
        to_socket = (channel.myevents and channel.socket_writer is not None
                     and not channel.socket_writer.is_closing())
        listeners = [] if self.blackholed else [
            w for w, names in self._listeners.items() if kind in names and not w.is_closing()]
        if not to_socket and not listeners:
            return
        if kind in ("CHANNEL_PARK", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE",
                    "CHANNEL_ANSWER"):
            values = self.templates.values(channel)
            values.update({slot: esl_enc(extra.get(name, "")) for name, slot in
                           self._SLOTS.items()})
            data = self.templates.event(kind, values)
        elif kind == "CHANNEL_HANGUP_COMPLETE":
            data = self.templates.hangup_complete(channel, extra.get("Hangup-Cause",
                                                                     channel.cause))
        else:
            data = esl.event_frame(self.headers(kind, channel, **extra))
        if to_socket:
            channel.socket_writer.write(data)
        for writer in listeners:
            writer.write(data)

    def _connect_reply(self, channel: SimChannel, mode: list[str]) -> bytes:
        if mode != ["async", "full"]:
            return super()._connect_reply(channel, mode)
        return self.templates.fill("connect", self.templates.values(channel))

    # the scheduler, indexed by group
    def _schedule(self, group: str, seconds: int, callback, *args) -> int:
        task = next(self._task_ids)

        def fire():
            self._tasks.pop(task, None)
            self._by_group.get(group, set()).discard(task)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(self.clock.real(seconds), fire)
        self._tasks[task] = (group, handle)
        self._by_group.setdefault(group, set()).add(task)
        return task

    def _cancel_group(self, group: str) -> int:
        doomed = self._by_group.pop(group, set())
        for task in doomed:
            entry = self._tasks.pop(task, None)
            if entry:
                entry[1].cancel()
        return len(doomed)

    def _outbound_command(self, channel, command, writer, queued) -> bool:
        self._outbound_api = True
        try:
            return super()._outbound_command(channel, command, writer, queued)
        finally:
            self._outbound_api = False

    def api(self, line: str) -> str:
        name, *args = line.split(" ")
        self.api_counts[name] += 1
        if name == "sched_hangup" and len(args) >= 2 and not self._outbound_api:
            seconds = args[0][1:] if args[0].startswith("+") else ""
            self.pushes.setdefault(args[1], []).append(
                (self.clock.monotonic(), int(seconds) if seconds.isdigit() else -1))
        if name == "sched_del" and len(args) == 1 and not args[0].isdigit():
            return f"+OK Deleted: {self._cancel_group(args[0])}\n"
        return super().api(line)

    def hangup(self, channel: SimChannel, cause: str, quiet: bool = False) -> None:
        """SimulatedFreeSWITCH.hangup, with the channel's tasks found in the index."""
        if channel.ended.is_set():
            return
        if channel.talk:
            channel.talk.cancel()
        self._cancel_group(channel.uuid)
        channel.ended_at = self.clock.monotonic()
        channel.cause, channel.state = cause, "hangup"
        self.calls.pop(channel.uuid, None)
        self.finished.append(channel)
        channel.ended.set()
        if not quiet:
            self.emit("CHANNEL_HANGUP_COMPLETE", channel, **{"Hangup-Cause": cause})


def esl_enc(value: str) -> bytes:
    from esl_load import enc

    return enc(value)


def fs_lateness(sim: BenchFreeSWITCH, quota: int, lead: float, grace: float) -> dict:
    """Each inbound sched_hangup against when it was due (see the module docstring)."""
    late, first, margins, mismatched = [], [], [], 0
    channels = {c.uuid: c for c in sim.finished}
    channels.update(sim.calls)
    for uuid, pushes in sim.pushes.items():
        channel = channels.get(uuid)
        if channel is None or channel.answered_at is None:
            continue
        answered = channel.answered_at
        first.append(pushes[0][0] - answered)
        for k, (arrived, seconds) in enumerate(pushes):
            grant_end = answered + (k + 1) * quota  # the slice this push covers
            if k:
                late.append(arrived - (answered + k * quota - lead))
            # The dead man's switch: FreeSWITCH's own hangup, beyond the grant's end.
            margins.append(arrived + seconds - grant_end)
            if not grace - 0.05 <= arrived + seconds - grant_end < grace + 1.05:
                mismatched += 1
    return {"late": late, "first": first, "margins": margins, "mismatched": mismatched}


async def scenario_fs(args, env: BenchEnv) -> dict:
    grace = Settings().grace_seconds
    lead = min(5.0, args.quota / 2)
    sim = BenchFreeSWITCH(outbound_port=0)
    await sim.start()
    port = free_port()
    server = common.serve_freeswitch(env, port, esl_url=sim.esl_url, **common.server_env(args))
    await asyncio.to_thread(server.start)
    sim.outbound_port = port
    result: dict = {}
    try:
        pid = server.pid
        rpid = common.redis_pid(args.redis_url)
        await wait_for(lambda: sim.api_counts["show"] > 0, 30,
                       "the serve process to log in to ESL and reconcile")

        warm = await place_calls(sim, env.accounts, args.warmup_calls, 200, 0.2, 0.5)
        await asyncio.gather(*warm)
        await wait_for(lambda: env.redis_totals()["channels"] == 0, 30, "warm-up commits")
        sim.pushes.clear()
        warm_finished = len(sim.finished)

        meter = CpuMeter({"serve": pid, "redis": rpid}).start()
        await asyncio.sleep(args.idle)
        idle = meter.stop()
        rss_before = proc_status(pid)
        print(f"# idle {args.idle:g} s: serve CPU {idle['serve']:.4f} core, "
              f"RSS {rss_before['VmRSS'] / 1024:.1f} MB; other load {idle['other']:.2f} core",
              flush=True)

        if not args.bench_gc:
            gc.collect()
            gc.freeze()
            gc.disable()

        talk = args.duration + args.calls / args.ramp + 600
        t_ramp = time.monotonic()
        ramp_meter = CpuMeter({"serve": pid, "redis": rpid, "bench": os.getpid()}).start()
        ramp_lag = LoopLag().start()
        tasks = await place_calls(sim, env.accounts, args.calls, args.ramp, args.ring, talk)
        placed = time.monotonic() - t_ramp

        def pushed() -> int:
            return len(sim.pushes)

        try:
            await wait_for(lambda: pushed() + len(sim.finished) - warm_finished >= args.calls,
                           60 + args.calls / args.ramp, "every call's first sched_hangup")
        except TimeoutError as exc:
            print(f"# {exc}: {pushed()} of {args.calls}", flush=True)
        ramp_s = time.monotonic() - t_ramp
        ramp_cpu = ramp_meter.stop()
        ramp_lag_ms = ramp_lag.stop()
        setup = [c.setup_latency for c in sim.calls.values()]
        denied = [c for c in sim.finished[warm_finished:] if not c.allowed]
        reasons = collections.Counter(c.reason or "no_result" for c in denied)
        up = len(sim.calls)
        rss_up = proc_status(pid)
        print(f"# ramp: {args.calls} calls placed in {placed:.1f} s, {up} up and "
              f"{pushed()} supervised after {ramp_s:.1f} s; denied {len(denied)} "
              f"{dict(reasons) if reasons else ''}; serve CPU {ramp_cpu['serve']:.2f}, "
              f"bench CPU {ramp_cpu['bench']:.2f}, bench loop lag p99 "
              f"{ramp_lag_ms['p99']:.1f} max {ramp_lag_ms['max']:.1f} ms; "
              f"RSS {rss_up['VmRSS'] / 1024:.1f} MB", flush=True)

        series = []
        meter = CpuMeter({"serve": pid, "redis": rpid, "bench": os.getpid()}).start()
        steady_lag = LoopLag().start()
        prev, t_prev = proc_cpu_seconds(pid), time.monotonic()
        t_end = t_prev + args.duration
        while time.monotonic() < t_end:
            await asyncio.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            cur, t_cur = proc_cpu_seconds(pid), time.monotonic()
            series.append((cur - prev) / max(t_cur - t_prev, 1e-9))
            prev, t_prev = cur, t_cur
        steady = meter.stop()
        steady_lag_ms = steady_lag.stop()
        rss_after = proc_status(pid)
        still_up = len(sim.calls)
        cut_off = sum(1 for c in sim.finished[warm_finished:] if c.killed)
        lat = fs_lateness(sim, args.quota, lead, grace)
        late_ms = summarize([x * 1000 for x in lat["late"]])
        early = sum(1 for x in lat["late"] if x < -0.05)
        counts = dict(sim.api_counts)

        t_hang = time.monotonic()
        await hang_up_all(sim, args.ramp * 2, "NORMAL_CLEARING")
        try:
            drained = await wait_for(lambda: env.redis_totals()["channels"] == 0, 120,
                                     "every session to be committed")
        except TimeoutError as exc:
            drained = float("nan")
            print(f"# {exc}", flush=True)
        totals = env.redis_totals()
        hang_s = time.monotonic() - t_hang
        await asyncio.gather(*tasks, return_exceptions=True)

        per_session = (rss_up["VmRSS"] - rss_before["VmRSS"]) * 1024 / max(up, 1)
        result = {
            "pbx": "freeswitch",
            "calls": args.calls, "quota": args.quota, "duration": args.duration,
            "ramp": args.ramp, "accounts": len(env.accounts), "lead": lead, "grace": grace,
            "up": up, "still_up_at_end": still_up, "denied": len(denied),
            "deny_reasons": dict(reasons), "cut_off_by_sched_hangup": cut_off,
            "setup_ms": {k: v * 1000 if k != "n" else v for k, v in summarize(setup).items()},
            "idle_cpu": idle["serve"], "idle_other": idle["other"],
            "ramp_cpu": ramp_cpu["serve"], "ramp_seconds": ramp_s,
            "ramp_bench_cpu": ramp_cpu["bench"], "ramp_bench_loop_lag_ms": ramp_lag_ms,
            "steady_bench_cpu": steady["bench"], "steady_bench_loop_lag_ms": steady_lag_ms,
            "steady_cpu": steady["serve"], "steady_cpu_peak_1s": max(series or [0.0]),
            "steady_cpu_p90_1s": common.percentile(series, 90),
            "steady_redis_cpu": steady.get("redis", float("nan")),
            "steady_other": steady["other"], "steady_wall": steady["wall"],
            "rss_before_mb": rss_before["VmRSS"] / 1024, "rss_up_mb": rss_up["VmRSS"] / 1024,
            "rss_after_mb": rss_after["VmRSS"] / 1024, "rss_peak_mb": rss_after["VmHWM"] / 1024,
            "bytes_per_session": per_session, "threads": rss_after["Threads"],
            "extends_measured": len(lat["late"]),
            "channels_with_one_push": sum(1 for p in sim.pushes.values() if len(p) == 1),
            "lateness_ms": late_ms, "early_pushes": early,
            "answer_to_first_push_ms": {k: v * 1000 if k != "n" else v
                                        for k, v in summarize(lat["first"]).items()},
            "deadline_margin_s": {k: v for k, v in summarize(lat["margins"]).items()},
            "deadline_margin_outside_grace": lat["mismatched"],
            "deadline_margin_min": min(lat["margins"], default=float("nan")),
            "esl_api": counts, "commit_drain_s": drained, "hangup_phase_s": hang_s,
            "redis_after": totals, "violations": sim.violations[:10],
            "server_log_tail": [line for line in server.log_tail(40).splitlines()
                                if not line.startswith("GCPROBE")][-5:],
        }
    finally:
        server.stop()
        await sim.stop()
        gc.enable()
        gc.unfreeze()
    if args.gc_probe:
        result["server_gc"] = common.gcprobe_summary(server.log_path)
    return result


def report_fs(r: dict) -> None:
    first, margin = r["answer_to_first_push_ms"], r["deadline_margin_s"]
    print(f"# FreeSWITCH: answer -> first sched_hangup median {first['median']:.1f} / p99 "
          f"{first['p99']:.1f} ms; FreeSWITCH's own hangup after the grant's end: median "
          f"{margin['median']:.2f} s, min {r['deadline_margin_min']:.2f} s, max "
          f"{margin['max']:.2f} s ({r['deadline_margin_outside_grace']} outside [grace, "
          f"grace + 1 s)); calls cut off by a sched_hangup: {r['cut_off_by_sched_hangup']}")


def report(r: dict) -> None:
    rows = [
        {"metric": "calls up (of N)", "value": f"{r['up']:,} of {r['calls']:,}"},
        {"metric": "denied at setup", "value": f"{r['denied']} {r['deny_reasons'] or ''}"},
        {"metric": "setup latency ms (median/p99/max)",
         "value": f"{r['setup_ms']['median']:.2f} / {r['setup_ms']['p99']:.2f} / "
                  f"{r['setup_ms']['max']:.1f}"},
        {"metric": "serve CPU idle (core)", "value": f"{r['idle_cpu']:.4f}"},
        {"metric": "serve CPU during ramp (core)", "value": f"{r['ramp_cpu']:.3f}"},
        {"metric": "serve CPU steady (core, mean)", "value": f"{r['steady_cpu']:.3f}"},
        {"metric": "serve CPU steady (busiest 1 s / p90 1 s)",
         "value": f"{r['steady_cpu_peak_1s']:.3f} / {r['steady_cpu_p90_1s']:.3f}"},
        {"metric": "Redis CPU steady (core)", "value": f"{r['steady_redis_cpu']:.3f}"},
        {"metric": "bench process (simulator) CPU steady / loop lag p99, max ms",
         "value": f"{r['steady_bench_cpu']:.3f} / {r['steady_bench_loop_lag_ms']['p99']:.1f}, "
                  f"{r['steady_bench_loop_lag_ms']['max']:.1f}"},
        {"metric": "other load on the machine (core)", "value": f"{r['steady_other']:.2f}"},
        {"metric": "RSS idle / all up / end / peak (MB)",
         "value": f"{r['rss_before_mb']:.1f} / {r['rss_up_mb']:.1f} / "
                  f"{r['rss_after_mb']:.1f} / {r['rss_peak_mb']:.1f}"},
        {"metric": "memory per session (bytes)", "value": f"{r['bytes_per_session']:,.0f}"},
        {"metric": "extends measured", "value": f"{r['extends_measured']:,}"},
        {"metric": "extend lateness ms (median/p99/max)",
         "value": f"{r['lateness_ms']['median']:.1f} / {r['lateness_ms']['p99']:.1f} / "
                  f"{r['lateness_ms']['max']:.1f}"},
        {"metric": "early pushes (< -50 ms)", "value": f"{r['early_pushes']}"},
        {"metric": "AMI actions received" if "ami_actions" in r else "ESL api commands received",
         "value": str(r.get("ami_actions", r.get("esl_api")))},
        {"metric": "all committed after hangup (s)", "value": f"{r['commit_drain_s']:.1f}"},
        {"metric": "Redis after (reserved/channels/live)",
         "value": f"{r['redis_after']['reserved']} / {r['redis_after']['channels']} / "
                  f"{r['redis_after']['live']}"},
    ]
    print_table(rows, ["metric", "value"],
                f"supervise: {r['calls']:,} calls, quota {r['quota']} s, "
                f"steady {r['steady_wall']:.0f} s, {r['accounts']} accounts")
    if r.get("server_gc"):
        print(f"# server GC (count, total ms, max ms per generation; slow = (uptime s, gen, "
              f"ms, collected)): {r['server_gc']}")
    if r["violations"]:
        print(f"# simulator violations: {r['violations']}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pbx", choices=("asterisk", "freeswitch"), default="asterisk",
                        help="serve asterisk + simulated Asterisk (default), or serve "
                             "freeswitch + simulated FreeSWITCH")
    parser.add_argument("--calls", type=int, default=20000, help="concurrent calls (20000)")
    parser.add_argument("--quota", type=int, default=60, help="quota seconds (60)")
    parser.add_argument("--duration", type=float, default=150.0,
                        help="seconds of steady phase with all calls up (150: at least two "
                             "extends per call with a 60 s quota)")
    parser.add_argument("--ramp", type=float, default=1000.0,
                        help="calls placed per second (1000)")
    parser.add_argument("--ring", type=float, default=0.5, help="ring seconds before answer")
    parser.add_argument("--per-account", type=int, default=20,
                        help="calls per prepaid account (20: 1,000 accounts for 20,000 calls)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds to measure the idle serve process (10)")
    parser.add_argument("--warmup-calls", type=int, default=100)
    parser.add_argument("--bench-gc", action="store_true",
                        help="leave this process's garbage collector on while measuring "
                             "(its pauses then show up as lateness)")
    common.add_common_args(parser)
    common.add_server_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.calls = min(args.calls, 1000)
        args.quota = min(args.quota, 10)
        args.duration = min(args.duration, 12.0)
        args.idle = min(args.idle, 2.0)
        args.warmup_calls = min(args.warmup_calls, 50)
        args.ramp = min(args.ramp, 500.0)

    common.keep_results(args)
    common.raise_fd_limit()
    info = print_machine()
    common.install_uvloop()
    env = BenchEnv(args.redis_url, quota=args.quota, keep=args.keep)
    try:
        t = time.perf_counter()
        env.setup(accounts=math.ceil(args.calls / args.per_account))
        print(f"# {len(env.accounts)} accounts set up in {time.perf_counter() - t:.1f} s "
              f"(prefix {env.prefix})", flush=True)
        result = asyncio.run(scenario(args, env) if args.pbx == "asterisk"
                             else scenario_fs(args, env))
        report(result)
        if args.pbx == "freeswitch":
            report_fs(result)
        emit_json({"bench": "supervise", "pbx": args.pbx, "machine": info,
                   "server_env": args.server_env, **result}, args.json_out)
    finally:
        deleted = env.cleanup()
        print(f"# cleaned up {deleted} Redis key(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
