"""Supervision that cannot go blind: `serve asterisk` when its AMI link is missing,
black-holed, dropped, or its reconcile fails, and when other nodes share the Redis.
Real sockets against the simulated Asterisk; a private Redis where it is stopped."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from callguard import service
from callguard.adapters.asterisk import AsteriskAdapter
from callguard.clock import Clock
from callguard.nodes import NodeClash
from callguard.rating import Rate
from callguard.service import App
from callguard.simulator.asterisk import SimulatedAsterisk
from callguard.supervision import CallState

from asterisk_rig import ACCT, PREMIUM, app_with, rig, run, until
from engine_helpers import prepaid, setup_plan, snapshot

RATE = Rate("", "", 3_000_000, 0, 1, 1)  # PREMIUM: CHF 3.00/min, 1/1


@pytest.fixture
def plan(app):
    setup_plan(app)
    prepaid(app, ACCT, balance=50_000_000)
    return app


def charged(app) -> int:
    return 50_000_000 - snapshot(app, ACCT)["balance"]


def private_app(plan, private_redis) -> App:
    app = App(dataclasses.replace(plan.settings, redis_url=private_redis.url))
    app.__dict__["books"] = plan.books
    setup_plan(app)
    service.create_account(app, "4155", opening_balance=50_000_000, kind="prepaid",
                           max_channels=0)
    return app


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_without_an_ami_link_no_call_gets_an_unsupervised_allow(plan, policy):
    async def scenario():
        async with rig(plan, ami=False, failure_policy=policy) as (sim, _):
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)

    call = run(scenario())
    s = plan.settings
    if policy == "fail_closed":
        assert call.variables["CALLGUARD_RESULT"] == "DENY"
        assert call.variables["CALLGUARD_REASON"] == "UNAVAILABLE"
    else:
        # The short fixed grant, ringing included, enforced by Asterisk's own timeout.
        assert call.variables["CALLGUARD_RESULT"] == "ALLOW"
        assert call.variables["CALLGUARD_REASON"] == "UNAVAILABLE"
        assert call.variables["CALLGUARD_GRANT"] == str(s.fail_open_grant)
        assert call.variables["TIMEOUT(absolute)"] == str(s.fail_open_grant + s.grace_seconds)


def test_a_black_holed_link_is_noticed_and_calls_get_the_failure_policy_until_it_is_back(plan):
    async def scenario():
        async with rig(plan, ami_timing=(0.2, 0.3)) as (sim, [adapter]):
            await until(lambda: any(a["Action"] == "CoreShowChannels" for a in sim.actions),
                        "the reconcile after login")
            await asyncio.sleep(0.1)  # its reply is in: nothing is waiting for an answer
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            sim.blackhole_ami()  # no FIN, no RST: only the keepalive can tell
            await until(lambda: not adapter.supervising, "the link declared down")
            blind = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            sim.restore_ami()
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) > logins,
                        "a new login")
            await until(lambda: adapter.supervising, "the link back")
            back = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            return blind, back

    blind, back = run(scenario())
    assert (blind.variables["CALLGUARD_RESULT"], blind.variables["CALLGUARD_REASON"]) == (
        "DENY", "UNAVAILABLE")
    assert back.variables["CALLGUARD_RESULT"] == "ALLOW"


def test_an_action_left_unanswered_drops_the_link(plan):
    """Not only the keepalive: a Hangup (or AbsoluteTimeout) that gets no reply ends the
    connection at once, and the client logs in again."""

    async def scenario():
        async with rig(plan, ami_timing=(60, 0.3)) as (sim, [adapter]):
            task = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=30))
            await until(lambda: any(t.state is CallState.TALKING
                                    for t in adapter.supervisor.sessions.values()), "answered")
            sim.blackhole_ami()
            [session] = adapter.supervisor.sessions
            await asyncio.to_thread(service.kill, plan, [session])
            await until(lambda: not adapter.supervising, "the link dropped")
            sim.restore_ami()
            await until(lambda: adapter.supervising, "the link back")
            sim.hangup(sim.calls[session.split("/")[1]], 16)
            return await task

    assert run(scenario()).cause == 16


def test_a_call_answered_while_the_link_was_black_holed_is_billed_from_its_real_answer(plan):
    async def scenario():
        async with rig(plan, speed=10, ami_timing=(0.2, 0.3), timestamp_events=True) as (
                sim, [adapter]):
            call = sim.new_call(ACCT, PREMIUM)
            assert await sim.fastagi(call, "authorize") == "SUCCESS"
            sim.blackhole_ami()
            await until(lambda: not adapter.supervising, "the link declared down")
            await sim.clock.sleep(2)  # it rings, unseen
            sim.answer(call)  # answered, unseen
            await sim.clock.sleep(20)  # and talks, unseen
            sim.restore_ami()
            tracked = adapter.supervisor.sessions[call.variables["CALLGUARD_SESSION"]]
            await until(lambda: tracked.state is CallState.TALKING, "the call resumed")
            await sim.clock.sleep(70)  # supervised again: extended past its first grant
            sim.hangup(call, 16)
            await until(lambda: not adapter.supervisor.sessions, "the commit")
            return call

    call = run(scenario())
    assert call.talk_seconds > 90
    # From the answer Asterisk recorded (CDR(answer)), not from the reconnect, not from setup.
    assert charged(plan) == RATE.cost(int(call.talk_seconds))


def test_a_reconnect_during_ringing_does_not_bill_the_ringing(plan):
    """Rang 3 s, talked 2.5 s, the link blipped while it rang: billed 2 s. A call that
    never answered across the blip costs nothing. (Not 2.0 s: a bill of whole seconds from
    a translated PBX clock must not sit on the second's boundary.)"""

    async def scenario():
        async with rig(plan, timestamp_events=True) as (sim, [adapter]):
            talked, unanswered = sim.new_call(ACCT, PREMIUM), sim.new_call(ACCT, PREMIUM)
            for call in (talked, unanswered):
                assert await sim.fastagi(call, "authorize") == "SUCCESS"
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            sim.drop_ami()
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) > logins
                        and adapter.supervising, "the reconnect")
            await until(lambda: any(a["Action"] == "CoreShowChannels"
                                    for a in sim.actions[logins:]), "the reconcile")
            await asyncio.sleep(0.2)  # whatever it does with the ringing calls, it has done
            sim.answer(talked)
            await sim.clock.sleep(2.5)
            sim.hangup(talked, 16)
            sim.hangup(unanswered, 16)
            await until(lambda: not adapter.supervisor.sessions, "the commits")
            return talked

    talked = run(scenario())
    assert charged(plan) == RATE.cost(int(talked.talk_seconds)) == RATE.cost(2)


def test_a_reconcile_while_redis_is_away_waits_for_it_and_the_link_stays_up(plan,
                                                                            private_redis):
    """Redis away when the AMI link logs in: the reconcile waits for it with the link up
    (it used to end the AMI task for good, leaving every later call unsupervised), and
    supervision goes on once Redis is back."""
    app = private_app(plan, private_redis)

    private_redis.kill()  # away from the start: the first login's reconcile waits too

    async def scenario():
        async with rig(app, speed=10) as (sim, [adapter]):
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            sim.drop_ami()  # noticed while the reconcile waits
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) > logins,
                        "the new login")
            await asyncio.sleep(1.5)
            assert sum(a["Action"] == "Login" for a in sim.actions) == logins + 1
            assert adapter.supervising  # waiting for Redis, not flapping
            private_redis.start()
            await until(lambda: any(a["Action"] == "CoreShowChannels"
                                    for a in sim.actions[logins:]), "the reconcile", timeout=15)
            return await sim.call("4155", PREMIUM, ring=1, talk=90)

    call = run(scenario())
    assert call.allowed and call.talk_seconds >= 89  # supervised: extended past 60 s
    assert 50_000_000 - int(private_redis.client().hget(app.keys.account("4155"), "balance")) \
        == RATE.cost(int(call.talk_seconds))


def test_any_error_in_a_login_ends_that_session_and_the_client_logs_in_again():
    """Whatever goes wrong after a login, the AMI client reconnects; it never gives up."""
    from callguard.adapters.ami_client import AMIClient

    async def scenario():
        sim = SimulatedAsterisk(agi_port=0)
        await sim.start()
        failures = []

        async def on_login():
            if not failures:
                failures.append(1)
                raise KeyError("a bug in whatever ran after the login")

        client = AMIClient(sim.ami_url, lambda event: None, on_login)
        task = asyncio.ensure_future(client.run())
        try:
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) == 2,
                        "a second login")
            await until(lambda: client.connected.is_set(), "connected")
        finally:
            task.cancel()
            await sim.stop()
        return failures

    assert run(scenario()) == [1]


def test_an_answer_redis_could_not_take_is_billed_all_the_same(plan, private_redis):
    """Redis away when the calls answer: one hangs up while Redis is still away, one after;
    both are billed from their answer (the answer is retried, and the commit carries it)."""
    app = private_app(plan, private_redis)

    async def scenario():
        async with rig(app, speed=10, timestamp_events=True) as (sim, [adapter]):
            early, late = sim.new_call("4155", PREMIUM), sim.new_call("4155", PREMIUM)
            for call in (early, late):
                assert await sim.fastagi(call, "authorize") == "SUCCESS"
            private_redis.kill()
            sim.answer(early)
            sim.answer(late)
            # Half a second off the whole: the bill is whole seconds of a time translated
            # from the PBX's clock, estimated to a few ms of wall time (x10 here).
            await sim.clock.sleep(20.5)
            sim.hangup(early, 16)
            # Long enough for early's answer to stop being retried: only its commit can
            # tell Redis it was answered.
            await sim.clock.sleep(40)
            private_redis.start()
            await sim.clock.sleep(20)
            sim.hangup(late, 16)
            await until(lambda: not adapter.supervisor.sessions and not adapter.control._work,
                        "the commits", timeout=20)
            return early, late

    early, late = run(scenario())
    balance = int(private_redis.client().hget(app.keys.account("4155"), "balance"))
    assert 50_000_000 - balance == RATE.cost(int(early.talk_seconds)) + RATE.cost(
        int(late.talk_seconds))


def test_a_pbx_clock_far_off_does_not_change_the_bill(plan):
    """Asterisk's clock five minutes slow: its timestamps are put on the scripts' clock
    by the offset its Ping replies show."""

    async def scenario():
        async with rig(plan, speed=10, timestamp_events=True) as (sim, [adapter]):
            sim.clock_skew_ms = -300_000
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            sim.drop_ami()  # a login that learns the skewed clock
            await until(lambda: sum(a["Action"] == "Login" for a in sim.actions) > logins
                        and adapter.supervising, "the new login")
            return await sim.call(ACCT, PREMIUM, ring=1, talk=40)

    call = run(scenario())
    assert charged(plan) == RATE.cost(int(call.talk_seconds))


def test_under_fail_open_a_call_nobody_saw_end_is_charged_its_short_grant(plan):
    """Allowed while the link was black-holed (fail_open) and over before it came back: its
    answer was never seen, so it counts as answered at setup, up to its grant: at least
    what it talked, never beyond what it was allowed, not nothing."""

    async def scenario():
        async with rig(plan, speed=10, ami_timing=(0.2, 0.3), failure_policy="fail_open") as (
                sim, [adapter]):
            await until(lambda: any(a["Action"] == "CoreShowChannels" for a in sim.actions),
                        "the reconcile after login")
            sim.blackhole_ami()
            await until(lambda: not adapter.supervising, "the link declared down")
            call = sim.new_call(ACCT, PREMIUM)
            assert await sim.fastagi(call, "authorize") == "SUCCESS"
            sim.answer(call)
            await sim.clock.sleep(30)
            sim.hangup(call, 16)
            sim.restore_ami()
            await until(lambda: not adapter.supervisor.sessions, "the reconcile's commit")
            return call

    call = run(scenario())
    assert call.variables["CALLGUARD_GRANT"] == str(plan.settings.fail_open_grant)
    grant = plan.settings.fail_open_grant
    assert RATE.cost(int(call.talk_seconds)) <= charged(plan) <= RATE.cost(grant)


@pytest.mark.postgres  # kept on PostgreSQL where the rest of the file runs on SQLite only
def test_a_plan_change_while_the_books_are_away_is_loaded_once_they_are_back(plan):
    """The serve process cannot reach the database when a plan changes: it keeps the old
    rates, keeps listening (kill requests still reach it), and loads the new plan once
    the database is back."""
    from urllib.parse import urlsplit, urlunsplit

    from callguard.books.database import make_engine
    from callguard.books.ledger import Books
    from callguard.simulator.faults import Proxy

    url = urlsplit(plan.settings.database_url)
    if not url.scheme.startswith("postgresql"):
        pytest.skip("needs a database server to cut off (CALLGUARD_TEST_DATABASE_URL)")
    proxy = Proxy((url.hostname, url.port or 5432))
    served = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))

    async def scenario():
        async with rig(plan) as (sim, [adapter]):
            adapter.app.__dict__["books"] = Books(make_engine(served))
            before = await sim.call(ACCT, "41991234567", ring=0.01, talk=0.01)
            proxy.cut()
            await asyncio.to_thread(service.import_plan, plan, "default", "outbound",
                                    [Rate("4199", "now allowed", 100_000, 0, 1, 1)])
            await asyncio.sleep(1)
            during = await sim.call(ACCT, "41991234567", ring=0.01, talk=0.01)
            listeners = await asyncio.to_thread(service.kill, plan, [f"{ACCT}/x/1"])
            proxy.heal()
            await until(lambda: adapter.engine.ops.plans.rate(
                "default", "outbound", "41991234567").description == "now allowed",
                "the new plan", timeout=15)
            after = await sim.call(ACCT, "41991234567", ring=0.01, talk=0.01)
            adapter.app.books.engine.dispose()
            return before, during, listeners, after

    try:
        before, during, listeners, after = run(scenario())
    finally:
        proxy.close()
    assert before.variables["CALLGUARD_REASON"] == "DEST_BLOCKED"
    assert during.variables["CALLGUARD_REASON"] == "DEST_BLOCKED"  # the old rates stand
    assert listeners >= 1
    assert after.variables["CALLGUARD_RESULT"] == "ALLOW"


def test_a_blip_on_one_node_leaves_another_nodes_calls_alone(plan):
    """Two serve processes sharing a Redis, each watching its own Asterisk: one's
    reconcile never touches the other's calls; the same identity twice is refused."""

    async def scenario():
        clock = Clock(10)
        pbx_a, pbx_b = (SimulatedAsterisk(agi_port=0, clock=clock, timestamp_events=True)
                        for _ in range(2))
        adapters = []
        for pbx, node in ((pbx_a, "pbx1:4573"), (pbx_b, "pbx1:4574")):
            await pbx.start()
            s = dataclasses.replace(plan.settings, ami_url=pbx.ami_url, node=node,
                                    agi_budget_ms=2000)
            adapter = AsteriskAdapter(app_with(plan, s), clock)
            await adapter.start("127.0.0.1", 0)
            pbx.agi_port = adapter.port
            adapters.append(adapter)
        await asyncio.gather(*(a.ami.connected.wait() for a in adapters))
        try:
            task = asyncio.ensure_future(pbx_b.call(ACCT, PREMIUM, ring=1, talk=100))
            await until(lambda: any(t.state is CallState.TALKING
                                    for t in adapters[1].supervisor.sessions.values()),
                        "the call on B answered")
            logins = sum(a["Action"] == "Login" for a in pbx_a.actions)
            pbx_a.drop_ami()
            await until(lambda: any(a["Action"] == "CoreShowChannels"
                                    for a in pbx_a.actions[logins:]), "A's reconcile")
            call = await task
            clash = AsteriskAdapter(app_with(plan, adapters[0].settings), clock)
            with pytest.raises(NodeClash, match="in use by pid"):
                await clash.control.start()
            return call
        finally:
            for adapter in adapters:
                await adapter.stop()
            for pbx in (pbx_a, pbx_b):
                await pbx.stop()

    call = run(scenario())
    assert call.talk_seconds >= 99 and call.cause == 16  # the caller hung up, after 100 s
    assert charged(plan) == RATE.cost(int(call.talk_seconds))


def test_default_identities_of_two_servers_on_one_host_differ(plan):
    ports = ("127.0.0.1:4573", "127.0.0.1:4574")
    nodes = {AsteriskAdapter(app_with(plan, dataclasses.replace(
        plan.settings, node=None, agi_bind=bind))).control.node for bind in ports}
    assert len(nodes) == 2
