"""When to extend a call, when to cut it off, and what deadline the PBX itself
must enforce. Pure: the caller passes the time in and carries out the actions,
so Asterisk (asyncio) and FreeSWITCH (gevent) share every rule here.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from decimal import Decimal

from .decisions import CUTOFF_CAUSE
from .engine.core import Grant


@dataclass(frozen=True, slots=True)
class PushDeadline:
    """Tell the PBX to end the channel by itself in `seconds` (the dead man's switch)."""

    channel: str
    seconds: Decimal  # to the millisecond: Asterisk parses fractions


@dataclass(frozen=True, slots=True)
class Extend:
    session: str
    seen_grant: int


@dataclass(frozen=True, slots=True)
class Hangup:
    channel: str
    cause: int = CUTOFF_CAUSE


Action = PushDeadline | Extend | Hangup
RING_ALLOWANCE = 120  # seconds a call may ring before its first grant starts


@dataclass(slots=True)
class Tracked:
    session: str
    channel_id: str  # Asterisk Uniqueid / FreeSWITCH Unique-ID
    channel: str  # what the PBX's actions name: Asterisk channel name / FreeSWITCH uuid
    grant: int = 0
    answered: bool = False
    final: bool = False
    deadline: float = 0.0  # local clock, seconds: when the grant runs out


@dataclass
class Supervisor:
    quota: int = 60
    lead: float = 5.0  # extend this long before the slice ends
    grace: int = 2  # the PBX's own deadline lies this far beyond the grant
    retry: float = 0.5  # a failed extend is retried this often until the grant ends
    ring_timeout: float = 600.0  # a call not answered by then is forgotten (the sweeper frees it)
    sessions: dict[str, Tracked] = field(default_factory=dict)
    by_channel_id: dict[str, str] = field(default_factory=dict)
    _timers: list = field(default_factory=list)  # (when, seq, session, grant, kind)
    _seq: int = 0

    def __post_init__(self):
        # Short slices (tests, demos) extend halfway through, never before they start.
        self.lead = min(self.lead, self.quota / 2)

    def setup_deadline(self, grant: int) -> int:
        """Seconds the PBX may keep a just-authorised call if it never hears from us
        again: ringing, then the first grant, then the grace."""
        return RING_ALLOWANCE + grant + self.grace

    def track(self, session: str, channel_id: str, channel: str, now: float) -> Tracked:
        tracked = Tracked(session, channel_id, channel)
        self.sessions[session] = tracked
        self.by_channel_id[channel_id] = session
        # A lost Hangup event must not keep a never-answered call in memory for ever.
        self._schedule(now + self.ring_timeout, tracked, "expire")
        return tracked

    def find(self, channel_id: str) -> Tracked | None:
        session = self.by_channel_id.get(channel_id)
        return self.sessions.get(session) if session else None

    def forget(self, session: str) -> Tracked | None:
        tracked = self.sessions.pop(session, None)
        if tracked:
            self.by_channel_id.pop(tracked.channel_id, None)
        return tracked

    def granted(self, session: str, grant: Grant, now: float) -> list[Action]:
        """Carry out an answer's or an extend's reply."""
        tracked = self.sessions.get(session)
        if tracked is None:
            return []
        if grant.state == "auth":
            return []  # still ringing: the clock has not started
        if not grant.live:
            # Redis no longer supervises this call (swept, killed, lost): it must not go on.
            self.forget(session)
            return [Hangup(tracked.channel)]
        changed = grant.grant != tracked.grant or not tracked.answered
        tracked.answered = True
        tracked.grant, tracked.final = grant.grant, grant.final
        tracked.deadline = now + grant.left_ms / 1000
        if grant.final:
            self._schedule(tracked.deadline, tracked, "hangup")
        elif changed:
            self._schedule(tracked.deadline - self.lead, tracked, "extend")
        else:
            # Asked too early or raced another extend: try again closer to the end.
            self._schedule(max(now + self.retry, tracked.deadline - self.lead / 2), tracked,
                           "extend")
        if not changed:
            return []
        left = Decimal(max(grant.left_ms, 0)).scaleb(-3)
        return [PushDeadline(tracked.channel, left + self.grace)]

    def extend_failed(self, session: str, now: float) -> None:
        """Redis did not answer: retry until the grant runs out; the PBX's deadline holds."""
        tracked = self.sessions.get(session)
        if tracked and now + self.retry < tracked.deadline:
            self._schedule(now + self.retry, tracked, "extend")

    def due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, session, grant, kind = heapq.heappop(self._timers)
            tracked = self.sessions.get(session)
            if tracked is None or tracked.grant != grant:
                continue  # superseded by a later grant
            if kind == "hangup":
                # Still tracked: the PBX's hangup event commits the session.
                actions.append(Hangup(tracked.channel))
            elif kind == "expire":
                if not tracked.answered:
                    self.forget(session)
            else:
                actions.append(Extend(session, grant))
        return actions

    def next_due(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _schedule(self, when: float, tracked: Tracked, kind: str) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, tracked.session, tracked.grant, kind))
