"""Call control: everything a PBX adapter shares, written once.

An adapter translates its protocol into calls on `CallControl` (authorize,
answered, hung_up, reconcile after each login) and implements the small `PBX`
port the control drives (hang up, push the dead man's timer, list live
channels, tell an answer time). The control holds the failure policy, the
Redis budget, supervision timers, extends, commits with their retries, the
operator's kill requests, plan reloads, its own sweeps and the node identity.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from time import perf_counter
from typing import Protocol

import redis

from . import nodes, service
from .clock import Clock
from .decisions import CUTOFF_CAUSE, Decision, Reason, denied, unavailable
from .engine import state
from .engine.connect import connect_async, is_cluster
from .engine.pipelined import PipelinedRedis
from .engine.runner import AsyncEngine
from .ghosts import PeerBuckets, peer_key
from .logs import Throttled
from .metrics import ServeMetrics
from .supervision import (
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

log = logging.getLogger(__name__)

# An asyncio Redis Cluster none of whose nodes answers raises a RedisClusterException.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
ENDED_KEPT = 4096  # hangups of untracked channels remembered: far more than setups in flight
LIST_EVERY = 1.0  # seconds: the PBX's channel list is asked at most this often for suspects
# Denials that suspects holding the account's money or channels may have caused.
CROWDED = (Reason.NO_FUNDS, Reason.CHANNEL_LIMIT, Reason.VELOCITY_LIMIT)
CROWDED_FOR = 60.0  # seconds an account so crowded admits no suspect at all


@dataclass(frozen=True, slots=True)
class LiveChannel:
    """A channel the PBX has up now."""

    channel_id: str  # what sessions are keyed by (Uniqueid / Unique-ID)
    channel: str  # what the PBX's commands name
    up: bool  # answered (else still ringing)


class PBX(Protocol):
    """What the control needs from a PBX: the whole port."""

    name: str

    @property
    def supervising(self) -> bool:
        """The event link is up: answers and hangups will be seen."""

    async def hang_up(self, channel: str, cause: int) -> bool: ...

    async def push_deadline(self, channel: str, seconds: Decimal) -> bool: ...

    async def live_channels(self) -> dict[str, LiveChannel]:
        """Every channel the PBX has up, by channel id; raises when it cannot tell."""

    async def answer_time(self, channel: LiveChannel) -> int | None:
        """Epoch ms when an up channel was answered, if the PBX can tell."""


def clean_cause(cause) -> str:
    """A PBX's hangup cause for the books: digits only (it comes off the wire)."""
    text = str(cause)
    return text if text.isascii() and text.isdigit() and len(text) <= 3 else "0"


class CallControl:
    def __init__(self, app: service.App, pbx: PBX, node: str, clock: Clock | None = None):
        self.app, self.pbx, self.node = app, pbx, node
        self.settings = s = app.settings
        self.clock = clock or Clock()
        url, tls = app.redis_url, app.redis_tls
        pipelined = None if is_cluster(url) else PipelinedRedis(url, tls)
        self.engine = AsyncEngine(connect_async(url, tls=tls), app.ops(node), pipelined)
        self.supervisor = Supervisor(quota=s.quota_seconds, grace=s.grace_seconds)
        self.lease = nodes.NodeLease(app.engine, node)
        self.metrics = ServeMetrics(pbx.name.lower())
        self.engine.round_trip = self.metrics.redis_round_trip
        self._read_metrics()
        # What can happen on every call setup is logged at most once a second each.
        self.warn_unavailable = Throttled(log)
        self.warn_blind = Throttled(log, logging.ERROR)
        self.warn_fail_open = Throttled(log, logging.ERROR)
        self.warn_commit = Throttled(log)
        self.warn_plans = Throttled(log, interval=10.0)
        self.log_denied = Throttled(log, logging.INFO)
        self.log_cut = Throttled(log, logging.INFO)
        # Ghosts and the setups their limits deny: a line every 10 s per peer at most.
        self.warn_ghost = Throttled(log, interval=10.0, max_templates=256)
        self.warn_list = Throttled(log, interval=10.0)
        self.warn_unreported = Throttled(log, interval=600.0)
        self.peer_buckets = PeerBuckets(s.unconfirmed_rate_per_peer, s.unconfirmed_burst_per_peer)
        self._admitting: collections.Counter = collections.Counter()  # suspects in authorize
        self._sighting: dict[str, list[asyncio.Future]] = {}  # setups waiting for an event
        self._due_checks: set[str] = set()  # suspects whose check is due
        self._checking: asyncio.Task | None = None
        self._listed_at = float("-inf")
        self._crowded: dict[str, float] = {}  # account -> until when it admits no suspect
        self.failed = asyncio.Event()  # the process must stop (its identity was taken)
        self._offset_ms = 0  # Redis clock minus ours, learned from the scripts' replies
        self._timer: asyncio.TimerHandle | None = None  # the supervisor's next due time
        self._timer_due = 0.0
        self._stopped = False  # stop() was called: no more timers
        self._tasks: set[asyncio.Task] = set()  # for ever: timers, pub/sub, housekeeping
        self._work: set[asyncio.Task] = set()  # one call step each: answer, extend, commit
        self._committing: set[str] = set()  # sessions whose commit is being retried
        # Hangups of channels not tracked (yet): the last few, by channel id.
        self._ended: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.identity = False  # the node lease is held: this process may own sessions
        self._plans_stamp = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Claim the node identity (NodeClash if a live process holds it), warm Redis.
        With Redis away, calls get the failure policy until the identity is held."""
        try:
            await asyncio.to_thread(self._claim)
            await asyncio.wait_for(self.engine.warm(), 5)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            log.error("Redis not reachable at start (%s); calls get the failure policy", exc)
        for loop_forever in (self._listen(), self._housekeeping()):
            self.spawn(loop_forever, self._tasks)
        # What start-up allocated lives for ever: keep it out of full collections, which
        # otherwise stall every supervised call (63-80 ms with 20,000 calls up).
        gc.collect()
        gc.freeze()

    def _read_metrics(self) -> None:
        """What a scrape reads from this process's own state (from the HTTP thread: each
        reading takes one snapshot that the loop cannot change half way)."""
        pbx = (self.metrics.pbx,)
        readings = self.metrics.readings
        readings.gauge("callguard_live_calls", "Calls this process supervises now",
                       lambda: [(pbx, len(self.supervisor.sessions))], ("pbx",))
        readings.gauge("callguard_reserved_money",
                       "Money Redis holds for this process's live calls, in currency units "
                       "(summed over accounts whatever their currency)",
                       lambda: [(pbx, sum(t.hold for t in list(self.supervisor.sessions.values()))
                                 / 1_000_000)], ("pbx",))
        readings.gauge("callguard_unconfirmed_sessions",
                       "Live sessions whose channel the PBX has not reported yet (ghost "
                       "suspects)",
                       lambda: [(pbx, sum(self.supervisor.suspects.copy().values()))], ("pbx",))
        readings.gauge("callguard_pbx_link_up", "1 while the PBX event link is logged in",
                       lambda: [(pbx, int(self.pbx.supervising))], ("pbx",))
        readings.counter("callguard_pbx_link_reconnects", "Logins to the PBX after the first",
                         lambda: [(pbx, max(0, getattr(self.pbx.link, "logins", 0) - 1))],
                         ("pbx",))

    def _claim(self) -> None:
        state.check_layout(self.app.redis, self.app.keys)
        self.lease.acquire()
        self._plans_stamp = self.app.redis.get(self.app.keys.plans_version)
        self.identity = True

    async def stop(self) -> None:
        """Finish the call steps under way (commits), then stop; the sessions stay in
        Redis under this node, for the next start to reconcile."""
        if self._work:
            await asyncio.wait(self._work, timeout=5)
        self._stopped = True  # an answer or extend reply heard meanwhile arms no timer
        if self._timer:
            self._timer.cancel()
            self._timer = None
        tasks = self._tasks | self._work
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py's pub/sub can hold on to a cancellation for a moment: do not hang on it.
            await asyncio.wait(tasks, timeout=2)
        if self.engine.pipelined:
            self.engine.pipelined.close()
        try:
            await asyncio.to_thread(self.lease.release)
        except REDIS_ERRORS:
            pass  # it runs out by itself

    @property
    def steps_under_way(self) -> set[asyncio.Task]:
        return self._work

    def spawn(self, coro, group: set | None = None) -> asyncio.Task:
        group = self._work if group is None else group
        task = asyncio.get_running_loop().create_task(coro)
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    def redis_ms(self) -> int:
        """Now on the scripts' clock (Redis TIME), estimated locally."""
        simulated = self.clock.redis_now()
        return simulated if simulated is not None else int(time.time() * 1000) + self._offset_ms

    # -- authorize --------------------------------------------------------------------
    async def authorize(self, account: str, destination: str, direction: str,
                        channel_id: str, channel: str, peer: str = "") -> Decision:
        """The answer to one call setup from the address `peer`, within the budget; never
        raises."""
        started = perf_counter()
        decision = await self._decide(account, destination, direction, channel_id, channel,
                                      peer)
        self.metrics.setup(decision.allow, decision.reason, perf_counter() - started)
        if not decision.allow:
            self.log_denied("denied %s call of %s to %s: %s", direction, account, destination,
                            decision.reason.value)
        return decision

    async def _decide(self, account, destination, direction, channel_id, channel,
                      peer) -> Decision:
        s = self.settings
        if not self.identity:
            return self._unavailable()  # Redis was away since the start
        supervised = self.pbx.supervising
        if not supervised and s.failure_policy == "fail_closed":
            # Nobody would see this call answer or end: no unsupervised ALLOW.
            self.warn_blind("no event link to %s: calls are denied (UNAVAILABLE, fail_closed) "
                            "until it is back", self.pbx.name)
            return denied(Reason.UNAVAILABLE)
        call = self.engine.ops.authorize(account, destination, direction, channel_id,
                                         self.clock.redis_now(),
                                         blind=not supervised)
        if isinstance(call, Decision):
            return call
        held = self.supervisor.find(channel_id)
        if held is not None and not held.suspect and held.account != account:
            # The PBX vouched for this channel as another account's call: a setup naming it
            # for this one (a local user who guessed a live Asterisk uniqueid) would take
            # the call out of supervision, unbilled, and bill its answer to this account.
            self.warn_ghost("%s: a setup from %s for account %s names channel %s, a call of "
                            "another account: denied (BAD_REQUEST)", self.pbx.name, peer,
                            account, channel_id, key=peer_key(peer))
            return denied(Reason.BAD_REQUEST)
        budget, suspect = s.agi_budget_ms / 1000, False
        ends = perf_counter() + budget
        if s.ghost_seconds and not (supervised and channel_id in self.supervisor.sighted):
            # The PBX has not vouched for this channel (it cannot while out of sight).
            if not await self._admit(account, channel_id, peer, supervised, budget / 2):
                return denied(Reason.RATE_LIMIT)
            suspect = supervised and channel_id not in self.supervisor.sighted
        if suspect:
            self._admitting[account] += 1  # counted against the account until tracked
        try:
            async with asyncio.timeout(ends - perf_counter()):
                decision = await self.engine.run(call)
                if not decision.allow and decision.reason in CROWDED and not suspect and \
                        supervised and self.supervisor.suspects[account] and \
                        await self._free_ghosts(account, (ends - perf_counter()) / 2):
                    decision = await self.engine.run(call)  # the ghosts' share is back
        except (TimeoutError, *REDIS_ERRORS) as exc:
            self.warn_unavailable("authorize %s: no answer from Redis within %d ms (%s)",
                                  account, s.agi_budget_ms, str(exc) or type(exc).__name__)
            # The script may still run: release what it would reserve.
            self.spawn(self._release_later(account, channel_id))
            return self._unavailable()
        except Exception:
            log.exception("authorize failed")
            return self._unavailable()
        finally:
            if suspect:
                self._admitting[account] -= 1
                if self._admitting[account] <= 0:
                    del self._admitting[account]
        if not decision.allow:
            return decision
        if supervised:
            deadline = s.ring_seconds + decision.grant + s.grace_seconds
        else:
            # fail_open with the PBX out of sight: a short grant, final, and the PBX's own
            # timeout counts the ringing too. Still up at the reconnect: charged from its
            # real answer time, learned from the PBX; over by then: as answered at setup,
            # up to this grant (commit.lua).
            deadline = decision.grant + s.grace_seconds
            decision = dataclasses.replace(decision, reason=Reason.UNAVAILABLE, final=True)
            self.metrics.fail_open.inc()
            self.warn_fail_open("fail_open: %s is out of sight; allowing calls for %d s at "
                                "most, supervised again once it is back", self.pbx.name,
                                deadline)
        now = self.clock.monotonic()
        # Still unreported by the PBX: checked against its channel list soon (a PBX out of
        # sight cannot be asked; the reconcile after its next login checks every session).
        verify_at = now + s.ghost_seconds if s.ghost_seconds and supervised else None
        self.supervisor.track(decision.session, channel_id, channel,
                              now + deadline + s.grace_seconds, verify_at, peer).hold = \
            decision.hold
        self._arm_timer()  # its expiry may come before any other
        ended = self._ended.pop(channel_id, None)
        if ended:
            self.hung_up(channel_id, *ended)  # while Redis decided
        return dataclasses.replace(decision, deadline=deadline)

    def _unavailable(self) -> Decision:
        s = self.settings
        decision = unavailable(s.failure_policy, s.fail_open_grant, s.grace_seconds)
        if decision.allow:
            self.metrics.fail_open.inc()
            self.warn_fail_open("fail_open: allowing a call for %d s without credit control",
                                decision.grant)
        return decision

    async def _admit(self, account: str, channel_id: str, peer: str, supervised: bool,
                     wait: float) -> bool:
        """Whether a setup for a channel the PBX has not reported may go on to Redis
        (ghosts.py): within its peer's rate and its account's suspects at once; else once
        an event names its channel within `wait` seconds."""
        s = self.settings
        key = peer_key(peer)
        now = time.monotonic()
        held = self.supervisor.suspects[account] + self._admitting[account]
        room = 0 if self._crowded.get(account, 0.0) > now else s.unconfirmed_per_account
        if (not supervised or held < room) and self.peer_buckets.take(key, now):
            return True
        if supervised:
            waiter = asyncio.get_running_loop().create_future()
            waiters = self._sighting.setdefault(channel_id, [])
            waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, wait)
                return True
            except TimeoutError:
                pass
            finally:
                waiters.remove(waiter)
                if not waiters and self._sighting.get(channel_id) is waiters:
                    del self._sighting[channel_id]
        self.warn_ghost("%s: setups from %s for channels %s has not reported are over the "
                        "limits (%d at once for account %s, %d a second from one address): "
                        "denied (RATE_LIMIT)", self.pbx.name, peer, self.pbx.name,
                        s.unconfirmed_per_account, account, s.unconfirmed_rate_per_peer,
                        key=key)
        return False

    async def _free_ghosts(self, account: str, timeout: float) -> bool:
        """A call the PBX reported was denied while suspects hold some of its account's
        money or channels: from now on (for CROWDED_FOR) the account admits no suspect,
        and those it holds are checked now, if the PBX lists its channels within `timeout`
        (and none was asked for within LIST_EVERY); True once ghosts gave theirs back."""
        now = time.monotonic()
        if len(self._crowded) >= 4096:
            self._crowded = {a: t for a, t in self._crowded.items() if t > now}
        self._crowded[account] = now + CROWDED_FOR
        if now - self._listed_at < LIST_EVERY:
            return False
        self._listed_at = time.monotonic()
        suspects = [t.session for t in self.supervisor.sessions.values()
                    if t.suspect and t.account == account]
        try:
            alive = await asyncio.wait_for(self.pbx.live_channels(), timeout)
        except Exception:  # noqa: BLE001 - too slow, or the link's own errors: deny as is
            return False
        actions = self.supervisor.judge(suspects, alive)
        freed = [self._ghost(a) for a in actions if isinstance(a, Ghost)]
        await self.execute([a for a in actions if not isinstance(a, Ghost)])
        if freed:
            await asyncio.wait(freed, timeout=timeout)  # their money and channels are back
        return bool(freed)

    async def _release_later(self, account: str, channel_id: str) -> None:
        try:
            await asyncio.sleep(1)
            await self.engine.release_channel(account, channel_id, self.clock.redis_now())
        except (*REDIS_ERRORS, ValueError):
            log.warning("could not release %s/%s; the sweeper will", account, channel_id)

    # -- what the PBX reports ------------------------------------------------------------
    def seen(self, channel_id: str) -> None:
        """The PBX's event link named the channel (any event): a call, not a ghost."""
        if not channel_id or not self.settings.ghost_seconds:
            return
        session = self.supervisor.seen(channel_id)
        if session:
            tracked = self.supervisor.sessions[session]
            self.spawn(self._answer(session, tracked.answered_ms))
        for waiter in self._sighting.pop(channel_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def answered(self, channel_id: str, at_ms: int | None = None) -> None:
        session = self.supervisor.answered(channel_id, at_ms or self.redis_ms())
        if session:
            self.spawn(self._answer(session, at_ms))

    def hung_up(self, channel_id: str, cause, at_ms: int | None = None,
                answered_ms: int | None = None, talk_ms: int | None = None) -> None:
        """The PBX ended the channel at `at_ms`. A PBX that keeps its own record of the
        call also gives its answer time and billed duration (FreeSWITCH's billmsec): the
        commit then bills exactly that duration from the answer Redis holds."""
        tracked = self.supervisor.hung_up(channel_id)
        if tracked:
            # The answer's own time goes along: Redis may not have it yet (Redis away).
            self._commit_soon(tracked.session, clean_cause(cause), "reported",
                              tracked.cut_ms or at_ms, tracked.answered_ms or answered_ms,
                              talk_ms)
        else:
            # Perhaps a call whose authorize is still deciding (the caller gave up): it
            # is ended as soon as it is tracked.
            self._ended[channel_id] = (cause, at_ms, answered_ms, talk_ms)
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)

    async def _answer(self, session: str, answered_ms: int | None = None,
                      resumed: bool = False) -> None:
        """Tell Redis the call was answered, until it takes it (or the call ends: then its
        commit carries the answer time); a retry bills from when the answer was seen."""
        delay = 0.2
        while True:
            try:
                grant = await self.engine.answer(session, self.clock.redis_now(), answered_ms)
                break
            except REDIS_ERRORS as exc:
                self.warn_commit("answer %s: %s; retrying until Redis takes it", session, exc)
                tracked = self.supervisor.sessions.get(session)
                if tracked is None:
                    return
                answered_ms = answered_ms or tracked.answered_ms
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        await self._granted(session, grant, resumed)

    async def _extend(self, action: Extend) -> None:
        if not self.pbx.supervising:
            # A grant the PBX cannot be told about is money held for nothing: wait.
            self.supervisor.extend_failed(action.session, self.clock.monotonic())
            self.metrics.extend_failed.inc()
            self._arm_timer()
            return
        try:
            grant = await self.engine.extend(action.session, action.seen_grant,
                                             self.clock.redis_now())
        except REDIS_ERRORS as exc:
            log.warning("extend %s: %s; retrying", action.session, exc)
            self.supervisor.extend_failed(action.session, self.clock.monotonic())
            self.metrics.extend_failed.inc()
            self._arm_timer()
            return
        self.metrics.extend_ok.inc()
        await self._granted(action.session, grant)

    async def _granted(self, session: str, grant, resumed: bool = False) -> None:
        if not self.clock.simulated:
            self._offset_ms = grant.now_ms - int(time.time() * 1000)
        tracked = self.supervisor.sessions.get(session)
        if tracked is not None and grant.hold is not None:
            tracked.hold = grant.hold
        await self.execute(self.supervisor.granted(session, grant, self.clock.monotonic(),
                                                   resumed))

    def _commit_soon(self, session: str, cause: str, mode: str, end_ms: int | None,
                     answered_ms: int | None = None, talk_ms: int | None = None
                     ) -> asyncio.Task:
        self._committing.add(session)
        task = self.spawn(self._commit(session, cause, mode, end_ms, self.redis_ms(),
                                       answered_ms, talk_ms))
        task.add_done_callback(lambda _: self._committing.discard(session))
        return task

    async def _commit(self, session: str, cause: str, mode: str, end_ms: int | None,
                      seen_ms: int, answered_ms: int | None = None,
                      talk_ms: int | None = None) -> None:
        """Commit until Redis takes it (commits are idempotent): a retry bills to when the
        end was seen, not to when Redis came back."""
        delay = 0.2
        while True:
            try:
                await self.engine.commit(session, cause, self.clock.redis_now(), mode, end_ms,
                                         answered_ms, talk_ms)
                return
            except REDIS_ERRORS as exc:
                self.warn_commit("commit %s: %s; retrying until Redis takes it", session, exc)
                end_ms = end_ms or seen_ms
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def execute(self, actions) -> None:
        """Carry out the supervisor's actions; those that talk to the PBX in turn."""
        for action in self.set_off(actions):
            if isinstance(action, PushDeadline):
                pushed = await self.pbx.push_deadline(action.channel, action.seconds)
                (self.metrics.push_ok if pushed else self.metrics.push_failed).inc()
            else:
                self.log_cut("hanging up %s (cause %d, %s)", action.channel, action.cause,
                             action.why.replace("_", " "))
                self.metrics.cutoffs[action.why].inc()
                await self._cut(action.session, action.channel, action.cause)

    def set_off(self, actions) -> list[PushDeadline | Hangup]:
        """Set off the actions that need no waiting here (steps of their own, timers); the
        PBX's (pushes, hangups) are left for the caller to wait on."""
        waits: list[PushDeadline | Hangup] = []
        for action in actions:
            if isinstance(action, Extend):
                self.spawn(self._extend(action))
            elif isinstance(action, PushDeadline | Hangup):
                waits.append(action)
            elif isinstance(action, Release):
                self._commit_soon(action.session, "released", "release", None)
            elif isinstance(action, Verify):
                self._due_checks.add(action.session)
                if self._checking is None or self._checking.done():
                    self._checking = self.spawn(self._check_suspects(), self._tasks)
            elif isinstance(action, Ghost):
                self._ghost(action)
            elif isinstance(action, Answer):
                self.spawn(self._answer(action.session, action.at_ms))
        self._arm_timer()
        return waits

    async def _check_suspects(self) -> None:
        """One channel list for every suspect that is due, at most one every LIST_EVERY
        seconds; present: a call; absent: a ghost."""
        while self._due_checks:
            await asyncio.sleep(max(0.0, self._listed_at + LIST_EVERY - time.monotonic()))
            if not self.pbx.supervising:
                self._due_checks.clear()  # the reconcile after the next login checks them
                return
            due, self._due_checks = self._due_checks, set()
            self._listed_at = time.monotonic()
            try:
                alive = await self.pbx.live_channels()
            except Exception as exc:  # noqa: BLE001 - the link's own errors: it reconnects
                self.warn_list("cannot list %s's channels to check %d unreported session(s) "
                               "(%s); trying again", self.pbx.name, len(due),
                               str(exc) or type(exc).__name__)
                self._due_checks |= due
                continue
            sessions = self.supervisor.sessions
            unreported = [sessions[s].channel_id for s in due if s in sessions
                          and sessions[s].suspect and sessions[s].channel_id in alive]
            if unreported:
                # A call, but no event named it: are the PBX's channel events filtered out?
                self.warn_unreported(
                    "%s has channel %s in its list but sent no event naming it within %d s: "
                    "let its channel events through (Asterisk: Newchannel in manager.conf's "
                    "eventfilter), else calls wait for this check", self.pbx.name,
                    unreported[0], self.settings.ghost_seconds)
            await self.execute(self.supervisor.judge(due, alive))

    def _ghost(self, ghost: Ghost) -> asyncio.Task:
        """Free what a ghost holds, the way a call that never answered is freed."""
        self.metrics.ghosts.inc()
        account, channel_id, _ = ghost.session.split("/")
        self.warn_ghost("ghost session from %s for account %s: %s never reported channel %s "
                        "(no event, not in its channel list); released", ghost.peer, account,
                        self.pbx.name, channel_id, key=peer_key(ghost.peer))
        return self._commit_soon(ghost.session, "ghost", "release", None)

    async def _cut(self, session: str, channel: str, cause: int = CUTOFF_CAUSE) -> None:
        cut_ms = self.redis_ms()
        if await self.pbx.hang_up(channel, cause):
            tracked = self.supervisor.sessions.get(session)
            if tracked is not None:
                tracked.cut_ms = cut_ms  # it ended here, however late its event comes

    def _arm_timer(self) -> None:
        """One loop timer at the supervisor's next due time, moved only when that comes
        earlier: a task waking on every change cost more than the rest of a call step."""
        due = self.supervisor.next_due()
        if due is None or self._stopped or (self._timer is not None and self._timer_due <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        delay = self.clock.real(due - self.clock.monotonic())
        # +1 ms: uvloop counts a timer in whole ms from the iteration's cached time, so one
        # set to the exact due time fires before it and re-arms itself until it is due
        # (6 wake-ups per due time measured, 18 a call).
        delay = delay + 0.001 if delay > 0 else 0.0
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        waits = self.set_off(self.supervisor.due(self.clock.monotonic()))  # arms the next one
        if waits:
            self.spawn(self.execute(waits), self._tasks)

    # -- reconnect and restart ----------------------------------------------------------------
    async def reconcile(self) -> None:
        """After each login to the PBX: resume this node's calls that are still up (charged
        from their real answer time), commit those that are gone. While Redis is away it
        waits, the link staying up (its events are what the retried answers and commits
        need); it raises when the PBX cannot tell: the adapter then drops the link."""
        mine = await self._my_sessions()
        if mine is None:
            return  # the link went down meanwhile: the next login reconciles
        for tracked in self.supervisor.sessions.values():
            mine.setdefault(tracked.session, {"ch": tracked.channel_id})
        # Suspects set up before the list is asked for: in it, calls; absent, ghosts.
        suspects = [t.session for t in self.supervisor.sessions.values() if t.suspect]
        alive = await self.pbx.live_channels()
        await self.execute(self.supervisor.judge(suspects, alive))
        resumed = gone = 0
        for session, fields in mine.items():
            if session in self._committing:
                continue
            live = alive.get(fields["ch"])
            if live is None:
                tracked = self.supervisor.forget(session)
                self._commit_soon(session, "gone", "gone", None,
                                  tracked.answered_ms if tracked else None)
                gone += 1
                continue
            tracked = self.supervisor.sessions.get(session) or self._adopt(session, live, fields)
            if fields.get("st") == "ans" or tracked.state is not CallState.RINGING:
                # Talking, or answered while Redis could not be told: resume from that.
                self.spawn(self._answer(session, tracked.answered_ms, resumed=True))
            elif live.up and tracked.state is CallState.RINGING:
                # Answered while nobody watched: bill from when the PBX says it was.
                answered_ms = await self.pbx.answer_time(live)
                if answered_ms is None:
                    log.warning("%s cannot tell when %s was answered: billed from now",
                                self.pbx.name, session)
                tracked.state = CallState.ANSWERING
                tracked.answered_ms = answered_ms or self.redis_ms()
                self.spawn(self._answer(session, answered_ms, resumed=True))
            resumed += 1
        log.info("reconciled with %s: %d session(s) resumed, %d closed", self.pbx.name,
                 resumed, gone)

    async def _my_sessions(self) -> dict[str, dict] | None:
        """This node's sessions in Redis, once Redis answers and the identity is held."""
        while self.pbx.supervising:
            try:
                if self.identity:
                    # Sessions first, channels second: a call authorised after this
                    # snapshot is not judged against a channel list taken before it existed.
                    return {s["session"]: s for s in await asyncio.to_thread(
                        state.live_sessions, self.app.redis, self.app.keys)
                        if s.get("node") == self.node}
            except REDIS_ERRORS as exc:
                self.warn_commit("reconcile with %s waits for Redis: %s", self.pbx.name, exc)
            await asyncio.sleep(1)
        return None

    def _adopt(self, session: str, live: LiveChannel, fields: dict):
        """Track a session of ours that this process did not authorise (a restart)."""
        s = self.settings
        ends_ms = int(fields.get("setup", 0)) + 1000 * (
            s.ring_seconds + int(fields.get("g", 0)) + 2 * s.grace_seconds)
        expires = self.clock.monotonic() + max(0, ends_ms - self.redis_ms()) / 1000
        tracked = self.supervisor.track(session, live.channel_id, live.channel, expires)
        tracked.hold = int(fields.get("hold", 0))  # what the metrics add up
        return tracked

    # -- operators, plans, housekeeping -------------------------------------------------------
    async def _listen(self) -> None:
        """Kill requests (`calls kill`, `account block --hangup`) and plan changes."""
        keys = self.app.keys
        while True:
            pubsub = self.engine.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.kill_channel, keys.plans_channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"] == keys.kill_channel:
                        await self._kill(message["data"].split())
                    else:
                        await self._reload_plans()
            except REDIS_ERRORS as exc:
                log.warning("Redis pub/sub: %s; resubscribing", exc)
                await asyncio.sleep(1)
            finally:
                await asyncio.shield(pubsub.aclose())

    async def _kill(self, sessions: list[str]) -> None:
        for session in sessions:
            tracked = self.supervisor.sessions.get(session)
            if tracked:
                log.warning("operator ends %s", session)
                self.metrics.cutoffs["operator"].inc()
                await self._cut(session, tracked.channel)

    async def _reload_plans(self) -> None:
        """Load the plans from the books; when the books are away, keep the ones held and
        let housekeeping try again (the stamp moves only once the load succeeded)."""
        try:
            stamp = await asyncio.to_thread(self.app.redis.get, self.app.keys.plans_version)
            plans = await asyncio.to_thread(self.app.books.load_plans)
        except Exception as exc:  # noqa: BLE001 - SQL or Redis away: the old plans stand
            self.warn_plans("rate plans changed but cannot be loaded (%s); the old ones stay "
                            "in force, retrying", str(exc).splitlines()[0] if str(exc) else exc)
            return
        self.engine.ops.plans.replace(plans)
        self._plans_stamp = stamp
        log.info("rate plans reloaded")

    async def _housekeeping(self) -> None:
        """Every few seconds: keep the node identity, catch a missed plan message, close
        this node's sessions whose PBX went silent past their deadline."""
        while True:
            try:
                if not self.identity:
                    await asyncio.to_thread(self._claim)
                await asyncio.to_thread(self.lease.renew)
                stamp = await asyncio.to_thread(self.app.redis.get, self.app.keys.plans_version)
                if stamp != self._plans_stamp:
                    await self._reload_plans()
                closed = await asyncio.to_thread(service.sweep, self.app, self.clock.redis_now(),
                                                 self.node, frozenset(self._committing))
                for session in closed:
                    self.supervisor.forget(session)
            except nodes.NodeClash as exc:
                log.critical("%s; this process stops taking calls", exc)
                self.failed.set()
                return
            except REDIS_ERRORS as exc:
                log.warning("housekeeping: %s", exc)
            await asyncio.sleep(nodes.RENEW_EVERY)
