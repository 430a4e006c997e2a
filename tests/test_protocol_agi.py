"""FastAGI protocol (callguard.protocol.agi) against the recorded Asterisk 22 transcripts."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callguard.protocol.agi import (
    MAX_COMMAND_BYTES,
    AGIHangup,
    AGIReply,
    AGIReplyReader,
    AGIRequest,
    AGIRequestReader,
    authorize_reply,
    noop,
    set_variable,
    verbose,
)
from callguard.protocol.errors import ProtocolError

from transcripts import FROM, TO, load, names, split, stream

AGI_FILES = names("agi")
Parsed = tuple[AGIRequest, list[AGIReply | AGIHangup]]


def feed_session(pieces: Iterable[bytes], requests: AGIRequestReader,
                 replies: AGIReplyReader) -> tuple[AGIRequest | None, list]:
    """Run a from_asterisk stream through the request reader, then the reply reader."""
    request = None
    events: list[AGIReply | AGIHangup] = []
    for piece in pieces:
        if request is None:
            request = requests.feed(piece)
            if request is not None:
                events += replies.feed(requests.trailing)
        else:
            events += replies.feed(piece)
    replies.feed_eof()
    return request, events


def parse(pieces: Iterable[bytes]) -> Parsed:
    request, events = feed_session(pieces, AGIRequestReader(), AGIReplyReader())
    assert request is not None
    return request, events


def recorded(name: str) -> list[bytes]:
    return [chunk.data for chunk in load(name) if chunk.dir == FROM]


def commands(name: str) -> list[bytes]:
    """Command lines we sent (without "\\n"); a CRLF command keeps its "\\r"."""
    return stream(name, TO).split(b"\n")[:-1]


def replies(events: list) -> list[AGIReply]:
    return [event for event in events if isinstance(event, AGIReply)]


# --- replaying every transcript --------------------------------------------------------------

# (replies, HANGUP lines) per session, from the scenario notes.
EXPECTED = {
    "agi-basic.args.jsonl": (0, 0),
    "agi-basic.jsonl": (25, 0),
    "agi-hangup-during.jsonl": (11, 2),
    "agi-hangup-during.noanswer.jsonl": (0, 1),
    "agi-hangup-during.silent.jsonl": (0, 0),
    "agi-pipelined.close.jsonl": (0, 0),  # server closed at once: no reply read
    "agi-pipelined.halfclose.jsonl": (5, 1),
    "agi-pipelined.jsonl": (6, 0),
    "ami-dial-call.agi.jsonl": (2, 0),
    "ami-pjsip-call.agi.jsonl": (2, 0),
}


def test_every_agi_fixture_is_covered() -> None:
    assert sorted(EXPECTED) == AGI_FILES


@pytest.mark.parametrize("name", AGI_FILES)
def test_replay_recorded_and_byte_by_byte(name: str) -> None:
    request, events = parse(recorded(name))
    data = stream(name, FROM)
    assert parse(data[i : i + 1] for i in range(len(data))) == (request, events)
    assert parse([data]) == (request, events)
    assert (len(replies(events)), events.count(AGIHangup())) == EXPECTED[name]
    if name != "agi-pipelined.close.jsonl":
        assert len(replies(events)) == len(commands(name))


@pytest.mark.parametrize("name", AGI_FILES)
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_replay_random_chunks(name: str, cuts: list[int]) -> None:
    data = stream(name, FROM)
    assert parse(split(data, cuts)) == parse([data])


# --- facts from the scenario notes ------------------------------------------------------------

BASIC_HEADER_ORDER = [
    "agi_network", "agi_network_script", "agi_request", "agi_channel", "agi_language",
    "agi_type", "agi_uniqueid", "agi_version", "agi_callerid", "agi_calleridname",
    "agi_callingpres", "agi_callingani2", "agi_callington", "agi_callingtns", "agi_dnid",
    "agi_rdnis", "agi_context", "agi_extension", "agi_priority", "agi_enhanced",
    "agi_accountcode", "agi_threadid",
]  # fmt: skip


def test_basic_request() -> None:
    request, _ = parse(recorded("agi-basic.jsonl"))
    assert list(request.headers) == BASIC_HEADER_ORDER
    assert request.script == "authorize"
    assert request.params == {"x": "1"}
    assert request.args == []
    assert request.channel == "Local/100@test-00000000;2"
    assert request.uniqueid == "1795235556.1"
    assert request.accountcode == "41440000001"
    assert request.extension == "100"
    assert request.callerid == "41440000001"
    assert request.headers["agi_request"] == "agi://127.0.0.1:4573/authorize?x=1"
    assert request.headers["agi_calleridname"] == "Alice"


def test_args_and_empty_accountcode() -> None:
    request, events = parse(recorded("agi-basic.args.jsonl"))
    assert list(request.headers) == [*BASIC_HEADER_ORDER, "agi_arg_1", "agi_arg_2"]
    assert request.args == ["first arg", "2nd"]
    assert request.accountcode == ""  # sent as "agi_accountcode: \n"
    assert request.params == {"x": "3"}
    assert events == []


def test_sip_and_dial_requests() -> None:
    sip, _ = parse(recorded("ami-pjsip-call.agi.jsonl"))
    assert (sip.channel, sip.uniqueid) == ("PJSIP/anonymous-00000000", "1795236355.1310")
    assert (sip.script, sip.params) == ("authorize", {})
    assert (sip.callerid, sip.extension, sip.accountcode) == ("sipp", "0791234567", "41440000001")
    assert sip.headers["agi_type"] == "PJSIP"
    dial, _ = parse(recorded("ami-dial-call.agi.jsonl"))
    assert dial.uniqueid == "1795236325.1307"
    assert dial.channel == "Local/0791234567@test-0000028d;2"


def test_basic_replies_match_commands() -> None:
    _, events = parse(recorded("agi-basic.jsonl"))
    pairs = list(zip(commands("agi-basic.jsonl"), replies(events), strict=True))
    by_command: dict[bytes, list[AGIReply]] = {}
    for command, reply in pairs:
        by_command.setdefault(command, []).append(reply)

    quote = by_command[b"GET VARIABLE CALLGUARD_QUOTE"]
    assert quote == [AGIReply(200, "1", 'say "hi" now', 'result=1 (say "hi" now)')]
    assert by_command[b"GET VARIABLE CALLGUARD_MSG"][0].data == "value with spaces"
    assert by_command[b"GET VARIABLE CALLGUARD_RAWQUOTE"][0].data == "abcd"
    assert by_command[b"GET VARIABLE CALLGUARD_BAD"][0].data == "unterminated"
    assert by_command[b"GET FULL VARIABLE ${CALLGUARD_GRANT}"][0].data == "60"
    assert by_command[b"GET VARIABLE CHANNEL(accountcode)"][0].data == "41440000001"
    unset, allow = by_command[b"GET VARIABLE CALLGUARD_RESULT"]
    assert (unset.result, unset.data) == ("0", None)  # unset: no parentheses
    assert (allow.result, allow.data) == ("1", "ALLOW")
    assert by_command[b"get variable CALLGUARD_RESULT"][0].data == "ALLOW"
    assert by_command[b"GET VARIABLE CALLGUARD_RESULT\r"][0].result == "0"  # CR not stripped
    assert by_command[b'EXEC Set "CALLGUARD_X=1"'][0] == AGIReply(200, "0", None, "result=0")
    for command in (b"FOO BAR", b""):
        assert by_command[command] == [AGIReply(510, None, None, "Invalid or unknown command")]

    usage_set = by_command[b"SET VARIABLE"][0]
    usage_get = by_command[b"GET VARIABLE"][0]
    assert usage_set == AGIReply(
        520,
        None,
        None,
        "Invalid command syntax.  Proper usage follows:\n"
        "Sets a variable to the current channel.\n"
        "End of proper usage.",
    )
    assert usage_get.code == 520
    assert "\nExample return code: 200 result=1 (testvariable)\n" in usage_get.text
    # The inner "200 result=1 (testvariable)" line is block text, never a reply.
    assert all(reply.data != "testvariable" for reply in replies(events))
    assert [reply.code for reply in replies(events)].count(520) == 2


def test_usage_block_split_across_chunks() -> None:
    # The 520 blocks arrived in two TCP chunks ~42 ms apart.
    reader = AGIReplyReader()
    assert reader.feed(b"520-Invalid command syntax.  Proper usage follows:\n") == []
    assert reader.feed(b"Example return code: 200 result=1 (testvariable)\n") == []
    [reply] = reader.feed(b"520 End of proper usage.\n200 result=1\n")[:1]
    assert reply.code == 520
    reader.feed_eof()


def test_hangup_during_session() -> None:
    _, events = parse(recorded("agi-hangup-during.jsonl"))
    assert events[0] == AGIHangup()  # unsolicited, before any command
    assert events[-1] == AGIHangup()  # again at the end of the session
    dead = AGIReply(511, None, None, "Command Not Permitted on a dead channel or intercept routine")
    assert replies(events).count(dead) == 5
    assert replies(events)[1].data == "ALLOW"  # dead-safe commands still work


def test_pipelined() -> None:
    chunks = recorded("agi-pipelined.halfclose.jsonl")
    requests = AGIRequestReader()
    assert requests.feed(chunks[0]) is None
    assert requests.feed(chunks[1]) is not None
    assert requests.trailing == b""
    # Five replies and the end-of-session HANGUP, all in one chunk.
    ok = AGIReply(200, "1", None, "result=1")
    assert AGIReplyReader().feed(chunks[2]) == [ok] * 5 + [AGIHangup()]

    _, events = parse(recorded("agi-pipelined.jsonl"))
    assert events == [ok] * 5 + [AGIReply(200, "0", None, "result=0")]  # + NOOP's reply


# --- formatting --------------------------------------------------------------------------------

_QUOTED_SET = re.compile(rb'SET VARIABLE ([A-Za-z_][A-Za-z0-9_]*) "((?:[^"\\\r]|\\.)*)"')
_VERBOSE = re.compile(rb'VERBOSE "((?:[^"\\\r]|\\.)*)" ([1-4])')


def _unescape(raw: bytes) -> str:
    return re.sub(rb"\\(.)", rb"\1", raw).decode("utf-8")


def test_formatter_reproduces_every_expressible_command() -> None:
    reproduced = skipped = 0
    for name in AGI_FILES:
        for line in commands(name):
            if m := _QUOTED_SET.fullmatch(line):
                assert set_variable(m[1].decode(), _unescape(m[2])) == line + b"\n"
            elif m := _VERBOSE.fullmatch(line):
                assert verbose(_unescape(m[1]), int(m[2])) == line + b"\n"
            elif line == b"NOOP":
                assert noop() == b"NOOP\n"
            else:
                skipped += 1
                continue
            reproduced += 1
    assert reproduced >= 20
    # Not expressible on purpose: unquoted / bare-quote / unterminated / CRLF SET VARIABLEs
    # and commands we have no formatter for (GET, EXEC, FOO BAR...).
    assert skipped > 0


def test_escaped_quote_is_byte_exact() -> None:
    assert set_variable("CALLGUARD_QUOTE", 'say "hi" now') == (
        b'SET VARIABLE CALLGUARD_QUOTE "say \\"hi\\" now"\n'
    )
    assert set_variable("X", "a\\b") == b'SET VARIABLE X "a\\\\b"\n'
    assert set_variable("X", "") == b'SET VARIABLE X ""\n'
    # The transcript's unquoted "SET VARIABLE CALLGUARD_GRANT 60" sets the same value.
    assert set_variable("CALLGUARD_GRANT", "60") == b'SET VARIABLE CALLGUARD_GRANT "60"\n'
    assert set_variable("X", "Zürich") == 'SET VARIABLE X "Zürich"\n'.encode()


def test_authorize_reply_is_the_pipelined_write() -> None:
    [write] = [c.data for c in load("agi-pipelined.halfclose.jsonl") if c.dir == TO]
    variables = [(f"CALLGUARD_P{i}", f"v{i}") for i in range(1, 6)]
    assert authorize_reply(variables) == write
    assert authorize_reply([]) == b""


def asterisk_parse_args(line: bytes) -> list[bytes]:
    """Model of res_agi.c parse_args(): how Asterisk splits one command line into words."""
    words: list[bytearray] = []
    quoted = escaped = False
    whitespace = True
    for byte in line:
        char = bytes([byte])
        if char == b'"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                words.append(bytearray())
                whitespace = False
            continue
        if char in b" \t" and not quoted and not escaped:
            whitespace = True
            continue
        if char == b"\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            words.append(bytearray())
            whitespace = False
        words[-1] += char
        escaped = False
    return [bytes(word) for word in words]


@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True), value=st.text())
def test_set_variable_round_trips_through_asterisk_parsing(name: str, value: str) -> None:
    try:
        line = set_variable(name, value)
    except ProtocolError:
        assert {"\r", "\n", "\0"} & set(value) or len(value.encode("utf-8", "replace")) > 2000
        return
    assert b"\r" not in line and line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= MAX_COMMAND_BYTES
    # Asterisk strips only the "\n", then splits into words.
    words = asterisk_parse_args(line[:-1])
    assert words == [b"SET", b"VARIABLE", name.encode(), value.encode("utf-8")]


@pytest.mark.parametrize("value", ["a\rb", "v\r", "a\nb", "a\0b", "\r\nSET VARIABLE X 1"])
def test_set_variable_rejects_line_breaks_and_nul(value: str) -> None:
    with pytest.raises(ProtocolError):
        set_variable("CALLGUARD_MSG", value)
    with pytest.raises(ProtocolError):
        verbose(value)


@pytest.mark.parametrize(
    "name",
    ["", "1X", "A B", "A-B", "TIMEOUT(absolute", "TIMEOUT(a b)", "X\n", "X\r", "Ä", "X Y\nNOOP"],
)
def test_set_variable_rejects_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError):
        set_variable(name, "v")


def test_command_length_and_encoding_bounds() -> None:
    fixed = len(b'SET VARIABLE X ""\n')
    assert len(set_variable("X", "a" * (MAX_COMMAND_BYTES - fixed))) == MAX_COMMAND_BYTES
    with pytest.raises(ProtocolError):
        set_variable("X", "a" * (MAX_COMMAND_BYTES - fixed + 1))
    with pytest.raises(ProtocolError):
        set_variable("X", "\ud800")  # lone surrogate: not UTF-8 encodable


def test_verbose_and_noop() -> None:
    assert verbose("x", 1) == b'VERBOSE "x" 1\n'
    assert verbose("after hangup") == b'VERBOSE "after hangup" 1\n'
    assert noop() == b"NOOP\n"
    for level in (0, 5, True, -1):
        with pytest.raises(ProtocolError):
            verbose("x", level)


# --- request reader bounds and errors -------------------------------------------------------

GOOD = b"agi_network: yes\nagi_channel: SIP/a-1\nagi_uniqueid: 1.1\n"


def feed_bytewise(reader: AGIRequestReader | AGIReplyReader, data: bytes) -> int:
    """Feed one byte at a time; return how many bytes were accepted before the error."""
    for i in range(len(data)):
        try:
            reader.feed(data[i : i + 1])
        except ProtocolError:
            return i
    raise AssertionError("no ProtocolError")


def test_request_minimal_and_trailing() -> None:
    reader = AGIRequestReader()
    request = reader.feed(GOOD + b"\nHANGUP\n")
    assert request is not None and reader.request is request
    assert (request.channel, request.uniqueid, request.script) == ("SIP/a-1", "1.1", "")
    assert (request.accountcode, request.extension, request.callerid) == ("", "", "")
    assert reader.trailing == b"HANGUP\n"
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_request_line_too_long_without_newline() -> None:
    reader = AGIRequestReader(max_line=100)
    # Raises on the 101st byte of the line: nothing beyond the bound is ever buffered.
    assert feed_bytewise(reader, b"agi_network: " + b"y" * 500) == 100
    reader = AGIRequestReader(max_line=100)
    with pytest.raises(ProtocolError):
        for _ in range(100):
            reader.feed(b"agi_x: " + b"y" * 30)
    assert len(reader._partial) <= 100
    reader = AGIRequestReader(max_line=100)
    reader.feed(b"agi_network: " + b"y" * 87 + b"\n")  # exactly 100: fine


def test_request_too_many_headers() -> None:
    reader = AGIRequestReader(max_headers=3)
    reader.feed(GOOD)
    with pytest.raises(ProtocolError, match="more than 3"):
        reader.feed(b"agi_type: Local\n")


def test_request_total_bytes() -> None:
    reader = AGIRequestReader(max_bytes=200)
    with pytest.raises(ProtocolError, match="200 bytes"):
        for i in range(50):
            reader.feed(b"agi_h%d: value\n" % i)
    # The partial line counts too.
    reader = AGIRequestReader(max_bytes=60)
    assert feed_bytewise(reader, GOOD + b"agi_x: " + b"v" * 100) == 60


@pytest.mark.parametrize(
    "line",
    [
        b"garbage\n",
        b"agi_network:yes\n",
        b"agi_network :yes\n",
        b": yes\n",
        b"network: yes\n",
        b"AGI_NETWORK: yes\n",
        b"agi_: yes\n",
        b"agi_bad-key: yes\n",
        b"agi_callerid: \xff\xfe\n",
        b"agi_callerid: \xe2\x82\n",  # truncated UTF-8
        b"agi_channel: again\n",  # repeated header
    ],
)
def test_request_bad_lines(line: bytes) -> None:
    reader = AGIRequestReader()
    reader.feed(GOOD)
    with pytest.raises(ProtocolError):
        reader.feed(line)


def test_request_cr_rejected_as_it_arrives() -> None:
    reader = AGIRequestReader()
    with pytest.raises(ProtocolError, match="CR"):
        reader.feed(b"agi_network: yes\r")  # before the "\n" arrives
    reader = AGIRequestReader()
    reader.feed(GOOD)
    with pytest.raises(ProtocolError, match="CR"):
        reader.feed(b"\r\n")  # a CRLF blank line is not the end of the headers


@pytest.mark.parametrize(
    "headers",
    [
        b"agi_network: yes\n",  # no channel / uniqueid
        b"agi_channel: SIP/a-1\nagi_uniqueid: \n",  # empty uniqueid
        GOOD + b"agi_network_script: authorize?x\n",  # strict query parsing
        GOOD + b"agi_network_script: authorize?x=1&\n",
        GOOD + b"agi_network_script: authorize?x=%ff\n",
        GOOD + b"agi_network_script: a?" + b"&".join(b"p%d=1" % i for i in range(17)) + b"\n",
        GOOD + b"agi_arg_2: b\n",  # gap in the arguments
        GOOD + b"agi_arg_1: a\nagi_arg_3: c\n",
        b"",  # blank line first
    ],
)
def test_request_bad_requests(headers: bytes) -> None:
    with pytest.raises(ProtocolError):
        AGIRequestReader().feed(headers + b"\n")


def test_request_params() -> None:
    script = b"agi_network_script: authorize?a=1&b=&a=2&c=x%20y+z\n"
    request = AGIRequestReader().feed(GOOD + script + b"\n")
    assert request is not None
    assert request.script == "authorize"
    assert request.params == {"a": "2", "b": "", "c": "x y z"}  # last value wins
    sixteen = b"&".join(b"p%d=1" % i for i in range(16))
    request = AGIRequestReader().feed(GOOD + b"agi_network_script: a?" + sixteen + b"\n\n")
    assert request is not None and len(request.params) == 16
    with pytest.raises(ProtocolError):
        AGIRequestReader(max_params=2).feed(GOOD + script + b"\n")


def test_request_value_may_contain_colon_space() -> None:
    request = AGIRequestReader().feed(GOOD + b"agi_calleridname: a: b\n\n")
    assert request is not None and request.headers["agi_calleridname"] == "a: b"


# --- reply reader bounds and errors -----------------------------------------------------------


def test_reply_forms() -> None:
    reader = AGIReplyReader()
    events = reader.feed(
        b"200 result=1 (a) b)\n"  # value with ")" inside: the last ")" closes it
        b"200 result=1 ()\n"
        b"200 result= (timeout)\n"
        b"200 result=0 endpos=1234\n"
        b"200 result=1 (timeout) endpos=5\n"
        b"200 result=-1\n"
        b"100 result=0 Trying...\n"
    )
    assert [(e.code, e.result, e.data) for e in replies(events)] == [
        (200, "1", "a) b"),
        (200, "1", ""),
        (200, "", "timeout"),
        (200, "0", None),
        (200, "1", "timeout"),
        (200, "-1", None),
        (100, "0", None),
    ]


def test_reply_line_too_long_without_newline() -> None:
    assert feed_bytewise(AGIReplyReader(max_line=64), b"200 result=1 (" + b"x" * 200) == 64
    reader = AGIReplyReader(max_line=64)
    reader.feed(b"200 result=1 (" + b"x" * 49 + b")\n")  # exactly 64


def test_reply_block_line_bound() -> None:
    reader = AGIReplyReader(max_block_lines=3)
    reader.feed(b"520-Invalid command syntax.  Proper usage follows:\nline 2\nline 3\n")
    with pytest.raises(ProtocolError, match="3 lines"):
        reader.feed(b"line 4\n")
    reader = AGIReplyReader(max_block_lines=3)
    events = reader.feed(b"520-a\nb\nc\n520 End of proper usage.\n")
    assert events == [AGIReply(520, None, None, "a\nb\nc\nEnd of proper usage.")]


@pytest.mark.parametrize(
    "line",
    [
        b"garbage\n",
        b"\n",
        b"200\n",
        b"200result=1\n",
        b"200 foo\n",  # success without result=
        b"20 result=1\n",
        b"2000 result=1\n",
        b"600 nope\n",
        b"HANGUP now\n",
        b"hangup\n",
        b"200 result=1 (unterminated\n",
        b"200 result=1 (\xff)\n",
    ],
)
def test_reply_bad_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        AGIReplyReader().feed(line)


def test_reply_cr_rejected_as_it_arrives() -> None:
    with pytest.raises(ProtocolError, match="CR"):
        AGIReplyReader().feed(b"200 result=1\r")
    reader = AGIReplyReader()
    reader.feed(b"520-usage\n")
    with pytest.raises(ProtocolError, match="CR"):
        reader.feed(b"text\r\n")


def test_reply_eof() -> None:
    reader = AGIReplyReader()
    reader.feed(b"200 result=1\n")
    reader.feed_eof()
    reader.feed(b"200 res")
    with pytest.raises(ProtocolError):
        reader.feed_eof()
    reader = AGIReplyReader()
    reader.feed(b"520-usage\n")
    with pytest.raises(ProtocolError):
        reader.feed_eof()


# --- fuzz: parse or ProtocolError, nothing else ---------------------------------------------

_TOKENS = [b"agi_network: yes", b"agi_channel: X", b"agi_uniqueid: 1", b"agi_x: ", b"agi_arg_1: a",
           b"agi_network_script: a?b=1", b"\n", b"\r", b": ", b"200 result=1", b" (v)", b"(",
           b")", b"520-", b"520 ", b"510 x", b"HANGUP", b"\xff", b"\xc3\xa4", b"\x00"]  # fmt: skip
fuzz_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join),
)


@settings(max_examples=400, deadline=None)
@given(data=fuzz_bytes, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_fuzz_request_reader(data: bytes, cuts: list[int]) -> None:
    reader = AGIRequestReader(max_line=64, max_headers=8, max_bytes=256, max_params=4)
    try:
        for piece in split(data, cuts):
            if reader.feed(piece) is not None:
                break
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(data=fuzz_bytes, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_fuzz_reply_reader(data: bytes, cuts: list[int]) -> None:
    reader = AGIReplyReader(max_line=64, max_block_lines=4)
    try:
        for piece in split(data, cuts):
            for event in reader.feed(piece):
                assert isinstance(event, AGIReply | AGIHangup)
        reader.feed_eof()
    except ProtocolError:
        pass


def agi_outcome(pieces: Iterable[bytes]) -> Parsed | str:
    requests = AGIRequestReader(max_line=64, max_headers=8, max_bytes=256, max_params=4)
    replies = AGIReplyReader(max_line=64, max_block_lines=4)
    try:
        request, events = feed_session(pieces, requests, replies)
    except ProtocolError:
        return "error"
    return "no request" if request is None else (request, events)


_REQUEST = b"agi_network: yes\nagi_channel: X\nagi_uniqueid: 1\n\n"


@settings(max_examples=500, deadline=None)
@given(
    with_request=st.booleans(),
    data=fuzz_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_fuzz_chunking_never_changes_the_outcome(
    with_request: bool, data: bytes, cuts: list[int]
) -> None:
    data = (_REQUEST if with_request else b"") + data
    assert agi_outcome(split(data, cuts)) == agi_outcome([data])


def test_set_variable_writes_dialplan_functions() -> None:
    # The authorize reply sets the PBX's own deadline with the TIMEOUT() function.
    assert set_variable("TIMEOUT(absolute)", "182") == b'SET VARIABLE TIMEOUT(absolute) "182"\n'
