"""ESL (FreeSWITCH Event Socket), sans-IO: bytes in, frames out; commands out.

Wire format of FreeSWITCH 1.10 (transcripts in tests/fixtures/freeswitch):

* a frame is ``Name: value\\n`` header lines up to an empty line, bare LF; with a
  ``Content-Length: N`` header exactly N body bytes follow, else there is no body;
* header order is not fixed: ``Content-Type`` says what a frame is (``auth/request``,
  ``command/reply``, ``api/response``, ``text/event-plain``, ``text/event-json``,
  ``text/disconnect-notice``, ``text/rude-rejection``);
* values are URL-encoded (``switch_url_encode``): the outbound ``connect`` reply is a
  whole channel's data, ``Reply-Text: %2BOK%0A``, with no Content-Length;
* a plain event's body is itself header lines (URL-encoded), then an optional inner
  body after its own ``Content-Length``; a JSON event's body is one JSON object.

The same module writes the few commands callguard sends, refusing any argument that
would inject a line, and (for the simulated FreeSWITCH) parses commands and writes
frames the way FreeSWITCH does.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from callguard.protocol.errors import ProtocolError

__all__ = [
    "ApiResponse",
    "AuthRequest",
    "Command",
    "CommandReader",
    "CommandReply",
    "DisconnectNotice",
    "ESLReader",
    "Event",
    "Frame",
    "ProtocolError",
    "SkippedEvent",
    "api",
    "auth",
    "command",
    "event_frame",
    "frame",
    "sendmsg_execute",
    "sendmsg_hangup",
    "url_decode",
    "url_encode",
    "whole",
]

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_LINE = re.compile(r"^([A-Za-z0-9_.-]+): (.*)$", re.MULTILINE)
_HEADER_BLOCK = re.compile(r"[A-Za-z0-9_.-]+: [^\n]*(?:\n[A-Za-z0-9_.-]+: [^\n]*)*")
# SWITCH_URL_UNSAFE, and every byte below 0x20 or above 0x7E.
_UNSAFE = frozenset(b"\r\n #%&+:;<=>?@[\\]^`{|}\"") | frozenset(range(0x20)) | frozenset(
    range(0x7F, 0x100))
_ENCODE = {b: (f"%{b:02X}" if b in _UNSAFE else chr(b)) for b in range(0x100)}


def whole(text: str) -> int | None:
    """A count FreeSWITCH wrote (ASCII digits only: "²" is a digit to str.isdigit)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def url_decode(value: str) -> str:
    """A value as FreeSWITCH wrote it, decoded; a stray ``%`` is a protocol error (it
    escapes every ``%`` it sends)."""
    if "%" not in value:
        return value
    if _BAD_ESCAPE.search(value):
        raise ProtocolError(f"bad URL encoding in {value[:80]!r}")
    return unquote(value, errors="replace")


def url_encode(value: str) -> str:
    """As ``switch_url_encode`` does it (for the simulated FreeSWITCH)."""
    return "".join(_ENCODE[b] for b in value.encode("utf-8"))


class HeaderText:
    """Header lines, checked as a whole, each looked up where it lies when asked for: a
    HANGUP_COMPLETE has ~250, a channel's data ~110, and callguard reads a handful. Read
    only; every other use sees a dict of them all (a repeated name: its last value, in
    its first place)."""

    __slots__ = ("_text", "_dict")

    def __init__(self, text: str):
        self._text = "\n" + text + "\n"
        self._dict: dict[str, str] | None = None

    def get(self, name: str, default=None):
        if self._dict is not None:
            return self._dict.get(name, default)
        text = self._text
        at = text.rfind("\n" + name + ": ")
        if at < 0:
            return default
        start = at + len(name) + 3
        return text[start:text.index("\n", start)]

    def __contains__(self, name) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def all(self) -> dict[str, str]:
        if self._dict is None:
            self._dict = dict(_HEADER_LINE.findall(self._text))
        return self._dict

    def items(self):
        return self.all().items()

    def keys(self):
        return self.all().keys()

    def values(self):
        return self.all().values()

    def __iter__(self):
        return iter(self.all())

    def __len__(self) -> int:
        return len(self.all())

    def __eq__(self, other) -> bool:
        return self.all() == (other.all() if isinstance(other, HeaderText) else other)

    def __repr__(self) -> str:
        return repr(self.all())


class Fields:
    """Header fields as they came, URL-decoded when read: a frame's escapes were checked
    when it was parsed, but most of its ~250 values are never looked at."""

    __slots__ = ("_raw", "_decoded")

    def __init__(self, raw: dict[str, str], encoded: bool = True):
        self._raw = raw
        self._decoded: dict[str, str] | None = None if encoded else raw

    def get(self, name: str, default: str = "") -> str:
        value = self._raw.get(name)
        if value is None:
            return default
        if "%" in value and self._decoded is not self._raw:
            return unquote(value, errors="replace")
        return value

    @property
    def headers(self) -> dict[str, str]:
        """Every field, decoded, in the order they came."""
        if self._decoded is None:
            self._decoded = dict(self._raw)
            _decode_values(self._decoded)
        return self._decoded

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class Frame(Fields):
    """One frame: what it is, its outer headers, its body."""

    __slots__ = ("content_type", "body")

    def __init__(self, content_type: str, headers: dict[str, str], body: bytes = b""):
        super().__init__(headers)
        self.content_type, self.body = content_type, body

    def _key(self):
        return self.content_type, tuple(self._raw.items()), self.body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.content_type!r})"


class AuthRequest(Frame):
    """Sent unprompted when an inbound connection is accepted."""

    __slots__ = ()


class CommandReply(Frame):
    """The answer to a command; the outbound ``connect`` reply also carries the channel's
    data as its headers."""

    __slots__ = ()

    @property
    def text(self) -> str:
        return self.get("Reply-Text").rstrip("\n")

    @property
    def ok(self) -> bool:
        return self.text.startswith("+OK")


class ApiResponse(Frame):
    __slots__ = ()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.body.startswith(b"+OK")


class DisconnectNotice(Frame):
    """FreeSWITCH ends the connection (``Content-Disposition: disconnect``) or, with
    ``linger``, tells that the channel hung up (``linger``)."""

    __slots__ = ()


class Event(Fields):
    __slots__ = ("name", "body")

    def __init__(self, name: str, headers: dict[str, str], body: str = "",
                 encoded: bool = True):
        super().__init__(headers, encoded)  # JSON events are not URL-encoded
        self.name = name  # Event-Name
        self.body = body  # BACKGROUND_JOB's output, say

    @property
    def unique_id(self) -> str:
        return self.get("Unique-ID")

    def _key(self):
        return self.name, tuple(self._raw.items()), self.body

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.unique_id!r})"


@dataclass(frozen=True, slots=True)
class SkippedEvent:
    """An event framed and named but not parsed: the reader was told which it reads."""

    name: str


_KINDS = {
    "auth/request": AuthRequest,
    "command/reply": CommandReply,
    "api/response": ApiResponse,
    "text/disconnect-notice": DisconnectNotice,
}

ESLMessage = Frame | Event | SkippedEvent


class ESLReader:
    """Incremental parser for what FreeSWITCH sends, on either kind of connection.

    Bounds: ``max_line`` per header line, ``max_headers`` lines and ``max_head`` bytes per
    header block (a channel's data is ~110 lines, a HANGUP_COMPLETE ~250), ``max_event``
    for an event's body and ``max_body`` for any other (``show channels as json`` with
    20,000 calls is ~20 MB).
    """

    def __init__(self, *, max_line: int = 16384, max_headers: int = 1024,
                 max_head: int = 256 << 10, max_event: int = 1 << 20,
                 max_body: int = 64 << 20, events: frozenset[str] | None = None) -> None:
        # Plain events not named in `events` come as SkippedEvent: a call setup sees a dozen
        # events of its channel and needs only to count some of them.
        self.events = events
        self.max_line, self.max_headers, self.max_head = max_line, max_headers, max_head
        self.max_event, self.max_body = max_event, max_body
        self._buf = bytearray()
        self._head: dict[str, str] | None = None  # headers of a frame awaiting its body
        self._need = 0
        self._search_from = 0

    def feed(self, data: bytes) -> list[ESLMessage]:
        buf = self._buf
        buf += data
        out: list[ESLMessage] = []
        pos = 0
        while True:
            if self._head is None:
                end = buf.find(b"\n\n", max(pos, self._search_from - 1))
                if end < 0:
                    self._check_pending(buf, pos)
                    break
                if end - pos > self.max_head:
                    raise ProtocolError(f"header block longer than {self.max_head} bytes")
                self._head = self._headers(bytes(buf[pos:end]))
                pos = end + 2
                self._need = self._length(self._head)
            if len(buf) - pos < self._need:
                break
            body = bytes(buf[pos:pos + self._need])
            pos += self._need
            head, self._head = self._head, None
            out.append(self._message(head, body))
        del buf[:pos]
        self._search_from = len(buf) if self._head is None else 0
        return out

    def _check_pending(self, buf: bytearray, pos: int) -> None:
        if len(buf) - pos > self.max_head:
            raise ProtocolError(f"header block longer than {self.max_head} bytes")
        last = buf.rfind(b"\n", pos)
        if len(buf) - max(last + 1, pos) > self.max_line:
            raise ProtocolError(f"header line longer than {self.max_line} bytes")

    def _headers(self, block: bytes) -> dict[str, str]:
        return parse_headers(block, self.max_line, self.max_headers)

    def _message(self, head: dict[str, str], body: bytes) -> ESLMessage:
        kind = head.get("Content-Type")
        if kind == "text/event-plain":
            if self.events is not None and body.startswith(b"Event-Name: "):
                name = body[12:body.find(b"\n")].decode("ascii", "replace")
                if name not in self.events:
                    return SkippedEvent(name)
            return _plain_event(body, self.max_line, self.max_headers)
        if kind == "text/event-json":
            return _json_event(body)
        if kind is None:
            raise ProtocolError("frame without Content-Type")
        return _KINDS.get(kind, Frame)(kind, head, body)

    def _length(self, head: dict[str, str]) -> int:
        text = head.get("Content-Length")
        if text is None:
            return 0
        length = whole(text)
        if length is None:
            raise ProtocolError(f"bad Content-Length {text[:20]!r}")
        kind = head.get("Content-Type", "")
        limit = self.max_event if kind.startswith("text/event") else self.max_body
        if length > limit:
            raise ProtocolError(f"{kind or 'frame'} of {length} bytes, more than {limit}")
        return length


def parse_headers(block: bytes, max_line: int,
                  max_headers: int) -> dict[str, str] | HeaderText:
    """``Name: value`` lines, checked, values left URL-encoded (Fields decodes them).
    Checked by one regex over the block and left as text (HeaderText): a Python loop over
    a HANGUP_COMPLETE's ~250 lines, or even a dict of them, would cost most of its parse."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("raw non-ASCII byte in headers (FreeSWITCH encodes them)") from None
    lines = text.count("\n") + 1
    if lines > max_headers:
        raise ProtocolError(f"more than {max_headers} header lines")
    if len(text) > max_line and _long_line(max_line).search(text):
        raise ProtocolError(f"header line longer than {max_line} bytes")
    bad = _BAD_ESCAPE.search(text) if "%" in text else None
    if bad:
        raise ProtocolError(f"bad URL encoding in {text[max(0, bad.start() - 40):][:80]!r}")
    # One name, ": ", then the rest of the line (which may hold ": " too), on every line.
    if _HEADER_BLOCK.fullmatch(text):
        return HeaderText(text)
    # "Name:value", or not headers at all. A repeated name keeps its place and its last
    # value: FreeSWITCH repeats only HANGUP_COMPLETE's Hangup-Cause, with the same value.
    return dict(_pair(line) for line in text.split("\n"))


def _pair(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if not sep or not _NAME.fullmatch(name):
        raise ProtocolError(f"not a header line: {line[:80]!r}")
    return name, value[1:] if value.startswith(" ") else value


@functools.cache
def _long_line(max_line: int) -> re.Pattern:
    return re.compile(f"[^\n]{{{max_line + 1}}}")


def _decode_values(headers: dict[str, str]) -> None:
    """URL-decode in place, in one `unquote` for all values: no raw LF is inside an
    encoded value, so LF joins them; a value that decodes to a LF falls back to one
    `unquote` each."""
    names = [name for name, value in headers.items() if "%" in value]
    decoded = unquote("\n".join(headers[name] for name in names), errors="replace").split("\n")
    if len(decoded) != len(names):
        decoded = [unquote(headers[name], errors="replace") for name in names]
    headers.update(zip(names, decoded, strict=True))


def _plain_event(body: bytes, max_line: int, max_headers: int) -> Event:
    block, sep, rest = body.partition(b"\n\n")
    if not sep:
        raise ProtocolError("plain event body not ended by a blank line")
    headers = parse_headers(block, max_line, max_headers)
    inner = b""
    if "Content-Length" in headers:
        length = headers["Content-Length"]
        if whole(length) != len(rest):
            raise ProtocolError(f"event's inner Content-Length {length[:20]!r} is not "
                                f"its {len(rest)} bytes")
        inner = rest
    elif rest:
        raise ProtocolError("bytes after a plain event's headers")
    return _event(headers, inner.decode("utf-8", "replace"), encoded=True)


def _json_event(body: bytes) -> Event:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("JSON event that is not JSON") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ProtocolError("JSON event that is not an object of strings")
    inner = data.pop("_body", "")
    return _event(data, inner, encoded=False)


def _event(headers: dict[str, str], body: str, encoded: bool) -> Event:
    name = headers.get("Event-Name")
    if not name:
        raise ProtocolError("event without Event-Name")
    return Event(name, headers, body, encoded)


# -- what callguard sends ------------------------------------------------------------------
def _safe(text: str) -> str:
    if "\n" in text or "\r" in text or not text.isprintable():
        raise ProtocolError(f"refusing to send a line break or control byte in {text[:80]!r}")
    return text


def command(line: str, **headers: str) -> bytes:
    """One command: its line, ``Name: value`` lines (``_`` in a name becomes ``-``)."""
    parts = [_safe(line)]
    parts += [f"{name.replace('_', '-')}: {_safe(value)}" for name, value in headers.items()]
    return ("\n".join(parts) + "\n\n").encode("utf-8")


def auth(password: str) -> bytes:
    return command(f"auth {password}")


def api(*words: str) -> bytes:
    """``api`` with its words joined by spaces; words must hold no space themselves
    (mod_commands splits on them), except the last, which is the rest of the line."""
    for word in words[:-1]:
        if not word or " " in word:
            raise ProtocolError(f"api argument {word[:80]!r} is empty or holds a space")
    return command("api " + " ".join(words))


def sendmsg_execute(app: str, arg: str, event_lock: bool = True) -> bytes:
    headers = {"call_command": "execute", "execute_app_name": app, "execute_app_arg": arg}
    if event_lock:
        headers["event_lock"] = "true"
    return command("sendmsg", **headers)


def sendmsg_hangup(cause: str) -> bytes:
    return command("sendmsg", call_command="hangup", hangup_cause=cause)


# -- what FreeSWITCH sends (the simulated FreeSWITCH) ------------------------------------------
@dataclass(frozen=True, slots=True)
class Command:
    line: str  # "api uuid_kill <uuid> NORMAL_CLEARING", "sendmsg", "exit"
    headers: dict[str, str]  # sendmsg's lines


class CommandReader:
    """Commands as mod_event_socket reads them: lines up to a blank line."""

    def __init__(self, max_command: int = 65536) -> None:
        self.max_command = max_command
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Command]:
        self._buf += data
        out = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                if len(self._buf) > self.max_command:
                    raise ProtocolError("command too long")
                return out
            lines = self._buf[:end].decode("utf-8", "replace").split("\n")
            del self._buf[:end + 2]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(": ")
                headers[name.lower()] = value
            out.append(Command(lines[0].strip(), headers))


def frame(content_type: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (),
          length_first: bool = False) -> bytes:
    """A frame in FreeSWITCH's header order: events put Content-Length first, api replies
    and notices after Content-Type."""
    lines = [f"Content-Type: {content_type}", *(f"{n}: {v}" for n, v in headers)]
    if body or content_type != "command/reply":
        length = f"Content-Length: {len(body)}"
        lines = [length, *lines] if length_first else [*lines, length]
    return ("\n".join(lines) + "\n\n").encode() + body


def event_frame(headers: list[tuple[str, str]], body: str = "") -> bytes:
    """A ``text/event-plain`` frame of the given (decoded) headers."""
    lines = [f"{name}: {url_encode(value)}\n" for name, value in headers
             if name != "Content-Length"]  # the body's own, written below
    inner = body.encode("utf-8")
    if inner:
        lines.append(f"Content-Length: {len(inner)}\n")
    data = ("".join(lines) + "\n").encode() + inner
    return frame("text/event-plain", data, length_first=True)
