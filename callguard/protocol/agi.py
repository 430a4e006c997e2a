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
from collections.abc import Iterable, Iterator
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
_ARG_KEY = re.compile(r"agi_arg_([1-9][0-9]*)")
_REPLY = re.compile(r"([1-5][0-9][0-9])([ -])(.*)")
# A variable, or a dialplan function with a simple argument: TIMEOUT(absolute).
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\([A-Za-z0-9_]+\))?")
_REQUIRED = ("agi_channel", "agi_uniqueid")


class _Lines:
    """Cuts a byte stream into ``\\n``-terminated lines, enforcing bounds as bytes arrive."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.partial = bytearray()

    def split(self, data: bytes) -> Iterator[tuple[bytes, int]]:
        """Yield each completed line (without ``\\n``) and the offset in data just after it.

        The tail without ``\\n`` is kept only if the caller drains the iterator.
        """
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            self._append(data, start, nl)
            line = bytes(self.partial)
            self.partial.clear()
            start = nl + 1
            yield line, start
        self._append(data, start, len(data))

    def _append(self, data: bytes, start: int, end: int) -> None:
        # Checked before copying, so a peer that never sends "\n" cannot grow the buffer.
        if len(self.partial) + end - start > self.max_line:
            raise ProtocolError(f"AGI line longer than {self.max_line} bytes")
        if data.find(b"\r", start, end) >= 0:
            raise ProtocolError("CR in an AGI line (Asterisk ends lines with a bare LF)")
        self.partial += data[start:end]


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
        params = {key: values[-1] for key, values in parsed.items()}
        numbers = sorted(int(m[1]) for key in headers if (m := _ARG_KEY.fullmatch(key)))
        if numbers != list(range(1, len(numbers) + 1)):
            raise ProtocolError(f"AGI arguments are not agi_arg_1..N: {numbers}")
        args = [headers[f"agi_arg_{n}"] for n in numbers]
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
        self.max_headers = max_headers
        self.max_bytes = max_bytes
        self.max_params = max_params
        self.request: AGIRequest | None = None
        self.trailing = b""
        self._lines = _Lines(max_line)
        self._headers: dict[str, str] = {}
        self._consumed = 0

    def feed(self, data: bytes) -> AGIRequest | None:
        if self.request is not None:
            raise RuntimeError("AGI request already complete: feed the reply reader instead")
        for line, end in self._lines.split(data):
            self._consumed += len(line) + 1
            self._check_size()
            if not line:
                self.request = AGIRequest.from_headers(self._headers, max_params=self.max_params)
                self.trailing = data[end:]
                return self.request
            self._add(line)
        self._check_size()
        return None

    def _check_size(self) -> None:
        if self._consumed + len(self._lines.partial) > self.max_bytes:
            raise ProtocolError(f"AGI request headers exceed {self.max_bytes} bytes")

    def _add(self, line: bytes) -> None:
        key, sep, value = _decode(line).partition(": ")
        if not sep:
            raise ProtocolError(f"AGI header line without ': ': {line[:80]!r}")
        if not _HEADER_KEY.fullmatch(key):
            raise ProtocolError(f"not an agi_ header: {key[:80]!r}")
        if key in self._headers:
            raise ProtocolError(f"repeated AGI header {key}")
        if len(self._headers) >= self.max_headers:
            raise ProtocolError(f"more than {self.max_headers} AGI headers")
        self._headers[key] = value


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


class AGIReplyReader:
    """Incremental parser for what Asterisk sends after the request headers."""

    def __init__(self, *, max_line: int = 8192, max_block_lines: int = 256) -> None:
        self.max_block_lines = max_block_lines
        self._lines = _Lines(max_line)
        self._block_code: str | None = None  # set inside an "NNN-" block
        self._block: list[str] = []

    def feed(self, data: bytes) -> list[AGIEvent]:
        events: list[AGIEvent] = []
        for line, _ in self._lines.split(data):
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
