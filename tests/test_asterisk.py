"""`serve asterisk` over real FastAGI and AMI sockets, against the simulated
Asterisk built from the transcripts. PBX time runs faster than wall time where
a test says `speed`; the adapter and the simulation share that clock."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from callguard import service
from callguard.adapters.asterisk import AsteriskAdapter, stamp_ms
from callguard.clock import Clock
from callguard.rating import Rate
from callguard.simulator.asterisk import SimulatedAsterisk
from callguard.supervision import CallState

from asterisk_rig import ACCT, PREMIUM, app_with, rig, run, until
from engine_helpers import T0, prepaid, setup_plan, snapshot


@pytest.fixture
def plan(app):
    setup_plan(app)
    return app


def test_allow_sets_every_channel_variable(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan) as (sim, _):
            call = sim.new_call(ACCT, PREMIUM)
            assert await sim.fastagi(call, "authorize") == "SUCCESS"
            return call.variables

    variables = run(scenario())
    assert variables == {
        "CALLGUARD_RESULT": "ALLOW", "CALLGUARD_REASON": "OK", "CALLGUARD_GRANT": "60",
        "CALLGUARD_MAXSEC": "1000", "CALLGUARD_SESSION": variables["CALLGUARD_SESSION"],
        "TIMEOUT(absolute)": str(120 + 60 + plan.settings.grace_seconds),
    }
    assert variables["CALLGUARD_SESSION"].startswith(ACCT + "/1795236355.")


@pytest.mark.parametrize("setup,script,exten,reason", [
    ("blocked", "authorize", PREMIUM, "BLOCKED"),
    ("empty", "authorize", PREMIUM, "NO_FUNDS"),
    ("busy", "authorize", PREMIUM, "CHANNEL_LIMIT"),
    ("ok", "authorize", "41991234567", "DEST_BLOCKED"),
    ("ok", "authorize", "3312345678", "NO_RATE"),
    ("none", "authorize", PREMIUM, "UNKNOWN_ACCOUNT"),
    ("ok", "authorize", "12#4", "BAD_REQUEST"),
    ("ok", "nosuchscript", PREMIUM, "BAD_REQUEST"),
    ("cps", "authorize", PREMIUM, "RATE_LIMIT"),
])
def test_every_deny_reason_reaches_the_channel(plan, setup, script, exten, reason):
    if setup != "none":
        prepaid(plan, ACCT, balance=0 if setup == "empty" else 50_000_000,
                max_channels=0 if setup == "busy" else 10,
                cps_limit=1 if setup == "cps" else 0)
    if setup == "busy":
        service.update_account(plan, ACCT, max_channels=1)
        plan.engine.authorize(ACCT, PREMIUM, "outbound", "other")
    clock = None
    if setup == "cps":
        # PBX time stands still, so both setups fall in the same second.
        clock = Clock(speed=1e-9, start_ms=T0)
        plan.engine.authorize(ACCT, PREMIUM, "outbound", "first", now_ms=T0)
    if setup == "blocked":
        service.update_account(plan, ACCT, status="blocked", block_reason="fraud")

    async def scenario():
        async with rig(plan, clock=clock) as (sim, _):
            return await sim.call(ACCT, exten, ring=0.01, talk=0.01, script=script)

    call = run(scenario())
    assert call.variables["CALLGUARD_RESULT"] == "DENY"
    assert call.variables["CALLGUARD_REASON"] == reason
    assert call.cause == 21 and call.answered_at is None  # the dialplan hung up


def test_query_parameters_override_account_and_destination(plan):
    prepaid(plan, "7777", balance=1_000_000)

    async def scenario():
        async with rig(plan) as (sim, _):
            call = sim.new_call("", "100")
            await sim.fastagi(call, f"authorize?account=7777&dest={PREMIUM}")
            return call

    call = run(scenario())
    assert call.variables["CALLGUARD_RESULT"] == "ALLOW"
    assert call.variables["CALLGUARD_MAXSEC"] == "20"  # CHF 1 at CHF 3/min


def test_ring_time_is_not_billed(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        # Events stamped by the PBX (timestampevents=yes): billing follows its clock exactly,
        # however late the events arrive.
        async with rig(plan, speed=20, timestamp_events=True) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=5, talk=10.5)

    call = run(scenario())
    assert call.allowed and call.cause == 16
    charged = 50_000_000 - snapshot(plan, ACCT)["balance"]
    premium = Rate("", "", 3_000_000, 0, 1, 1)
    assert charged == premium.cost(int(call.talk_seconds))  # the talk the PBX saw, no ring


def test_call_cut_off_when_money_runs_out(plan):
    prepaid(plan, ACCT, balance=5_000_000)  # 100 s at CHF 3/min

    async def scenario():
        async with rig(plan, speed=10) as (sim, adapters):
            call = await sim.call(ACCT, PREMIUM, ring=1, talk=3600)
            return call, sim

    call, sim = run(scenario())
    assert call.cause == 16 and call.talk_seconds >= 99.5  # not before its money ran out
    hangups = [a for a in sim.actions if a["Action"] == "Hangup"]
    assert hangups and hangups[0]["Channel"] == call.channel  # callguard cut it, not the timeout
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    # Billed to the moment callguard cut it, and never past the grant's end plus the grace.
    assert -state["balance"] <= plan.settings.grace_seconds * 50_000


def test_thirty_concurrent_calls_cut_off_together(plan):
    prepaid(plan, ACCT, balance=50_000_000)
    plan.settings = dataclasses.replace(plan.settings, quota_seconds=10)

    async def scenario():
        async with rig(plan, speed=5, quota_seconds=10) as (sim, _):
            return await asyncio.gather(*(sim.call(ACCT, PREMIUM, ring=1, talk=3600)
                                          for _ in range(30)))

    calls = run(scenario())
    allowed = [c for c in calls if c.allowed]
    assert len(allowed) == 30
    talk = sum(int(c.talk_seconds) for c in allowed)
    assert talk >= 900  # CHF 50 buys 1000 call-seconds at CHF 3/min: they used it
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert -state["balance"] < 100_000  # overshoot under CHF 0.10


def test_extends_push_the_pbx_deadline_forward(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan, speed=20) as (sim, _):
            call = await sim.call(ACCT, PREMIUM, ring=1, talk=150)
            return call, sim

    call, sim = run(scenario())
    timeouts = [float(a["Timeout"]) for a in sim.actions if a["Action"] == "AbsoluteTimeout"]
    assert len(timeouts) >= 3  # at answer, then one per extension
    # Each deadline: what is left of the grant (at most a slice plus the extend lead) + grace.
    assert all(0 < t <= 60 + 5 + 1 + plan.settings.grace_seconds for t in timeouts), timeouts
    assert call.cause == 16 and call.talk_seconds >= 149
    assert not [a for a in sim.actions if a["Action"] == "Hangup"]  # the caller hung up


def test_kill_and_block_hangup_reach_whichever_process_holds_the_call(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan, nodes=("node-a", "node-b")) as (sim, adapters):
            sim.agi_port = adapters[1].port  # the call lands on node-b
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=60))
            await until(lambda: any(t.state is CallState.TALKING
                                for t in adapters[1].supervisor.sessions.values()),
                        "the first call answered on node-b",
                        diagnose=lambda: (task.done() and task.result(), sim.calls,
                                          adapters[1].metrics))
            session = next(iter(adapters[1].supervisor.sessions))
            assert await asyncio.to_thread(service.kill, plan, [session]) >= 2
            call = await asyncio.wait_for(task, 30)
            for _ in range(100):  # and its Hangup event committed the session
                killed = await asyncio.to_thread(lambda: snapshot(plan, ACCT)["channels"])
                if not killed:
                    break
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=60))
            await until(lambda: any(t.state is CallState.TALKING
                                for t in adapters[1].supervisor.sessions.values()),
                        "the second call answered on node-b")
            sessions = [s["session"] for s in service.live_sessions(plan, ACCT)]
            service.update_account(plan, ACCT, status="blocked", block_reason="fraud")
            service.kill(plan, sessions)
            blocked = await asyncio.wait_for(second, 30)
            hangups = [a["Channel"] for a in sim.actions if a["Action"] == "Hangup"]
            return call, killed, blocked, hangups

    call, killed, blocked, hangups = run(scenario())
    # Ended by callguard's Hangup (the callers would have talked for 60 s), and committed.
    assert hangups == [call.channel, blocked.channel] and killed == 0
    assert call.cause == blocked.cause == 16


def test_fail_closed_and_fail_open_when_redis_is_down(plan, tmp_path):
    prepaid(plan, ACCT, balance=50_000_000)
    down = "redis://127.0.0.1:1/0"

    async def scenario(policy):
        app = app_with(plan, dataclasses.replace(plan.settings, failure_policy=policy))
        app.__dict__["redis_url"] = down
        async with rig(app) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=0.1, talk=0.1)

    closed = run(scenario("fail_closed"))
    assert (closed.variables["CALLGUARD_RESULT"], closed.variables["CALLGUARD_REASON"]) == (
        "DENY", "UNAVAILABLE")
    opened = run(scenario("fail_open"))
    assert (opened.variables["CALLGUARD_RESULT"], opened.variables["CALLGUARD_GRANT"]) == (
        "ALLOW", "60")
    assert opened.variables["CALLGUARD_REASON"] == "UNAVAILABLE"


def test_restart_resumes_live_calls_and_closes_gone_ones(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        clock = Clock(20)
        sim = SimulatedAsterisk(agi_port=0, clock=clock)
        await sim.start()
        settings = dataclasses.replace(plan.settings, ami_url=sim.ami_url, node="node-a")
        first = AsteriskAdapter(app_with(plan, settings), clock)
        await first.start("127.0.0.1", 0)
        sim.agi_port = first.port
        await first.ami.connected.wait()
        staying = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.5, talk=200))
        leaving = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.5, talk=20))
        await until(lambda: sum(t.state is CallState.TALKING
                                for t in first.supervisor.sessions.values()) == 2,
                    "both calls answered")
        await first.stop()  # callguard goes away; one call ends while nobody watches
        await leaving
        second = AsteriskAdapter(app_with(plan, settings), clock)
        await second.start("127.0.0.1", 0)
        sim.agi_port = second.port
        await asyncio.wait_for(second.ami.connected.wait(), 5)
        call = await asyncio.wait_for(staying, 30)
        await second.stop()
        await sim.stop()
        assert sim.violations == []
        return call, (await leaving)

    staying, leaving = run(scenario())
    assert staying.cause == 16 and staying.talk_seconds >= 199  # extended past 60 s
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    # The gone call is charged up to its grant end (60 s), not beyond.
    assert 50_000_000 - state["balance"] <= 3_000_000 * 200 // 60 + 3_000_000 + 100_000


def _raw(port: int, payload: bytes, half_close: bool = True, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        if not read:
            return b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"garbage line without colon\n\n",
    b"agi_network: yes\n" + b"agi_x: " + b"a" * 100_000 + b"\n",
    b"agi_network: yes\n" * 10_000,
    b"\xff\xfe\x00\x01" * 100,
])
def test_hostile_peers_get_a_deny_and_the_server_keeps_serving(plan, payload):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan) as (sim, adapters):
            reply = await asyncio.to_thread(_raw, adapters[0].port, payload)
            call = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            return reply, call

    reply, call = run(scenario())
    assert b'SET VARIABLE CALLGUARD_RESULT "DENY"' in reply and b"BAD_REQUEST" in reply
    assert call.allowed  # still serving


@pytest.mark.parametrize("stamp", ["NaN", "sNaN", "Infinity", "1e4000", "1e999990", "1_0",
                                   " 1", "-5", "0.000000", "", "1795236284.213525" * 2])
def test_an_ami_timestamp_that_is_not_epoch_seconds_is_no_time(stamp):
    """Asterisk writes "%ld.%06lu": anything else (NaN raised ValueError, 1e4000 made a
    4,000-digit time for the Lua scripts) is no time, like a missing one."""
    assert stamp_ms(stamp) is None
    assert stamp_ms("1795236284.213525") == 1795236284213


@pytest.mark.parametrize("uniqueid", ["1795236355.1310\x00", "9" * 200, "a/b", ""])
def test_channel_ids_no_pbx_produces_are_refused_and_nothing_is_held(plan, uniqueid):
    """A NUL or a 200-character unique id would make a session id no column can hold."""
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan) as (sim, adapters):
            call = sim.new_call(ACCT, PREMIUM)
            headers = b"".join(sim.agi_headers(call, "authorize")).replace(
                f"agi_uniqueid: {call.uniqueid}".encode(), f"agi_uniqueid: {uniqueid}".encode())
            return await asyncio.to_thread(_raw, adapters[0].port, headers)

    reply = run(scenario())
    assert b'SET VARIABLE CALLGUARD_RESULT "DENY"' in reply and b"BAD_REQUEST" in reply
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)


def test_silent_and_vanishing_peers_cost_bounded_time(plan, monkeypatch):
    monkeypatch.setattr("callguard.adapters.asterisk.HEADER_TIMEOUT", 0.5)
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan) as (sim, adapters):
            port = adapters[0].port
            silent = socket.create_connection(("127.0.0.1", port), timeout=10)
            half = socket.create_connection(("127.0.0.1", port))
            half.sendall(b"agi_network: yes\nagi_channel: x\n")
            half.close()  # gone mid-request
            # Part of the environment, then nothing: no blank line, so no AGI command may
            # go out (there is nothing to answer yet); it is closed without a word.
            stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
            stalled.sendall(sim.agi_headers(sim.new_call(ACCT, PREMIUM), "authorize")[0])
            # The server drops both by itself, long before these sockets' own 10 s timeout.
            data = await asyncio.to_thread(silent.recv, 10)
            silent.close()
            cut = await asyncio.to_thread(stalled.recv, 10)
            stalled.close()
            call = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            return data, cut, call

    data, cut, call = run(scenario())
    assert data == b""
    assert cut == b""
    assert call.allowed


def test_a_decision_that_does_not_come_is_still_a_deny(plan, monkeypatch):
    """Once Asterisk has sent its whole environment a command may go out, and Asterisk
    waits for one as long as the socket stays open. Should the decision not come (the call
    control stuck past its budget), the channel is still told DENY/UNAVAILABLE by SET
    VARIABLE before the close; the header deadline is over by then."""
    monkeypatch.setattr("callguard.adapters.asterisk.HEADER_TIMEOUT", 0.2)
    prepaid(plan, ACCT, balance=50_000_000)
    release = asyncio.Event()
    late = []

    async def stuck(request):
        late.append(asyncio.current_task())
        await release.wait()
        return [("CALLGUARD_RESULT", "ALLOW")]  # too late: must not go out

    async def scenario():
        async with rig(plan, agi_budget_ms=50) as (sim, adapters):
            monkeypatch.setattr(adapters[0], "authorize", stuck)
            call = sim.new_call(ACCT, PREMIUM)
            # As Asterisk does: the environment in its two writes, then it waits, the
            # socket open; here it does not even answer the commands.
            raw = await asyncio.to_thread(_raw, adapters[0].port,
                                          b"".join(sim.agi_headers(call, "authorize")),
                                          half_close=False)
            dialled = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            release.set()
            await asyncio.gather(*late)  # the decisions that came late: dropped, no error
            return raw, dialled

    raw, dialled = run(scenario())
    assert raw == (b'SET VARIABLE CALLGUARD_RESULT "DENY"\n'
                   b'SET VARIABLE CALLGUARD_REASON "UNAVAILABLE"\n'
                   b'SET VARIABLE CALLGUARD_GRANT "0"\n'
                   b'SET VARIABLE CALLGUARD_MAXSEC "0"\n'
                   b'SET VARIABLE CALLGUARD_SESSION ""\n')  # then our half-close: EOF
    assert dialled.agi_status == "SUCCESS" and not dialled.allowed
    assert (dialled.variables["CALLGUARD_RESULT"], dialled.variables["CALLGUARD_REASON"]) == (
        "DENY", "UNAVAILABLE")


def test_only_allowed_addresses_may_use_fastagi(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan, ami=False, agi_allow=("10.0.0.0/8",)) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)

    call = run(scenario())
    # Refused connection: nothing set, the shipped dialplan treats it as a deny.
    assert "CALLGUARD_RESULT" not in call.variables and not call.allowed


def test_the_double_flags_what_asterisk_would_reject():
    async def scenario():
        sim = SimulatedAsterisk(agi_port=0)
        call = sim.new_call(ACCT, PREMIUM)
        assert sim._agi_command(call, b"FOO BAR") == b"510 Invalid or unknown command\n"
        sim._agi_command(call, b'SET VARIABLE CALLGUARD_CRLF "v"\r')
        assert sim._parse_action(b"Action Hangup") is None
        assert sim._parse_action(b"Channel: x\r\nAction: Hangup") is None
        return sim.violations

    assert len(run(scenario())) == 4


def test_sigkill_during_calls_the_pbx_ends_them_and_restart_charges_them(plan, tmp_path):
    """`serve asterisk` as a real process, killed with SIGKILL mid-call."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import free_port

    prepaid(plan, ACCT, balance=50_000_000)
    agi_port = free_port()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=agi_port)
        await sim.start()
        s = plan.settings
        env = {**os.environ, "CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
               "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
               "CALLGUARD_NODE": "node-k", "CALLGUARD_AMI_URL": sim.ami_url,
               "CALLGUARD_AGI_BIND": f"127.0.0.1:{agi_port}", "CALLGUARD_QUOTA_SECONDS": "3",
               "CALLGUARD_GRACE_SECONDS": "1"}

        async def start_serve():
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            proc = subprocess.Popen([sys.executable, "-m", "callguard", "serve", "asterisk"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) > logins,
                        "serve asterisk logged in to AMI", timeout=15,
                        diagnose=lambda: proc.poll() is not None and proc.stderr.read())
            await asyncio.sleep(0.3)  # its reconcile
            return proc

        procs = [await start_serve()]
        try:
            calls = [asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.2, talk=600))
                     for _ in range(3)]
            await asyncio.sleep(4.5)  # answered, extended at least once
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait()
            grants = {sid: int(f["g"]) for sid, f in (  # final: nobody extends them now
                (s["session"], s) for s in service.live_sessions(plan, ACCT))}
            ended = await asyncio.wait_for(asyncio.gather(*calls), 15)
            procs.append(await start_serve())  # reconciles: the channels are gone
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "sessions committed")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
            await sim.stop()
        assert sim.violations == []
        return ended, grants

    ended, grants = run(scenario())
    assert len(ended) == len(grants) == 3
    for call in ended:
        granted = grants[call.variables["CALLGUARD_SESSION"]]
        assert granted >= 6  # the first slice was extended before the kill
        # The PBX's own timeout ended the call: nobody was left to send a Hangup.
        assert call.cause == 16 and call.talk_seconds >= granted
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    # Charged what was granted and used: each call up to its grant end.
    assert 50_000_000 - state["balance"] == sum(g * 50_000 for g in grants.values())


def test_a_rate_change_reaches_a_running_server(plan):
    """Call setup never reads SQL: the server holds the plans and reloads on change."""
    import time

    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan) as (sim, adapters):
            before = await sim.call(ACCT, "3312345678", ring=0.01, talk=0.01)
            started = time.perf_counter()
            await asyncio.to_thread(service.import_plan, plan, "default", "outbound",
                                    [Rate("33", "France", 150_000, 0, 60, 60)])
            await until(lambda: adapters[0].engine.ops.plans.rate(
                "default", "outbound", "3312345678") is not None, "the new plan")
            elapsed = time.perf_counter() - started
            after = await sim.call(ACCT, "3312345678", ring=0.01, talk=0.01)
            return before, after, elapsed

    before, after, elapsed = run(scenario())
    assert before.variables["CALLGUARD_REASON"] == "NO_RATE"
    assert after.variables["CALLGUARD_RESULT"] == "ALLOW"
    print(f"plan change reached the server in {elapsed * 1000:.1f} ms")


def test_an_answer_lost_while_ami_was_down_is_recovered(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with rig(plan, speed=20) as (sim, adapters):
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=2, talk=90))
            await until(lambda: adapters[0].supervisor.sessions, "the call authorised")
            sim.drop_ami()  # the DialEnd will go nowhere
            await until(lambda: any(c.answered_at for c in sim.calls.values()), "answered")
            await until(lambda: any(t.state is CallState.TALKING
                                for t in adapters[0].supervisor.sessions.values()),
                        "the answer recovered by the reconcile after the reconnect")
            return await task

    call = run(scenario())
    assert call.cause == 16 and call.talk_seconds >= 89  # supervised, extended past 60 s
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert 50_000_000 - state["balance"] > 3_000_000  # billed past the first slice (reconcile)


def test_no_deadline_timer_is_armed_once_call_control_has_stopped(plan):
    """The event link outlives the control's stop by a moment: a reply heard then must not
    arm a timer that would extend or hang up after the stop."""

    async def scenario():
        async with rig(plan) as (_, adapters):
            control = adapters[0].control
            await control.stop()
            control.supervisor.track(f"{ACCT}/1.1/1", "1.1", "PJSIP/late",
                                     control.clock.monotonic() + 0.01)
            control.set_off([])
            return control._timer

    assert run(scenario()) is None
