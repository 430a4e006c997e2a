"""`callguard serve asterisk`: FastAGI for authorize, AMI for answer, hangup and
cut-off. It translates; the engine decides and the supervisor schedules.

The FastAGI listener is our own asyncio.Protocol rather than panoramisk's
`fast_agi.Application`: that handler loops on `reader.read()` until it sees a
blank line, so a peer that closes early spins it for ever, and it buffers
headers without bound. Here a bounded parser reads the headers and every
request is answered within `agi_budget_ms`, whatever Redis does.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import ipaddress
import logging
import signal

import redis

from .. import service
from ..clock import Clock
from ..decisions import Decision, Reason, denied, unavailable
from ..engine import state
from ..engine.connect import connect_async, is_cluster
from ..engine.pipelined import PipelinedRedis
from ..engine.runner import AsyncEngine
from ..logs import Throttled
from ..protocol import agi, ami
from ..protocol.errors import ProtocolError
from ..supervision import Extend, Hangup, PushDeadline, Supervisor
from .ami_client import AMIClient, AMIError

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 5.0  # Asterisk sends its headers at once; a silent peer is dropped
DRAIN_TIMEOUT = 2.0  # after our reply, how long we wait for Asterisk's replies and EOF


class AsteriskAdapter:
    def __init__(self, app: service.App, clock: Clock | None = None):
        self.app = app
        self.settings = s = app.settings
        self.clock = clock or Clock()
        pipelined = None if is_cluster(app.redis_url) else PipelinedRedis(app.redis_url)
        self.engine = AsyncEngine(connect_async(app.redis_url), app.ops(), pipelined)
        self.supervisor = Supervisor(quota=s.quota_seconds, grace=s.grace_seconds,
                                     ring_timeout=self.engine.ops.ring_timeout)
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in s.agi_allow]
        self._peer_allowed: dict[str, bool] = {}  # PBXs are few: remember each verdict
        self.metrics: collections.Counter[str] = collections.Counter()
        # What can happen on every call setup is logged at most once a second each.
        self.warn_unavailable = Throttled(log)
        self.warn_fail_open = Throttled(log, logging.ERROR)
        self.warn_refused = Throttled(log)
        self.warn_bad_request = Throttled(log)
        self.ami: AMIClient | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()  # for ever: AMI, timers, pub/sub
        self._work: set[asyncio.Task] = set()  # one call step each: answer, extend, commit
        self.server: asyncio.AbstractServer | None = None

    # -- lifecycle -------------------------------------------------------------
    async def start(self, host: str, port: int) -> None:
        try:
            await asyncio.wait_for(self.engine.warm(), 5)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            log.error("Redis not reachable at start (%s); calls get the failure policy", exc)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: AGIConnection(self), host, port,
                                               reuse_address=True, backlog=1024)
        if self.settings.ami_url:
            self.ami = AMIClient(self.settings.ami_url, self.on_event, self.reconcile)
            self.spawn(self.ami.run(), self._tasks)
        else:
            log.warning("no CALLGUARD_AMI_URL: calls are authorised but not supervised")
        for loop_forever in (self.timer_loop(), self.listen(), self.housekeeping()):
            self.spawn(loop_forever, self._tasks)
        # What start-up allocated lives for ever: keep it out of full collections, which
        # otherwise stall every supervised call (63-80 ms with 20,000 calls up).
        gc.collect()
        gc.freeze()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop taking calls, finish the call steps under way (commits), then stop."""
        if self.server:
            self.server.close()
        if self._work:
            await asyncio.wait(self._work, timeout=5)
        tasks = self._tasks | self._work
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py's pub/sub can hold on to a cancellation for a moment: do not hang on it.
            await asyncio.wait(tasks, timeout=2)
        if self.engine.pipelined:
            self.engine.pipelined.close()

    def spawn(self, coro, group: set | None = None) -> asyncio.Task:
        group = self._work if group is None else group
        task = asyncio.ensure_future(coro)
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    # -- authorize (FastAGI) ------------------------------------------------------
    async def authorize(self, request: agi.AGIRequest) -> list[tuple[str, str]]:
        """Channel variables for one FastAGI request; never raises."""
        decision = await self._decide(request)
        self.metrics[f"authorize_{decision.reason.value.lower()}"] += 1
        variables = decision.channel_variables()
        if decision.allow:
            # The PBX's own limit from the start: if we vanish before the answer, the call
            # still ends once it could have rung and used its first grant.
            variables.append(("TIMEOUT(absolute)",
                              str(self.supervisor.setup_deadline(decision.grant))))
        return variables

    async def _decide(self, request: agi.AGIRequest) -> Decision:
        if request.script != "authorize":
            return denied(Reason.BAD_REQUEST)
        params = request.params
        account = params.get("account") or request.accountcode
        destination = params.get("dest") or request.extension
        direction = params.get("direction") or "outbound"
        budget = self.settings.agi_budget_ms / 1000
        call = self.engine.ops.authorize(account, destination, direction, request.uniqueid,
                                         self.clock.redis_now())
        if isinstance(call, Decision):
            return call
        try:
            async with asyncio.timeout(budget):
                decision = await self.engine.run(call)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            self.warn_unavailable("authorize %s: no answer from Redis within %d ms (%s)",
                                  account, self.settings.agi_budget_ms,
                                  str(exc) or type(exc).__name__)
            # The script may still run: release what it would reserve.
            self.spawn(self._release_later(f"{account}/{request.uniqueid}"))
            return self._unavailable()
        except Exception:
            log.exception("authorize failed")
            return self._unavailable()
        if decision.allow and self.ami is not None:
            self.supervisor.track(decision.session, request.uniqueid, request.channel,
                                  self.clock.monotonic())
        return decision

    def peer_allowed(self, host: str) -> bool:
        verdict = self._peer_allowed.get(host)
        if verdict is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            verdict = any(address in net for net in self.allowed)
            if len(self._peer_allowed) < 1024:
                self._peer_allowed[host] = verdict
        return verdict

    def _unavailable(self) -> Decision:
        decision = unavailable(self.settings.failure_policy, self.settings.fail_open_grant)
        if decision.allow:
            self.metrics["fail_open"] += 1
            self.warn_fail_open("fail_open: allowing a call for %d s without credit control",
                                decision.grant)
        return decision

    async def _release_later(self, session: str) -> None:
        try:
            await asyncio.sleep(1)
            await self.engine.release(session, self.clock.redis_now())
        except (redis.RedisError, OSError, ValueError):
            log.warning("could not release %s; the sweeper will", session)

    # -- supervision (AMI) ---------------------------------------------------------
    def on_event(self, event: ami.AMIEvent) -> None:
        name = event.name
        if name not in ("DialEnd", "Newstate", "Hangup"):
            return
        tracked = self.supervisor.find(event.get("Uniqueid"))
        if tracked is None:
            return
        if name == "Hangup":
            self.supervisor.forget(tracked.session)
            self.spawn(self._commit(tracked.session, event.get("Cause") or "0"))
        elif not tracked.answered and (
            (name == "DialEnd" and event.get("DialStatus") == "ANSWER")
            or (name == "Newstate" and event.get("ChannelState") == "6")
        ):
            tracked.answered = True
            self.spawn(self._answer(tracked.session))

    async def _answer(self, session: str) -> None:
        try:
            grant = await self.engine.answer(session, self.clock.redis_now())
        except (redis.RedisError, OSError) as exc:
            log.error("answer %s: %s; the PBX's own timeout still ends the call", session, exc)
            return
        await self.execute(self.supervisor.granted(session, grant, self.clock.monotonic()))

    async def _extend(self, action: Extend) -> None:
        try:
            grant = await self.engine.extend(action.session, action.seen_grant,
                                             self.clock.redis_now())
        except (redis.RedisError, OSError) as exc:
            log.warning("extend %s: %s; retrying", action.session, exc)
            self.supervisor.extend_failed(action.session, self.clock.monotonic())
            self._wake.set()
            return
        await self.execute(self.supervisor.granted(action.session, grant, self.clock.monotonic()))

    async def _commit(self, session: str, cause: str, mode: str = "reported") -> None:
        for attempt in range(3):
            try:
                await self.engine.commit(session, cause, self.clock.redis_now(), mode)
                return
            except (redis.RedisError, OSError) as exc:
                log.warning("commit %s: %s (attempt %d)", session, exc, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        log.error("commit %s failed; the sweeper will close it at its grant end", session)

    async def execute(self, actions) -> None:
        for action in actions:
            if isinstance(action, Extend):
                self.spawn(self._extend(action))
            elif isinstance(action, PushDeadline):
                await self._ami(ami.absolute_timeout, action.channel, action.seconds)
            elif isinstance(action, Hangup):
                log.info("hanging up %s (cause %d)", action.channel, action.cause)
                await self._ami(ami.hangup, action.channel, action.cause)
        self._wake.set()

    async def _ami(self, build, *args) -> None:
        if self.ami is None:
            return
        try:
            reply = await self.ami.action(build, *args)
            if reply.name != "Success":
                log.info("AMI %s %s: %s", build.__name__, args[0], reply.get("Message"))
        except (AMIError, TimeoutError, OSError) as exc:
            log.warning("AMI %s %s failed: %s", build.__name__, args[0], exc)

    async def timer_loop(self) -> None:
        while True:
            due = self.supervisor.next_due()
            self._wake.clear()
            if due is not None:
                delay = self.clock.real(due - self.clock.monotonic())
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                    except TimeoutError:
                        pass
            else:
                await self._wake.wait()
            await self.execute(self.supervisor.due(self.clock.monotonic()))

    # -- restart, kills, plans, sweeping ----------------------------------------------
    async def reconcile(self) -> None:
        """After each AMI login: resume our live sessions, close those whose channel is gone."""
        # Sessions first, channels second: a call authorised after this snapshot is not
        # judged against a channel list taken before its channel existed.
        known = {s["session"]: s for s in await asyncio.to_thread(self._my_sessions)}
        for tracked in list(self.supervisor.sessions.values()):
            known.setdefault(tracked.session, {"session": tracked.session,
                                               "ch": tracked.channel_id})
        events = await self.ami.action(ami.core_show_channels, collect=True)
        if not isinstance(events, list):
            log.error("CoreShowChannels refused: %s", events.get("Message"))
            return
        alive = {e.get("Uniqueid"): e for e in events if e.name == "CoreShowChannel"}
        resumed = gone = 0
        for session, fields in known.items():
            channel_id = fields["ch"]
            if channel_id in alive:
                tracked = self.supervisor.sessions.get(session) or self.supervisor.track(
                    session, channel_id, alive[channel_id].get("Channel"),
                    self.clock.monotonic())
                # Up while we still think it rings: its answer event was lost in the gap.
                up = alive[channel_id].get("ChannelState") == "6"
                if fields.get("st", "ans") == "ans" or up:
                    tracked.answered = True
                    tracked.grant = -1  # force the deadline to be pushed again
                    self.spawn(self._answer(session))
                resumed += 1
            else:
                self.supervisor.forget(session)
                await self._commit(session, "gone", mode="gone")
                gone += 1
        log.info("reconciled with Asterisk: %d session(s) resumed, %d closed", resumed, gone)

    def _my_sessions(self) -> list[dict]:
        sessions = state.live_sessions(self.app.redis, self.app.keys,
                                       state.account_ids(self.app.redis, self.app.keys))
        return [s for s in sessions if s.get("node") == self.settings.node]

    async def listen(self) -> None:
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
                        await asyncio.to_thread(self._reload_plans)
            except (redis.RedisError, OSError) as exc:
                log.warning("Redis pub/sub: %s; resubscribing", exc)
                await asyncio.sleep(1)
            finally:
                await asyncio.shield(pubsub.aclose())

    async def _kill(self, sessions: list[str]) -> None:
        for session in sessions:
            tracked = self.supervisor.sessions.get(session)
            if tracked:
                log.warning("operator ends %s", session)
                await self._ami(ami.hangup, tracked.channel, 16)

    def _reload_plans(self) -> None:
        self._plans_stamp = self.app.redis.get(self.app.keys.plans_version)
        self.engine.ops.plans.replace(self.app.books.load_plans())
        log.info("rate plans reloaded")

    async def housekeeping(self) -> None:
        """Every few seconds: a missed plan message, sessions whose PBX went silent."""
        self._plans_stamp = await asyncio.to_thread(self.app.redis.get,
                                                    self.app.keys.plans_version)
        while True:
            await asyncio.sleep(5)
            try:
                stamp = await asyncio.to_thread(self.app.redis.get, self.app.keys.plans_version)
                if stamp != self._plans_stamp:
                    await asyncio.to_thread(self._reload_plans)
                if not self.clock.simulated:
                    await asyncio.to_thread(service.sweep, self.app)
            except (redis.RedisError, OSError) as exc:
                log.warning("housekeeping: %s", exc)


class AGIConnection(asyncio.Protocol):
    """One FastAGI session: headers in, SET VARIABLEs out, half-close, drain, close."""

    def __init__(self, adapter: AsteriskAdapter):
        self.adapter = adapter
        self.reader = agi.AGIRequestReader()
        self.replied = False
        self.replies: agi.AGIReplyReader | None = None  # None once replied: discard input
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if not self.adapter.peer_allowed(peer[0] if peer else ""):
            self.adapter.warn_refused("FastAGI connection from %s refused (not in agi_allow)",
                                      peer)
            self.adapter.metrics["agi_refused"] += 1
            transport.abort()
            return
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.replied:
            if self.replies is None:
                return
            try:
                for reply in self.replies.feed(data):
                    if isinstance(reply, agi.AGIReply) and reply.code != 200:
                        log.warning("Asterisk refused a command: %s", reply.text)
            except ProtocolError:
                # Not Asterisk talking. Keep reading (and dropping) until EOF or the drain
                # timeout: closing with unread input would reset our reply away.
                self.replies = None
            return
        if self.task is not None:
            return  # Asterisk says nothing more before our reply; ignore a chatty peer
        try:
            request = self.reader.feed(data)
        except ProtocolError as exc:
            self.adapter.warn_bad_request("bad FastAGI request: %s", exc)
            self.adapter.metrics["agi_bad_request"] += 1
            self._reply(denied(Reason.BAD_REQUEST).channel_variables())
            return
        if request is not None:
            self.task = asyncio.ensure_future(self._handle(request))

    async def _handle(self, request: agi.AGIRequest) -> None:
        self._reply(await self.adapter.authorize(request))

    def _reply(self, variables) -> None:
        if self.transport.is_closing():
            return
        # All commands in one write, then half-close: Asterisk runs them all and answers in
        # one round trip (without the FIN it would stall after the first, see agi-pipelined).
        self.transport.write(agi.authorize_reply(variables))
        self.transport.write_eof()
        self.replied = True
        self.replies = agi.AGIReplyReader()
        if self.timer:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(DRAIN_TIMEOUT, self.transport.abort)

    def eof_received(self) -> bool:
        if not self.replied and self.task is None:
            # The request stopped half way: whoever is left reading gets a deny.
            self.adapter.metrics["agi_eof_before_request"] += 1
            self._reply(denied(Reason.BAD_REQUEST).channel_variables())
        self.transport.close()
        return True

    def connection_lost(self, exc) -> None:
        # A running authorize is left to finish: its session is then tracked, and the
        # channel's Hangup event (sent once we close) releases it.
        if self.timer:
            self.timer.cancel()


def serve(app: service.App) -> None:
    """Run `serve asterisk` until SIGINT/SIGTERM."""
    from ..config import split_hostport

    async def main():
        adapter = AsteriskAdapter(app)
        host, port = split_hostport(app.settings.agi_bind)
        await adapter.start(host, port)
        log.warning("callguard serving FastAGI on %s:%d (node %s)", host, port,
                    app.settings.node)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await adapter.stop()

    run_loop(main())


def run_loop(coro):
    """uvloop where installed: it halves the event loop's share of a call setup."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
