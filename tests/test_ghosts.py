"""Ghost sessions: a call setup for a channel the PBX never reports (a local user
talking FastAGI or outbound ESL to callguard) holds no money for long, and cannot
crowd out the calls the PBX does report. The same tests for Asterisk and FreeSWITCH,
against the simulated PBXs over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid as uuidlib

import pytest

from callguard.clock import Clock
from callguard.rating import Rate
from callguard.simulator.asterisk import SimCall
from callguard.simulator.freeswitch import SimChannel

from asterisk_rig import ACCT, PREMIUM, rig, run, until
from engine_helpers import prepaid, setup_plan, snapshot
from freeswitch_rig import fs_rig

RATE = Rate("", "", 3_000_000, 0, 1, 1)  # PREMIUM: CHF 3.00/min, 1/1
HOLD = RATE.cost(60)  # what a setup reserves: its first 60 s slice
_fake_ids = itertools.count(1)


@pytest.fixture
def plan(app):
    setup_plan(app)
    prepaid(app, ACCT, balance=50_000_000)
    return app


class Asterisk:
    """The Asterisk side: its rig, a fake FastAGI setup, a real call, its channel list."""

    rig = staticmethod(rig)

    @staticmethod
    def delay_reports(sim, seconds: float) -> None:
        sim.newchannel_delay = seconds

    @staticmethod
    async def fake(sim, account: str = ACCT, uniqueid: str | None = None) -> str:
        """A FastAGI session for a channel this Asterisk does not have (or for one it has:
        `uniqueid`); its result."""
        call = SimCall(f"PJSIP/fake-{next(_fake_ids):08x}",
                       uniqueid or f"1700000000.{next(_fake_ids)}", account, PREMIUM)
        await sim.fastagi(call, "authorize")
        if call.timeout:
            call.timeout.cancel()  # no such channel: nothing would end it in Asterisk
        return call.variables.get("CALLGUARD_RESULT", "") + "/" + call.reason

    @staticmethod
    def lists(sim) -> int:
        return sum(1 for a in sim.actions if a["Action"] == "CoreShowChannels")

    @staticmethod
    def drop_link(sim) -> None:
        sim.drop_ami()


class FreeSWITCH:
    rig = staticmethod(fs_rig)

    @staticmethod
    def delay_reports(sim, seconds: float) -> None:
        sim.create_delay = seconds

    @staticmethod
    async def fake(sim, account: str = ACCT, uuid: str | None = None) -> str:
        """An outbound ESL session for a channel this FreeSWITCH does not have (or has)."""
        channel = SimChannel(uuid or str(uuidlib.uuid4()), "sofia/internal/fake@pbx1", account,
                             PREMIUM, {"accountcode": account})
        if uuid:  # not this FreeSWITCH's channel: a hangup sent to it ends no real one
            real = sim.hangup

            def hangup(ch, *args, **kwargs):
                if ch is not channel:
                    return real(ch, *args, **kwargs)
                ch.ended.set()
                if ch.socket_writer:
                    ch.socket_writer.close()

            sim.hangup = hangup
        try:
            await sim._socket(channel, "127.0.0.1:8084 async full")
        finally:
            sim.__dict__.pop("hangup", None)
        return channel.variables.get("callguard_result", "") + "/" + channel.reason

    @staticmethod
    def lists(sim) -> int:
        return sum(1 for c in sim.commands if c == "api show channels as json")

    @staticmethod
    def drop_link(sim) -> None:
        sim.drop_esl()


PBXS = pytest.mark.parametrize("pbx", [Asterisk, FreeSWITCH], ids=["asterisk", "freeswitch"])


async def logged_in(pbx, sim) -> None:
    """The login's reconcile has taken its list: a setup from now on is checked later."""
    await until(lambda: pbx.lists(sim) == 1, "the reconcile after the login")


def billed(app, calls) -> bool:
    """The account paid for the calls' talk time (to the second: PBX time runs fast)."""
    charged = 50_000_000 - snapshot(app, ACCT)["balance"]
    return abs(charged - sum(RATE.cost(int(c.talk_seconds)) for c in calls)) <= \
        RATE.cost(1) * len(calls)


def ghosts(adapter) -> float:
    return adapter.metrics.registry.get_sample_value(
        "callguard_ghost_sessions_total", {"pbx": adapter.metrics.pbx})


@PBXS
def test_a_setup_the_pbx_never_reports_is_released_and_a_real_call_is_not(plan, pbx, caplog):
    caplog.set_level(logging.WARNING, "callguard.control")

    async def scenario():
        async with pbx.rig(plan, clock=Clock(speed=20)) as (sim, [adapter]):
            await logged_in(pbx, sim)
            real = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=20, talk=20))
            await until(lambda: len(adapter.supervisor.sessions) == 1, "the real call")
            assert await pbx.fake(sim) == "ALLOW/OK"
            assert snapshot(plan, ACCT)["reserved"] == 2 * HOLD
            await until(lambda: snapshot(plan, ACCT)["reserved"] == HOLD, "the ghost released",
                        timeout=15)
            assert snapshot(plan, ACCT)["channels"] == 1  # the real call's
            assert ghosts(adapter) == 1
            assert [t.state.value for t in adapter.supervisor.sessions.values()] == ["ringing"]
            call = await real  # rings past the ghost checks, answers, talks, ends
            return call, adapter

    call, adapter = run(scenario())
    assert call.allowed and call.talk_seconds > 0
    assert snapshot(plan, ACCT)["reserved"] == 0
    assert billed(plan, [call])
    assert ghosts(adapter) == 1
    [line] = [r.getMessage() for r in caplog.records if "ghost session" in r.getMessage()]
    assert "from 127.0.0.1" in line and f"account {ACCT}" in line


@PBXS
def test_a_ghost_whose_check_the_link_lost_is_released_by_the_next_logins_reconcile(plan, pbx):
    """The event link drops before the suspect's check (nobody to ask then): the reconcile
    after the next login finds its channel absent and releases it as a ghost."""
    async def scenario():
        async with pbx.rig(plan, ghost_seconds=60) as (sim, [adapter]):
            await logged_in(pbx, sim)
            assert await pbx.fake(sim) == "ALLOW/OK"
            assert snapshot(plan, ACCT)["reserved"] == HOLD
            pbx.drop_link(sim)
            await until(lambda: pbx.lists(sim) == 2, "the reconcile after the next login",
                        timeout=15)
            await until(lambda: snapshot(plan, ACCT)["reserved"] == 0, "the ghost released")
            assert snapshot(plan, ACCT)["channels"] == 0
            return ghosts(adapter)

    assert run(scenario()) == 1


@PBXS
def test_calls_reported_just_after_their_setup_are_no_ghosts(plan, pbx):
    """The race of the two sockets: each channel's first event comes after its setup (as
    FreeSWITCH's CHANNEL_CREATE does). Beside a fake, one call takes the account's last
    unreported slot, the other waits for its event; neither is ever checked or released."""

    async def scenario():
        async with pbx.rig(plan, clock=Clock(speed=30), ghost_seconds=30,
                           unconfirmed_per_account=2) as (sim, [adapter]):
            await logged_in(pbx, sim)
            assert await pbx.fake(sim) == "ALLOW/OK"
            pbx.delay_reports(sim, 0.05)
            lists = pbx.lists(sim)
            calls = [asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=3, talk=10))
                     for _ in range(2)]
            await until(lambda: len(adapter.supervisor.sessions) == 3, "both calls set up")
            await until(lambda: adapter.supervisor.suspects[ACCT] == 1, "their events")
            calls = await asyncio.gather(*calls)
            assert pbx.lists(sim) == lists  # no check was needed for them
            await until(lambda: ghosts(adapter) == 1, "the fake released", timeout=15)
            return calls

    calls = run(scenario())
    assert [c.reason for c in calls] == ["OK", "OK"]
    assert all(c.talk_seconds >= 9 for c in calls)
    assert snapshot(plan, ACCT)["reserved"] == 0
    assert billed(plan, calls)


@PBXS
@pytest.mark.parametrize("limit", ["account", "peer"])
def test_fakes_over_a_limit_are_denied_while_reported_calls_go_through(plan, pbx, limit):
    settings = ({"unconfirmed_per_account": 2} if limit == "account" else
                {"unconfirmed_rate_per_peer": 1, "unconfirmed_burst_per_peer": 2})

    async def scenario():
        async with pbx.rig(plan, agi_budget_ms=400, **settings) as (sim, [adapter]):
            await logged_in(pbx, sim)
            pbx.delay_reports(sim, 0.02)  # FreeSWITCH's order: every real call waits
            fakes = await asyncio.gather(*(pbx.fake(sim) for _ in range(6)))
            reserved = snapshot(plan, ACCT)["reserved"]
            calls = await asyncio.gather(*(sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
                                           for _ in range(3)))
            return fakes, reserved, calls

    fakes, reserved, calls = run(scenario())
    assert sorted(fakes) == ["ALLOW/OK"] * 2 + ["DENY/RATE_LIMIT"] * 4
    assert reserved == 2 * HOLD
    assert [c.reason for c in calls] == ["OK"] * 3


@PBXS
@pytest.mark.parametrize("crowded", ["channels", "money"])
def test_a_reported_call_that_ghosts_crowd_out_frees_them_at_once(app, pbx, crowded):
    """Fakes take every channel (or all the money) of a small account: the next call the
    PBX reports is denied by Redis, the account's suspects are checked at once, and it
    goes through in the same setup; for a while the account then admits no suspect."""
    setup_plan(app)
    prepaid(app, ACCT, balance=2 * HOLD if crowded == "money" else 50_000_000,
            max_channels=2 if crowded == "channels" else 0)

    async def scenario():
        async with pbx.rig(app, agi_budget_ms=400) as (sim, [adapter]):
            await logged_in(pbx, sim)
            assert [await pbx.fake(sim) for _ in range(3)] == ["ALLOW/OK"] * 2 + [
                "DENY/" + ("CHANNEL_LIMIT" if crowded == "channels" else "NO_FUNDS")]
            call = await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)
            assert await pbx.fake(sim) == "DENY/RATE_LIMIT"
            return call, adapter

    call, adapter = run(scenario())
    assert call.reason == "OK"
    assert ghosts(adapter) == 2


@PBXS
def test_a_setup_naming_another_accounts_live_call_is_denied(plan, pbx, caplog):
    """A local user who knows (on Asterisk: guesses) a live call's channel id sets up a
    call on it for another account: denied, and the real call stays supervised and billed
    to its own account (it was dropped from supervision, unbilled, its answer billable to
    the other account)."""
    caplog.set_level(logging.WARNING, "callguard.control")
    other = "41449999999"
    prepaid(plan, other, balance=50_000_000)

    async def scenario():
        async with pbx.rig(plan, clock=Clock(speed=10)) as (sim, [adapter]):
            await logged_in(pbx, sim)
            real = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=1, talk=20))
            await until(lambda: any(t.answered_ms for t in adapter.supervisor.sessions.values()),
                        "the real call answered", timeout=10)
            [tracked] = adapter.supervisor.sessions.values()
            assert await pbx.fake(sim, other, tracked.channel_id) == "DENY/BAD_REQUEST"
            assert list(adapter.supervisor.sessions) == [tracked.session]
            return await real

    call = run(scenario())
    assert call.talk_seconds > 0 and billed(plan, [call])
    assert snapshot(plan, ACCT)["reserved"] == 0
    assert (snapshot(plan, other)["reserved"], snapshot(plan, other)["balance"]) == \
        (0, 50_000_000)
    assert any("a call of another account: denied" in r.getMessage() for r in caplog.records)
