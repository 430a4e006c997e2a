"""`callguard serve asterisk`: FastAGI for authorize, AMI for answer, hangup and
cut-off. It translates; the call control decides and supervises.

The FastAGI listener is our own asyncio.Protocol rather than panoramisk's
`fast_agi.Application`: that handler loops on `reader.read()` until it sees a
blank line, so a peer that closes early spins it for ever, and it buffers
headers without bound. Here a bounded parser reads the headers and every
request is answered within `agi_budget_ms`, whatever Redis does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from decimal import Decimal

from .. import service
from ..clock import Clock
from ..config import split_hostport
from ..control import LiveChannel
from ..decisions import Reason, denied
from ..logs import Throttled
from ..nodes import default_node
from ..protocol import agi, ami
from ..protocol.errors import ProtocolError
from .ami_client import AMIClient, AMIError
from .common import PBXAdapter, SetupConnection

log = logging.getLogger(__name__)
_warn_no_decision = Throttled(log)

# Asterisk sends its whole AGI environment at once, on connect. A peer that has not sent
# all of it (up to the blank line) within this is closed without a reply: AGI has no
# command before that line. To Asterisk a close is a script that set nothing, which the
# shipped dialplan denies (UNAVAILABLE).
HEADER_TIMEOUT = 5.0
# Once the environment is in, a command may go out and a reply is due: the decision comes
# within agi_budget_ms. Should it not have come this much later, the connection sets
# DENY/UNAVAILABLE itself: a request is never closed on without a result.
REPLY_MARGIN = 1.0
DRAIN_TIMEOUT = 2.0  # after our reply, how long we wait for Asterisk's replies and EOF
UP = "6"  # ChannelState of an answered channel
_STAMP = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")  # "%ld.%06lu"; Decimal takes NaN, 1e9, 1_0


def stamp_ms(stamp: str) -> int | None:
    """Asterisk's "1795236284.213525" (epoch seconds) in ms; 0 or junk: None."""
    if not _STAMP.fullmatch(stamp):
        return None
    return int(Decimal(stamp) * 1000) or None


class AsteriskAdapter(PBXAdapter):
    """FastAGI server, AMI client and the PBX port of the call control, for Asterisk."""

    name = "Asterisk"
    link_setting = "CALLGUARD_AMI_URL"
    bind_setting = "agi_bind"
    setup_protocol = "FastAGI"

    def __init__(self, app: service.App, clock: Clock | None = None):
        s = app.settings
        self.link = self.ami = AMIClient(s.ami_url, self.on_event, self._logged_in,
                                         on_pong=self._pong, tls_ca=s.ami_tls_ca
                                         ) if s.ami_url else None
        self._pbx_ahead_ms: int | None = None  # Asterisk's clock minus the scripts' clock
        super().__init__(app, s.node or default_node("asterisk", split_hostport(s.agi_bind)[1]),
                         s.agi_allow, clock)

    @staticmethod
    def connection(adapter):
        return AGIConnection(adapter)

    # -- the PBX port --------------------------------------------------------------------
    async def hang_up(self, channel: str, cause: int) -> bool:
        return await self._action(ami.hangup, channel, cause)

    async def push_deadline(self, channel: str, seconds: Decimal) -> bool:
        return await self._action(ami.absolute_timeout, channel, seconds)

    async def live_channels(self) -> dict[str, LiveChannel]:
        events = await self.ami.action(ami.core_show_channels, collect=True)
        if not isinstance(events, list):
            raise AMIError(f"CoreShowChannels refused: {events.get('Message')}")
        return {e.get("Uniqueid"): LiveChannel(e.get("Uniqueid"), e.get("Channel"),
                                               e.get("ChannelState") == UP)
                for e in events if e.name == "CoreShowChannel"}

    async def answer_time(self, channel: LiveChannel) -> int | None:
        """The CDR's answer time, raw (`u`): "1795236357.123456", "0.000000" if none."""
        reply = await self.ami.action(ami.getvar, channel.channel, "CDR(answer,u)")
        return self._pbx_time(reply.get("Value")) if reply.name == "Success" else None

    def _pong(self, reply: ami.AMIResponse) -> None:
        stamp = stamp_ms(reply.get("Timestamp"))
        if stamp is not None:
            self._pbx_ahead_ms = stamp - self.control.redis_ms()

    def _pbx_time(self, stamp: str) -> int | None:
        """A time Asterisk wrote, on the scripts' clock: its own clock may be off by any
        amount, learned from its Ping replies; unknown offset, no time."""
        ms = stamp_ms(stamp)
        if ms is None or self._pbx_ahead_ms is None:
            return None
        return ms - self._pbx_ahead_ms

    async def _action(self, build, *args) -> bool:
        if not self.supervising:
            return False
        try:
            reply = await self.ami.action(build, *args)
        except (AMIError, ProtocolError, OSError) as exc:
            log.warning("AMI %s %s failed: %s", build.__name__, args[0], exc)
            return False
        if reply.name != "Success":
            log.info("AMI %s %s: %s", build.__name__, args[0], reply.get("Message"))
        return reply.name == "Success"

    # -- what Asterisk reports -------------------------------------------------------------
    def on_event(self, event: ami.AMIEvent) -> None:
        name = event.name
        if name not in ("Newchannel", "DialEnd", "Newstate", "Hangup"):
            return
        uniqueid = event.get("Uniqueid")
        self.control.seen(uniqueid)  # Asterisk has this channel: no ghost
        # Asterisk's own time of the event, with `timestampevents = yes` in manager.conf
        at = self._pbx_time(event.get("Timestamp"))
        if name == "Hangup":
            self.control.hung_up(uniqueid, event.get("Cause") or "0", at)
        elif (name == "DialEnd" and event.get("DialStatus") == "ANSWER") or (
                name == "Newstate" and event.get("ChannelState") == UP):
            self.control.answered(uniqueid, at)

    # -- authorize (FastAGI) ------------------------------------------------------
    async def authorize(self, request: agi.AGIRequest, peer: str = "") -> list[tuple[str, str]]:
        """Channel variables for one FastAGI request from `peer`; never raises."""
        if request.script != "authorize":
            return denied(Reason.BAD_REQUEST).channel_variables()
        params = request.params
        decision = await self.control.authorize(
            params.get("account") or request.accountcode,
            params.get("dest") or request.extension,
            params.get("direction") or "outbound",
            request.uniqueid, request.channel, peer)
        variables = decision.channel_variables()
        if decision.allow:
            # The PBX's own limit from the start: if we vanish, the call still ends once it
            # could have rung and used its first grant.
            variables.append(("TIMEOUT(absolute)", str(decision.deadline)))
        return variables


class AGIConnection(SetupConnection):
    """One FastAGI session: headers in, SET VARIABLEs out, half-close, drain, close."""

    def __init__(self, adapter: AsteriskAdapter):
        super().__init__(adapter)
        self.reader = agi.AGIRequestReader()
        self.replied = False
        self.replies: agi.AGIReplyReader | None = None  # None once replied: discard input

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.adapter.refuse(transport):
            self.arm(HEADER_TIMEOUT)

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
            self.adapter.metrics.bad_requests.inc()
            self._reply(denied(Reason.BAD_REQUEST).channel_variables())
            return
        if request is not None:
            self.task = asyncio.get_running_loop().create_task(self._handle(request))
            self._reply_due(request)

    def _reply_due(self, request: agi.AGIRequest) -> None:
        """The environment is in: the header deadline gives way to the reply's."""
        if self.timer:
            self.timer.cancel()
        due = self.adapter.settings.agi_budget_ms / 1000 + REPLY_MARGIN
        self.timer = asyncio.get_running_loop().call_later(due, self._no_decision, request,
                                                           due)

    def _no_decision(self, request: agi.AGIRequest, due: float) -> None:
        # The call control overran its own budget (or failed): the channel is told, and a
        # session the decision may still reserve is released by the channel's hangup.
        _warn_no_decision("FastAGI %s: no decision within %.1f s: denied (UNAVAILABLE)",
                          request.uniqueid, due)
        self._reply(denied(Reason.UNAVAILABLE).channel_variables())

    async def _handle(self, request: agi.AGIRequest) -> None:
        self._reply(await self.adapter.authorize(request, self.peer))

    def _reply(self, variables) -> None:
        if self.replied or self.transport.is_closing():
            return  # one reply a request: a decision after the deny of _no_decision
        # All commands in one write, then half-close: Asterisk runs them all and answers in
        # one round trip (without the FIN it would stall after the first, see agi-pipelined).
        self.transport.write(agi.authorize_reply(variables))
        self.transport.write_eof()
        self.replied = True
        self.replies = agi.AGIReplyReader()
        self.arm(DRAIN_TIMEOUT)

    def eof_received(self) -> bool:
        if not self.replied and self.task is None:
            # The request stopped half way: whoever is left reading gets a deny.
            self.adapter.metrics.bad_requests.inc()
            self._reply(denied(Reason.BAD_REQUEST).channel_variables())
        self.transport.close()
        return True


