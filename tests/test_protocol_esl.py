"""ESL protocol (callguard.protocol.esl) against the recorded FreeSWITCH 1.10.12 transcripts,
hostile bytes, and the outbound server and inbound client on real sockets."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callguard.adapters import freeswitch
from callguard.adapters.esl_client import ESLClient, ESLError
from callguard.engine import state
from callguard.protocol import esl
from callguard.protocol.errors import ProtocolError

from engine_helpers import prepaid, setup_plan, snapshot
from freeswitch_rig import ACCT, PREMIUM, fs_rig, run, until
from fs_transcripts import (
    FROM,
    TO,
    chunks,
    conns,
    load,
    names,
    raw_frames,
    split,
    stream,
    streams,
)

FROM_STREAMS = streams(FROM)
Parsed = list[esl.Frame | esl.Event]
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def parse(pieces: Iterable[bytes], reader: esl.ESLReader | None = None) -> Parsed:
    reader = reader or esl.ESLReader()
    out: Parsed = []
    for piece in pieces:
        out += reader.feed(piece)
    return out


def outer_type(raw: bytes) -> str:
    return re.search(rb"^Content-Type: (.*)$", raw.split(b"\n\n")[0], re.M).group(1).decode()


def pairs(name: str, conn: str) -> list[tuple[bytes, esl.Frame | esl.Event]]:
    """(recorded frame bytes, parsed message) of one FreeSWITCH->client stream."""
    data = stream(name, conn, FROM)
    parsed = parse([data])
    frames = raw_frames(data)
    assert len(frames) == len(parsed)
    return list(zip(frames, parsed, strict=True))


def plain_events() -> list[tuple[str, bytes, esl.Event]]:
    return [(name, raw, m) for name, conn in FROM_STREAMS for raw, m in pairs(name, conn)
            if outer_type(raw) == "text/event-plain"]


def messages(name: str, conn: str) -> Parsed:
    return parse(chunks(name, conn, FROM))


def connect_reply(name: str = "outbound-socket.jsonl") -> bytes:
    data = stream(name, "outbound", FROM)
    return data[:data.index(b"\n\n") + 2]


def raw_lines(block: bytes) -> list[tuple[str, str]]:
    """Header lines as recorded (duplicates kept), values still URL-encoded."""
    return [tuple(line.split(": ", 1)) for line in block.decode("ascii").split("\n")]


# --- replaying every transcript --------------------------------------------------------------


@pytest.mark.parametrize(("name", "conn"), FROM_STREAMS)
def test_every_stream_parses_whole_in_its_chunks_and_byte_by_byte(name, conn):
    """Each recorded FreeSWITCH->client stream parses to the same frames however it is cut,
    and ends on a frame boundary."""
    data = stream(name, conn, FROM)
    whole = parse([data])
    assert parse(chunks(name, conn, FROM)) == whole
    assert parse(data[i:i + 1] for i in range(len(data))) == whole
    frames = raw_frames(data)
    assert len(whole) == len(frames) and sum(map(len, frames)) == len(data)


@pytest.mark.parametrize(("name", "conn"), FROM_STREAMS)
@settings(max_examples=15)
@given(cuts=st.lists(st.integers(min_value=0), max_size=60))
def test_every_stream_parses_the_same_split_anywhere(name, conn, cuts):
    """Arbitrary cuts (hypothesis) give the frames the recorded chunks give."""
    data = stream(name, conn, FROM)
    assert parse(split(data, cuts)) == parse([data])


# The README's checker table: TCP chunks (eof markers included) and frames (FreeSWITCH's
# plus the commands sent to it) per file.
CHECKER = {
    "event-json.jsonl": (20, 21), "inbound-auth.jsonl": (23, 20),
    "inbound-bridged-call.jsonl": (19, 30), "inbound-events-call.jsonl": (33, 36),
    "inbound-interleave.jsonl": (782, 950), "inbound-sip-call.jsonl": (15, 14),
    "outbound-socket-continue-async-full-close.jsonl": (44, 53),
    "outbound-socket-continue-async-full-exit.jsonl": (44, 55),
    "outbound-socket-continue-async-full-linger-exit.jsonl": (44, 57),
    "outbound-socket-continue-async-full-nolinger-exit.jsonl": (47, 57),
    "outbound-socket-continue-full-close.jsonl": (41, 52),
    "outbound-socket-continue-full-exit.jsonl": (43, 54),
    "outbound-socket-continue-full-linger-close.jsonl": (43, 54),
    "outbound-socket-continue-no-server.jsonl": (32, 41),
    "outbound-socket-continue-socket-last-async-full-exit.jsonl": (37, 42),
    "outbound-socket.jsonl": (27, 33),
}


def test_every_fixture_is_covered_by_the_checker_table():
    """No transcript is left out of the replay."""
    assert names() == sorted(CHECKER)


@pytest.mark.parametrize("name", sorted(CHECKER))
def test_frame_counts_per_file_match_the_checker(name):
    """ESLReader finds as many frames, and CommandReader as many commands, as the README's
    strict checker did."""
    frames = sum(len(messages(name, conn)) for conn in conns(name))
    commands = sum(len(esl.CommandReader().feed(stream(name, conn, TO))) for conn in conns(name))
    assert (len(load(name)), frames + commands) == CHECKER[name]


def kind_of(raw: bytes, message) -> str:
    if isinstance(message, esl.Event):
        return f"{outer_type(raw)} {message.name}"
    if message.content_type == "command/reply" and "Unique-ID" in message.headers:
        return f"command/reply (connect, {len(message.headers)} headers)"
    return message.content_type


def test_counts_per_content_type_match_the_checker_table():
    """Over all 16 files, the frames per content type (and event name) are the README's."""
    counts = Counter(kind_of(raw, m) for name, conn in FROM_STREAMS for raw, m in
                     pairs(name, conn))
    assert counts == {
        "api/response": 132, "auth/request": 28, "command/reply": 364,
        "command/reply (connect, 105 headers)": 9, "text/disconnect-notice": 38,
        "text/event-json BACKGROUND_JOB": 1, "text/event-json CHANNEL_ANSWER": 2,
        "text/event-json CHANNEL_HANGUP_COMPLETE": 2, "text/event-plain BACKGROUND_JOB": 1,
        "text/event-plain CHANNEL_ANSWER": 23, "text/event-plain CHANNEL_BRIDGE": 1,
        "text/event-plain CHANNEL_CREATE": 25, "text/event-plain CHANNEL_EXECUTE": 59,
        "text/event-plain CHANNEL_EXECUTE_COMPLETE": 60, "text/event-plain CHANNEL_HANGUP": 2,
        "text/event-plain CHANNEL_HANGUP_COMPLETE": 26, "text/event-plain CHANNEL_PARK": 16,
        "text/event-plain CHANNEL_STATE": 2, "text/event-plain CHANNEL_UNBRIDGE": 1,
        "text/event-plain CHANNEL_UNPARK": 1, "text/event-plain CUSTOM": 270,
        "text/event-plain HEARTBEAT": 1,
    }
    commands = sum(len(esl.CommandReader().feed(stream(name, conn, TO)))
                   for name in names() for conn in conns(name))
    assert commands == 505


def test_event_json_frames_in_wire_order():
    """event-json.jsonl, frame by frame as its notes list it."""
    assert [kind_of(raw, m) for raw, m in pairs("event-json.jsonl", "inbound")] == [
        "auth/request", "command/reply", "command/reply", "api/response",
        "text/event-json CHANNEL_ANSWER", "text/event-json CHANNEL_ANSWER", "api/response",
        "text/event-json CHANNEL_HANGUP_COMPLETE", "text/event-json CHANNEL_HANGUP_COMPLETE",
        "command/reply", "command/reply", "text/event-json BACKGROUND_JOB", "command/reply",
        "text/disconnect-notice",
    ]


def test_outbound_socket_frames_in_wire_order():
    """outbound-socket.jsonl's outbound connection, frame by frame as its notes list it."""
    plain = "text/event-plain "
    assert [kind_of(raw, m) for raw, m in pairs("outbound-socket.jsonl", "outbound")] == [
        "command/reply (connect, 105 headers)", "command/reply", "command/reply",
        "command/reply", plain + "CHANNEL_PARK", plain + "CHANNEL_EXECUTE",
        plain + "CHANNEL_EXECUTE_COMPLETE", "command/reply", plain + "CHANNEL_HANGUP",
        plain + "CHANNEL_UNPARK", plain + "CHANNEL_EXECUTE_COMPLETE", plain + "CHANNEL_STATE",
        plain + "CHANNEL_STATE", plain + "CHANNEL_HANGUP_COMPLETE", "text/disconnect-notice",
        "command/reply", "text/disconnect-notice",
    ]


# --- what the frames say ---------------------------------------------------------------------


def test_inbound_greeting_and_auth():
    """auth/request comes unprompted; `auth ClueCon` gets `+OK accepted`, a wrong password
    `-ERR invalid` and the goodbye."""
    ok = messages("inbound-auth.jsonl", "conn1-auth-ok")
    assert type(ok[0]) is esl.AuthRequest and ok[0].headers == {"Content-Type": "auth/request"}
    assert type(ok[1]) is esl.CommandReply and (ok[1].text, ok[1].ok) == ("+OK accepted", True)
    wrong = messages("inbound-auth.jsonl", "conn2-auth-wrong")
    assert (wrong[1].text, wrong[1].ok) == ("-ERR invalid", False)
    assert type(wrong[2]) is esl.DisconnectNotice and wrong[2].body == GOODBYE
    early = messages("inbound-auth.jsonl", "conn3-command-before-auth")
    assert early[1].text == "-ERR command not found" and early[2].text == "+OK accepted"


def test_connect_reply_is_the_channel_data_decoded():
    """The outbound connect reply: 105 URL-decoded headers, Reply-Text `+OK\\n`, no body."""
    [reply] = parse([connect_reply()])
    assert type(reply) is esl.CommandReply and reply.body == b""
    assert len(reply.headers) == 105
    assert reply.get("Reply-Text") == "+OK\n" and reply.text == "+OK" and reply.ok
    assert reply.get("Socket-Mode") == "async" and reply.get("Control") == "full"
    assert reply.get("Unique-ID") == "f0f51409-cc87-4a41-bdf6-6f1b0f315316"
    assert reply.get("variable_accountcode") == "41440000001"
    assert reply.get("Caller-Destination-Number") == "9998"
    assert reply.get("Channel-Callee-ID-Name") == "Outbound Call"
    assert reply.get("FreeSWITCH-IPv6") == "2001:db8::10"
    assert reply.get("Event-Date-GMT") == "Sat, 21 Nov 2026 04:30:35 GMT"
    assert reply.get("variable_current_application_data") == "127.0.0.1:8084 async full"
    assert list(reply.headers)[-4:] == ["Content-Type", "Reply-Text", "Socket-Mode", "Control"]


def test_static_mode_connect_reply():
    """`socket ... full` (no async) says Socket-Mode: static."""
    [reply] = parse([connect_reply("outbound-socket-continue-full-exit.jsonl")])
    assert reply.get("Socket-Mode") == "static" and reply.text == "+OK"


def test_api_bodies_with_and_without_a_trailing_newline():
    """api/response bodies are kept byte-exact: `+OK <uuid>\\n`, uuid_getvar's bare value."""
    replies = [m for m in messages("inbound-events-call.jsonl", "inbound")
               if isinstance(m, esl.ApiResponse)]
    bodies = [m.body for m in replies]
    assert bodies[0] == b"+OK f7d72fb1-c5d5-4fe4-bd84-d1591ed9e661\n" and replies[0].ok
    assert b"41440000001" in bodies  # uuid_getvar accountcode: no newline
    getvar = replies[bodies.index(b"41440000001")]
    assert getvar.text == "41440000001" and getvar.get("Content-Length") == "11"
    assert b"+OK Deleted: 1\n" in bodies and b"+OK Added: 4\n" in bodies
    assert bodies[-2:] == [b"-ERR No such channel!\n", b"-ERR nosuchcommand Command not found!\n"]
    assert not replies[-1].ok
    values = [m.body for m in messages("outbound-socket-continue-async-full-exit.jsonl",
                                       "inbound-monitor") if isinstance(m, esl.ApiResponse)]
    assert b"ALLOW" in values and b"yes" in values


def test_show_channels_as_json_parses():
    """`show channels as json` is one compact JSON object with its rows."""
    import json

    body = next(m.body for m in messages("inbound-events-call.jsonl", "inbound")
                if isinstance(m, esl.ApiResponse) and m.body.startswith(b"{"))
    data = json.loads(body)
    assert data["row_count"] == 2 and len(data["rows"]) == 2
    assert data["rows"][0]["uuid"] == "f7d72fb1-c5d5-4fe4-bd84-d1591ed9e661"
    assert {row["accountcode"] for row in data["rows"]} == {"41440000001"}


def test_background_job_plain_event_with_its_inner_body():
    """A plain BACKGROUND_JOB carries its output after an inner Content-Length."""
    [job] = [m for m in messages("inbound-bridged-call.jsonl", "inbound")
             if isinstance(m, esl.Event) and m.name == "BACKGROUND_JOB"]
    assert job.body == "+OK 11bc6b48-6d2f-4ef5-9e8b-107bd5131e64\n"
    assert job.get("Job-Command") == "originate"
    assert job.get("Job-Command-Arg") == "loopback/9995/billing_test &park"
    assert job.get("Content-Length") == "41"


def test_json_events_and_their_body():
    """text/event-json: values not URL-encoded, `_body` becomes the event's body."""
    events = [m for m in messages("event-json.jsonl", "inbound") if isinstance(m, esl.Event)]
    assert [e.name for e in events] == ["CHANNEL_ANSWER", "CHANNEL_ANSWER",
                                        "CHANNEL_HANGUP_COMPLETE", "CHANNEL_HANGUP_COMPLETE",
                                        "BACKGROUND_JOB"]
    answer = events[0]
    assert answer.unique_id == "7740fce3-fce5-4509-b4e3-ce6b5147472b"
    assert answer.get("variable_accountcode") == "41440000001"
    assert answer.get("FreeSWITCH-IPv6") == "2001:db8::10" and answer.body == ""
    assert events[2].get("Hangup-Cause") == "NORMAL_CLEARING"
    job = events[-1]
    assert job.body.startswith("UP 0 years, 0 days, 0 hours, 3 minutes, ")
    assert "_body" not in job.headers
    assert int(job.get("Content-Length")) == len(job.body.encode()) == 338


def test_disconnect_notices_linger_and_disconnect():
    """Outbound sockets say linger (at hangup, no body) and disconnect (with the goodbye)."""
    notices = [m for m in messages("outbound-socket.jsonl", "outbound")
               if isinstance(m, esl.DisconnectNotice)]
    linger, bye = notices
    uuid = "f0f51409-cc87-4a41-bdf6-6f1b0f315316"
    assert linger.get("Content-Disposition") == "linger" and linger.body == b""
    assert linger.get("Linger-Time") == "-1" and linger.get("Controlled-Session-UUID") == uuid
    assert linger.get("Channel-Name") == "loopback/9998-b"
    assert bye.get("Content-Disposition") == "disconnect" and bye.body == GOODBYE
    inbound = messages("inbound-auth.jsonl", "conn1-auth-ok")[-1]
    assert type(inbound) is esl.DisconnectNotice and "Content-Disposition" not in inbound.headers


def test_execute_complete_names_the_set_it_finished():
    """The CHANNEL_EXECUTE_COMPLETE the outbound server waits for carries the set's data."""
    [done] = [m for m in messages("outbound-socket.jsonl", "outbound")
              if isinstance(m, esl.Event) and m.name == "CHANNEL_EXECUTE_COMPLETE"
              and m.get("Application") == "set"]
    assert done.get("Application-Data") == "callguard_result=ALLOW"
    assert done.unique_id == "f0f51409-cc87-4a41-bdf6-6f1b0f315316"


# --- the simulator's encoder against the recorded bytes ---------------------------------------


def test_url_encode_matches_freeswitch_on_every_recorded_value():
    """For every header of every plain event and connect reply, url_encode(decoded) is
    exactly what FreeSWITCH wrote."""
    blocks = [raw.split(b"\n\n")[1] for _, raw, _ in plain_events()]
    blocks += [connect_reply(name)[:-2] for name in names() if "outbound" in conns(name)]
    seen = 0
    for block in blocks:
        for name, value in raw_lines(block):
            assert esl.url_encode(esl.url_decode(value)) == value, (name, value)
            seen += 1
    assert seen > 20_000


def hangup_cause_twice(raw: bytes) -> bool:
    return raw.count(b"\nHangup-Cause: ") == 2


def test_plain_events_round_trip_through_event_frame():
    """event_frame(headers, body) rebuilds every plain event's bytes exactly, but for the
    two kinds the next tests explain."""
    exact = 0
    for _, raw, event in plain_events():
        if event.body or hangup_cause_twice(raw):
            continue
        assert esl.event_frame(list(event.headers.items()), event.body) == raw
        exact += 1
    assert exact == 461


def test_hangup_complete_repeats_hangup_cause_and_the_parser_keeps_one():
    """FreeSWITCH writes Hangup-Cause twice (same value) in CHANNEL_HANGUP_COMPLETE; a dict
    keeps the first, so that event round-trips only with the second line put back."""
    events = [(raw, e) for _, raw, e in plain_events() if hangup_cause_twice(raw)]
    assert len(events) == 26
    assert {e.name for _, e in events} == {"CHANNEL_HANGUP_COMPLETE"}
    for raw, event in events:
        block = raw.split(b"\n\n")[1]
        lines = raw_lines(block)
        positions = [i for i, (n, _) in enumerate(lines) if n == "Hangup-Cause"]
        assert lines[positions[0]] == lines[positions[1]]
        headers = list(event.headers.items())
        headers.insert(positions[1], ("Hangup-Cause", event.get("Hangup-Cause")))
        assert esl.event_frame(headers) == raw


def test_background_job_round_trips_without_its_inner_content_length():
    """With the inner Content-Length left to event_frame, the BACKGROUND_JOB is rebuilt
    exactly: that header goes last, before the blank line and the body."""
    [(_, raw, job)] = [p for p in plain_events() if p[2].body]
    headers = [(n, v) for n, v in job.headers.items() if n != "Content-Length"]
    assert esl.event_frame(headers, job.body) == raw


def test_background_job_round_trips_from_the_headers_the_reader_returns():
    """The parser's Event fed back to event_frame gives FreeSWITCH's BACKGROUND_JOB bytes."""
    [(_, raw, job)] = [p for p in plain_events() if p[2].body]
    assert esl.event_frame(list(job.headers.items()), job.body) == raw


def recorded_commands() -> set[bytes]:
    out = set()
    for name in names():
        for conn in conns(name):
            data = stream(name, conn, TO)
            out |= {part + b"\n\n" for part in data.split(b"\n\n") if part}
    return out


def test_commands_are_byte_for_byte_what_was_sent_to_freeswitch():
    """connect, sendmsg set/hangup, auth and api uuid_kill as recorded going to FreeSWITCH."""
    sent = recorded_commands()
    uuid = "f7d72fb1-c5d5-4fe4-bd84-d1591ed9e661"
    ours = [
        esl.command("connect"), esl.command("myevents"), esl.command("exit"),
        esl.sendmsg_execute("set", "callguard_result=ALLOW"),
        esl.sendmsg_hangup("CALL_REJECTED"), esl.auth("ClueCon"),
        esl.api("uuid_kill", uuid, "NORMAL_CLEARING"), esl.api("sched_del", uuid),
        esl.api("show", "channels", "as", "json"),
        esl.api("uuid_getvar", uuid, "accountcode"),
        esl.command("event plain CUSTOM protocol::probe"),
    ]
    for data in ours:
        assert data in sent, data
    assert esl.sendmsg_execute("set", "callguard_result=ALLOW") == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
        b"execute-app-arg: callguard_result=ALLOW\nevent-lock: true\n\n")
    assert esl.sendmsg_hangup("CALL_REJECTED") == (
        b"sendmsg\ncall-command: hangup\nhangup-cause: CALL_REJECTED\n\n")


def test_command_reader_reads_the_recorded_commands():
    """The simulator's CommandReader splits the recorded client streams into the commands."""
    data = stream("outbound-socket.jsonl", "outbound", TO)
    commands = esl.CommandReader().feed(data)
    assert [c.line for c in commands] == ["connect", "myevents", "linger", "sendmsg",
                                          "sendmsg", "exit"]
    assert commands[3].headers == {"call-command": "execute", "execute-app-name": "set",
                                   "execute-app-arg": "callguard_result=ALLOW",
                                   "event-lock": "true"}
    assert commands[4].headers == {"call-command": "hangup", "hangup-cause": "CALL_REJECTED"}


# --- bad input -------------------------------------------------------------------------------


def feed_error(data: bytes, reader: esl.ESLReader | None = None) -> str:
    with pytest.raises(ProtocolError) as caught:
        (reader or esl.ESLReader()).feed(data)
    return str(caught.value)


API = b"Content-Type: api/response\n"


@pytest.mark.parametrize("garbage", [
    b"hello world\n\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\n\n", b"\n\n", b": x\n\n",
    b"Content Type: api/response\n\n", b"\x00\x01\x02\n\n",
])
def test_garbage_is_a_protocol_error(garbage):
    """Bytes that are no header block are refused, not skipped."""
    feed_error(garbage)


@pytest.mark.parametrize("line", [b"X Y: z", b"X/Y: z", b"no colon", b": z", b" X: z"])
def test_a_bad_header_line_in_a_typed_frame(line):
    """Header names are tokens: a frame with a Content-Type and one bad line is refused."""
    assert "not a header line" in feed_error(API + line + b"\n\n")


def test_a_frame_without_content_type():
    """Every FreeSWITCH frame says what it is."""
    assert "Content-Type" in feed_error(b"Reply-Text: +OK\n\n")
    assert "Content-Type" in feed_error(b"Content-Length: 2\n\nok")


@pytest.mark.parametrize("length", [b"abc", b"-1", b"+4", b"4.0", b" 4", b"0x10", b"",
                                    b"1" * 19])
def test_bad_content_length(length):
    """Content-Length must be plain decimal digits."""
    assert "Content-Length" in feed_error(API + b"Content-Length: " + length + b"\n\n+OK\n")


def test_huge_content_length_is_refused_before_buffering():
    """`Content-Length: 2000000000` fails as soon as the header block is complete."""
    reader = esl.ESLReader()
    feed_error(API + b"Content-Length: 2000000000\n\n", reader)
    event = b"Content-Length: 2000000\nContent-Type: text/event-plain\n\n"
    assert "more than" in feed_error(event)  # beyond max_event (1 MB)
    assert esl.ESLReader(max_body=10).feed(API + b"Content-Length: 10\n\n") == []
    feed_error(API + b"Content-Length: 11\n\n", esl.ESLReader(max_body=10))


def test_truncated_body_waits_for_the_rest():
    """Half a body is no error and no frame; the rest completes it."""
    reader = esl.ESLReader()
    assert reader.feed(API + b"Content-Length: 11\n\n+OK ") == []
    assert reader.feed(b"") == []
    assert reader.feed(b"12345") == []
    reply, greeting = reader.feed(b"6\nContent-Type: auth/request\n\n")
    assert reply.body == b"+OK 123456\n" and type(greeting) is esl.AuthRequest


def test_oversized_event_beyond_max_event():
    """An event body larger than max_event is refused, whatever its content."""
    body = b"Event-Name: CUSTOM\nX: " + b"a" * 200 + b"\n\n"
    frame = b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body
    assert len(esl.ESLReader(max_event=len(body)).feed(frame)) == 1
    feed_error(frame, esl.ESLReader(max_event=len(body) - 1))


def test_a_header_line_without_newline_fails_early():
    """A line longer than max_line is refused once that many bytes are in, not after MBs."""
    reader = esl.ESLReader()
    reader.feed(b"Content-Type: api/response\nX-Long: ")
    fed = 0
    with pytest.raises(ProtocolError, match="line"):
        while fed < 1 << 20:
            reader.feed(b"a" * 1024)
            fed += 1024
    assert fed <= reader.max_line + 1024


def test_endless_header_lines_fail_at_max_head():
    """Short lines with no blank line ever: refused after max_head bytes."""
    reader = esl.ESLReader(max_head=4096)
    fed = 0
    with pytest.raises(ProtocolError, match="header block"):
        while fed < 1 << 20:
            reader.feed(b"X-A: b\n" * 100)
            fed += 700
    assert fed <= 4096 + 700


def test_too_many_header_lines():
    """More than max_headers lines in one block is refused."""
    block = API + b"".join(b"X-%d: v\n" % i for i in range(30)) + b"\n"
    assert len(esl.ESLReader(max_headers=31).feed(block)) == 1
    assert "header lines" in feed_error(block, esl.ESLReader(max_headers=30))


@pytest.mark.parametrize("value", [b"100%", b"100% sure", b"%4", b"%4G", b"%ZZ", b"a%%41",
                                   b"%"])
def test_stray_percent_in_a_value(value):
    """FreeSWITCH escapes every % it sends: a stray one is a protocol error."""
    assert "URL encoding" in feed_error(b"Content-Type: command/reply\nReply-Text: " + value
                                        + b"\n\n")


def test_valid_escapes_decode_either_case():
    """%2B, %0A and lower-case hex decode; %25 is a literal %."""
    [reply] = esl.ESLReader().feed(
        b"Content-Type: command/reply\nReply-Text: %2bOK%0a\nX: 100%25\n\n")
    assert reply.get("Reply-Text") == "+OK\n" and reply.get("X") == "100%"


@pytest.mark.parametrize("raw", ["caf\u00e9".encode(), b"\xff\xfe", "\u2028".encode()])
def test_raw_non_ascii_bytes_in_headers(raw):
    """FreeSWITCH URL-encodes bytes above 0x7E: raw ones are refused."""
    assert "non-ASCII" in feed_error(b"Content-Type: command/reply\nReply-Text: " + raw
                                     + b"\n\n")


def plain(body: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body


def json_event(body: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body


@pytest.mark.parametrize("inner", [b"40", b"42", b"x", b"-41"])
def test_plain_event_with_a_wrong_inner_content_length(inner):
    """The inner Content-Length must be the exact byte count of what follows."""
    body = (b"Event-Name: BACKGROUND_JOB\nContent-Length: " + inner
            + b"\n\n+OK 11bc6b48-6d2f-4ef5-9e8b-107bd5131e64\n")
    assert "inner Content-Length" in feed_error(plain(body))


def test_plain_event_body_must_end_in_a_blank_line_or_carry_a_length():
    """Headers without the blank line, or bytes after them without a length: refused."""
    feed_error(plain(b"Event-Name: CUSTOM\n"))
    feed_error(plain(b"Event-Name: CUSTOM\n\nstray"))
    feed_error(plain(b"Event-Name: CUSTOM\nX: 5%\n\n"))


@pytest.mark.parametrize("body", [b"not json", b"{\"Event-Name\": ", b"[\"CUSTOM\"]",
                                  b"\"CUSTOM\"", b"{\"Event-Name\": \"CUSTOM\", \"n\": 1}",
                                  b"{\"Event-Name\": \"CUSTOM\", \"x\": {\"a\": \"b\"}}",
                                  b"{\"Event-Name\": null}", b"\xff{}"])
def test_json_event_that_is_not_an_object_of_strings(body):
    """A text/event-json body must be one JSON object of strings."""
    assert "JSON event" in feed_error(json_event(body))


@pytest.mark.parametrize("frame", [
    plain(b"Core-UUID: 1f35b8ec\n\n"), plain(b"Event-Name: \n\n"),
    json_event(b'{"Core-UUID":"1f35b8ec"}'), json_event(b'{"Event-Name":""}'),
])
def test_event_without_event_name(frame):
    """Plain or JSON, an event must have an Event-Name."""
    assert "Event-Name" in feed_error(frame)


@pytest.mark.parametrize("bad", ["4144\nexit", "4144\r", "ALLOW\n\nsendmsg", "a\tb", "\x00"])
def test_commands_refuse_line_breaks_and_control_bytes(bad):
    """No argument can smuggle a line (an account code with a newline, say) into a command."""
    for build in (lambda: esl.sendmsg_execute("set", f"callguard_account={bad}"),
                  lambda: esl.sendmsg_hangup(bad), lambda: esl.auth(bad),
                  lambda: esl.api("uuid_kill", bad), lambda: esl.api("uuid_kill", "u", bad),
                  lambda: esl.command(bad), lambda: esl.command("sendmsg", x=bad)):
        with pytest.raises(ProtocolError):
            build()


def test_api_words_may_not_hold_spaces_but_the_last_may():
    """mod_commands splits on spaces: only the last api word is the rest of the line."""
    with pytest.raises(ProtocolError):
        esl.api("uuid_kill", "f7d7 NORMAL_CLEARING", "x")
    with pytest.raises(ProtocolError):
        esl.api("uuid_kill", "", "NORMAL_CLEARING")
    assert esl.api("show", "channels as json") == b"api show channels as json\n\n"


# --- parser bugs found by the tests, fixed ----------------------------------------------------


def test_a_superscript_digit_content_length_is_a_protocol_error():
    """`Content-Length: %C2%B2` is a ProtocolError like any other bad length."""
    feed_error(API + b"Content-Length: %C2%B2\n\nxx")


def test_a_superscript_digit_inner_content_length_is_a_protocol_error():
    """An inner `Content-Length: %C2%B2` is a ProtocolError."""
    feed_error(plain(b"Event-Name: BACKGROUND_JOB\nContent-Length: %C2%B2\n\nxx"))


def test_max_head_holds_for_a_block_that_arrives_whole():
    """A header block longer than max_head is refused even when it comes in one read."""
    block = API + b"".join(b"X-%d: %s\n" % (i, b"a" * 500) for i in range(10)) + b"\n"
    feed_error(block, esl.ESLReader(max_head=1000))


def test_a_value_holding_colon_space_beside_a_line_without_one_keeps_its_pairs():
    """Found by bench/fuzz.py: a line with two ": " and one with ":" alone made as many
    items as lines, and the fast split paired half a value with the next line."""
    [reply] = esl.ESLReader().feed(b"Content-Type: command/reply\n"
                                   b"Reply-Text: +OK Job-UUID: 0db7\nJob:x\n\n")
    assert reply.headers == {"Content-Type": "command/reply",
                             "Reply-Text": "+OK Job-UUID: 0db7", "Job": "x"}


# --- the outbound server against a hostile peer (real sockets) ----------------------------------


@pytest.fixture
def plan(app):
    setup_plan(app)
    prepaid(app, ACCT, balance=50_000_000)
    return app


def our_connect_reply(**replace: bytes) -> bytes:
    """The recorded connect reply, made a call of ACCT to PREMIUM."""
    data = connect_reply().replace(b"variable_accountcode: 41440000001",
                                   b"variable_accountcode: " + ACCT.encode())
    data = data.replace(b"Caller-Destination-Number: 9998",
                        b"Caller-Destination-Number: " + PREMIUM.encode())
    for old, new in replace.items():
        assert old.encode() in data
        data = data.replace(old.encode(), new)
    return data


async def drained(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server drops the connection (EOF or reset), within 5 s."""
    got = b""
    try:
        while data := await asyncio.wait_for(reader.read(65536), 5):
            got += data
    except ConnectionResetError:
        pass
    return got


async def hostile_peer(port: int, send: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5) == b"connect\n\n"
        writer.write(send)
        return await drained(reader)
    finally:
        writer.close()


HOSTILE = {
    "garbage": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n\n\n",
    "huge-content-length": b"Content-Type: command/reply\nReply-Text: %2BOK%0A\n"
                           b"Content-Length: 2000000000\n\n",
    "stray-percent": None,  # filled below: the connect reply with one bad escape
    "reply-without-channel": b"Content-Type: command/reply\nReply-Text: %2BOK%0A\n\n",
    "superscript-content-length": b"Content-Type: command/reply\nContent-Length: %C2%B2\n\n",
}


@pytest.mark.parametrize("case", [
    "garbage", "huge-content-length", "stray-percent", "reply-without-channel",
    "superscript-content-length",
])
def test_outbound_server_drops_a_peer_that_breaks_the_protocol(plan, monkeypatch, case):
    """Garbage, an oversized Content-Length, a bad escape or no channel data instead of the
    connect reply: the server hangs up on that peer, reserves nothing, and the next real call
    is allowed."""
    monkeypatch.setattr(freeswitch, "CONNECT_TIMEOUT", 60.0)  # only the error can drop it
    send = HOSTILE[case] or our_connect_reply(**{
        "Channel-Callee-ID-Name: Outbound%20Call": b"Channel-Callee-ID-Name: Outbound%2GCall"})
    before = snapshot(plan, ACCT)

    async def scenario():
        async with fs_rig(plan) as (sim, [adapter]):
            got = await hostile_peer(adapter.port, send)
            assert b"myevents" not in got and b"sendmsg" not in got
            assert adapter.metrics.registry.get_sample_value(
                "callguard_setup_bad_requests_total", {"pbx": "freeswitch"}) == 1
            await asyncio.sleep(0.05)
            assert adapter.supervisor.sessions == {}
            assert snapshot(plan, ACCT) == before
            assert state.live_sessions(plan.redis, plan.keys, ACCT) == []
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)

    assert run(scenario()).allowed


def test_outbound_server_drops_a_peer_that_stalls_mid_frame(plan, monkeypatch):
    """Half a connect reply, then silence: the connect timer drops the peer; nothing is
    reserved and the next call is allowed."""
    monkeypatch.setattr(freeswitch, "CONNECT_TIMEOUT", 0.3)
    half = our_connect_reply()[:1500]
    before = snapshot(plan, ACCT)

    async def scenario():
        async with fs_rig(plan) as (sim, [adapter]):
            got = await hostile_peer(adapter.port, half)
            assert got == b""
            assert adapter.supervisor.sessions == {}
            assert snapshot(plan, ACCT) == before
            return await sim.call(ACCT, PREMIUM, ring=0.01, talk=0.01)

    assert run(scenario()).allowed


def test_the_doctored_connect_reply_well_encoded_is_authorised(plan, monkeypatch):
    """Control for the tests above: the same reply without the bad escape is a call of ACCT
    that the server authorises (sched_del, sched_hangup, then the multiset), and reserves
    for."""
    monkeypatch.setattr(freeswitch, "DRAIN_TIMEOUT", 0.5)
    before = snapshot(plan, ACCT)

    async def scenario():
        async with fs_rig(plan) as (sim, [adapter]):
            # The login's reconcile closes sessions FreeSWITCH does not show: let it pass.
            await until(lambda: "api show channels as json" in sim.commands, "the reconcile")
            await asyncio.sleep(0.1)
            got = await hostile_peer(adapter.port, our_connect_reply())
            assert got.startswith(b"myevents\n\napi sched_del ")
            assert b"\napi sched_hangup +" in got
            assert b"execute-app-name: multiset\nexecute-app-arg: callguard_result=ALLOW " in got
            assert len(adapter.supervisor.sessions) == 1
            assert snapshot(plan, ACCT)["reserved"] > before["reserved"]

    run(scenario())


# --- the inbound client against a misbehaving ESL server ------------------------------------------


class FakeESL:
    """An ESL server on 127.0.0.1 that logs anyone in, then answers nothing; once `go` is
    set it writes `after_login` on the first connection."""

    def __init__(self, after_login: bytes = b""):
        self.after_login = after_login
        self.go = asyncio.Event()
        self.connections = 0
        self.commands: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    @property
    def url(self) -> str:
        return f"esl://:ClueCon@127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer):
        self.connections += 1
        first = self.connections == 1
        writer.write(b"Content-Type: auth/request\n\n")
        try:
            for reply in (b"+OK accepted", b"+OK event listener enabled plain"):
                self.commands.append(await reader.readuntil(b"\n\n"))
                writer.write(b"Content-Type: command/reply\nReply-Text: " + reply + b"\n\n")
            if first and self.after_login:
                await self.go.wait()  # a write of its own, after the login's replies
                writer.write(self.after_login)
            while data := await reader.read(65536):  # stays open: only the client drops it
                self.commands.append(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def client_of(fake: FakeESL, timeout: float = 0.3):
    client = ESLClient(fake.url, lambda event: None, timeout=timeout, keepalive=60)
    return client, asyncio.ensure_future(client.run())


def test_inbound_client_drops_and_reconnects_on_garbage():
    """Garbage from the ESL server after login ends that session; the client logs in again."""

    async def scenario():
        async with FakeESL(after_login=b"\x00garbage line\n\n") as fake:
            client, task = client_of(fake)
            try:
                await asyncio.wait_for(client.connected.wait(), 5)
                fake.go.set()
                await until(lambda: fake.connections >= 2, "a second connection")
                await asyncio.wait_for(client.connected.wait(), 5)
                login = [b"auth ClueCon\n\n",
                         b"event plain CHANNEL_CREATE CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE\n\n"]
                assert fake.commands == login * 2  # nothing else was sent: no timeout did it
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_inbound_api_left_unanswered_times_out_and_reconnects():
    """An api command FreeSWITCH never answers raises within the client's timeout, and the
    client drops that link and connects again."""

    async def scenario():
        async with FakeESL() as fake:
            client, task = client_of(fake, timeout=0.2)
            try:
                await asyncio.wait_for(client.connected.wait(), 5)
                with pytest.raises(ESLError, match="no reply"):
                    await asyncio.wait_for(client.api("status"), 5)
                assert b"api status\n\n" in fake.commands
                await until(lambda: fake.connections >= 2, "a second connection")
                await asyncio.wait_for(client.connected.wait(), 5)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(scenario())
