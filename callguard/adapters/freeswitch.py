"""`callguard serve freeswitch`: the dialplan's `socket` application (outbound ESL)
for authorize, one inbound ESL connection for answers, hangups, the dead man's
timer and cut-off. It translates; the call control decides and supervises.

Billing follows the leg that was authorised (the one that ran `socket`): its
CHANNEL_ANSWER starts the clock and its CHANNEL_HANGUP_COMPLETE commits with
FreeSWITCH's own `billmsec` for that leg. `bridge` answers that leg when the far
end answers, so this is the talk time; a dialplan that answers the caller
itself before bridging (an IVR) is billed from that answer, or from the
authorization when it came before `socket`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import statistics
from decimal import Decimal

from .. import service
from ..clock import Clock
from ..config import split_hostport
from ..control import LiveChannel
from ..decisions import HANGUP_CAUSE, Decision
from ..nodes import default_node
from ..protocol import esl
from ..protocol.errors import ProtocolError
from .common import PBXAdapter, SetupConnection
from .esl_client import ESLClient, ESLError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # FreeSWITCH answers `connect` at once; a silent peer is dropped
DRAIN_TIMEOUT = 2.0  # after the decision: how long FreeSWITCH may take to run our commands
LIST_TIMEOUT = 30.0  # `show channels as json`, the one command whose reply can be large
UP = frozenset({"ACTIVE", "HELD"})  # `show channels` callstates of an answered channel

# Q.850 cause -> the name FreeSWITCH's commands take (switch_channel_str2cause).
CAUSE_NAMES = {
    1: "UNALLOCATED_NUMBER", 16: "NORMAL_CLEARING", 17: "USER_BUSY",
    21: "CALL_REJECTED", 34: "NORMAL_CIRCUIT_CONGESTION", 41: "NORMAL_TEMPORARY_FAILURE",
    111: "PROTOCOL_ERROR",
}


def cause_name(cause: int) -> str:
    return CAUSE_NAMES.get(cause, "NORMAL_CLEARING")


def micros_ms(text: str) -> int | None:
    """FreeSWITCH's µs epoch ("1795235435415636") in ms; 0 or junk: None."""
    micros = esl.whole(text)
    return micros // 1000 or None if micros is not None else None


class FreeSWITCHAdapter(PBXAdapter):
    """Outbound ESL server, inbound ESL client and the PBX port of the call control."""

    name = "FreeSWITCH"
    link_setting = "CALLGUARD_ESL_URL"
    bind_setting = "esl_bind"
    setup_protocol = "outbound ESL"

    def __init__(self, app: service.App, clock: Clock | None = None):
        s = app.settings
        self.link = self.esl = ESLClient(s.esl_url, self.on_event,
                                         self._logged_in) if s.esl_url else None
        # FreeSWITCH's clock minus the scripts' clock, from its own timestamps: the median
        # of recent samples, so that one odd stamp (a clock step, a forged event) moves
        # nothing; the transit delay it leaves in is milliseconds.
        self._ahead_samples: collections.deque[int] = collections.deque(maxlen=63)
        super().__init__(app, s.node or default_node("freeswitch",
                                                     split_hostport(s.esl_bind)[1]),
                         s.esl_allow, clock)

    @staticmethod
    def connection(adapter):
        return OutboundSession(adapter)

    # -- the PBX port --------------------------------------------------------------------
    async def hang_up(self, channel: str, cause: int) -> bool:
        return await self._api("uuid_kill", channel, cause_name(cause))

    async def push_deadline(self, channel: str, seconds: Decimal) -> bool:
        """sched_hangup does not replace an earlier one: `sched_del <uuid>` drops every
        task grouped under the channel first. Both go in one write, so FreeSWITCH runs
        them back to back. Its scheduler counts whole epoch seconds from the current one,
        so a task may run up to a second early: rounded up, plus one."""
        when = f"+{math.ceil(seconds) + 1}"
        replies = await self._api_batch(esl.api("sched_del", channel),
                                        esl.api("sched_hangup", when, channel,
                                                "ALLOTTED_TIMEOUT"))
        return replies is not None and replies[1].ok

    async def live_channels(self) -> dict[str, LiveChannel]:
        # 20,000 calls make ~20 MB: FreeSWITCH may take a while, and the parse is done
        # off the event loop, where call setups wait.
        reply = await self.esl.api("show", "channels", "as", "json", timeout=LIST_TIMEOUT)
        try:
            rows = (await asyncio.to_thread(json.loads, reply.body)).get("rows", [])
        except (ValueError, AttributeError):
            raise ESLError(f"show channels: {reply.text[:80]!r}") from None
        return {row["uuid"]: LiveChannel(row["uuid"], row["uuid"], row.get("callstate") in UP)
                for row in rows if isinstance(row, dict) and row.get("uuid")}

    async def answer_time(self, channel: LiveChannel) -> int | None:
        """`uuid_dump` shows the channel's times; its answer variables only exist once
        it hangs up."""
        reply = await self.esl.api("uuid_dump", channel.channel, "json")
        try:
            dump = json.loads(reply.body)
        except ValueError:
            return None
        if not isinstance(dump, dict):
            return None
        self._learn_clock(str(dump.get("Event-Date-Timestamp", "")))  # no event may have come
        return self._pbx_time(str(dump.get("Caller-Channel-Answered-Time", "")))

    def _learn_clock(self, micros: str) -> None:
        stamp = micros_ms(micros)
        if stamp is not None:
            self._ahead_samples.append(stamp - self.control.redis_ms())

    def _pbx_time(self, micros: str) -> int | None:
        """A time FreeSWITCH wrote, on the scripts' clock; unknown offset, no time."""
        ms = micros_ms(micros)
        if ms is None or not self._ahead_samples:
            return None
        return ms - statistics.median_low(self._ahead_samples)

    async def _api(self, *words: str) -> bool:
        replies = await self._api_batch(esl.api(*words))
        return replies is not None and replies[0].ok

    async def _api_batch(self, *commands: bytes) -> list[esl.ApiResponse] | None:
        if not self.supervising:
            return None
        try:
            replies = await self.esl.send(*commands)
        except (ESLError, ProtocolError, OSError) as exc:
            log.warning("ESL %s failed: %s", commands[0][:60], exc)
            return None
        replies = replies if isinstance(replies, list) else [replies]
        for reply in replies:
            if not reply.ok:
                log.info("ESL: %s", reply.text.strip())
        return replies

    # -- what FreeSWITCH reports ------------------------------------------------------
    def on_event(self, event: esl.Event) -> None:
        self._learn_clock(event.get("Event-Date-Timestamp"))
        uuid = event.unique_id
        self.control.seen(uuid)  # FreeSWITCH has this channel: no ghost (CHANNEL_CREATE first)
        if event.name == "CHANNEL_ANSWER":
            self.control.answered(uuid, self._pbx_time(event.get("Caller-Channel-Answered-Time")))
        elif event.name == "CHANNEL_HANGUP_COMPLETE":
            self.control.hung_up(
                uuid, event.get("variable_hangup_cause_q850") or "0",
                self._pbx_time(event.get("Caller-Channel-Hangup-Time")),
                self._pbx_time(event.get("Caller-Channel-Answered-Time")),
                esl.whole(event.get("variable_billmsec")))

    # -- authorize (outbound ESL) ---------------------------------------------------------
    async def authorize(self, channel: esl.CommandReply, peer: str = "") -> Decision:
        """The decision for one `socket` connection's channel data from `peer`; never
        raises."""
        uuid = channel.get("Unique-ID", "")
        return await self.control.authorize(
            channel.get("variable_callguard_account") or channel.get("variable_accountcode", ""),
            channel.get("variable_callguard_dest") or channel.get("Caller-Destination-Number", ""),
            channel.get("variable_callguard_direction") or "outbound",
            uuid, uuid, peer)


class OutboundSession(SetupConnection):
    """One `socket` connection: connect, decide, set the callguard_* variables (and the
    PBX's own timer, or hang a denied call up), then exit; the dialplan goes on."""

    def __init__(self, adapter: FreeSWITCHAdapter):
        super().__init__(adapter)
        # Nothing big comes here: a channel's data, command replies, its own events (only
        # counted). Tight bounds, so a thousand hostile peers cannot take much memory.
        self.reader = esl.ESLReader(events=frozenset(), max_head=64 << 10,
                                    max_event=64 << 10, max_body=4096)
        self.channel: dict[str, str] | None = None
        self.replies = 0  # replies still expected to our commands
        # Applications not yet run: the socket application keeps the channel parked, so
        # nothing but our own sendmsg executes on it, each ending in CHANNEL_EXECUTE_COMPLETE.
        self.executing = 0
        self.done = False  # exit sent, or waiting for FreeSWITCH to hang a deny up

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.adapter.refuse(transport):
            return
        transport.write(esl.command("connect"))
        self.arm(CONNECT_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except ProtocolError as exc:
            # Not FreeSWITCH talking: nothing is set, so the dialplan's re-check after
            # `socket` hangs the call up.
            self.adapter.warn_bad_request("bad outbound ESL data: %s", exc)
            self.adapter.metrics.bad_requests.inc()
            self.transport.abort()
            return
        for message in messages:
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, esl.SkippedEvent | esl.Event):
            if message.name == "CHANNEL_EXECUTE_COMPLETE" and self.executing:
                self.executing -= 1
                self._maybe_exit()
        elif isinstance(message, esl.CommandReply | esl.ApiResponse):
            if self.channel is None:
                if not isinstance(message, esl.CommandReply) or not message.get("Unique-ID"):
                    self.adapter.metrics.bad_requests.inc()
                    self.transport.abort()
                    return
                self.channel = message
                self.task = asyncio.get_running_loop().create_task(self._decide())
                return
            self.replies -= 1
            if not message.ok:
                log.warning("FreeSWITCH refused a command for %s: %s",
                            self.channel.get("Unique-ID"), message.text.strip())
            self._maybe_exit()
        elif isinstance(message, esl.DisconnectNotice):
            if message.get("Content-Disposition") != "linger":
                self.transport.close()

    async def _decide(self) -> None:
        decision = await self.adapter.authorize(self.channel, self.peer)
        if self.transport.is_closing():
            return
        uuid = self.channel.get("Unique-ID")
        commands = [esl.command("myevents")]  # to see the multiset run: sent with it
        if decision.allow:
            # The PBX's own limit from the start: if we vanish, the call still ends once it
            # could have rung and used its first grant. A channel back in the socket (the
            # dialplan passed it through again) drops the timer of its earlier call first.
            commands += [esl.api("sched_del", uuid),
                         esl.api("sched_hangup", f"+{decision.deadline + 1}", uuid,
                                 "ALLOTTED_TIMEOUT")]
            if self.channel.get("Answer-State") == "answered":
                # Answered before the socket (an IVR): billed and supervised from now.
                self.adapter.control.answered(uuid)
        # One `multiset` (space-separated; no value of ours holds a space): one application
        # to run on the parked channel, one CHANNEL_EXECUTE_COMPLETE to wait for.
        variables = " ".join(f"{name.lower()}={value}"
                             for name, value in decision.channel_variables())
        commands.append(esl.sendmsg_execute("multiset", variables))
        if not decision.allow:
            commands.append(esl.sendmsg_hangup(cause_name(HANGUP_CAUSE[decision.reason])))
        else:
            self.executing = 1
        self.replies += len(commands)
        self.done = not decision.allow  # a deny: FreeSWITCH hangs up and closes
        self.transport.write(b"".join(commands))
        self.arm(DRAIN_TIMEOUT)

    def _maybe_exit(self) -> None:
        """Exit once every command is answered and the last variable is set: FreeSWITCH
        then returns from `socket` and the dialplan goes on."""
        if self.done or self.replies or self.executing or self.task is None \
                or not self.task.done():
            return
        self.done = True
        # FreeSWITCH's goodbye (+OK bye, a notice) tells nothing more: close at once.
        self.transport.write(esl.command("exit"))
        self.transport.close()

    def eof_received(self) -> bool:
        self.transport.close()
        return True


