"""FastAGI, server side, sans-IO: bytes in, events out; commands out as bytes.

Wire format of Asterisk 22 (transcripts in tests/fixtures/asterisk):

* every line ends in a bare ``\\n``; Asterisk never sends ``\\r``;
* on connect: ``agi_key: value\\n`` headers (an empty value keeps the space), then ``\\n``;
* one reply line ``NNN text\\n`` per command, except the ``520-`` usage block
  (``520-...\\n`` free text ... ``520 End of proper usage.\\n``);
* ``HANGUP\\n`` alone: the channel hung up, or the session ends after our EOF.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs

from callguard.protocol.errors import ProtocolError

__all__ = [
    "MAX_COMMAND_BYTES",
    "AGIHangup",
    "AGIReply",
    "AGIReplyReader",
    "AGIRequest",
    "AGIRequestReader",
    "ProtocolError",
    "authorize_reply",
    "noop",
    "set_variable",
    "verbose",
]

# res_agi reads a command with fgets() into char[AGI_BUF_LEN = 2048]: a longer line is cut
# and its rest runs as a second command, so one command line (with "\n") must fit in 2047.
MAX_COMMAND_BYTES = 2047

_HEADER_KEY = re.compile(r"agi_[a-z0-9_]+")
_HEADER_KEYS = re.compile(r"agi_[a-z0-9_]+(?:\nagi_[a-z0-9_]+)*")  # keys joined by "\n"
_HEADER_LINE = re.compile(r"^(agi_[a-z0-9_]+): (.*)$", re.MULTILINE)
_ARG_KEY = re.compile(r"agi_arg_([1-9][0-9]*)")
_REPLY = re.compile(r"([1-5][0-9][0-9])([ -])(.*)")
# A variable, or a dialplan function with a simple argument: TIMEOUT(absolute).
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\([A-Za-z0-9_]+\))?")
_REQUIRED = ("agi_channel", "agi_uniqueid")


class _Lines:
    """Cuts a byte stream into ``\\n``-terminated lines, enforcing bounds as bytes arrive.

    A chunk at a time, not a line at a time: the split and the checks run in C.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.partial = b""

    def split(self, data: bytes) -> list[bytes]:
        """The lines (without ``\\n``) that data completes; the rest waits for more."""
        _check_no_cr(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        _check_line_lengths(lines, self.partial, self.max_line)
        return lines


def _check_no_cr(data: bytes) -> None:
    if b"\r" in data:
        raise ProtocolError("CR in an AGI line (Asterisk ends lines with a bare LF)")


def _check_line_lengths(lines: list[bytes], partial: bytes, max_line: int) -> None:
    # The unterminated rest is checked as it grows: a peer that never sends "\n" cannot
    # make it longer than max_line.
    if len(partial) > max_line or (lines and max(map(len, lines)) > max_line):
        raise ProtocolError(f"AGI line longer than {max_line} bytes")


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"AGI line is not valid UTF-8: {line[:80]!r}") from exc


# --- request (headers sent on connect) ---------------------------------------------------


@dataclass(frozen=True)
class AGIRequest:
    """The headers Asterisk sends when it connects, plus what the server needs from them."""

    headers: dict[str, str]
    script: str  # agi_network_script without its query string: "authorize"
    params: dict[str, str]  # query of agi_network_script, last value wins
    args: list[str]  # agi_arg_1 .. agi_arg_N

    @classmethod
    def from_headers(cls, headers: dict[str, str], *, max_params: int = 16) -> AGIRequest:
        for key in _REQUIRED:
            if not headers.get(key):
                raise ProtocolError(f"AGI request without {key}")
        # Present only if the agi:// URL has a path; the query string stays in it.
        script, _, query = headers.get("agi_network_script", "").partition("?")
        params = _params(query, max_params) if query else {}
        args: list[str] = []
        while (value := headers.get(f"agi_arg_{len(args) + 1}")) is not None:
            args.append(value)
        if ("\n" + "\n".join(headers)).count("\nagi_arg_") != len(args):
            numbers = sorted(int(m[1]) for key in headers
                             if key.startswith("agi_arg_") and (m := _ARG_KEY.fullmatch(key)))
            if numbers != list(range(1, len(numbers) + 1)):
                raise ProtocolError(f"AGI arguments are not agi_arg_1..N: {numbers}")
        return cls(headers, script, params, args)

    @property
    def channel(self) -> str:
        return self.headers["agi_channel"]

    @property
    def uniqueid(self) -> str:
        return self.headers["agi_uniqueid"]

    @property
    def accountcode(self) -> str:
        return self.headers.get("agi_accountcode", "")

    @property
    def extension(self) -> str:
        return self.headers.get("agi_extension", "")

    @property
    def callerid(self) -> str:
        """Raw ``agi_callerid``: Asterisk writes ``unknown`` when there is none."""
        return self.headers.get("agi_callerid", "")


def _params(query: str, max_params: int) -> dict[str, str]:
    try:
        parsed = parse_qs(
            query,
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=max_params,
            errors="strict",
        )
    except ValueError as exc:  # includes UnicodeDecodeError from a bad %-escape
        raise ProtocolError(f"bad AGI script query {query!r}: {exc}") from exc
    return {key: values[-1] for key, values in parsed.items()}


class AGIRequestReader:
    """Incremental parser for the request headers; ``feed()`` until it returns the request.

    Bytes that follow the blank line in the same chunk are kept in ``trailing`` (feed them
    to an :class:`AGIReplyReader`).
    """

    def __init__(
        self,
        *,
        max_line: int = 2048,
        max_headers: int = 64,
        max_bytes: int = 16384,
        max_params: int = 16,
    ) -> None:
        self.max_line = max_line
        self.max_headers = max_headers
        self.max_bytes = max_bytes
        self.max_params = max_params
        self.request: AGIRequest | None = None
        self.trailing = b""
        self._partial = b""  # an unterminated line, at most max_line bytes
        self._headers: dict[str, str] = {}
        self._consumed = 0

    def feed(self, data: bytes) -> AGIRequest | None:
        if self.request is not None:
            raise RuntimeError("AGI request already complete: feed the reply reader instead")
        data = self._partial + data  # _partial starts a line
        if data[:1] == b"\n":
            blank = 0
        elif (end := data.find(b"\n\n")) >= 0:
            blank = end + 1
        else:
            blank = -1  # the headers go on
        if blank >= 0:
            self._add_lines(data[:blank])
            self._consumed += 1
            self._check_size(0)
            self.request = AGIRequest.from_headers(self._headers, max_params=self.max_params)
            self.trailing = data[blank + 1 :]
            return self.request
        cut = data.rfind(b"\n") + 1
        partial = data[cut:]
        _check_no_cr(partial)
        _check_line_lengths([], partial, self.max_line)
        self._add_lines(data[:cut])
        self._check_size(len(partial))
        self._partial = partial
        return None

    def _check_size(self, pending: int) -> None:
        if self._consumed + pending > self.max_bytes:
            raise ProtocolError(f"AGI request headers exceed {self.max_bytes} bytes")

    def _add_lines(self, block: bytes) -> None:
        """Whole ``agi_key: value\\n`` lines, checked and parsed together."""
        if not block:
            return
        _check_no_cr(block)
        self._consumed += len(block)
        self._check_size(0)
        if len(block) > self.max_line:  # else no line of it can be too long
            _check_line_lengths(block[:-1].split(b"\n"), b"", self.max_line)
        text = _decode(block)
        lines = text[:-1].split("\n")
        # One partition a line and one match over all keys: this runs on every call setup.
        parts = [line.partition(": ") for line in lines]
        headers = {key: value for key, sep, value in parts if sep}
        if len(headers) != len(lines) or not _HEADER_KEYS.fullmatch("\n".join(headers)):
            pairs = _HEADER_LINE.findall(text)
            if len(pairs) != len(lines):
                raise _bad_header(text)
            if len(self._headers) + len(pairs) > self.max_headers:
                raise ProtocolError(f"more than {self.max_headers} AGI headers")
            raise ProtocolError(f"repeated AGI header {_repeated(pairs)}")
        if len(self._headers) + len(headers) > self.max_headers:
            raise ProtocolError(f"more than {self.max_headers} AGI headers")
        if not self._headers.keys().isdisjoint(headers):
            raise ProtocolError(
                f"repeated AGI header {_repeated([*self._headers.items(), *headers.items()])}")
        self._headers.update(headers)


def _repeated(pairs) -> str:
    seen: set[str] = set()
    return next(key for key, _ in pairs if key in seen or seen.add(key))


def _bad_header(text: str) -> ProtocolError:
    """The error for the first line of text that is not an ``agi_key: value`` header."""
    for line in text.split("\n"):
        key, sep, _ = line.partition(": ")
        if not sep:
            return ProtocolError(f"AGI header line without ': ': {line[:80]!r}")
        if not _HEADER_KEY.fullmatch(key):
            return ProtocolError(f"not an agi_ header: {key[:80]!r}")
    return ProtocolError("bad AGI header line")


# --- replies to our commands ---------------------------------------------------------------


@dataclass(frozen=True)
class AGIReply:
    """One reply: ``200 result=1 (value)``, ``510 ...``, ``511 ...`` or a whole ``520`` block.

    ``result``/``data`` are set for 1xx/2xx replies only (``data`` is the text in parentheses,
    verbatim, or None without parentheses). ``text`` is everything after the code; for a
    multi-line block, its lines joined with ``\\n``.
    """

    code: int
    result: str | None
    data: str | None
    text: str


@dataclass(frozen=True)
class AGIHangup:
    """The line ``HANGUP``: the caller hung up, or (after our EOF) the session is over.

    It does not prove the channel is gone: Asterisk sends it at the end of every session.
    """


AGIEvent = AGIReply | AGIHangup
_SET_VARIABLE_OK = AGIReply(200, "1", None, "result=1")


class AGIReplyReader:
    """Incremental parser for what Asterisk sends after the request headers."""

    def __init__(self, *, max_line: int = 8192, max_block_lines: int = 256) -> None:
        self.max_block_lines = max_block_lines
        self._lines = _Lines(max_line)
        self._block_code: str | None = None  # set inside an "NNN-" block
        self._block: list[str] = []

    def feed(self, data: bytes) -> list[AGIEvent]:
        events: list[AGIEvent] = []
        for line in self._lines.split(data):
            if line == b"200 result=1" and self._block_code is None:
                events.append(_SET_VARIABLE_OK)  # nearly every reply we ever get
                continue
            event = self._line(_decode(line))
            if event is not None:
                events.append(event)
        return events

    def feed_eof(self) -> None:
        """The peer closed: raise if it stopped in the middle of a line or block."""
        if self._lines.partial or self._block_code is not None:
            raise ProtocolError("AGI connection closed in the middle of a reply")

    def _line(self, line: str) -> AGIEvent | None:
        if self._block_code is not None:
            # Usage text inside the block is free-form ("Example return code: 200 result=1
            # (testvariable)"): only the closing "NNN " line ends it.
            if line.startswith(self._block_code + " "):
                self._block.append(line[4:])
                code, text = int(self._block_code), "\n".join(self._block)
                self._block_code, self._block = None, []
                return AGIReply(code, None, None, text)
            if len(self._block) >= self.max_block_lines:
                raise ProtocolError(
                    f"AGI {self._block_code} block over {self.max_block_lines} lines"
                )
            self._block.append(line)
            return None
        if line == "HANGUP":
            return AGIHangup()
        match = _REPLY.fullmatch(line)
        if match is None:
            raise ProtocolError(f"not an AGI reply: {line[:80]!r}")
        code, sep, text = match.groups()
        if sep == "-":
            self._block_code, self._block = code, [text]
            return None
        if code[0] in "12":
            result, data = _parse_result(text)
            return AGIReply(int(code), result, data, text)
        return AGIReply(int(code), None, None, text)


def _parse_result(text: str) -> tuple[str, str | None]:
    """``result=1 (some value) endpos=5`` -> ("1", "some value")."""
    if not text.startswith("result="):
        raise ProtocolError(f"AGI success reply without result=: {text[:80]!r}")
    result, _, rest = text[len("result=") :].partition(" ")
    if not rest.startswith("("):
        return result, None
    # The value is verbatim and may itself contain ")": take the last one.
    close = rest.rfind(")")
    if close < 0:
        raise ProtocolError(f"unterminated ( in AGI reply: {text[:80]!r}")
    return result, rest[1:close]


# --- commands ------------------------------------------------------------------------------


def _quote(value: str) -> str:
    # res_agi's parse_args(): inside "..." a backslash makes the next byte literal. A CR
    # would stay in the value (Asterisk strips only the "\n"), LF ends the command, NUL
    # ends the C string.
    if "\r" in value or "\n" in value or "\0" in value:
        raise ProtocolError(f"CR, LF or NUL in an AGI argument: {value[:80]!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _command(*words: str) -> bytes:
    try:
        line = (" ".join(words) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"AGI command is not encodable as UTF-8: {exc}") from exc
    if len(line) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"AGI command longer than {MAX_COMMAND_BYTES} bytes")
    return line


def set_variable(name: str, value: str) -> bytes:
    """``SET VARIABLE NAME "value"\\n``; the value is quoted and escaped."""
    if not _VAR_NAME.fullmatch(name):
        raise ProtocolError(f"bad channel variable name {name[:80]!r}")
    return _command("SET VARIABLE", name, _quote(value))


def verbose(msg: str, level: int = 1) -> bytes:
    """``VERBOSE "msg" level\\n`` (level 1-4) into the Asterisk log."""
    if isinstance(level, bool) or level not in (1, 2, 3, 4):
        raise ProtocolError(f"VERBOSE level must be 1-4, not {level!r}")
    return _command("VERBOSE", _quote(msg), str(level))


def noop() -> bytes:
    return b"NOOP\n"


def authorize_reply(variables: Iterable[tuple[str, str]]) -> bytes:
    """All SET VARIABLE lines of a decision, for one write followed by ``shutdown(SHUT_WR)``.

    Asterisk executes one buffered command per wake-up of its poll(); the half-close is what
    makes it drain the rest (agi-pipelined.md), answering each and then ``HANGUP``.
    """
    return b"".join(set_variable(name, value) for name, value in variables)
