"""Rate plans: longest-prefix match on the dialled number and the cost of a call.

The engine's Lua scripts compute the same cost formula in Redis; the test
suite checks the two agree.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from .money import MAX_MICROS, AmountError, format_full, parse_amount

CSV_HEADER = (
    "prefix",
    "description",
    "rate_per_min",
    "connect_fee",
    "initial_increment",
    "subsequent_increment",
    "blocked",
)
MAX_PREFIX_LEN = 16
MAX_NUMBER_LEN = 32
MAX_DESCRIPTION_LEN = 200  # RateRow.description
MAX_INCREMENT = 3600
_DIGITS = re.compile(r"[0-9]+")
_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n", ""}


class NumberError(ValueError):
    """A dialled number callguard cannot rate (junk characters, empty, too long)."""


class PlanError(ValueError):
    """A rate plan file with bad rows; `problems` lists every one as (line, message)."""

    def __init__(self, problems: list[tuple[int, str]]):
        self.problems = problems
        super().__init__(f"{len(problems)} bad row(s)")


def normalize_number(number: str) -> str:
    """Digits only, in international format where the caller wrote one.

    "+41 44..." is junk (spaces are refused: a dialplan never sends them).
    "+4144..." and "004144..." both become "4144..."; a national "044..." stays
    as dialled, so a plan for national dialling keys on "0" prefixes.
    """
    text = number.strip() if isinstance(number, str) else ""
    if text.startswith("+"):
        text = text[1:]
    elif text.startswith("00"):
        text = text[2:]
    if not text or not _DIGITS.fullmatch(text):
        raise NumberError(f"not a dialable number: {number!r} (digits with an optional leading +)")
    if len(text) > MAX_NUMBER_LEN:
        raise NumberError(f"number too long: {number!r}")
    return text


@dataclass(frozen=True, slots=True)
class Rate:
    prefix: str
    description: str
    rate_per_min: int  # micro-units per minute
    connect_fee: int  # micro-units
    initial_increment: int  # seconds
    subsequent_increment: int  # seconds
    blocked: bool = False

    def billed_seconds(self, duration: int) -> int:
        """Seconds billed for an answered call of `duration` seconds (DESIGN.md)."""
        extra = max(0, duration - self.initial_increment)
        steps = -(-extra // self.subsequent_increment)
        return self.initial_increment + steps * self.subsequent_increment

    def cost_of_billed(self, billed: int) -> int:
        return self.connect_fee + -(-(self.rate_per_min * billed) // 60)

    def cost(self, duration: int, answered: bool = True) -> int:
        """Micro-units for a call; unanswered calls cost nothing."""
        if not answered:
            return 0
        return self.cost_of_billed(self.billed_seconds(duration))

    def as_json(self) -> dict:
        return {
            "prefix": self.prefix,
            "description": self.description,
            "rate_per_min": format_full(self.rate_per_min),
            "connect_fee": format_full(self.connect_fee),
            "initial_increment": self.initial_increment,
            "subsequent_increment": self.subsequent_increment,
            "blocked": self.blocked,
        }


FREE_RATE = Rate("", "free", 0, 0, 1, 1)


class RatePlan:
    """A plan's rows indexed by prefix; lookups are a handful of dict probes."""

    def __init__(self, name: str, rates: list[Rate], version: int = 0):
        self.name = name
        self.version = version
        self._by_prefix = {r.prefix: r for r in rates}
        self._longest = max((len(p) for p in self._by_prefix), default=0)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def rates(self) -> list[Rate]:
        return sorted(self._by_prefix.values(), key=lambda r: r.prefix)

    def lookup(self, normalized: str) -> Rate | None:
        """Longest prefix of an already normalized number, or None."""
        for length in range(min(len(normalized), self._longest), 0, -1):
            rate = self._by_prefix.get(normalized[:length])
            if rate is not None:
                return rate
        return None


def parse_rates_csv(text: str) -> list[Rate]:
    """Validate a whole rates file; raise PlanError naming every bad line."""
    reader = csv.reader(io.StringIO(text))
    problems: list[tuple[int, str]] = []
    try:
        header = next(reader, None)
    except csv.Error:
        header = None
    if header is None or tuple(h.strip().lower() for h in header) != CSV_HEADER:
        raise PlanError([(1, "header must be: " + ",".join(CSV_HEADER))])
    rates: list[Rate] = []
    seen: dict[str, int] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the csv module's size limit
            problems.append((reader.line_num, f"not a readable CSV row: {exc}"))
            continue
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        try:
            rate = _parse_row(row)
        except ValueError as exc:
            problems.append((line, str(exc)))
            continue
        if rate.prefix in seen:
            problems.append((line, f"prefix {rate.prefix} already on line {seen[rate.prefix]}"))
            continue
        seen[rate.prefix] = line
        rates.append(rate)
    if problems:
        raise PlanError(problems)
    if not rates:
        raise PlanError([(2, "the file has no rates")])
    return rates


def _parse_row(row: list[str]) -> Rate:
    if len(row) != len(CSV_HEADER):
        raise ValueError(f"expected {len(CSV_HEADER)} columns, found {len(row)}")
    prefix, description, rate, fee, initial, subsequent, blocked = (c.strip() for c in row)
    if not _DIGITS.fullmatch(prefix) or len(prefix) > MAX_PREFIX_LEN:
        raise ValueError(f"prefix must be 1-{MAX_PREFIX_LEN} digits, not {prefix!r}")
    if len(description) > MAX_DESCRIPTION_LEN or any(ord(c) < 32 for c in description):
        # The books hold 200 characters; PostgreSQL refuses NUL and longer strings.
        raise ValueError(f"description must be at most {MAX_DESCRIPTION_LEN} characters"
                         " without control characters")
    try:
        rate_micros = parse_amount(rate)
        fee_micros = parse_amount(fee)
    except AmountError as exc:
        raise ValueError(str(exc)) from None
    if rate_micros * MAX_INCREMENT * 1000 > MAX_MICROS:
        raise ValueError(f"rate_per_min too large: {rate!r}")
    increments = []
    for name, value in (("initial_increment", initial), ("subsequent_increment", subsequent)):
        if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_INCREMENT:
            raise ValueError(f"{name} must be whole seconds 1-{MAX_INCREMENT}, not {value!r}")
        increments.append(int(value))
    if blocked.lower() not in _TRUE | _FALSE:
        raise ValueError(f"blocked must be 0/1, yes/no or true/false, not {blocked!r}")
    return Rate(
        prefix, description, rate_micros, fee_micros, increments[0], increments[1],
        blocked.lower() in _TRUE,
    )
