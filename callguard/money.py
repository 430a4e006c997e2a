"""Amounts of money: integers of micro-units inside, decimal strings at the edges.

One micro-unit is 1e-6 of the currency unit. Lua scripts in Redis compute with
doubles, which hold integers exactly up to 2**53, so every amount callguard
accepts stays below that bound (about 9 billion currency units).
"""

from __future__ import annotations

import re
from decimal import Decimal

MICRO = 1_000_000
MAX_MICROS = 2**53 - 1

# [0-9], not \d: \d also matches "٥" or "５", which int() would happily read.
_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]*))?")


class AmountError(ValueError):
    """An amount string that is not a plain decimal number we accept."""


def parse_amount(text: str, *, allow_negative: bool = False, allow_zero: bool = True) -> int:
    """Parse "50", "50.00", "0.000205" into micro-units.

    Refused: floats in scientific notation, "1,5", signs where not allowed,
    more than six decimals, NaN/infinity, surrounding junk, amounts beyond 2**53
    micro-units.
    """
    if not isinstance(text, str):
        raise AmountError(f"amount must be a decimal string, not {type(text).__name__}")
    stripped = text.strip()
    match = _AMOUNT.fullmatch(stripped)
    if not match or (match.group(3) == "" and "." in stripped):
        raise AmountError(f"not a decimal amount: {text!r} (write e.g. 50 or 50.00)")
    sign, whole, frac = match.group(1), match.group(2), match.group(3) or ""
    if len(frac) > 6:
        raise AmountError(f"too many decimals in {text!r} (at most 6)")
    if len(whole) > 10:
        raise AmountError(f"amount too large: {text!r}")
    micros = int(whole) * MICRO + int(frac.ljust(6, "0"))
    if sign:
        micros = -micros
    if micros > MAX_MICROS or micros < -MAX_MICROS:
        raise AmountError(f"amount too large: {text!r}")
    if micros < 0 and not allow_negative:
        raise AmountError(f"amount must not be negative: {text!r}")
    if micros == 0 and not allow_zero:
        raise AmountError(f"amount must be greater than zero: {text!r}")
    return micros


def to_decimal(micros: int) -> Decimal:
    return Decimal(micros).scaleb(-6)


def format_full(micros: int) -> str:
    """Full precision, for --json and machine interfaces: "0.000205", "50.000000"."""
    return f"{to_decimal(micros):.6f}"


def format_display(micros: int) -> str:
    """The currency's usual two decimals for people; sub-cent amounts keep their digits.

    50_000_000 -> "50.00", 205 -> "0.000205": rounding a rate of 0.000205 to
    "0.00" would hide it.
    """
    if micros % 10_000 == 0:
        return f"{to_decimal(micros):.2f}"
    return format_full(micros).rstrip("0")
