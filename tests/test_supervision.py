"""The pure supervisor: when to extend, when to cut off, what deadline the PBX gets."""

from decimal import Decimal

from callguard.engine.core import Grant
from callguard.supervision import Extend, Hangup, PushDeadline, Supervisor


def grant(g, left_ms, final=False, state="ans", now=1_000_000):
    return Grant(state, g, now + left_ms, final, now)


def test_answer_pushes_the_deadline_and_schedules_the_extend():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1", "1", "PJSIP/x-1", 0.0)
    assert sup.granted("a/1", grant(60, 60_000), now=100.0) == [
        PushDeadline("PJSIP/x-1", Decimal("62.000"))]
    assert sup.due(154.9) == []
    assert sup.due(155.0) == [Extend("a/1", 60)]


def test_a_new_grant_supersedes_the_old_timer_and_moves_the_deadline():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1", "1", "ch", 0.0)
    sup.granted("a/1", grant(60, 60_000), now=100.0)
    assert sup.granted("a/1", grant(120, 65_000), now=155.0) == [
        PushDeadline("ch", Decimal("67.000"))]
    assert sup.due(160.0) == []  # the extend of the first slice is gone
    assert sup.due(215.0) == [Extend("a/1", 120)]


def test_final_grant_hangs_up_at_its_end_and_keeps_tracking_until_the_hangup_event():
    sup = Supervisor(quota=60, lead=5, grace=2)
    sup.track("a/1", "1", "ch", 0.0)
    sup.granted("a/1", grant(80, 25_000, final=True), now=155.0)
    assert sup.due(179.9) == []
    assert sup.due(180.0) == [Hangup("ch", 16)]
    assert sup.find("1") is not None  # the PBX's Hangup event commits it


def test_a_session_redis_no_longer_supervises_is_hung_up():
    sup = Supervisor()
    sup.track("a/1", "1", "ch", 0.0)
    assert sup.granted("a/1", grant(60, 0, state="done"), now=1.0) == [Hangup("ch", 16)]
    assert sup.find("1") is None


def test_ringing_and_unknown_sessions_need_nothing():
    sup = Supervisor()
    sup.track("a/1", "1", "ch", 0.0)
    assert sup.granted("a/1", grant(60, 0, state="auth"), now=1.0) == []
    assert sup.granted("nobody/2", grant(60, 60_000), now=1.0) == []


def test_a_call_never_answered_is_forgotten_after_the_ring_timeout():
    sup = Supervisor(ring_timeout=600)
    sup.track("a/1", "1", "ch", 0.0)
    assert sup.due(599.0) == [] and sup.find("1") is not None
    assert sup.due(600.0) == [] and sup.find("1") is None


def test_failed_extend_is_retried_until_the_grant_ends():
    sup = Supervisor(quota=60, lead=5, grace=2, retry=0.5)
    sup.track("a/1", "1", "ch", 0.0)
    sup.granted("a/1", grant(60, 60_000), now=100.0)
    assert sup.due(155.0) == [Extend("a/1", 60)]
    sup.extend_failed("a/1", now=155.0)
    assert sup.due(155.5) == [Extend("a/1", 60)]
    sup.extend_failed("a/1", now=159.8)  # too late: the PBX's own deadline takes over
    assert sup.due(599.0) == []


def test_short_quotas_extend_halfway_through():
    sup = Supervisor(quota=4, lead=5, grace=1)
    sup.track("a/1", "1", "ch", 0.0)
    sup.granted("a/1", grant(4, 4_000), now=0.0)
    assert sup.due(1.9) == [] and sup.due(2.0) == [Extend("a/1", 4)]
