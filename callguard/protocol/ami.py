"""AMI (Asterisk Manager Interface), client side, sans-IO: bytes in, events out.

Wire format of Asterisk 22 (transcripts in tests/fixtures/asterisk):

* on connect, one banner line ``Asterisk Call Manager/11.0.0\\r\\n`` (no blank line after it);
* then messages of ``Key: Value\\r\\n`` lines, each ended by an empty line ``\\r\\n``;
* only ``\\r\\n`` ends a line: a value may hold a raw ``\\r`` (AGIExecStart ``Command:`` of a
  CRLF AGI command is ``...RESULT\\r\\r\\n``), and is kept;
* the FIRST line classifies a message: ``Response:`` or ``Event:``. Events may carry
  ``Response:`` and ``ActionID:`` further down (OriginateResponse, list items).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from callguard.protocol.errors import ProtocolError

__all__ = [
    "MAX_ACTION_FIELDS",
    "MAX_ACTION_LINE",
    "AMIBanner",
    "AMIEvent",
    "AMIMessage",
    "AMIReader",
    "AMIResponse",
    "ProtocolError",
    "absolute_timeout",
    "core_show_channels",
    "events",
    "filter_add",
    "format_action",
    "getvar",
    "hangup",
    "login",
    "logoff",
    "ping",
]

_BANNER = b"Asterisk Call Manager/"
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_KEY = re.compile(r"[A-Za-z0-9_-]+")
# The keys callguard's own actions use: known good, neither matched nor lowered again.
_GOOD_KEYS = frozenset({"Channel", "Timeout", "Cause", "Variable", "Username", "Secret",
                        "Events", "EventMask", "Operation", "Filter"})

# manager.c reads action lines into char inbuf[1025]: a line (with "\r\n") longer than 1024
# bytes is discarded with a warning, and the action silently loses that header.
MAX_ACTION_LINE = 1024
# AST_MAX_MANHEADERS: headers past the 128th are dropped silently.
MAX_ACTION_FIELDS = 128
# AbsoluteTimeout turns atof(Timeout) into a timeval, and a zero timeval means "no hangup
# time": a tiny positive value (< 1 us) would clear the timeout instead of firing at once.
_MIN_TIMEOUT = Decimal("0.001")


@dataclass(frozen=True, slots=True)
class AMIBanner:
    version: str  # "11.0.0": the AMI protocol version, not the Asterisk version


@dataclass(frozen=True, slots=True)
class AMIMessage:
    """One message. ``fields`` keeps every pair in order; ``headers`` maps a key to its
    first value (keys are case-sensitive here, as Asterisk writes them)."""

    name: str  # Response status (Success, Error, Goodbye) or Event name
    action_id: str | None
    fields: tuple[tuple[str, str], ...]
    headers: dict[str, str] = field(compare=False, hash=False, repr=False)

    def get(self, key: str, default: str = "") -> str:
        return self.headers.get(key, default)


class AMIResponse(AMIMessage):
    """Reply to an action (first line ``Response:``)."""

    __slots__ = ()


class AMIEvent(AMIMessage):
    """Event (first line ``Event:``), including list items that carry our ActionID."""

    __slots__ = ()


AMIReaderEvent = AMIBanner | AMIResponse | AMIEvent


class AMIReader:
    """Incremental parser for the byte stream Asterisk sends on an AMI connection."""

    def __init__(
        self, *, max_line: int = 8192, max_fields: int = 256, max_message: int = 65536
    ) -> None:
        self.max_line = max_line
        self.max_fields = max_fields
        self.max_message = max_message
        self._buf = bytearray()  # unparsed bytes: always the start of one message (or banner)
        self._banner = False
        self._search_from = 0  # no "\r\n\r\n" starts before this offset in _buf
        self._lines = 0  # "\r\n" counted in _buf so far ...
        self._counted_to = 0  # ... up to this offset

    def feed(self, data: bytes) -> list[AMIReaderEvent]:
        buf = self._buf
        buf += data
        out: list[AMIReaderEvent] = []
        pos = 0
        if not self._banner:
            end = buf.find(b"\r\n")
            if end < 0:
                self._check_banner_prefix()
                return out
            out.append(self._parse_banner(bytes(buf[:end])))
            self._banner = True
            pos = end + 2
            self._search_from = pos
        while True:
            if buf[pos : pos + 2] == b"\r\n":
                raise ProtocolError("empty AMI message")
            end = buf.find(b"\r\n\r\n", max(pos, self._search_from))
            if end < 0:
                break
            if end + 4 - pos > self.max_message:
                raise ProtocolError(f"AMI message longer than {self.max_message} bytes")
            out.append(self._parse_message(buf[pos:end]))
            pos = end + 4
        if pos:
            del buf[:pos]
            self._lines = self._counted_to = 0
        self._search_from = max(len(buf) - 3, 0)
        self._check_partial()
        return out

    def feed_eof(self) -> None:
        """The peer closed: raise if it stopped in the middle of a message."""
        if self._buf:
            raise ProtocolError("AMI connection closed in the middle of a message")

    def _check_banner_prefix(self) -> None:
        # Fail on the first wrong byte instead of waiting for a line end.
        head = bytes(self._buf[: len(_BANNER)])
        if not _BANNER.startswith(head):
            raise ProtocolError(f"not an AMI banner: {head!r}")
        if len(self._buf) > self.max_line:
            raise ProtocolError(f"AMI banner longer than {self.max_line} bytes")

    def _parse_banner(self, line: bytes) -> AMIBanner:
        version = line[len(_BANNER) :].decode("ascii", "replace")
        if len(line) > self.max_line:
            raise ProtocolError(f"AMI banner longer than {self.max_line} bytes")
        if not line.startswith(_BANNER) or not _VERSION.fullmatch(version):
            raise ProtocolError(f"not an AMI banner: {line[:80]!r}")
        return AMIBanner(version)

    def _check_partial(self) -> None:
        """Bounds on the incomplete message left in the buffer, checked as bytes arrive."""
        buf = self._buf
        if len(buf) > self.max_message:
            raise ProtocolError(f"AMI message longer than {self.max_message} bytes")
        # Count only bytes not seen before (a "\r\n" may straddle two feeds).
        self._lines += buf.count(b"\r\n", max(self._counted_to - 1, 0))
        self._counted_to = len(buf)
        if self._lines > self.max_fields:
            raise ProtocolError(f"AMI message with more than {self.max_fields} lines")
        line_start = buf.rfind(b"\r\n") + 2 if self._lines else 0
        partial = len(buf) - line_start - buf.endswith(b"\r")  # that "\r" may start "\r\n"
        if partial > self.max_line:
            raise ProtocolError(f"AMI line longer than {self.max_line} bytes")

    def _parse_message(self, block: bytearray) -> AMIMessage:
        if len(block) > self.max_line and max(map(len, block.split(b"\r\n"))) > self.max_line:
            raise ProtocolError(f"AMI line longer than {self.max_line} bytes")
        # surrogateescape: a caller name in Latin-1 must not kill the connection, and it
        # round-trips byte for byte into format_action() (e.g. as a channel name).
        lines = block.decode("utf-8", "surrogateescape").split("\r\n")
        if len(lines) > self.max_fields:
            raise ProtocolError(f"AMI message with more than {self.max_fields} lines")
        # Comprehensions, not a loop of statements: this is the hot path (~17 lines/event).
        parts = [line.partition(": ") for line in lines]
        fields = tuple([(key, value) for key, sep, value in parts if sep and key])
        if len(fields) != len(lines):
            bad = next(
                line for line, (key, sep, _) in zip(lines, parts, strict=True) if not (sep and key)
            )
            raise ProtocolError(f"AMI line without 'Key: ': {bad[:80]!r}")
        headers = dict(fields)
        if len(headers) != len(fields):  # a repeated key: the first value wins
            headers = {}
            for key, value in fields:
                headers.setdefault(key, value)
        kind, name = fields[0]
        if kind == "Response":
            cls: type[AMIMessage] = AMIResponse
        elif kind == "Event":
            cls = AMIEvent
        else:
            raise ProtocolError(f"AMI message starts with {kind!r}, not Response or Event")
        if not name:
            raise ProtocolError(f"AMI message with an empty {kind}")
        return cls(name, headers.get("ActionID"), fields, headers)


# --- actions -------------------------------------------------------------------------------


def _check_value(value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ProtocolError(f"CR, LF or NUL in an AMI value: {value[:80]!r}")


def format_action(
    action: str,
    action_id: str,
    fields: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> bytes:
    """``Action: X\\r\\nActionID: Y\\r\\nKey: Value\\r\\n...\\r\\n`` (keys may repeat in a list)."""
    pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
    if not _KEY.fullmatch(action):
        raise ProtocolError(f"bad AMI action name {action[:80]!r}")
    if not action_id:
        raise ProtocolError("empty ActionID: responses could not be matched")
    if len(pairs) + 2 > MAX_ACTION_FIELDS:
        raise ProtocolError(f"AMI action with more than {MAX_ACTION_FIELDS} lines")
    # Asterisk looks headers up case-insensitively and takes the first: a second Action or
    # ActionID would be ignored or, worse, shadow ours.
    if not _GOOD_KEYS.issuperset([key for key, _ in pairs]) and any(
            str(key).lower() in ("action", "actionid") for key, _ in pairs):
        raise ProtocolError("Action/ActionID given twice")
    out = []
    for key, value in [("Action", action), ("ActionID", action_id), *pairs]:
        if key not in _GOOD_KEYS and key not in ("Action", "ActionID") and not _KEY.fullmatch(key):
            raise ProtocolError(f"bad AMI key {key[:80]!r}")
        _check_value(value)
        try:
            line = f"{key}: {value}\r\n".encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise ProtocolError(f"AMI value not encodable: {exc}") from exc
        if len(line) > MAX_ACTION_LINE:
            raise ProtocolError(f"AMI line longer than {MAX_ACTION_LINE} bytes: {key}")
        out.append(line)
    out.append(b"\r\n")
    return b"".join(out)


def _channel(channel: str) -> str:
    if not channel:
        raise ProtocolError("empty channel name")
    return channel


def login(action_id: str, username: str, secret: str, events: str | None = "call") -> bytes:
    """Plain-text Login. ``events`` is the event mask (``call``, ``on``, ``off``, ...); None
    omits the header, which means every class the user may read, security events included."""
    fields = [("Username", username), ("Secret", secret)]
    if events is not None:
        fields.append(("Events", events))
    return format_action("Login", action_id, fields)


def absolute_timeout(action_id: str, channel: str, seconds: int | str | Decimal) -> bytes:
    """Hang the channel up ``seconds`` from now; a second call replaces the first.

    It cannot clear a timeout: ``Timeout: 0`` is an error ("No timeout specified").
    """
    # No float: its binary expansion (Decimal(0.1) has 55 digits) is not what the caller meant.
    if isinstance(seconds, bool) or not isinstance(seconds, int | str | Decimal):
        raise ProtocolError(f"AbsoluteTimeout seconds must be int, str or Decimal: {seconds!r}")
    if isinstance(seconds, int):
        value, text = Decimal(seconds), str(seconds)
    else:
        try:
            value = Decimal(seconds)
        except InvalidOperation as exc:
            raise ProtocolError(f"bad AbsoluteTimeout seconds {seconds!r}") from exc
        if not value.is_finite():
            raise ProtocolError(f"bad AbsoluteTimeout seconds {seconds!r}")
        text = format(value, "f")  # Asterisk uses atof(): no exponent, no spaces
    if value < _MIN_TIMEOUT:
        raise ProtocolError(f"AbsoluteTimeout needs at least {_MIN_TIMEOUT} s, not {seconds!r}")
    return format_action(
        "AbsoluteTimeout", action_id, [("Channel", _channel(channel)), ("Timeout", text)]
    )


def hangup(action_id: str, channel: str, cause: int = 16) -> bytes:
    """Hang up with a Q.850 cause (16 = Normal Clearing, shown in the Hangup event)."""
    if isinstance(cause, bool) or not isinstance(cause, int) or not 0 <= cause <= 127:
        raise ProtocolError(f"Q.850 cause must be 0-127, not {cause!r}")
    return format_action(
        "Hangup", action_id, [("Channel", _channel(channel)), ("Cause", str(cause))]
    )


def core_show_channels(action_id: str) -> bytes:
    """List channels: a Response (EventList: start), CoreShowChannel events with our
    ActionID, then CoreShowChannelsComplete (ListItems)."""
    return format_action("CoreShowChannels", action_id)


def getvar(action_id: str, channel: str, variable: str) -> bytes:
    """Read a channel variable or function; the Response carries ``Variable`` and ``Value``
    (``Value: `` when unset)."""
    return format_action("Getvar", action_id, [("Channel", _channel(channel)),
                                               ("Variable", variable)])


def ping(action_id: str) -> bytes:
    return format_action("Ping", action_id)


def logoff(action_id: str) -> bytes:
    """Asterisk answers ``Response: Goodbye`` and closes the socket at once."""
    return format_action("Logoff", action_id)


def events(action_id: str, mask: str) -> bytes:
    """Change the session's event mask (``call``, ``off``, ``call,agi`` ...)."""
    return format_action("Events", action_id, [("EventMask", mask)])


def filter_add(action_id: str, filter_expr: str) -> bytes:
    """Add a session event filter (legacy syntax: a regex over the event text, ``!`` =
    exclude). There is no Remove operation."""
    return format_action("Filter", action_id, [("Operation", "Add"), ("Filter", filter_expr)])
