"""A simulated FreeSWITCH 1.10 that speaks ESL exactly as the captured transcripts
do (tests/fixtures/freeswitch): for the tests, `callguard demo --pbx freeswitch`
and the benchmarks.

It runs the shipped dialplan (freeswitch_conf/dialplan/callguard.xml) with a
small XML dialplan interpreter: `socket` connects to callguard's outbound ESL
server and, like the real one, returns to the dialplan however the connection
ends, or at once when nothing listens. An inbound ESL server carries events and
the api commands callguard uses. Frames are built from headers recorded off a
real FreeSWITCH (fs_templates.json, derived from the transcripts by
tests/test_freeswitch_sim.py). It is strict: whatever a real FreeSWITCH would
reject or ignore is recorded in `violations`, and the tests fail on any.

Not in the transcripts, modelled on FreeSWITCH's source: `uuid_dump <uuid> json`
(the channel's headers as JSON), the `multiset` application (mod_dptools), the
park loop's 20 ms tick that runs queued `sendmsg` commands in async mode, and the
scheduler's whole seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from ..clock import Clock
from ..protocol import esl
from ..protocol.esl import Command
from .fs_dialplan import Dialplan, expand

log = logging.getLogger(__name__)

TEMPLATES = json.loads((Path(__file__).with_name("fs_templates.json")).read_text())
SHIPPED_DIALPLAN = Path(__file__).parents[2] / "freeswitch_conf" / "dialplan" / "callguard.xml"
TEMPLATE_UUID = "75f2f3a9-b3e6-463a-899c-cc76353db7dd"  # the recorded leg's own values
TEMPLATE_NAME = "loopback/9998-b"
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
CAUSES = {"NORMAL_CLEARING": 16, "USER_BUSY": 17, "CALL_REJECTED": 21,
          "UNALLOCATED_NUMBER": 1, "NORMAL_CIRCUIT_CONGESTION": 34,
          "NORMAL_TEMPORARY_FAILURE": 41, "PROTOCOL_ERROR": 111, "ALLOTTED_TIMEOUT": 602}
CALLSTATES = {"ringing": "RINGING", "answered": "ACTIVE", "hangup": "HANGUP"}


def reply(text: str, *extra: tuple[str, str]) -> bytes:
    return esl.frame("command/reply", headers=(("Reply-Text", text), *extra))


def api_response(body: str) -> bytes:
    return esl.frame("api/response", body.encode())


def notice(*headers: tuple[str, str]) -> bytes:
    return esl.frame("text/disconnect-notice", GOODBYE, headers)


@dataclass
class SimChannel:
    """One call as the authorised leg lived it (PBX seconds from clock.monotonic())."""

    uuid: str
    name: str
    account: str
    dest: str
    variables: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    cause: str = ""
    state: str = "ringing"  # Answer-State
    setup_latency: float = 0.0  # wall seconds the socket application took
    bridged: bool = False
    killed: bool = False  # ended by uuid_kill or the scheduler, not by its own caller
    socket_writer: asyncio.StreamWriter | None = None
    myevents: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    talk: asyncio.TimerHandle | None = None

    @property
    def allowed(self) -> bool:
        return self.variables.get("callguard_result") == "ALLOW"

    @property
    def reason(self) -> str:
        return self.variables.get("callguard_reason", "")

    @property
    def cut_off(self) -> bool:
        return self.killed and self.answered_at is not None

    @property
    def talk_seconds(self) -> float:
        if self.answered_at is None or self.ended_at is None:
            return 0.0
        return self.ended_at - self.answered_at


class SimulatedFreeSWITCH:
    def __init__(self, outbound_port: int, clock: Clock | None = None,
                 password: str = "s3cret-ESL", outbound_host: str = "127.0.0.1",
                 dialplan: Path = SHIPPED_DIALPLAN, context: str = "callguard",
                 park_tick: float = 0.02):
        self.outbound_host, self.outbound_port = outbound_host, outbound_port
        self.clock = clock or Clock()
        self.password = password
        self.dialplan = Dialplan.load(dialplan)
        self.context = context
        self.park_tick = park_tick  # wall seconds: async-mode sendmsg runs on the next one
        # CHANNEL_CREATE goes out as the channel is created; a real FreeSWITCH delivers it to
        # the event socket after `socket` has connected (14 ms in the transcripts): a delay
        # (wall seconds) models that.
        self.create_delay = 0.0
        self.blackholed = False
        self.clock_skew_ms = 0  # this PBX's clock against the true one
        self.calls: dict[str, SimChannel] = {}  # live, by uuid
        self.finished: list[SimChannel] = []
        self.violations: list[str] = []
        self.commands: list[str] = []  # every inbound command line received
        self.outbound_commands: list[tuple[str, Command]] = []  # (uuid, command) on sockets
        self._listeners: dict[asyncio.StreamWriter, set[str]] = {}
        self._sessions: set[asyncio.StreamWriter] = set()
        self._tasks: dict[int, tuple[str, asyncio.TimerHandle]] = {}  # scheduler: id -> group
        self._task_ids = itertools.count(1)
        self._names = itertools.count(1)
        self._seq = itertools.count(614)
        self.server: asyncio.AbstractServer | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = await asyncio.start_server(self._inbound, host, port)

    @property
    def esl_port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def esl_url(self) -> str:
        return f"esl://:{self.password}@127.0.0.1:{self.esl_port}"

    async def stop(self) -> None:
        for channel in list(self.calls.values()):
            self.hangup(channel, "NORMAL_CLEARING", quiet=True)
        if self.server:
            self.server.close()
        for writer in list(self._sessions):
            writer.close()

    def drop_esl(self) -> None:
        """Cut every inbound connection, as a restarting FreeSWITCH or a blip would."""
        for writer in list(self._sessions):
            writer.close()

    def blackhole_esl(self) -> None:
        """From now on inbound ESL bytes go nowhere, both ways, and no FIN tells it."""
        self.blackholed = True

    def restore_esl(self) -> None:
        self.blackholed = False
        self.drop_esl()

    # -- frames ----------------------------------------------------------------------------
    def micros(self, pbx_seconds: float | None) -> str:
        if pbx_seconds is None:
            return "0"
        return str((self.clock.epoch_ms(pbx_seconds) + self.clock_skew_ms) * 1000)

    def headers(self, kind: str, channel: SimChannel, **extra: str) -> list[tuple[str, str]]:
        """The recorded leg's headers for `kind`, made this channel's."""
        now = self.micros(self.clock.monotonic())
        times = {
            "Event-Date-Timestamp": now, "Event-Sequence": str(next(self._seq)),
            "Caller-Channel-Created-Time": self.micros(channel.created_at),
            "Caller-Profile-Created-Time": self.micros(channel.created_at),
            "Caller-Channel-Answered-Time": self.micros(channel.answered_at),
            "Caller-Channel-Hangup-Time": self.micros(channel.ended_at),
            "Caller-Destination-Number": channel.dest, "Channel-Destination-Number": channel.dest,
            "Answer-State": channel.state,
            "Channel-Call-State": CALLSTATES[channel.state],
        }
        out = []
        for name, value in TEMPLATES["frames"][kind]:
            if name.startswith("variable_callguard_") or name == "variable_accountcode":
                continue
            if name in times:
                value = times[name]
            else:
                value = value.replace(TEMPLATE_UUID, channel.uuid).replace(TEMPLATE_NAME,
                                                                           channel.name)
            out.append((name, extra.pop(name, value)))
        out += [(f"variable_{k}", v) for k, v in channel.variables.items()]
        return out + list(extra.items())

    def emit(self, kind: str, channel: SimChannel, **extra: str) -> None:
        data = esl.event_frame(self.headers(kind, channel, **extra))
        if channel.myevents and channel.socket_writer and not channel.socket_writer.is_closing():
            channel.socket_writer.write(data)
        if self.blackholed:
            return
        for writer, names in list(self._listeners.items()):
            if kind in names and not writer.is_closing():
                writer.write(data)

    # -- inbound ESL server ------------------------------------------------------------
    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._sessions.add(writer)
        if not self.blackholed:
            writer.write(esl.frame("auth/request"))
        parser, authed = esl.CommandReader(), False
        try:
            while data := await reader.read(65536):
                if self.blackholed:
                    continue
                for command in parser.feed(data):
                    self.commands.append(command.line)
                    word, _, rest = command.line.partition(" ")
                    if word == "auth":
                        if rest != self.password:
                            writer.write(reply("-ERR invalid") + notice())
                            return
                        authed = True
                        writer.write(reply("+OK accepted"))
                    elif word == "exit":
                        writer.write(reply("+OK bye") + notice())
                        return
                    elif not authed:
                        writer.write(reply("-ERR command not found"))
                    elif word == "event":
                        kind, *names = rest.split()
                        if kind != "plain":
                            self.violations.append(f"ESL: event {kind} (callguard parses plain)")
                        self._listeners[writer] = set(names)
                        writer.write(reply(f"+OK event listener enabled {kind}"))
                    elif word == "api":
                        writer.write(api_response(self.api(rest)))
                    else:
                        self.violations.append(f"ESL: unknown command {command.line!r}")
                        writer.write(reply("-ERR command not found"))
        except (ConnectionError, esl.ProtocolError) as exc:
            self.violations.append(f"ESL: {exc}") if isinstance(exc, esl.ProtocolError) else None
        finally:
            self._sessions.discard(writer)
            self._listeners.pop(writer, None)
            writer.close()

    def api(self, line: str) -> str:
        """One api command, as mod_commands answers it."""
        name, *args = line.split(" ")
        channel = self.calls.get(args[0]) if args else None
        if name == "status":
            return TEMPLATES["status"]
        if name == "show" and args == ["channels", "as", "json"]:
            if not self.calls:
                return '{"row_count":0}'
            rows = [self._row(c) for c in self.calls.values()]
            return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))
        if name == "sched_hangup" and len(args) >= 2:
            seconds = self._seconds(args[0])
            if seconds is not None:
                cause = args[2] if len(args) > 2 else "ALLOTTED_TIMEOUT"
                self._schedule(args[1], seconds, self._kill, args[1], cause)
            return "+OK\n"
        if name == "sched_del" and len(args) == 1:
            doomed = [i for i, (group, _) in self._tasks.items()
                      if group == args[0] or str(i) == args[0]]
            for task in doomed:
                self._tasks.pop(task)[1].cancel()
            return f"+OK Deleted: {len(doomed)}\n"
        if name == "uuid_kill" and args:
            if channel is None:
                return "-ERR No such channel!\n"
            cause = args[1] if len(args) > 1 else "NORMAL_CLEARING"
            asyncio.get_running_loop().call_later(0.001, self._kill, channel.uuid, cause)
            return "+OK\n"
        if name == "uuid_dump" and args:
            if channel is None:
                return "-ERR No such channel!\n"
            return json.dumps(dict(self.headers("CHANNEL_DATA", channel)))
        if name == "uuid_getvar" and len(args) == 2:
            if channel is None:
                return "-ERR No such channel!\n"
            return channel.variables.get(args[1], "_undef_")
        self.violations.append(f"ESL: api {line!r} not simulated")
        return f"-ERR {name} Command not found!\n"

    def _seconds(self, text: str) -> int | None:
        if not (text.startswith("+") and text[1:].isdigit()):
            self.violations.append(f"ESL: scheduler time {text!r} (whole seconds, +N)")
            return None
        return int(text[1:])

    def _schedule(self, group: str, seconds: int, callback, *args) -> int:
        task = next(self._task_ids)

        def fire():
            self._tasks.pop(task, None)
            callback(*args)

        # switch_scheduler_add_task: runtime = the current epoch second + N; the task
        # thread runs it once that second has begun, so up to a second early.
        now = self.clock.epoch_ms(self.clock.monotonic()) / 1000
        delay = int(now) + seconds - now
        handle = asyncio.get_running_loop().call_later(self.clock.real(delay), fire)
        self._tasks[task] = (group, handle)
        return task

    def _row(self, channel: SimChannel) -> dict[str, str]:
        row = dict(TEMPLATES["show_channels_row"])
        row.update(uuid=channel.uuid, name=channel.name, dest=channel.dest,
                   accountcode=channel.account, callstate=CALLSTATES[channel.state],
                   created_epoch=str(self.clock.epoch_ms(channel.created_at) // 1000))
        return row

    # -- channels ------------------------------------------------------------------------
    def _kill(self, uuid: str, cause: str) -> None:
        channel = self.calls.get(uuid)
        if channel:
            channel.killed = True
            self.hangup(channel, cause)

    def answer(self, channel: SimChannel) -> None:
        if channel.answered_at is None and not channel.ended.is_set():
            channel.answered_at = self.clock.monotonic()
            channel.state = "answered"
            self.emit("CHANNEL_ANSWER", channel)

    def hangup(self, channel: SimChannel, cause: str, quiet: bool = False) -> None:
        if channel.ended.is_set():
            return
        if channel.talk:
            channel.talk.cancel()
        for task in [i for i, (group, _) in self._tasks.items() if group == channel.uuid]:
            self._tasks.pop(task)[1].cancel()
        channel.ended_at = self.clock.monotonic()
        channel.cause, channel.state = cause, "hangup"
        self.calls.pop(channel.uuid, None)
        if channel.socket_writer and not channel.socket_writer.is_closing():
            # nolinger: the socket application says goodbye and closes at the hangup.
            channel.socket_writer.write(notice(("Controlled-Session-UUID", channel.uuid),
                                               ("Content-Disposition", "disconnect")))
            channel.socket_writer.close()
        self.finished.append(channel)
        channel.ended.set()
        if quiet:
            return
        talk_ms = 0 if channel.answered_at is None else int(
            (channel.ended_at - channel.answered_at) * 1000)
        q850 = CAUSES.get(cause, 16)
        self.emit("CHANNEL_HANGUP_COMPLETE", channel, **{
            "Hangup-Cause": cause, "variable_hangup_cause": cause,
            "variable_hangup_cause_q850": str(q850 if q850 <= 127 else 16),
            "variable_billsec": str(-(-talk_ms // 1000)), "variable_billmsec": str(talk_ms),
            "variable_billusec": str(talk_ms * 1000)})

    async def call(self, account: str, dest: str, ring: float = 2.0, talk: float = 30.0,
                   variables: dict[str, str] | None = None,
                   answered: bool = False) -> SimChannel:
        """One call entering the dialplan's context; returns when it has ended. `answered`:
        the caller was answered before (an IVR in front)."""
        channel = SimChannel(str(uuidlib.uuid4()), f"sofia/internal/{next(self._names)}@pbx1",
                             account, dest, {"accountcode": account, **(variables or {})},
                             created_at=self.clock.monotonic())
        self.calls[channel.uuid] = channel
        if self.create_delay:
            asyncio.get_running_loop().call_later(self.create_delay, self.emit,
                                                  "CHANNEL_CREATE", channel)
        else:
            self.emit("CHANNEL_CREATE", channel)
        if answered:
            self.answer(channel)
        actions = self.dialplan.hunt(self.context, self._fields(channel), channel.variables)
        while actions and not channel.ended.is_set():
            app, data = actions.pop(0)
            data = expand(data, {**channel.variables, "destination_number": channel.dest,
                                 "uuid": channel.uuid})
            if app == "set":
                name, _, value = data.partition("=")
                channel.variables[name] = value
            elif app == "unset":
                channel.variables.pop(data, None)
            elif app == "socket":
                await self._socket(channel, data)
            elif app == "transfer":
                number, _, context = data.partition(" XML ")
                channel.dest = number.strip()
                actions = self.dialplan.hunt(context.strip(), self._fields(channel),
                                             channel.variables)
            elif app == "bridge":
                channel.bridged = True
                try:  # the far end rings, unless the call ends first
                    await asyncio.wait_for(channel.ended.wait(), self.clock.real(ring))
                    break
                except TimeoutError:
                    pass
                self.answer(channel)
                channel.talk = asyncio.get_running_loop().call_later(
                    self.clock.real(talk), self.hangup, channel, "NORMAL_CLEARING")
                await channel.ended.wait()
            elif app == "hangup":
                self.hangup(channel, data or "NORMAL_CLEARING")
            else:
                self.violations.append(f"dialplan: application {app!r} not simulated")
        # "executed the last dialplan instruction, hanging up"
        self.hangup(channel, "NORMAL_CLEARING")
        return channel

    def _fields(self, channel: SimChannel) -> dict[str, str]:
        return {"destination_number": channel.dest, "caller_id_number": "sipp",
                "uuid": channel.uuid}

    # -- the socket application (outbound ESL) ---------------------------------------------
    async def _socket(self, channel: SimChannel, data: str) -> None:
        """Connect to the outbound server and obey it until the connection ends; every
        way it ends, the dialplan goes on (nothing listening included)."""
        host_port, *mode = data.split()
        if mode not in (["async", "full"], ["full"]):
            self.violations.append(f"socket: mode {' '.join(mode)!r}")
        started = time.perf_counter()
        try:
            # The shipped address (8084) stands for wherever this test's server listens.
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.outbound_host, self.outbound_port), 5.0)
        except (OSError, TimeoutError):
            log.info("socket %s: connection refused; the dialplan goes on", host_port)
            return
        channel.socket_writer = writer
        parser, queued = esl.CommandReader(), []
        tick = asyncio.ensure_future(self._park(channel, queued))
        try:
            connected = False
            while data := await reader.read(65536):
                for command in parser.feed(data):
                    if not connected:
                        if command.line != "connect":
                            self.violations.append(f"outbound: {command.line!r} before connect")
                            return
                        connected = True
                        writer.write(self._connect_reply(channel, mode))
                    elif not self._outbound_command(channel, command, writer, queued):
                        return
        except (ConnectionError, esl.ProtocolError):
            pass
        finally:
            tick.cancel()
            channel.setup_latency = time.perf_counter() - started
            channel.socket_writer = None
            if not writer.is_closing():
                writer.write(notice(("Controlled-Session-UUID", channel.uuid),
                                    ("Content-Disposition", "disconnect")))
                writer.close()

    def _connect_reply(self, channel: SimChannel, mode: list[str]) -> bytes:
        headers = self.headers("CHANNEL_DATA", channel)
        headers = [(n, v) for n, v in headers if n not in (
            "Content-Type", "Reply-Text", "Socket-Mode", "Control")]
        headers += [("Content-Type", "command/reply"), ("Reply-Text", "+OK\n"),
                    ("Socket-Mode", "async" if "async" in mode else "static"),
                    ("Control", "full")]
        return "".join(f"{n}: {esl.url_encode(v)}\n" for n, v in headers).encode() + b"\n"

    def _outbound_command(self, channel, command: esl.Command, writer, queued) -> bool:
        """Obey one command on the outbound connection; False ends it."""
        line = command.line
        self.outbound_commands.append((channel.uuid, command))
        if line == "myevents":
            channel.myevents = True
            writer.write(reply("+OK Events Enabled"))
        elif line in ("linger", "nolinger"):
            writer.write(reply("+OK will linger" if line == "linger" else "+OK will not linger"))
        elif line == "sendmsg":
            kind = command.headers.get("call-command")
            if kind not in ("execute", "hangup"):
                self.violations.append(f"outbound: sendmsg {command.headers!r}")
            writer.write(reply("+OK"))
            queued.append(command.headers)  # async mode: the channel runs it on its next tick
        elif line.startswith("api "):
            writer.write(api_response(self.api(line[4:])))
        elif line == "exit":
            writer.write(reply("+OK bye"))
            return False
        else:
            self.violations.append(f"outbound: unknown command {line!r}")
            writer.write(reply("-ERR command not found"))
        return True

    async def _park(self, channel: SimChannel, queued: list[dict[str, str]]) -> None:
        """The socket application's park loop: queued messages run on its ticks. Those
        still queued when the connection ends are not run (the safe assumption)."""
        while not channel.ended.is_set():
            await asyncio.sleep(self.park_tick)
            while queued and not channel.ended.is_set():
                message = queued.pop(0)
                if message.get("call-command") == "hangup":
                    self.hangup(channel, message.get("hangup-cause", "NORMAL_CLEARING"))
                    return
                app, arg = message.get("execute-app-name", ""), message.get("execute-app-arg", "")
                extra = {"Application": app, "Application-Data": arg,
                         "Application-UUID": str(uuidlib.uuid4())}
                self.emit("CHANNEL_EXECUTE", channel, **extra)
                if app in ("set", "multiset"):
                    # multiset: space-separated, or "^^X" then X-separated (mod_dptools)
                    if app == "multiset" and arg.startswith("^^") and len(arg) > 2:
                        pairs = arg[3:].split(arg[2])
                    else:
                        pairs = arg.split(" ") if app == "multiset" else [arg]
                    for pair in pairs:
                        name, _, value = pair.partition("=")
                        channel.variables[name] = value
                else:
                    self.violations.append(f"outbound: execute {app!r} not simulated")
                self.emit("CHANNEL_EXECUTE_COMPLETE", channel, **extra,
                          **{"Application-Response": "_none_"})
