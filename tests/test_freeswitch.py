"""`serve freeswitch` over real outbound and inbound ESL sockets, against the
simulated FreeSWITCH built from the transcripts, running the shipped dialplan.
PBX time runs faster than wall time where a test says `speed`; the adapter and
the simulation share that clock."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from callguard import service
from callguard.adapters.freeswitch import FreeSWITCHAdapter
from callguard.clock import Clock
from callguard.rating import Rate
from callguard.simulator.freeswitch import SimulatedFreeSWITCH
from callguard.supervision import CallState

from engine_helpers import prepaid, setup_plan, snapshot
from freeswitch_rig import ACCT, PREMIUM, app_with, fs_rig, run, until

RATE = Rate("", "", 3_000_000, 0, 1, 1)  # PREMIUM: CHF 3.00/min, 1/1


@pytest.fixture
def plan(app):
    setup_plan(app)
    return app


def apis(sim, word: str, inbound: bool = True) -> list[list[str]]:
    """The arguments of every `api <word>` FreeSWITCH received: on the outbound sockets,
    then (unless `inbound` is False) on the inbound connection."""
    lines = [c.line for _, c in sim.outbound_commands] + (sim.commands if inbound else [])
    return [line.split()[2:] for line in lines if line.startswith(f"api {word} ")]


def test_allow_sets_every_variable_arms_the_pbx_timer_and_the_dialplan_goes_on(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01), sim

    call, sim = run(scenario())
    variables = {k: v for k, v in call.variables.items() if k.startswith("callguard_")}
    assert variables == {
        "callguard_direction": "outbound", "callguard_result": "ALLOW",
        "callguard_reason": "OK", "callguard_grant": "60", "callguard_maxsec": "1000",
        "callguard_session": f"{ACCT}/{call.uuid}/1"}
    assert call.bridged  # past the re-check in callguard_checked
    # The dead man's switch from the start: ring time + first grant + grace, on the uuid
    # (plus the second FreeSWITCH's whole-second scheduler may take off), alone in its group.
    assert apis(sim, "sched_del", inbound=False) == [[call.uuid]]
    assert apis(sim, "sched_hangup", inbound=False) == [[
        f"+{120 + 60 + plan.settings.grace_seconds + 1}", call.uuid, "ALLOTTED_TIMEOUT"]]
    # Exit only once the last variable is set (async mode runs sendmsg later).
    lines = [c.line for _, c in sim.outbound_commands]
    assert lines[0] == "myevents" and lines[-1] == "exit"


@pytest.mark.parametrize("setup,exten,reason,cause", [
    ("blocked", PREMIUM, "BLOCKED", "CALL_REJECTED"),
    ("empty", PREMIUM, "NO_FUNDS", "CALL_REJECTED"),
    ("busy", PREMIUM, "CHANNEL_LIMIT", "NORMAL_CIRCUIT_CONGESTION"),
    ("ok", "41991234567", "DEST_BLOCKED", "CALL_REJECTED"),
    ("ok", "3312345678", "NO_RATE", "UNALLOCATED_NUMBER"),
    ("none", PREMIUM, "UNKNOWN_ACCOUNT", "CALL_REJECTED"),
])
def test_every_deny_reason_reaches_the_channel_and_callguard_hangs_it_up(
        plan, setup, exten, reason, cause):
    if setup != "none":
        prepaid(plan, ACCT, balance=0 if setup == "empty" else 50_000_000, max_channels=10)
    if setup == "busy":
        service.update_account(plan, ACCT, max_channels=1)
        plan.engine.authorize(ACCT, PREMIUM, "outbound", "other")
    if setup == "blocked":
        service.update_account(plan, ACCT, status="blocked", block_reason="fraud")

    async def scenario():
        async with fs_rig(plan) as (sim, _):
            return await sim.call(ACCT, exten, ring=0.01, talk=0.01)

    call = run(scenario())
    assert (call.variables["callguard_result"], call.reason) == ("DENY", reason)
    assert call.cause == cause and not call.bridged and call.answered_at is None


def test_with_nothing_listening_the_re_check_hangs_the_call_up(plan):
    """The recorded fail-open of `socket`: the shipped dialplan must close it."""
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, esl=False) as (sim, [adapter]):
            await adapter.stop()  # nothing listens on the outbound port any more
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)

    call = run(scenario())
    assert "callguard_result" not in call.variables
    assert call.cause == "NORMAL_TEMPORARY_FAILURE" and not call.bridged


def test_billed_from_the_authorised_legs_answer_by_freeswitchs_billmsec(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=20) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=5, talk=10.5)

    call = run(scenario())
    assert call.allowed and call.cause == "NORMAL_CLEARING"
    charged = 50_000_000 - snapshot(plan, ACCT)["balance"]
    assert charged == RATE.cost(int(call.talk_seconds))  # the talk FreeSWITCH saw, no ring


def test_call_cut_off_with_uuid_kill_when_money_runs_out(plan):
    prepaid(plan, ACCT, balance=5_000_000)  # 100 s at CHF 3/min

    async def scenario():
        async with fs_rig(plan, speed=10) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=1, talk=3600), sim

    call, sim = run(scenario())
    assert call.talk_seconds >= 99.5 and call.cut_off  # not before its money ran out
    assert apis(sim, "uuid_kill") == [[call.uuid, "NORMAL_CLEARING"]]  # callguard cut it
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert -state["balance"] <= plan.settings.grace_seconds * 50_000


def test_thirty_concurrent_calls_cut_off_together(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=5, quota_seconds=10) as (sim, _):
            return await asyncio.gather(*(sim.call(ACCT, PREMIUM, ring=1, talk=3600)
                                          for _ in range(30)))

    calls = run(scenario())
    assert all(c.allowed for c in calls)
    assert sum(int(c.talk_seconds) for c in calls) >= 900  # CHF 50 buys 1000 call-seconds
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert -state["balance"] < 100_000  # overshoot under CHF 0.10


def test_extends_move_sched_hangup_forward_after_sched_del(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=20) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=1, talk=150), sim

    call, sim = run(scenario())
    inbound = [line.split()[1:] for line in sim.commands if line.startswith("api sched")]
    pairs = list(zip(inbound[::2], inbound[1::2], strict=True))
    assert len(pairs) >= 3  # at answer, then one per extension
    for delete, schedule in pairs:
        # The earlier task (the socket's, or the last extend's) goes first: they add up.
        assert delete == ["sched_del", call.uuid]
        assert schedule[0] == "sched_hangup" and schedule[2:] == [call.uuid, "ALLOTTED_TIMEOUT"]
        assert 0 < int(schedule[1][1:]) <= 60 + 5 + 2 + plan.settings.grace_seconds
    assert call.cause == "NORMAL_CLEARING" and call.talk_seconds >= 149 and not call.killed


def test_operators_list_kill_and_block_hangup_calls_of_whichever_process(plan, request):
    """`calls list`, `calls kill`, `account block --hangup` as an operator types them."""
    import json

    cli = request.getfixturevalue("run")  # the CLI against this test's services
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, nodes=("node-a", "node-b")) as (sim, adapters):
            sim.outbound_port = adapters[1].port  # the calls land on node-b
            talking = lambda: any(t.state is CallState.TALKING  # noqa: E731
                                  for t in adapters[1].supervisor.sessions.values())
            first = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=60))
            await until(talking, "the first call answered on node-b")
            listed = json.loads((await asyncio.to_thread(cli, "calls", "list", "--json")).stdout)
            await asyncio.to_thread(cli, "calls", "kill", listed[0]["session"])
            killed = await asyncio.wait_for(first, 30)
            second = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=60))
            await until(talking, "the second call answered on node-b")
            await asyncio.to_thread(cli, "account", "block", ACCT, "--hangup")
            return listed, killed, await asyncio.wait_for(second, 30), sim

    listed, killed, blocked, sim = run(scenario())
    assert [(c["session"], c["node"]) for c in listed] == [
        (killed.variables["callguard_session"], "node-b")]
    assert killed.cut_off and blocked.cut_off  # the callers would have talked for 60 s
    assert [args[0] for args in apis(sim, "uuid_kill")] == [killed.uuid, blocked.uuid]


def test_restart_resumes_live_calls_and_closes_gone_ones(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        clock = Clock(20)
        sim = SimulatedFreeSWITCH(outbound_port=0, clock=clock)
        await sim.start()
        settings = dataclasses.replace(plan.settings, esl_url=sim.esl_url, node="node-a")
        first = FreeSWITCHAdapter(app_with(plan, settings), clock)
        await first.start("127.0.0.1", 0)
        sim.outbound_port = first.port
        await first.esl.connected.wait()
        staying = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.5, talk=200))
        leaving = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.5, talk=20))
        await until(lambda: sum(t.state is CallState.TALKING
                                for t in first.supervisor.sessions.values()) == 2,
                    "both calls answered")
        await first.stop()  # callguard goes away; one call ends while nobody watches
        await leaving
        second = FreeSWITCHAdapter(app_with(plan, settings), clock)
        await second.start("127.0.0.1", 0)
        sim.outbound_port = second.port
        await asyncio.wait_for(second.esl.connected.wait(), 5)
        call = await asyncio.wait_for(staying, 30)
        await second.stop()
        await sim.stop()
        assert sim.violations == []
        return call, sim

    staying, sim = run(scenario())
    assert staying.cause == "NORMAL_CLEARING" and staying.talk_seconds >= 199  # extended
    assert any(line == "api show channels as json" for line in sim.commands)
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    # The gone call is charged up to its grant end (60 s), not beyond.
    assert 50_000_000 - state["balance"] <= 3_000_000 * 200 // 60 + 3_000_000 + 100_000


def test_a_call_answered_while_the_link_was_down_is_billed_from_its_real_answer(plan):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=10, esl_timing=(0.2, 0.3)) as (sim, [adapter]):
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=3, talk=30))
            await until(lambda: adapter.supervisor.sessions, "the call authorised")
            sim.drop_esl()  # the answer happens while nobody is connected
            await until(lambda: any(c.answered_at for c in sim.calls.values()), "answered")
            await until(lambda: adapter.supervising, "the link back")
            call = await asyncio.wait_for(task, 30)
            return call, sim

    call, sim = run(scenario())
    assert any(line.startswith("api uuid_dump ") for line in sim.commands)
    charged = 50_000_000 - snapshot(plan, ACCT)["balance"]
    # Billed from FreeSWITCH's answer, not from the reconnect: at most a second of drift.
    assert abs(charged - RATE.cost(int(call.talk_seconds))) <= 50_000


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_black_holed_link_gives_the_failure_policy_until_it_is_back(plan, policy):
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, esl_timing=(0.2, 0.3), failure_policy=policy) as (
                sim, [adapter]):
            await until(lambda: "api show channels as json" in sim.commands, "the reconcile")
            await asyncio.sleep(0.1)
            sim.blackhole_esl()  # no FIN, no RST: only the keepalive can tell
            await until(lambda: not adapter.supervising, "the link declared down")
            blind = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            sim.restore_esl()
            await until(lambda: adapter.supervising, "the link back")
            back = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            return blind, back, sim

    blind, back, sim = run(scenario())
    assert blind.reason == "UNAVAILABLE"
    if policy == "fail_closed":
        assert blind.variables["callguard_result"] == "DENY" and not blind.bridged
    else:  # the short final grant, ringing included, on FreeSWITCH's own scheduler
        assert blind.variables["callguard_result"] == "ALLOW"
        grant = plan.settings.fail_open_grant + plan.settings.grace_seconds + 1
        assert [f"+{grant}", blind.uuid, "ALLOTTED_TIMEOUT"] in apis(sim, "sched_hangup")
    assert back.allowed and back.reason == "OK"


def test_sigkill_during_calls_freeswitch_ends_them_and_restart_charges_them(plan):
    """`serve freeswitch` as a real process, killed with SIGKILL mid-call: FreeSWITCH's
    own scheduler ends the calls at their grant end; the next start commits them."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import free_port

    prepaid(plan, ACCT, balance=50_000_000)
    port = free_port()

    async def scenario():
        sim = SimulatedFreeSWITCH(outbound_port=port)
        await sim.start()
        s = plan.settings
        env = {**os.environ, "CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
               "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
               "CALLGUARD_NODE": "node-k", "CALLGUARD_ESL_URL": sim.esl_url,
               "CALLGUARD_ESL_BIND": f"127.0.0.1:{port}", "CALLGUARD_QUOTA_SECONDS": "3",
               "CALLGUARD_GRACE_SECONDS": "1"}

        async def start_serve():
            logins = sim.commands.count("api show channels as json")
            proc = subprocess.Popen([sys.executable, "-m", "callguard", "serve", "freeswitch"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await until(lambda: sim.commands.count("api show channels as json") > logins,
                        "serve freeswitch reconciled", timeout=15,
                        diagnose=lambda: proc.poll() is not None and proc.stderr.read())
            return proc

        procs = [await start_serve()]
        try:
            calls = [asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.2, talk=600))
                     for _ in range(3)]
            await asyncio.sleep(4.5)  # answered, extended at least once
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait()
            grants = {s["session"]: int(s["g"]) for s in service.live_sessions(plan, ACCT)}
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
        granted = grants[call.variables["callguard_session"]]
        assert granted >= 6  # the first slice was extended before the kill
        # FreeSWITCH's scheduler ended the call: nobody was left to send uuid_kill.
        assert call.cause == "ALLOTTED_TIMEOUT" and call.talk_seconds >= granted
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    # Charged what was granted and used: each call up to its grant end.
    assert 50_000_000 - state["balance"] == sum(g * 50_000 for g in grants.values())


def recorded_templates() -> dict[str, list[list[str]]]:
    """The headers the simulation builds its frames from, taken again from the recording
    of one real call through `socket` (its leg loopback/9998-b)."""
    import json

    from callguard.protocol import esl

    from conftest import FIXTURES

    rows = [json.loads(line) for line in
            (FIXTURES / "freeswitch" / "outbound-socket-continue-async-full-exit.jsonl")
            .read_text().splitlines() if line.strip()]

    def frames(conn):
        data = b"".join(r["data"].encode() for r in rows
                        if r["conn"] == conn and r["dir"] == "from_fs")
        return esl.ESLReader().feed(data)

    out = {"CHANNEL_DATA": [list(kv) for kv in frames("outbound")[0].headers.items()]}
    for event in frames("inbound-monitor"):
        if isinstance(event, esl.Event) and event.get("Channel-Name") == "loopback/9998-b" \
                and event.get("Application", "set") == "set":
            out.setdefault(event.name, [list(kv) for kv in event.headers.items()])
    return out


def test_the_simulations_frames_come_from_the_recording():
    from callguard.simulator.freeswitch import TEMPLATES

    assert TEMPLATES["frames"] == recorded_templates()


def test_one_odd_timestamp_does_not_move_the_bill(plan):
    """A FreeSWITCH clock step (or a forged event) stamped ten minutes ahead, once."""
    from callguard.simulator.freeswitch import SimChannel

    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=20) as (sim, _):
            sim.clock_skew_ms = 600_000
            sim.emit("CHANNEL_ANSWER", SimChannel("0" * 8 + "-0000-0000-0000-" + "0" * 12,
                                                  "x", "x", "1"))
            sim.clock_skew_ms = 0
            return await sim.call(ACCT, PREMIUM, ring=5, talk=120)

    call = run(scenario())
    assert 50_000_000 - snapshot(plan, ACCT)["balance"] == RATE.cost(int(call.talk_seconds))


def test_a_caller_answered_before_the_socket_is_supervised_from_the_start(plan):
    """An IVR in front answers the caller: callguard must still extend and cut off."""
    prepaid(plan, ACCT, balance=500_000)  # 10 s at CHF 3/min

    async def scenario():
        async with fs_rig(plan, speed=20) as (sim, [adapter]):
            await until(lambda: "api show channels as json" in sim.commands, "the reconcile")
            await asyncio.sleep(0.1)  # done: it cannot be what finds this call answered
            return await sim.call(ACCT, PREMIUM, ring=1, talk=600, answered=True), sim

    call, sim = run(scenario())
    assert call.cut_off and apis(sim, "uuid_kill") == [[call.uuid, "NORMAL_CLEARING"]]
    state = snapshot(plan, ACCT)
    assert (state["reserved"], state["channels"]) == (0, 0)
    assert -state["balance"] <= plan.settings.grace_seconds * 50_000


def test_a_caller_who_gives_up_while_redis_decides_holds_nothing(plan):
    """The HANGUP_COMPLETE comes before the decision: the session is ended once it exists."""
    prepaid(plan, ACCT, balance=50_000_000, max_channels=1)

    async def scenario():
        async with fs_rig(plan) as (sim, [adapter]):
            decide, release = adapter.control.engine.run, asyncio.Event()

            async def slow(call):  # Redis decides only once the caller has gone
                await release.wait()
                return await decide(call)

            adapter.control.engine.run = slow
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=5))
            await until(lambda: any(c.socket_writer for c in sim.calls.values()), "the socket")
            sim.hangup(next(iter(sim.calls.values())), "ORIGINATOR_CANCEL")
            await task
            await until(lambda: adapter.control._ended, "its HANGUP_COMPLETE read")
            release.set()
            control = adapter.control
            await until(lambda: not control._ended and not control._committing
                        and snapshot(plan, ACCT)["channels"] == 0, "the session ended",
                        diagnose=lambda: snapshot(plan, ACCT))
            adapter.control.engine.run = decide
            return await sim.call(ACCT, PREMIUM, ring=0.1, talk=0.1)

    after = run(scenario())
    assert snapshot(plan, ACCT)["reserved"] == 0
    assert after.allowed, after.variables  # the channel cap of 1 is free again


def test_a_call_that_never_answers_nor_ends_is_released_at_its_expiry(plan):
    """Nothing else going on (no answer, no extend): the ringing call's own expiry timer
    must still fire, not wait for the sweeper (kept out of the way here)."""
    prepaid(plan, ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan, speed=20, ring_seconds=2, stale_grace_seconds=3600) as (
                sim, [adapter]):
            await until(lambda: "api show channels as json" in sim.commands, "the reconcile")
            await asyncio.sleep(0.1)  # the timer loop is asleep with no timer at all
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=3600, talk=1))
            await until(lambda: adapter.supervisor.sessions, "the call authorised")
            sim.blackhole_esl()  # its hangup event will never come
            await until(lambda: not adapter.supervisor.sessions, "the expiry", timeout=15)
            # The release's script goes out on the loop's next turn: wait for Redis, not
            # for the sweeper (an hour away).
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "the release")
            released = snapshot(plan, ACCT)
            sim.restore_esl()
            for channel in list(sim.calls.values()):  # unless its sched_hangup came first
                sim.hangup(channel, "NORMAL_CLEARING")
            await task
            return released

    released = run(scenario())
    assert (released["reserved"], released["channels"]) == (0, 0)
