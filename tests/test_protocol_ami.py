"""AMI protocol (callguard.protocol.ami) against the recorded Asterisk 22 transcripts."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callguard.protocol.ami import (
    MAX_ACTION_FIELDS,
    MAX_ACTION_LINE,
    AMIBanner,
    AMIEvent,
    AMIMessage,
    AMIReader,
    AMIResponse,
    absolute_timeout,
    core_show_channels,
    events,
    filter_add,
    format_action,
    hangup,
    login,
    logoff,
    ping,
)
from callguard.protocol.errors import ProtocolError

from transcripts import FROM, TO, load, names, split, stream

AMI_FILES = names("ami")
BANNER = b"Asterisk Call Manager/11.0.0\r\n"
Parsed = list[AMIBanner | AMIResponse | AMIEvent]


def parse(pieces: Iterable[bytes], reader: AMIReader | None = None) -> Parsed:
    reader = reader or AMIReader()
    out: Parsed = []
    for piece in pieces:
        out += reader.feed(piece)
    reader.feed_eof()
    return out


def recorded(name: str) -> list[bytes]:
    return [chunk.data for chunk in load(name) if chunk.dir == FROM]


def messages(name: str) -> list[AMIMessage]:
    return [m for m in parse(recorded(name)) if isinstance(m, AMIMessage)]


def find(name: str, event: str, **headers: str) -> list[AMIMessage]:
    return [
        m
        for m in messages(name)
        if m.name == event and all(m.get(k) == v for k, v in headers.items())
    ]


# --- replaying every transcript --------------------------------------------------------------


@pytest.mark.parametrize("name", AMI_FILES)
def test_replay_recorded_and_byte_by_byte(name: str) -> None:
    data = stream(name, FROM)
    parsed = parse(recorded(name))
    assert parse(data[i : i + 1] for i in range(len(data))) == parsed
    assert parse([data]) == parsed
    assert parsed[0] == AMIBanner("11.0.0")
    assert all(isinstance(m, AMIMessage) for m in parsed[1:])
    # Every message of the stream is parsed, and every line kept: the CRLFs are the banner's,
    # one per field and one per message terminator.
    n = len(parsed) - 1
    assert n == data.count(b"\r\n\r\n")
    assert sum(len(m.fields) for m in parsed[1:]) == data.count(b"\r\n") - 1 - n


@pytest.mark.parametrize("name", AMI_FILES)
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=60000), max_size=60))
def test_replay_random_chunks(name: str, cuts: list[int]) -> None:
    data = stream(name, FROM)
    assert parse(split(data, cuts)) == parse([data])


@pytest.mark.parametrize("name", AMI_FILES)
def test_each_action_gets_exactly_one_response(name: str) -> None:
    # Every request we wrote, including noauth's deliberate one without Action: (its ActionID
    # is echoed with "Missing action in request").
    sent = re.findall(r"\r\nActionID: ([^\r]*)\r\n", "\r\n" + stream(name, TO).decode())
    answered = [m.action_id for m in messages(name) if isinstance(m, AMIResponse)]
    assert Counter(answered) == Counter(sent)


# --- facts from the scenario notes ------------------------------------------------------------


def test_dial_end_ties_to_the_agi_channel() -> None:
    msgs = messages("ami-dial-call.jsonl")
    assert sum(isinstance(m, AMIEvent) for m in msgs) == 102
    [dial_end] = [
        m
        for m in find("ami-dial-call.jsonl", "DialEnd", DialStatus="ANSWER")
        if "Channel" in m.headers
    ]
    assert dial_end.get("Uniqueid") == "1795236325.1307"  # == agi_uniqueid
    assert dial_end.get("Channel") == "Local/0791234567@test-0000028d;2"
    assert dial_end.get("Linkedid") == "1795236325.1306"
    assert dial_end.get("DestUniqueid") == "1795236325.1308"
    assert dial_end.get("DestExten") == ""  # "DestExten: " with the space, empty value
    assert dial_end.action_id is None
    # The Originate's own dial: Dest-only fields, no Channel.
    dest_only = [m for m in find("ami-dial-call.jsonl", "DialEnd") if "Channel" not in m.headers]
    assert len(dest_only) == 1 and dest_only[0].get("DestChannel").endswith(";1")


def test_hangup_event_keys_with_dash() -> None:
    hangups = find("ami-pjsip-call.jsonl", "Hangup", Channel="PJSIP/anonymous-00000000")
    assert [(h.get("Cause"), h.get("Cause-txt")) for h in hangups] == [("16", "Normal Clearing")]


def test_originate_response_is_an_event() -> None:
    [originate] = [
        m
        for m in messages("ami-session.jsonl")
        if m.action_id == "s022" and isinstance(m, AMIEvent)
    ]
    assert originate.name == "OriginateResponse"
    assert originate.get("Response") == "Success" and originate.get("Reason") == "4"
    [response] = [
        m
        for m in messages("ami-session.jsonl")
        if isinstance(m, AMIResponse) and m.action_id == "s022"
    ]
    assert response.get("Message") == "Originate successfully queued"


def test_core_show_channels_list() -> None:
    listed = [m for m in messages("ami-session.jsonl") if m.action_id == "s009"]
    assert [(type(m), m.name) for m in listed] == [
        (AMIResponse, "Success"),
        *[(AMIEvent, "CoreShowChannel")] * 4,
        (AMIEvent, "CoreShowChannelsComplete"),
    ]
    assert listed[0].get("EventList") == "start"
    assert listed[-1].get("EventList") == "Complete" and listed[-1].get("ListItems") == "4"
    assert all(m.get("BridgeId") == "" and m.get("Duration") == "00:00:00" for m in listed[1:5])


def test_several_messages_in_one_chunk() -> None:
    reader = AMIReader()
    chunks = load("ami-session.jsonl")
    for chunk in chunks:
        if chunk.dir != FROM:
            continue
        got = reader.feed(chunk.data)
        if chunk.t == 1.512:  # the whole CoreShowChannels list arrived in one chunk
            assert [m.name for m in got] == ["Success"] + ["CoreShowChannel"] * 4 + [
                "CoreShowChannelsComplete"
            ]
            return
    raise AssertionError("chunk not found")


def test_message_split_across_chunks() -> None:
    # agi-basic.ami t=0.310 ends with "Response: Success\r\nActionID: a003\r\n", t=0.311
    # brings "Variable: AGISTATUS\r\nValue: SUCCESS\r\n\r\n".
    reader = AMIReader()
    for chunk in load("agi-basic.ami.jsonl"):
        if chunk.dir == FROM:
            got = reader.feed(chunk.data)
            if chunk.data.endswith(b"ActionID: a003\r\n"):
                assert all(m.action_id != "a003" for m in got if isinstance(m, AMIMessage))
                split_seen = True
            if chunk.data.startswith(b"Variable: AGISTATUS"):
                assert split_seen
                [response] = got
                assert response.fields == (
                    ("Response", "Success"),
                    ("ActionID", "a003"),
                    ("Variable", "AGISTATUS"),
                    ("Value", "SUCCESS"),
                )
                return
    raise AssertionError("split message not found")


def test_raw_cr_inside_values_is_kept() -> None:
    msgs = messages("agi-basic.ami.jsonl")
    commands = [m.get("Command") for m in msgs if m.name == "AGIExecStart"]
    assert commands.count("GET VARIABLE CALLGUARD_RESULT\r") == 1
    assert commands.count("GET VARIABLE CALLGUARD_RESULT") == 2
    assert 'SET VARIABLE CALLGUARD_CRLF "v"\r' in commands
    getvar = [
        m for m in msgs if isinstance(m, AMIResponse) and m.get("Variable") == "CALLGUARD_CRLF"
    ]
    assert [m.get("Value") for m in getvar] == ["v\r"]  # Getvar returns the raw value
    quote = [m for m in msgs if m.name == "VarSet" and m.get("Variable") == "CALLGUARD_QUOTE"]
    assert quote[0].get("Value") == 'say \\"hi\\" now'  # VarSet escapes C-style
    getquote = [
        m for m in msgs if isinstance(m, AMIResponse) and m.get("Variable") == "CALLGUARD_QUOTE"
    ]
    assert getquote[0].get("Value") == 'say "hi" now'


def test_session_responses() -> None:
    by_id = {m.action_id: m for m in messages("ami-session.jsonl") if isinstance(m, AMIResponse)}
    assert by_id["s001"].get("Message") == "Authentication accepted"
    assert by_id["s002"].get("Ping") == "Pong"
    assert by_id["s003"].get("Events") == "On"
    assert by_id["s005"].name == "Error"
    assert by_id["s005"].get("Message") == (
        "Filter did not compile.  Check the syntax of the filter given."  # two spaces
    )
    assert by_id["s006"].get("Message") == "Unknown operation"
    assert by_id["s010"].get("Value") == ""  # unset variable: "Value: "
    for ok in ("s017", "s018", "s019"):
        assert (by_id[ok].name, by_id[ok].get("Message")) == ("Success", "Timeout Set")
    assert (by_id["s020"].name, by_id["s020"].get("Message")) == ("Error", "No timeout specified")
    assert by_id["s021"].get("Message") == "No such channel"
    assert by_id["s023"].get("Message") == "Channel Hungup"
    assert (by_id["s026"].name, by_id["s026"].get("Message")) == (
        "Goodbye",
        "Thanks for all the fish.",
    )
    assert by_id["s001"].get("Nope", "default") == "default"
    [bad] = [m for m in messages("ami-session.badlogin.jsonl")]
    assert (bad.name, bad.action_id, bad.get("Message")) == (
        "Error",
        "b001",
        "Authentication failed",
    )
    noaction = [m for m in messages("ami-session.noauth.jsonl") if m.action_id == "n-noaction"]
    assert noaction[0].get("Message") == "Missing action in request"


def test_security_event_value_with_colon_space() -> None:
    [event] = find("ami-session.jsonl", "RequestNotAllowed")
    assert event.get("RequestType") == "Action: Ping"


def test_repeated_keys_first_wins_all_kept() -> None:
    [msg] = AMIReader().feed(BANNER + b"Event: X\r\nA: 1\r\nB: 2\r\nA: 3\r\n\r\n")[1:]
    assert msg.get("A") == "1" and msg.headers == {"Event": "X", "A": "1", "B": "2"}
    assert msg.fields == (("Event", "X"), ("A", "1"), ("B", "2"), ("A", "3"))


def test_non_utf8_value_round_trips() -> None:
    # A Latin-1 caller name must not kill the connection and must go back out unchanged.
    [msg] = AMIReader().feed(BANNER + b"Event: Newchannel\r\nChannel: SIP/j\xfcrg-1\r\n\r\n")[1:]
    assert hangup("x1", msg.get("Channel")).split(b"\r\n")[2] == b"Channel: SIP/j\xfcrg-1"


# --- formatting ------------------------------------------------------------------------------


def actions_sent(name: str) -> list[AMIMessage]:
    """The to_asterisk messages that start with Action:, as (unchecked) field lists."""
    out = []
    for block in stream(name, TO).split(b"\r\n\r\n")[:-1]:
        fields = tuple(tuple(line.decode().split(": ", 1)) for line in block.split(b"\r\n"))
        if fields[0][0] == "Action":
            out.append(AMIMessage(fields[0][1], dict(fields).get("ActionID"), fields, dict(fields)))  # type: ignore[arg-type]
    return out


def via_helper(action: AMIMessage) -> bytes | None:
    """Rebuild an action with the dedicated helper, or None if there is none for it."""
    h, aid = action.headers, action.action_id or ""
    keys = [k for k, _ in action.fields[2:]]
    builders: dict[str, tuple[list[str], Callable[[], bytes]]] = {
        "Ping": ([], lambda: ping(aid)),
        "Logoff": ([], lambda: logoff(aid)),
        "CoreShowChannels": ([], lambda: core_show_channels(aid)),
        "Events": (["EventMask"], lambda: events(aid, h["EventMask"])),
        "Hangup": (["Channel", "Cause"], lambda: hangup(aid, h["Channel"], int(h["Cause"]))),
        "AbsoluteTimeout": (
            ["Channel", "Timeout"],
            lambda: absolute_timeout(aid, h["Channel"], h["Timeout"]),
        ),
        "Login": (
            ["Username", "Secret", "Events"][: len(keys)],
            lambda: login(aid, h["Username"], h["Secret"], events=h.get("Events")),
        ),
    }
    if action.name == "Filter" and h.get("Operation") == "Add":
        builders["Filter"] = (["Operation", "Filter"], lambda: filter_add(aid, h["Filter"]))
    if action.name not in builders:
        return None
    expected_keys, build = builders[action.name]
    assert keys == expected_keys
    return build()


def wire(action: AMIMessage) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in action.fields) + b"\r\n"


def test_formatter_reproduces_every_action() -> None:
    helpers: Counter[str] = Counter()
    total = 0
    for name in AMI_FILES:
        sent = stream(name, TO)
        blocks = sent.split(b"\r\n\r\n")[:-1]
        actions = actions_sent(name)
        # Only noauth's deliberate request without Action: is not an action.
        assert len(blocks) - len(actions) == (name == "ami-session.noauth.jsonl")
        for action in actions:
            total += 1
            fields = list(action.fields[2:])
            assert action.fields[1][0] == "ActionID"
            assert format_action(action.name, action.action_id or "", fields) == wire(action)
            if action.name == "AbsoluteTimeout" and action.get("Timeout") == "0":
                with pytest.raises(ProtocolError):
                    via_helper(action)
                continue
            rebuilt = via_helper(action)
            if rebuilt is not None:
                assert rebuilt == wire(action)
                helpers[action.name] += 1
    assert total == 101
    assert set(helpers) == {
        "Login", "Ping", "Logoff", "CoreShowChannels", "AbsoluteTimeout", "Hangup", "Events",
        "Filter",
    }  # fmt: skip
    assert helpers["AbsoluteTimeout"] == 5


def test_format_action_mapping_and_helpers() -> None:
    assert format_action("Getvar", "a1", {"Channel": "Local/1@t;2", "Variable": "X"}) == (
        b"Action: Getvar\r\nActionID: a1\r\nChannel: Local/1@t;2\r\nVariable: X\r\n\r\n"
    )
    assert format_action("Setvar", "a2", {"Variable": "CG_FOO", "Value": ""}).endswith(
        b"Value: \r\n\r\n"
    )
    assert login("s1", "cgtest", "pw") == (
        b"Action: Login\r\nActionID: s1\r\nUsername: cgtest\r\nSecret: pw\r\nEvents: call\r\n\r\n"
    )
    assert login("s1", "u", "p", events=None) == (
        b"Action: Login\r\nActionID: s1\r\nUsername: u\r\nSecret: p\r\n\r\n"
    )
    assert b"\r\nTimeout: 3\r\n" in absolute_timeout("t", "PJSIP/a-1", 3)
    assert b"\r\nTimeout: 2.5\r\n" in absolute_timeout("t", "PJSIP/a-1", "2.5")
    assert b"\r\nTimeout: 10.50\r\n" in absolute_timeout("t", "PJSIP/a-1", Decimal("10.50"))
    assert b"\r\nTimeout: 100\r\n" in absolute_timeout("t", "PJSIP/a-1", "1e2")  # atof: no exponent
    assert b"\r\nTimeout: 0.001\r\n" in absolute_timeout("t", "PJSIP/a-1", Decimal("0.001"))
    assert hangup("h", "PJSIP/a-1") == (
        b"Action: Hangup\r\nActionID: h\r\nChannel: PJSIP/a-1\r\nCause: 16\r\n\r\n"
    )
    assert filter_add("f", "!Event: VarSet") == (
        b"Action: Filter\r\nActionID: f\r\nOperation: Add\r\nFilter: !Event: VarSet\r\n\r\n"
    )
    assert events("e", "call") == b"Action: Events\r\nActionID: e\r\nEventMask: call\r\n\r\n"


@pytest.mark.parametrize("seconds", [0, -1, "0", "0.0", "-3", "abc", "", "NaN", "Infinity",
                                     "sNaN", True, Decimal("0.0000001"), None, 1.5])  # fmt: skip
def test_absolute_timeout_rejects_bad_seconds(seconds: object) -> None:
    with pytest.raises(ProtocolError):
        absolute_timeout("t", "PJSIP/a-1", seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize("cause", [-1, 128, True, "16"])
def test_hangup_rejects_bad_cause(cause: object) -> None:
    with pytest.raises(ProtocolError):
        hangup("h", "PJSIP/a-1", cause)  # type: ignore[arg-type]


def test_helpers_reject_empty_channel() -> None:
    with pytest.raises(ProtocolError):
        hangup("h", "")
    with pytest.raises(ProtocolError):
        absolute_timeout("t", "", 3)


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b", "x\r\n\r\nAction: Hangup"])
def test_format_action_rejects_injection(bad: str) -> None:
    for make in (
        lambda: format_action("Getvar", "a1", {"Variable": bad}),
        lambda: format_action("Getvar", bad, {}),
        lambda: format_action(bad, "a1", {}),
        lambda: format_action("Getvar", "a1", [(bad, "v")]),
        lambda: hangup("a1", bad),
        lambda: absolute_timeout("a1", bad, 3),
        lambda: login("a1", "u", bad),
        lambda: filter_add("a1", bad),
        lambda: events("a1", bad),
    ):
        with pytest.raises(ProtocolError):
            make()


@pytest.mark.parametrize("key", ["", "Bad Key", "Key:", "Ké", "A.B", "Action", "actionid"])
def test_format_action_rejects_bad_keys(key: str) -> None:
    with pytest.raises(ProtocolError):
        format_action("Getvar", "a1", [(key, "v")])


def test_format_action_bounds() -> None:
    with pytest.raises(ProtocolError):
        format_action("Ping", "", {})  # empty ActionID
    with pytest.raises(ProtocolError):
        format_action("Bad Action", "a1", {})
    fixed = len(b"Variable: \r\n")
    assert format_action("Getvar", "a1", {"Variable": "x" * (MAX_ACTION_LINE - fixed)})
    with pytest.raises(ProtocolError):
        format_action("Getvar", "a1", {"Variable": "x" * (MAX_ACTION_LINE - fixed + 1)})
    assert format_action("Originate", "a1", [("Variable", "a=1")] * (MAX_ACTION_FIELDS - 2))
    with pytest.raises(ProtocolError):
        format_action("Originate", "a1", [("Variable", "a=1")] * (MAX_ACTION_FIELDS - 1))
    with pytest.raises(ProtocolError):
        format_action("Getvar", "a1", {"Variable": "\ud800"})  # not encodable


# --- reader bounds and errors ------------------------------------------------------------------


def feed_bytewise(reader: AMIReader, data: bytes) -> int:
    """Feed one byte at a time; return how many bytes were accepted before the error."""
    for i in range(len(data)):
        try:
            reader.feed(data[i : i + 1])
        except ProtocolError:
            return i
    raise AssertionError("no ProtocolError")


@pytest.mark.parametrize(
    "banner",
    [
        b"HTTP/1.1 200 OK\r\n",
        b"Response: Success\r\n\r\n",
        b"Asterisk Call Manager/\r\n",
        b"Asterisk Call Manager/11.0.0 beta\r\n",
        b"Asterisk Call Manager/11..0\r\n",
        b"asterisk call manager/11.0.0\r\n",
        b"\r\n",
    ],
)
def test_bad_banner(banner: bytes) -> None:
    with pytest.raises(ProtocolError):
        AMIReader().feed(banner)


def test_bad_banner_fails_on_first_wrong_byte() -> None:
    assert feed_bytewise(AMIReader(), b"HTTP/1.1 200 OK\r\n") == 0
    assert feed_bytewise(AMIReader(), b"Asterisk Call Mangler/1\r\n") == len("Asterisk Call Man")
    too_long = b"Asterisk Call Manager/" + b"1" * 200
    assert feed_bytewise(AMIReader(max_line=100), too_long) == 100
    with pytest.raises(ProtocolError):
        AMIReader(max_line=100).feed(too_long + b"\r\n")


def test_banner_and_message_in_one_chunk() -> None:
    got = AMIReader().feed(BANNER + b"Response: Success\r\nActionID: x\r\n\r\nEvent: A\r\n")
    assert got == [
        AMIBanner("11.0.0"),
        AMIResponse("Success", "x", (("Response", "Success"), ("ActionID", "x")), {}),
    ]


def test_line_too_long_without_crlf() -> None:
    reader = AMIReader(max_line=100)
    reader.feed(BANNER + b"Event: X\r\n")
    assert feed_bytewise(reader, b"Key: " + b"v" * 500) == 100
    # Exactly at the bound, including a value ending in "\r", is fine.
    reader = AMIReader(max_line=100)
    reader.feed(BANNER + b"Event: X\r\nKey: " + b"v" * 94 + b"\r")
    [msg] = reader.feed(b"\r\n\r\n")
    assert msg.get("Key") == "v" * 94 + "\r"
    with pytest.raises(ProtocolError):
        AMIReader(max_line=100).feed(BANNER + b"Event: X\r\nKey: " + b"v" * 96 + b"\r\n\r\n")


def test_too_many_fields() -> None:
    reader = AMIReader(max_fields=5)
    reader.feed(BANNER)
    # Raises on the 6th line end, before the message terminator arrives.
    data = b"".join(b"K%d: v\r\n" % i for i in range(10))
    assert feed_bytewise(reader, data) == data.index(b"K5: v\r\n") + len(b"K5: v\r")
    ok = AMIReader(max_fields=5).feed(BANNER + b"Event: X\r\n" + b"K: v\r\n" * 4 + b"\r\n")
    assert len(ok[1].fields) == 5
    with pytest.raises(ProtocolError):  # all at once: checked when the message completes
        AMIReader(max_fields=5).feed(BANNER + b"Event: X\r\n" + b"K: v\r\n" * 5 + b"\r\n")


def test_message_too_big() -> None:
    reader = AMIReader(max_message=1000)
    reader.feed(BANNER)
    assert feed_bytewise(reader, b"Event: X\r\n" + b"Key: value\r\n" * 200) == 1000
    with pytest.raises(ProtocolError):
        AMIReader(max_message=1000).feed(
            BANNER + b"Event: X\r\n" + b"Key: value\r\n" * 100 + b"\r\n"
        )


@pytest.mark.parametrize(
    "message",
    [
        b"garbage\r\n\r\n",
        b"Event: X\r\ngarbage\r\n\r\n",
        b"Event: X\r\nKey:value\r\n\r\n",
        b"Event: X\r\n: value\r\n\r\n",
        b"Action: Ping\r\n\r\n",  # first line must be Response or Event
        b"ActionID: 1\r\nResponse: Success\r\n\r\n",
        b"Event: \r\n\r\n",
        b"\r\n",  # empty message
        b"Response: Success\r\n\r\n\r\n",
    ],
)
def test_bad_messages(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        AMIReader().feed(BANNER + message)


def test_eof_in_the_middle() -> None:
    reader = AMIReader()
    reader.feed(BANNER + b"Response: Success\r\n\r\n")
    reader.feed_eof()
    reader.feed(b"Event: X\r\n")
    with pytest.raises(ProtocolError):
        reader.feed_eof()


def test_messages_compare_by_type_and_fields() -> None:
    fields = (("Response", "Success"),)
    assert AMIResponse("Success", None, fields, {}) != AMIEvent("Success", None, fields, {})
    assert hash(AMIEvent("X", None, (("Event", "X"),), {"Event": "X"}))


# --- fuzz: parse or ProtocolError, nothing else ---------------------------------------------

_TOKENS = [b"Event: X", b"Response: Success", b"ActionID: 1", b"Key", b": ", b":", b"\r\n",
           b"\r", b"\n", b"value", b"\xff", b"\xc3\xa4", b"\x00", b"-"]  # fmt: skip
fuzz_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(_TOKENS), max_size=60).map(b"".join),
)


@settings(max_examples=500, deadline=None)
@given(
    with_banner=st.booleans(),
    data=fuzz_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=8),
)
def test_fuzz_reader(with_banner: bool, data: bytes, cuts: list[int]) -> None:
    reader = AMIReader(max_line=64, max_fields=6, max_message=256)
    data = (BANNER if with_banner else b"") + data
    try:
        for piece in split(data, cuts):
            for msg in reader.feed(piece):
                assert isinstance(msg, AMIBanner | AMIResponse | AMIEvent)
        reader.feed_eof()
    except ProtocolError:
        pass


def outcome(pieces: Iterable[bytes]) -> Parsed | str:
    try:
        return parse(pieces, AMIReader(max_line=64, max_fields=6, max_message=256))
    except ProtocolError:
        return "error"


@settings(max_examples=500, deadline=None)
@given(
    with_banner=st.booleans(),
    data=fuzz_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=8),
)
def test_fuzz_chunking_never_changes_the_outcome(
    with_banner: bool, data: bytes, cuts: list[int]
) -> None:
    # Bounds checked early on partial data must agree with the checks on whole messages.
    data = (BANNER if with_banner else b"") + data
    assert outcome(split(data, cuts)) == outcome([data])


@settings(max_examples=300, deadline=None)
@given(key=st.text(max_size=20), value=st.text(max_size=40))
def test_fuzz_format_action(key: str, value: str) -> None:
    try:
        data = format_action("Setvar", "a1", [(key, value)])
    except ProtocolError:
        return
    # Whatever got through is exactly one well-formed message that our reader parses back.
    assert data.count(b"\r\n\r\n") == 1 and data.endswith(b"\r\n\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    [msg] = AMIReader().feed(BANNER + b"Response" + data[len(b"Action") :])[1:]
    assert msg.fields[2] == (key, value)
