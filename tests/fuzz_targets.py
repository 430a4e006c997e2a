"""Fuzz targets for the sans-IO parsers (AGI, AMI, ESL): run by bench/fuzz.py under atheris,
and replayed on the corpus it found (tests/fixtures/fuzz/) by tests/test_fuzz_corpus.py.

One input is a header, then the stream. Header byte 0: bits 0-2 are how many size bytes
follow (0: the stream in one chunk); bit 3 picks tight bounds (reachable by small inputs)
instead of the defaults; bit 4 (ESL) reads as the outbound session does (events skipped).
Size byte b is a chunk of b + 1 bytes, the sizes taken in turn: ``01 00`` feeds byte by byte.

A target feeds the stream in those chunks, then whole, and fails (any exception but
ProtocolError) when
* the parser raises anything but ProtocolError;
* a buffer holds more than the parser's bounds allow;
* a message breaks what the parser promises (types, bounds, no line end inside a line,
  the message re-serialises to the bytes it came from);
* the two framings disagree (different messages, or one fails and not the other);
* the pure code that reads parsed messages (timestamps, counts, decoded values) raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from callguard.adapters.asterisk import stamp_ms
from callguard.adapters.freeswitch import micros_ms
from callguard.protocol import agi, ami, esl
from callguard.protocol.errors import ProtocolError

FAILED = "ProtocolError"


def framing(data: bytes) -> tuple[list[bytes], int, bytes]:
    """(chunks, header byte, stream) of one fuzz input."""
    if not data:
        return [], 0, b""
    flags, count = data[0], data[0] & 0x07
    sizes = [size + 1 for size in data[1 : 1 + count]]
    stream = data[1 + count :]
    if not sizes:
        return [stream], flags, stream
    chunks, pos, turn = [], 0, 0
    while pos < len(stream):
        chunks.append(stream[pos : pos + sizes[turn % len(sizes)]])
        pos += len(chunks[-1])
        turn += 1
    return chunks, flags, stream


def outcome(parse: Callable[[Iterable[bytes]], object], pieces: Iterable[bytes]) -> object:
    try:
        return parse(pieces)
    except ProtocolError:
        return FAILED


def check_framings(parse: Callable[[Iterable[bytes]], object], data: bytes) -> object:
    chunks, _, stream = framing(data)
    chunked = outcome(parse, chunks)
    whole = outcome(parse, [stream])
    assert chunked == whole, f"chunked {chunked!r} != whole {whole!r}"
    return whole


# --- AGI ---------------------------------------------------------------------------------

AGI_TIGHT = {"request": dict(max_line=64, max_headers=8, max_bytes=256, max_params=4),
             "reply": dict(max_line=64, max_block_lines=4)}
AGI_DEFAULT = {"request": {}, "reply": {}}


def agi_target(data: bytes) -> None:
    bounds = AGI_TIGHT if framing(data)[1] & 0x08 else AGI_DEFAULT
    check_framings(lambda pieces: agi_session(pieces, **bounds), data)


def agi_session(pieces: Iterable[bytes], request: dict, reply: dict) -> tuple:
    """The FastAGI session as the server reads it: the request, then the replies."""
    requests = agi.AGIRequestReader(**request)
    replies = agi.AGIReplyReader(**reply)
    pieces = list(pieces)
    stream = b"".join(pieces)
    parsed, events, after = None, [], []
    for piece in pieces:
        if parsed is None:
            parsed = requests.feed(piece)
            assert len(requests._partial) <= requests.max_line
            if parsed is not None:
                after.append(requests.trailing)
        else:
            after.append(piece)
    if parsed is None:
        return ("no request",)
    head = _check_agi_request(requests, parsed, stream)
    assert b"".join(after) == stream[head:]  # nothing lost or repeated after the blank line
    for piece in after:
        events += replies.feed(piece)
        assert len(replies._lines.partial) <= replies._lines.max_line
        assert len(replies._block) <= replies.max_block_lines
    replies.feed_eof()
    assert b"".join(map(_agi_line, events)) == stream[head:]
    return parsed, events


def _check_agi_request(reader: agi.AGIRequestReader, request: agi.AGIRequest,
                       stream: bytes) -> int:
    """Check what the request promises; the offset where the replies start."""
    head = 1 if stream[:1] == b"\n" else stream.index(b"\n\n") + 2
    assert head <= reader.max_bytes
    assert all(len(line) <= reader.max_line for line in stream[:head].split(b"\n"))
    headers = request.headers
    assert len(headers) <= reader.max_headers
    lines = "".join(f"{key}: {value}\n" for key, value in headers.items()) + "\n"
    assert lines.encode() == stream[:head]  # every header line, once, in order
    assert all(agi._HEADER_KEY.fullmatch(key) for key in headers)
    assert request.channel and request.uniqueid
    assert request.script == headers.get("agi_network_script", "").partition("?")[0]
    assert len(request.params) <= reader.max_params
    assert request.args == [headers[f"agi_arg_{n}"] for n in range(1, len(request.args) + 1)]
    assert f"agi_arg_{len(request.args) + 1}" not in headers
    for text in (request.accountcode, request.extension, request.callerid):
        assert isinstance(text, str)
    return head


def _agi_line(event: agi.AGIReply | agi.AGIHangup) -> bytes:
    """The bytes an event came from."""
    if isinstance(event, agi.AGIHangup):
        return b"HANGUP\n"
    assert isinstance(event, agi.AGIReply) and 100 <= event.code <= 599
    assert "\r" not in event.text
    lines = event.text.split("\n")
    if len(lines) > 1:  # a "NNN-" block, its closing "NNN " line last
        assert event.result is None and event.data is None
        middle = "".join(line + "\n" for line in lines[1:-1])
        text = f"{event.code}-{lines[0]}\n{middle}{event.code} {lines[-1]}\n"
    else:
        if event.code < 300:
            assert event.text.startswith(f"result={event.result}")
            assert event.data is None or f"({event.data})" in event.text
        else:
            assert event.result is None and event.data is None
        text = f"{event.code} {event.text}\n"
    return text.encode()


# --- AMI ---------------------------------------------------------------------------------

AMI_TIGHT = dict(max_line=64, max_fields=6, max_message=256)


def ami_target(data: bytes) -> None:
    bounds = AMI_TIGHT if framing(data)[1] & 0x08 else {}
    check_framings(lambda pieces: ami_stream(pieces, **bounds), data)


def ami_stream(pieces: Iterable[bytes], **bounds) -> list:
    reader = ami.AMIReader(**bounds)
    pieces = list(pieces)
    out = []
    for piece in pieces:
        out += reader.feed(piece)
        buf = reader._buf
        assert len(buf) <= reader.max_message
        line_start = buf.rfind(b"\r\n") + 2 if b"\r\n" in buf else 0
        assert len(buf) - line_start - buf.endswith(b"\r") <= reader.max_line
    reader.feed_eof()
    assert b"".join(_ami_bytes(reader, message, i) for i, message in enumerate(out)) == (
        b"".join(pieces))
    return out


def _ami_bytes(reader: ami.AMIReader, message: ami.AMIReaderEvent, index: int) -> bytes:
    """Check what a message promises; the bytes it came from."""
    if isinstance(message, ami.AMIBanner):
        assert index == 0
        line = f"Asterisk Call Manager/{message.version}\r\n".encode()
        assert len(line) - 2 <= reader.max_line
        return line
    assert index > 0 and isinstance(message, ami.AMIResponse | ami.AMIEvent)
    kind, name = message.fields[0]
    assert kind == ("Response" if isinstance(message, ami.AMIResponse) else "Event")
    assert name == message.name != ""
    assert len(message.fields) <= reader.max_fields
    first: dict[str, str] = {}
    for key, value in message.fields:
        assert key and ": " not in key and "\r\n" not in key and "\r\n" not in value
        first.setdefault(key, value)
        ms = stamp_ms(value)  # what a Timestamp is read with: a time the scripts can take
        assert ms is None or isinstance(ms, int) and 0 < ms < 1 << 63
    assert message.headers == first and message.action_id == first.get("ActionID")
    lines = [f"{key}: {value}".encode("utf-8", "surrogateescape")
             for key, value in message.fields]
    assert max(map(len, lines)) <= reader.max_line
    block = b"\r\n".join(lines) + b"\r\n\r\n"
    assert len(block) <= reader.max_message
    return block


# --- ESL ---------------------------------------------------------------------------------

ESL_TIGHT = dict(max_line=64, max_headers=8, max_head=256, max_event=256, max_body=512)
# The outbound session's reader (callguard.adapters.freeswitch.OutboundSession).
ESL_OUTBOUND = dict(events=frozenset(), max_head=64 << 10, max_event=64 << 10, max_body=4096)


def esl_target(data: bytes) -> None:
    flags = framing(data)[1]
    bounds = ESL_TIGHT if flags & 0x08 else {}
    if flags & 0x10:
        bounds = {**ESL_OUTBOUND, **bounds}
    check_framings(lambda pieces: esl_stream(pieces, **bounds), data)


def esl_stream(pieces: Iterable[bytes], **bounds) -> list:
    reader = esl.ESLReader(**bounds)
    out = []
    for piece in pieces:
        for message in reader.feed(piece):
            _check_esl(reader, message)
            out.append(message)
        if reader._head is None:
            assert len(reader._buf) <= reader.max_head
            assert len(reader._buf) - reader._buf.rfind(b"\n") - 1 <= reader.max_line
        else:  # a frame's headers are in, its body is coming
            assert len(reader._buf) < reader._need <= max(reader.max_event, reader.max_body)
    # ESLReader has no feed_eof: its callers drop a connection that ends mid-frame. So does
    # this, or a bound checked early on a partial frame would tell the framings apart.
    if reader._buf or reader._head is not None:
        raise ProtocolError("closed in the middle of a frame")
    return out


def _check_esl(reader: esl.ESLReader, message: esl.ESLMessage) -> None:
    if isinstance(message, esl.SkippedEvent):
        assert reader.events is not None and message.name not in reader.events
        return
    assert isinstance(message, esl.Frame | esl.Event)
    raw = message._raw
    encoded = message._decoded is not raw  # not a JSON event: header lines, URL-encoded
    if encoded:
        assert len(raw) <= reader.max_headers
        for name, value in raw.items():
            assert esl._NAME.fullmatch(name) and "\n" not in value, name
            assert len(name) + 1 + len(value) <= reader.max_line
    decoded = message.headers  # decoded lazily: must not fail when read
    assert list(decoded) == list(raw)
    for name, value in decoded.items():
        assert message.get(name) == value  # one value read alone, or all of them at once
        if encoded:  # what the simulated FreeSWITCH writes decodes back
            assert esl.url_decode(esl.url_encode(value)) == value
    for name in ("Event-Date-Timestamp", "Caller-Channel-Answered-Time"):
        assert isinstance(micros_ms(message.get(name)), int | None)
    if isinstance(message, esl.Event):
        assert message.name == raw["Event-Name"] != "" and isinstance(message.body, str)
        assert isinstance(esl.whole(message.get("variable_billmsec")), int | None)
        return
    assert message.content_type == raw["Content-Type"]
    assert type(message) is esl._KINDS.get(message.content_type, esl.Frame)
    length = raw.get("Content-Length")
    assert len(message.body) == (0 if length is None else int(length))
    if isinstance(message, esl.CommandReply | esl.ApiResponse):
        assert isinstance(message.text, str) and isinstance(message.ok, bool)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "agi": agi_target,
    "ami": ami_target,
    "esl": esl_target,
}
