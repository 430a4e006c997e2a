"""The pure supervisor: when to extend, when to cut off, what deadline the PBX gets."""

from decimal import Decimal

from callguard.engine.core import Grant
from callguard.ghosts import PeerBuckets, peer_key
from callguard.supervision import (
    SIGHTED_KEPT,
    Answer,
    CallState,
    Extend,
    Ghost,
    Hangup,
    PushDeadline,
    Release,
    Supervisor,
    Verify,
)


def grant(g, left_ms, final=False, state="ans", now=1_000_000):
    return Grant(state, g, now + left_ms, final, now)


def answered(sup, channel_id="1"):
    assert sup.answered(channel_id) is not None


def test_answer_pushes_the_deadline_and_schedules_the_extend():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1/1", "1", "PJSIP/x-1", 600.0)
    answered(sup)
    assert sup.granted("a/1/1", grant(60, 60_000), now=100.0) == [
        PushDeadline("PJSIP/x-1", Decimal("62.000"))]
    assert sup.due(154.9) == []
    assert sup.due(155.0) == [Extend("a/1/1", 60)]


def test_an_answer_is_reported_once():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0)
    assert sup.answered("1") == "a/1/1"
    assert sup.answered("1") is None  # DialEnd and Newstate both say so
    assert sup.sessions["a/1/1"].state is CallState.ANSWERING


def test_a_new_grant_supersedes_the_old_timer_and_moves_the_deadline():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.granted("a/1/1", grant(60, 60_000), now=100.0)
    assert sup.granted("a/1/1", grant(120, 65_000), now=155.0) == [
        PushDeadline("ch", Decimal("67.000"))]
    assert sup.due(160.0) == []  # the extend of the first slice is gone
    assert sup.due(215.0) == [Extend("a/1/1", 120)]


def test_final_grant_hangs_up_at_its_end_and_keeps_tracking_until_the_hangup_event():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.granted("a/1/1", grant(80, 25_000, final=True), now=155.0)
    assert sup.due(179.9) == []
    assert sup.due(180.0) == [Hangup("a/1/1", "ch", 16)]
    assert sup.find("1") is not None  # the PBX's Hangup event commits it
    assert sup.hung_up("1").session == "a/1/1" and sup.find("1") is None


def test_a_session_redis_no_longer_supervises_is_hung_up():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0)
    assert sup.granted("a/1/1", grant(60, 0, state="unknown"), now=1.0) == [
        Hangup("a/1/1", "ch", 16, why="lost")]
    assert sup.find("1") is None


def test_a_session_replaced_on_its_channel_is_forgotten_without_a_hangup():
    """Another call on the same channel superseded it: that call must not be cut."""
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0)
    assert sup.granted("a/1/1", grant(60, 0, state="superseded"), now=1.0) == []
    assert sup.find("1") is None


def test_a_new_session_on_a_channel_replaces_the_one_before():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.track("a/1/2", "1", "ch", 600.0)
    assert sup.find("1").session == "a/1/2" and "a/1/1" not in sup.sessions


def test_ringing_and_unknown_sessions_need_nothing():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0)
    assert sup.granted("a/1/1", grant(60, 0, state="auth"), now=1.0) == []
    assert sup.granted("nobody/2/1", grant(60, 60_000), now=1.0) == []


def test_a_call_never_answered_is_released_once_the_pbx_gave_up_on_it():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 184.0)
    assert sup.due(183.0) == [] and sup.find("1") is not None
    assert sup.due(184.0) == [Release("a/1/1")] and sup.find("1") is None


def test_a_retried_setup_moves_the_ring_deadline():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 184.0)
    sup.track("a/1/1", "1", "ch", 300.0)  # the dialplan authorised the same call again
    assert sup.due(250.0) == []
    assert sup.due(300.0) == [Release("a/1/1")]


def test_an_answered_call_does_not_expire():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 184.0)
    sup.granted("a/1/1", grant(600, 600_000), now=10.0)
    assert [a for a in sup.due(200.0) if isinstance(a, Release)] == []


def test_failed_extend_is_retried_until_the_grant_ends():
    sup = Supervisor(quota=60, lead=5, grace=2, retry=0.5)
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.granted("a/1/1", grant(60, 60_000), now=100.0)
    assert sup.due(155.0) == [Extend("a/1/1", 60)]
    sup.extend_failed("a/1/1", now=155.0)
    assert sup.due(155.5) == [Extend("a/1/1", 60)]
    sup.extend_failed("a/1/1", now=159.8)  # too late: the PBX's own deadline takes over
    assert sup.due(599.0) == []


def test_a_resumed_call_gets_its_deadline_pushed_again():
    sup = Supervisor(grace=2)
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.granted("a/1/1", grant(60, 30_000), now=100.0)
    assert sup.granted("a/1/1", grant(60, 20_000), now=110.0) == []
    assert sup.granted("a/1/1", grant(60, 20_000), now=110.0, resumed=True) == [
        PushDeadline("ch", Decimal("22.000"))]


def test_short_quotas_extend_halfway_through():
    sup = Supervisor(quota=4, lead=5, grace=1)
    sup.track("a/1/1", "1", "ch", 600.0)
    sup.granted("a/1/1", grant(4, 4_000), now=0.0)
    assert sup.due(1.9) == [] and sup.due(2.0) == [Extend("a/1/1", 4)]


def test_a_setup_the_pbx_has_not_reported_is_a_suspect_until_it_does():
    sup = Supervisor()
    sup.seen("1")  # Newchannel before the AGI
    assert not sup.track("a/1/1", "1", "ch1", 600.0, verify_at=3.0).suspect
    assert sup.track("a/2/1", "2", "ch2", 600.0, verify_at=3.0, peer="127.0.0.1").suspect
    assert sup.track("b/3/1", "3", "ch3", 600.0, verify_at=3.0).suspect
    assert sup.suspects == {"a": 1, "b": 1}
    sup.seen("3")  # its first event after the setup
    assert sup.suspects == {"a": 1} and sup.due(3.0) == [Verify("a/2/1")]
    # The channel list, asked for after it was due: absent, a ghost, freed at once.
    assert sup.judge(["a/2/1"], {"1": None, "3": None}) == [Ghost("a/2/1", "127.0.0.1")]
    assert "a/2/1" not in sup.sessions and sup.suspects == {}
    assert sup.due(600.0) == [Release("a/1/1"), Release("b/3/1")]  # no second release


def test_a_suspect_in_the_channel_list_is_a_call():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0, verify_at=3.0)
    assert sup.judge(["a/1/1"], {"1": None}) == []
    assert not sup.sessions["a/1/1"].suspect and sup.suspects == {}


def test_an_answer_only_the_setup_claims_waits_until_the_pbx_reports_the_channel():
    sup = Supervisor()
    sup.track("a/1/1", "1", "ch", 600.0, verify_at=3.0)
    assert sup.answered("1", 5_000) is None  # FreeSWITCH's Answer-State: the peer's word
    assert sup.sessions["a/1/1"].state is CallState.RINGING
    assert sup.seen("1") == "a/1/1"  # CHANNEL_CREATE: now it counts, from its own time
    assert sup.sessions["a/1/1"].answered_ms == 5_000
    sup.track("a/2/1", "2", "ch2", 600.0, verify_at=3.0)
    sup.answered("2", 6_000)
    assert sup.judge(["a/2/1"], {"2": None}) == [Answer("a/2/1", 6_000)]
    sup.track("a/3/1", "3", "ch3", 600.0, verify_at=3.0)
    sup.answered("3", 7_000)
    assert sup.judge(["a/3/1"], {}) == [Ghost("a/3/1", "")]  # never billed


def test_an_ended_channel_vouches_for_no_later_setup_and_sightings_are_bounded():
    sup = Supervisor()
    sup.seen("1")
    sup.hung_up("1")
    assert sup.track("a/1/1", "1", "ch", 600.0, verify_at=3.0).suspect
    for n in range(SIGHTED_KEPT + 1):
        sup.seen(f"x{n}")
    assert len(sup.sighted) == SIGHTED_KEPT and "x0" not in sup.sighted


def test_peer_buckets_refill_at_their_rate_and_every_loopback_address_is_one_peer():
    buckets = PeerBuckets(rate=2, burst=3)
    assert [buckets.take("loopback", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("192.0.2.1", 0.0)  # another peer, its own bucket
    assert not buckets.take("loopback", 0.4) and buckets.take("loopback", 0.5)
    assert {peer_key(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.2")} == {
        "loopback"}
    assert peer_key("192.0.2.1") == "192.0.2.1"
