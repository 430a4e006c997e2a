"""When to extend a call, when to cut it off, and what deadline the PBX itself
must enforce. Pure: the caller passes the time in and carries out the actions
it returns. This is the only code that changes a supervised call's state, for
every PBX.

It also tells a ghost from a call: a session whose channel the PBX's event link has
not reported is a suspect until an event names the channel or the PBX's channel list
shows it; one still absent from that list at its check is a ghost, and goes.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum

from .decisions import CUTOFF_CAUSE
from .engine.core import Grant


class CallState(Enum):
    RINGING = "ringing"  # authorised, not answered
    ANSWERING = "answering"  # the PBX said it was answered; Redis has not replied yet
    TALKING = "talking"  # the grant runs


class TimerKind(Enum):
    EXTEND = "extend"
    CUTOFF = "cutoff"  # the end of a final grant
    EXPIRE = "expire"  # the PBX's own timeout has ended a call that never answered
    VERIFY = "verify"  # a suspect's check against the PBX's channel list is due


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
    session: str
    channel: str
    cause: int = CUTOFF_CAUSE
    why: str = "no_credit"  # or "lost": Redis no longer holds the session


@dataclass(frozen=True, slots=True)
class Release:
    """Free a call that never answered (its reservation and its channel)."""

    session: str


@dataclass(frozen=True, slots=True)
class Verify:
    """Ask the PBX whether a suspect's channel exists (one list for all that are due)."""

    session: str


@dataclass(frozen=True, slots=True)
class Ghost:
    """A suspect whose channel the PBX does not have: free what it holds (it never
    answered: an answer is not believed of a suspect)."""

    session: str
    peer: str  # who set it up


@dataclass(frozen=True, slots=True)
class Answer:
    """Tell Redis a call was answered at `at_ms`: one whose setup said so, now that the
    PBX has reported its channel."""

    session: str
    at_ms: int | None


Action = PushDeadline | Extend | Hangup | Release | Verify | Ghost | Answer
SIGHTED_KEPT = 16384  # channels reported but not tracked (yet): ~3 per call, seconds' worth


@dataclass(slots=True)
class Tracked:
    session: str
    channel_id: str  # Asterisk Uniqueid / FreeSWITCH Unique-ID
    channel: str  # what the PBX's actions name: Asterisk channel name / FreeSWITCH uuid
    state: CallState = CallState.RINGING
    grant: int = 0
    final: bool = False
    deadline: float = 0.0  # local clock, seconds: when the grant runs out
    expires: float = 0.0  # local clock: when a call still ringing is given up
    cut_ms: int | None = None  # when we hung it up ourselves (Redis clock): bill to then
    answered_ms: int | None = None  # when the PBX answered it (Redis clock)
    hold: int = 0  # micro-units Redis holds for it (metrics only)
    suspect: bool = False  # the PBX has not reported its channel yet
    claimed_ms: int | None = None  # an answer its setup claimed, believed once it is no suspect
    peer: str = ""  # the address that set it up (for the ghost's log line)

    @property
    def account(self) -> str:
        return self.session.split("/", 1)[0]


@dataclass
class Supervisor:
    quota: int = 60
    lead: float = 5.0  # extend this long before the slice ends
    grace: int = 2  # the PBX's own deadline lies this far beyond the grant
    retry: float = 0.5  # a failed extend is retried this often until the grant ends
    sessions: dict[str, Tracked] = field(default_factory=dict)
    by_channel_id: dict[str, str] = field(default_factory=dict)
    suspects: collections.Counter = field(default_factory=collections.Counter)  # by account
    # Channels the event link reported that no session is tracked on: a setup for one of
    # them is no suspect (on Asterisk the channel's Newchannel comes before its AGI).
    sighted: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    _timers: list = field(default_factory=list)  # (when, seq, session, grant, kind)
    _seq: int = 0

    def __post_init__(self):
        # Short slices (tests, demos) extend halfway through, never before they start.
        self.lead = min(self.lead, self.quota / 2)

    def track(self, session: str, channel_id: str, channel: str, expires: float,
              verify_at: float | None = None, peer: str = "") -> Tracked:
        """Supervise a session until the PBX reports its end; `expires` is when it is given
        up if it never answers. A new session on a channel replaces the one before it
        (Redis ended that one when it authorised this one). With `verify_at`, a session
        whose channel the PBX has not reported is a suspect, checked then."""
        old = self.find(channel_id)
        if old is not None and old.session != session:
            self.forget(old.session)
        tracked = self.sessions.get(session)
        if tracked is None:
            tracked = Tracked(session, channel_id, channel, peer=peer)
            self.sessions[session] = tracked
            self.by_channel_id[channel_id] = session
            if verify_at is not None and channel_id not in self.sighted:
                tracked.suspect = True
                self.suspects[tracked.account] += 1
                self._schedule(verify_at, tracked, TimerKind.VERIFY)
        tracked.expires = expires
        self._schedule(expires, tracked, TimerKind.EXPIRE)
        return tracked

    def find(self, channel_id: str) -> Tracked | None:
        session = self.by_channel_id.get(channel_id)
        return self.sessions.get(session) if session else None

    def seen(self, channel_id: str) -> str | None:
        """The PBX reported the channel (an event named it): its session is no suspect (the
        session to tell Redis about, if its setup said it was answered); a channel with no
        session yet is remembered for a while."""
        tracked = self.find(channel_id)
        if tracked is not None:
            return self._clear(tracked)
        self.sighted[channel_id] = None
        self.sighted.move_to_end(channel_id)
        if len(self.sighted) > SIGHTED_KEPT:
            self.sighted.popitem(last=False)
        return None

    def judge(self, sessions, alive) -> list[Action]:
        """The suspects among `sessions` against the PBX's channel ids `alive`, a list
        asked for after they were due: present ones are calls, absent ones ghosts."""
        actions: list[Action] = []
        for session in sessions:
            tracked = self.sessions.get(session)
            if tracked is None or not tracked.suspect:
                continue  # ended, or reported meanwhile
            if tracked.channel_id in alive:
                if self._clear(tracked):
                    actions.append(Answer(session, tracked.answered_ms))
            else:
                self.forget(session)
                actions.append(Ghost(session, tracked.peer))
        return actions

    def _clear(self, tracked: Tracked) -> str | None:
        if not tracked.suspect:
            return None
        tracked.suspect = False
        self._uncount(tracked.account)
        return None if tracked.claimed_ms is None else self.answered(tracked.channel_id,
                                                                     tracked.claimed_ms)

    def _uncount(self, account: str) -> None:
        self.suspects[account] -= 1
        if self.suspects[account] <= 0:
            del self.suspects[account]

    def answered(self, channel_id: str, at_ms: int | None = None) -> str | None:
        """The PBX answered the channel (at `at_ms`): the session to tell Redis about, once.
        Of a suspect only its setup can have said so: held until the PBX reports it."""
        tracked = self.find(channel_id)
        if tracked is None or tracked.state is not CallState.RINGING:
            return None
        if tracked.suspect:
            tracked.claimed_ms = at_ms
            return None
        tracked.state = CallState.ANSWERING
        tracked.answered_ms = at_ms
        return tracked.session

    def hung_up(self, channel_id: str) -> Tracked | None:
        """The PBX ended the channel: the session to commit, now forgotten. An ended
        channel confirms no later setup."""
        self.sighted.pop(channel_id, None)
        tracked = self.find(channel_id)
        if tracked is not None:
            self.forget(tracked.session)
        return tracked

    def forget(self, session: str) -> Tracked | None:
        tracked = self.sessions.pop(session, None)
        if tracked and self.by_channel_id.get(tracked.channel_id) == session:
            del self.by_channel_id[tracked.channel_id]
        if tracked and tracked.suspect:
            self._uncount(tracked.account)
        return tracked

    def granted(self, session: str, grant: Grant, now: float,
                resumed: bool = False) -> list[Action]:
        """Carry out an answer's or an extend's reply. `resumed`: after a reconnect or a
        restart, push the PBX's deadline again even if the grant did not change."""
        tracked = self.sessions.get(session)
        if tracked is None or grant.state == "auth":
            return []
        if grant.state == "superseded":
            self.forget(session)  # a later call on the channel is supervised instead
            return []
        if not grant.live:
            # Redis no longer supervises this call (swept, killed, lost): it must not go on.
            self.forget(session)
            return [Hangup(session, tracked.channel, why="lost")]
        changed = resumed or grant.grant != tracked.grant or tracked.state is not CallState.TALKING
        tracked.state = CallState.TALKING
        tracked.grant, tracked.final = grant.grant, grant.final
        tracked.deadline = now + grant.left_ms / 1000
        if grant.final:
            self._schedule(tracked.deadline, tracked, TimerKind.CUTOFF)
        elif changed:
            self._schedule(tracked.deadline - self.lead, tracked, TimerKind.EXTEND)
        else:
            # Asked too early or raced another extend: try again closer to the end.
            self._schedule(max(now + self.retry, tracked.deadline - self.lead / 2), tracked,
                           TimerKind.EXTEND)
        if not changed:
            return []
        left = Decimal(max(grant.left_ms, 0)).scaleb(-3)
        return [PushDeadline(tracked.channel, left + self.grace)]

    def extend_failed(self, session: str, now: float) -> None:
        """Redis or the PBX link is away: retry until the grant runs out; the PBX's own
        deadline holds meanwhile."""
        tracked = self.sessions.get(session)
        if tracked and now + self.retry < tracked.deadline:
            self._schedule(now + self.retry, tracked, TimerKind.EXTEND)

    def due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, session, grant, kind = heapq.heappop(self._timers)
            tracked = self.sessions.get(session)
            if tracked is None:
                continue
            if kind is TimerKind.EXPIRE:
                if tracked.state is CallState.RINGING and when == tracked.expires:
                    self.forget(session)
                    actions.append(Release(session))
            elif kind is TimerKind.VERIFY:
                if tracked.suspect:
                    actions.append(Verify(session))
            elif tracked.grant != grant:
                continue  # superseded by a later grant
            elif kind is TimerKind.CUTOFF:
                # Still tracked: the PBX's hangup event commits the session.
                actions.append(Hangup(session, tracked.channel))
            else:
                actions.append(Extend(session, grant))
        return actions

    def next_due(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _schedule(self, when: float, tracked: Tracked, kind: TimerKind) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, tracked.session, tracked.grant, kind))
