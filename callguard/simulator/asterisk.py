"""A simulated Asterisk 22 that speaks FastAGI and AMI exactly as the captured
transcripts do (tests/fixtures/asterisk): for the tests, `callguard demo` and
the benchmarks. It places calls through a FastAGI server, runs a minimal
dialplan (authorize, Dial, ring, answer, talk, hang up) and honours the AMI
actions callguard uses. It is strict: whatever a real Asterisk would reject or
mangle is recorded in `violations`, and the tests fail on any.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field

from ..clock import Clock

log = logging.getLogger(__name__)

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
DEAD_SAFE = ("SET VARIABLE", "GET VARIABLE", "GET FULL VARIABLE", "VERBOSE", "NOOP", "EXEC")
KNOWN_AGI = DEAD_SAFE + ("ANSWER", "HANGUP", "CHANNEL STATUS", "STREAM FILE", "WAIT FOR DIGIT")


@dataclass
class SimCall:
    """One call as the caller's channel lived it."""

    channel: str
    uniqueid: str
    account: str
    exten: str
    variables: dict[str, str] = field(default_factory=dict)
    agi_status: str = ""
    setup_latency: float = 0.0  # connect to EOF of the FastAGI session, wall seconds
    answered_at: float | None = None  # PBX seconds (clock.monotonic())
    ended_at: float | None = None
    cause: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    timeout: asyncio.TimerHandle | None = None
    talk: asyncio.TimerHandle | None = None

    @property
    def allowed(self) -> bool:
        return self.variables.get("CALLGUARD_RESULT") == "ALLOW"

    @property
    def reason(self) -> str:
        return self.variables.get("CALLGUARD_REASON", "")

    @property
    def cut_off(self) -> bool:
        """Hung up on a timeout or by callguard (16) after an answer."""
        return self.cause == 16 and self.answered_at is not None

    @property
    def talk_seconds(self) -> float:
        if self.answered_at is None or self.ended_at is None:
            return 0.0
        return self.ended_at - self.answered_at


def agi_unquote(args: str) -> list[str]:
    """Split AGI arguments as res_agi does: quotes group, backslash escapes inside quotes,
    a bare quote just toggles quoting and is dropped."""
    out, current, quoted, escaped, has = [], [], False, False, False
    for ch in args:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
            has = True
        elif ch == " " and not quoted:
            if current or has:
                out.append("".join(current))
            current, has = [], False
        else:
            current.append(ch)
    if current or has:
        out.append("".join(current))
    return out


class SimulatedAsterisk:
    def __init__(self, agi_port: int, clock: Clock | None = None, username: str = "callguard",
                 secret: str = "s3cret-AMI", agi_host: str = "127.0.0.1",
                 agi_wait: float = 10.0, timestamp_events: bool = False,
                 ami_tls: ssl.SSLContext | None = None):
        self.agi_host, self.agi_port = agi_host, agi_port
        self.clock = clock or Clock()
        self.username, self.secret = username, secret
        self.agi_wait = agi_wait  # a real Asterisk waits for ever; the simulation gives up
        self.timestamp_events = timestamp_events  # manager.conf [general] timestampevents
        self.ami_tls = ami_tls  # manager.conf tlsenable: AMI only over TLS, same bytes inside
        # Newchannel goes out as the channel is created, before its dialplan reaches the AGI
        # (the transcripts); a delay (wall seconds) lets it arrive after the setup instead.
        self.newchannel_delay = 0.0
        self.blackholed = False  # AMI: nothing gets through either way, no FIN, no RST
        self.clock_skew_ms = 0  # this PBX's clock against the true one (its own timestamps)
        self.calls: dict[str, SimCall] = {}  # live channels by uniqueid
        self.finished: list[SimCall] = []
        self.violations: list[str] = []
        self.actions: list[dict[str, str]] = []  # every AMI action received
        self._sessions: set[asyncio.StreamWriter] = set()
        self._listeners: set[asyncio.StreamWriter] = set()
        self._seq = itertools.count(1310)
        self._channel_seq = itertools.count(0)
        self.server: asyncio.AbstractServer | None = None

    # -- AMI server ------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = await asyncio.start_server(self._ami_session, host, port,
                                                 ssl=self.ami_tls)

    @property
    def ami_port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def ami_url(self) -> str:
        scheme = "amis" if self.ami_tls else "ami"
        return f"{scheme}://{self.username}:{self.secret}@127.0.0.1:{self.ami_port}"

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            self.hangup(call, 16, quiet=True)
        if self.server:
            self.server.close()
        for writer in list(self._sessions):
            writer.close()

    def drop_ami(self) -> None:
        """Cut every AMI connection, as a restarting Asterisk or a network blip would."""
        for writer in list(self._sessions):
            writer.close()

    def blackhole_ami(self) -> None:
        """From now on AMI bytes go nowhere, both ways, and nothing tells the peer: a
        firewall dropping packets, a cable pulled between two switches."""
        self.blackholed = True

    def restore_ami(self) -> None:
        """The network is back. Connections that lived through the black hole are of no
        use to anyone (the client gave up on them): they end."""
        self.blackholed = False
        self.drop_ami()

    async def _ami_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._sessions.add(writer)
        if not self.blackholed:
            writer.write(BANNER)
        logged_in, buffer = False, b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if self.blackholed:
                    continue
                buffer += data
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    action = self._parse_action(block)
                    if action is None:
                        writer.write(b"Response: Error\r\nMessage: Missing action in request"
                                     b"\r\n\r\n")
                        continue
                    self.actions.append(action)
                    logged_in = await self._act(action, writer, logged_in)
                    if logged_in is None:
                        await writer.drain()
                        return
                if len(buffer) > 65536 or b"\n" in buffer.replace(b"\r\n", b""):
                    self.violations.append(f"AMI: malformed bytes {buffer[:60]!r}")
                    buffer = b""
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._sessions.discard(writer)
            self._listeners.discard(writer)
            writer.close()

    def _parse_action(self, block: bytes) -> dict[str, str] | None:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            self.violations.append(f"AMI: not UTF-8: {block[:60]!r}")
            return None
        fields: dict[str, str] = {}
        for line in text.split("\r\n"):
            key, sep, value = line.partition(": ")
            if not sep or not key or "\r" in line or "\n" in line:
                self.violations.append(f"AMI: malformed line {line!r}")
                return None
            fields.setdefault(key, value)
        if next(iter(fields)) != "Action":
            self.violations.append(f"AMI: message does not start with Action: {text[:60]!r}")
            return None
        return fields

    async def _act(self, a: dict[str, str], writer, logged_in: bool) -> bool | None:
        name, aid = a["Action"].lower(), a.get("ActionID", "")

        def reply(status: str, *lines: str) -> None:
            head = [f"Response: {status}"] + ([f"ActionID: {aid}"] if aid else [])
            writer.write(("\r\n".join(head + list(lines)) + "\r\n\r\n").encode())

        if name == "login":
            if a.get("Username") != self.username or a.get("Secret") != self.secret:
                await asyncio.sleep(1.0)  # manager.c sleeps before it refuses
                reply("Error", "Message: Authentication failed")
                return None
            reply("Success", "Message: Authentication accepted")
            if a.get("Events", "on").lower() != "off":
                self._listeners.add(writer)
            return True
        if name == "logoff":
            reply("Goodbye", "Message: Thanks for all the fish.")
            return None
        if not logged_in:
            reply("Error", "Message: Permission denied")
            return False
        if name == "ping":
            ms = self.clock.epoch_ms(self.clock.monotonic()) + self.clock_skew_ms
            reply("Success", "Ping: Pong", f"Timestamp: {ms // 1000}.{ms % 1000 * 1000:06d}")
        elif name == "events":
            reply("Success", "Events: On")
        elif name == "filter":
            reply("Success", "Message: Success")
        elif name == "coreshowchannels":
            reply("Success", "EventList: start", "Message: Channels will follow")
            for call in self.calls.values():
                state = "Up" if call.answered_at is not None else "Ring"
                writer.write(self._event("CoreShowChannel", call, state, aid=aid, extra=[
                    "Application: Dial", f"ApplicationData: Local/{call.exten}@farend,30",
                    "Duration: 00:00:00", "BridgeId: "], privilege=False))
            writer.write((f"Event: CoreShowChannelsComplete\r\nActionID: {aid}\r\n"
                          f"EventList: Complete\r\nListItems: {len(self.calls)}\r\n\r\n").encode())
        elif name == "getvar":
            call = self._channel(a.get("Channel", ""))
            variable = a.get("Variable", "")
            if call is None:
                reply("Error", "Message: No such channel")
            else:
                reply("Success", f"Variable: {variable}", f"Value: {self._getvar(call, variable)}")
        elif name == "absolutetimeout":
            call = self._channel(a.get("Channel", ""))
            try:
                seconds = float(a.get("Timeout", "0"))
            except ValueError:
                seconds = 0.0
            if call is None:
                reply("Error", "Message: No such channel")
            elif seconds <= 0:
                reply("Error", "Message: No timeout specified")
            else:
                self.set_timeout(call, seconds)
                reply("Success", "Message: Timeout Set")
        elif name == "hangup":
            call = self._channel(a.get("Channel", ""))
            if call is None:
                reply("Error", "Message: No such channel")
            else:
                reply("Success", "Message: Channel Hungup")
                cause = int(a.get("Cause", "16") or 16)
                asyncio.get_running_loop().call_later(0.001, self.hangup, call, cause)
        else:
            self.violations.append(f"AMI: unknown action {a['Action']!r}")
            reply("Error", "Message: Invalid/unknown command")
        return True

    def _getvar(self, call: SimCall, variable: str) -> str:
        if variable == "CDR(answer,u)":
            # func_cdr raw mode: "%ld.%06ld" of the CDR's answer time, zero if unanswered.
            if call.answered_at is None:
                return "0.000000"
            ms = self.clock.epoch_ms(call.answered_at) + self.clock_skew_ms
            return f"{ms // 1000}.{ms % 1000 * 1000:06d}"
        return call.variables.get(variable, "")

    def _channel(self, name: str) -> SimCall | None:
        return next((c for c in self.calls.values() if c.channel == name), None)

    def _event(self, name: str, call: SimCall, state: str = "Up", extra=(), aid: str = "",
               privilege: bool = True) -> bytes:
        code = {"Ring": 4, "Up": 6}[state]
        lines = [f"Event: {name}"]
        lines += [f"ActionID: {aid}"] if aid else []
        lines += ["Privilege: call,all"] if privilege else []
        if privilege and self.timestamp_events:  # manager.c puts it right after Privilege
            ms = self.clock.epoch_ms(self.clock.monotonic()) + self.clock_skew_ms
            lines.append(f"Timestamp: {ms // 1000}.{ms % 1000 * 1000:06d}")
        lines += [
            f"Channel: {call.channel}", f"ChannelState: {code}", f"ChannelStateDesc: {state}",
            "CallerIDNum: sipp", "CallerIDName: sipp", "ConnectedLineNum: <unknown>",
            "ConnectedLineName: <unknown>", "Language: en", f"AccountCode: {call.account}",
            "Context: test", f"Exten: {call.exten}", "Priority: 2",
            f"Uniqueid: {call.uniqueid}", f"Linkedid: {call.uniqueid}", *extra,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def emit(self, data: bytes) -> None:
        if self.blackholed:
            return
        for writer in list(self._listeners):
            if not writer.is_closing():
                writer.write(data)

    # -- channels ----------------------------------------------------------------------
    def set_timeout(self, call: SimCall, seconds: float) -> None:
        """AbsoluteTimeout and TIMEOUT(absolute): each replaces the previous one."""
        if call.timeout:
            call.timeout.cancel()
        call.timeout = asyncio.get_running_loop().call_later(
            self.clock.real(seconds), self.hangup, call, 16)

    def hangup(self, call: SimCall, cause: int, quiet: bool = False) -> None:
        if call.ended.is_set():
            return
        for handle in (call.timeout, call.talk):
            if handle:
                handle.cancel()
        call.ended_at = self.clock.monotonic()
        call.cause = cause
        self.calls.pop(call.uniqueid, None)
        self.finished.append(call)
        call.ended.set()
        if not quiet:
            text = {16: "Normal Clearing", 21: "Call Rejected", 0: "Unknown"}.get(cause, "Unknown")
            self.emit(self._event("Hangup", call, extra=[f"Cause: {cause}",
                                                         f"Cause-txt: {text}"]))

    def new_call(self, account: str, exten: str) -> SimCall:
        uniqueid = f"1795236355.{next(self._seq)}"
        channel = f"PJSIP/anonymous-{next(self._channel_seq):08x}"
        call = SimCall(channel, uniqueid, account, exten)
        self.calls[uniqueid] = call
        newchannel = self._event("Newchannel", call, state="Ring")
        if self.newchannel_delay:
            asyncio.get_running_loop().call_later(self.newchannel_delay, self.emit, newchannel)
        else:
            self.emit(newchannel)
        return call

    async def call(self, account: str, exten: str, ring: float = 2.0, talk: float = 30.0,
                   script: str = "authorize") -> SimCall:
        """One call through the dialplan of dialplan/asterisk/callguard.conf."""
        call = self.new_call(account, exten)
        started = time.perf_counter()
        call.agi_status = await self.fastagi(call, script)
        call.setup_latency = time.perf_counter() - started
        if call.agi_status != "SUCCESS" or not call.allowed:
            # callguard-authorize: anything but ALLOW hangs up with a fitting cause.
            self.hangup(call, 21)
            return call
        await self.clock.sleep(ring)  # Dial: the callee rings
        if call.ended.is_set():
            return call
        self.answer(call)
        call.talk = asyncio.get_running_loop().call_later(self.clock.real(talk), self.hangup,
                                                          call, 16)
        await call.ended.wait()
        return call

    def answer(self, call: SimCall) -> None:
        """The callee picks up: Dial answers the caller (DialEnd, then Newstate Up)."""
        call.answered_at = self.clock.monotonic()
        self.emit(self._event("DialEnd", call, state="Ring", extra=[
            f"DestChannel: Local/{call.exten}@farend-00000001;1", "DestChannelState: 6",
            "DestChannelStateDesc: Up", f"DestUniqueid: {call.uniqueid}9", "DialStatus: ANSWER"]))
        self.emit(self._event("Newstate", call))

    # -- FastAGI client ------------------------------------------------------------------
    def agi_headers(self, call: SimCall, script: str) -> list[bytes]:
        """The request headers in Asterisk 22's order, in two writes as recorded."""
        first = (
            f"agi_network: yes\nagi_network_script: {script}\n"
            f"agi_request: agi://{self.agi_host}:{self.agi_port}/{script}\n"
            f"agi_channel: {call.channel}\nagi_language: en\nagi_type: PJSIP\n"
            f"agi_uniqueid: {call.uniqueid}\nagi_version: 22.10.1\nagi_callerid: sipp\n"
            "agi_calleridname: sipp\nagi_callingpres: 0\nagi_callingani2: 0\n"
            "agi_callington: 0\nagi_callingtns: 0\n"
            f"agi_dnid: {call.exten}\nagi_rdnis: unknown\nagi_context: test\n"
        )
        second = (
            f"agi_extension: {call.exten}\nagi_priority: 1\nagi_enhanced: 0.0\n"
            f"agi_accountcode: {call.account}\nagi_threadid: 139932030469824\n\n"
        )
        return [first.encode(), second.encode()]

    async def fastagi(self, call: SimCall, script: str) -> str:
        """Run AGI(agi://host:port/script); returns AGISTATUS."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.agi_host, self.agi_port), 2.0)  # MAX_AGI_CONNECT
        except (OSError, TimeoutError):
            return "FAILURE"
        try:
            for chunk in self.agi_headers(call, script):
                writer.write(chunk)
            pending: list[bytes] = []
            buffer = b""
            deadline = time.monotonic() + self.agi_wait
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536),
                                                  max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    self.violations.append(f"FastAGI: server silent for {self.agi_wait} s")
                    return "HANGUP"
                if data:
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    pending += lines
                    # res_agi reads one command per time the socket turns readable.
                    if pending:
                        writer.write(self._agi_command(call, pending.pop(0)))
                    continue
                # EOF: the rest of the buffered commands run, then HANGUP, then close.
                if buffer:
                    pending.append(buffer)
                writer.write(b"".join(self._agi_command(call, line) for line in pending))
                writer.write(b"HANGUP\n")
                await writer.drain()
                return "SUCCESS"
        except ConnectionError:
            return "SUCCESS"
        finally:
            writer.close()

    def _agi_command(self, call: SimCall, raw: bytes) -> bytes:
        line = raw.decode("utf-8", "replace")
        if "\r" in line:
            self.violations.append(f"FastAGI: CR in command {line!r} (Asterisk keeps it)")
        upper = line.upper()
        command = next((c for c in KNOWN_AGI if upper == c or upper.startswith(c + " ")), None)
        if command is None:
            self.violations.append(f"FastAGI: unknown command {line!r}")
            return b"510 Invalid or unknown command\n"
        if command == "SET VARIABLE":
            args = agi_unquote(line[len(command) + 1:])
            if len(args) < 2:
                self.violations.append(f"FastAGI: bad usage {line!r}")
                return (b"520-Invalid command syntax.  Proper usage follows:\n"
                        b"Sets a variable to the current channel.\n520 End of proper usage.\n")
            name, value = args[0], args[1]
            call.variables[name] = value
            if name.upper() == "TIMEOUT(ABSOLUTE)":
                self.set_timeout(call, float(value))
            return b"200 result=1\n"
        if command in ("NOOP", "EXEC"):
            return b"200 result=0\n"
        return b"200 result=1\n"
