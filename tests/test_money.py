"""Money: integer micro-units inside, decimal strings at the edges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callguard.money import (
    MAX_MICROS,
    MICRO,
    AmountError,
    format_display,
    format_full,
    parse_amount,
)


@pytest.mark.parametrize("text,micros", [
    ("50", 50_000_000),
    ("50.00", 50_000_000),
    ("50.5", 50_500_000),
    ("0.000205", 205),
    ("0.000001", 1),
    ("0", 0),
    ("0.0", 0),
    ("007", 7_000_000),
    ("1234567.891011", 1_234_567_891_011),
    ("9007199254.740991", MAX_MICROS),  # the largest amount Lua's doubles hold exactly
    (" 5 ", 5_000_000),  # surrounding whitespace from a shell or a form is tolerated
    ("5\n", 5_000_000),
])
def test_parse_accepts_plain_decimals(text, micros):
    value = parse_amount(text)
    assert value == micros
    assert type(value) is int


@pytest.mark.parametrize("text", [
    "1e3", "1E3", "1e-3", "5e0",  # scientific notation
    "1,5", "1'000", "1_000", "1 000",  # separators
    "+5", ".5", "5.", "-.5", "--5", "5-",  # signs and dots in the wrong place
    "1.0000001", "0.0000001",  # more than six decimals
    "NaN", "nan", "inf", "-inf", "Infinity",
    "", " ", ".", "-", "abc", "5abc", "CHF 5", "5 CHF", "0x10", "5.0.0",
    "٥", "１２", "５.００",  # non-ASCII digits are not amounts
])
def test_parse_refuses_junk(text):
    with pytest.raises(AmountError):
        parse_amount(text)


@pytest.mark.parametrize("text", [
    "9007199254.740992",  # one micro-unit over 2**53 - 1
    "10000000000",  # 11 digits of whole units
    "1" + "0" * 1000,  # absurd, and must not take long
    "-9007199254.740992",
])
def test_parse_refuses_absurd_sizes(text):
    with pytest.raises(AmountError, match="too large"):
        parse_amount(text, allow_negative=True)


def test_negative_only_where_allowed():
    with pytest.raises(AmountError, match="negative"):
        parse_amount("-5")
    with pytest.raises(AmountError, match="negative"):
        parse_amount("-0.000001")
    assert parse_amount("-5", allow_negative=True) == -5_000_000
    assert parse_amount("-0.000205", allow_negative=True) == -205
    assert parse_amount("-9007199254.740991", allow_negative=True) == -MAX_MICROS


def test_zero_only_where_allowed():
    assert parse_amount("0") == 0
    for text in ("0", "0.00", "0.000000", "-0"):
        with pytest.raises(AmountError, match="greater than zero"):
            parse_amount(text, allow_zero=False)
    assert parse_amount("0.000001", allow_zero=False) == 1


@pytest.mark.parametrize("value", [5, 5.0, None, b"5"])
def test_parse_refuses_non_strings(value):
    with pytest.raises(AmountError):
        parse_amount(value)


def test_errors_are_value_errors_that_name_the_input():
    with pytest.raises(ValueError) as info:
        parse_amount("1,5")
    assert "'1,5'" in str(info.value)
    with pytest.raises(AmountError, match="at most 6"):
        parse_amount("1.1234567")


@pytest.mark.parametrize("micros,full,display", [
    (0, "0.000000", "0.00"),
    (1, "0.000001", "0.000001"),
    (205, "0.000205", "0.000205"),
    (10_000, "0.010000", "0.01"),
    (12_345, "0.012345", "0.012345"),
    (1_234_500, "1.234500", "1.2345"),
    (1_230_000, "1.230000", "1.23"),
    (50_000_000, "50.000000", "50.00"),
    (50_500_000, "50.500000", "50.50"),
    (-205, "-0.000205", "-0.000205"),
    (-50_000_000, "-50.000000", "-50.00"),
    (MAX_MICROS, "9007199254.740991", "9007199254.740991"),
    (1_000_000_000 * MICRO, "1000000000.000000", "1000000000.00"),
])
def test_formatting(micros, full, display):
    assert format_full(micros) == full
    assert format_display(micros) == display


@given(st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS))
def test_full_format_round_trips(micros):
    text = format_full(micros)
    assert parse_amount(text, allow_negative=True) == micros
    whole, frac = text.lstrip("-").split(".")
    assert len(frac) == 6 and whole.isdigit()


@given(st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS))
def test_display_format_round_trips_and_never_hides_digits(micros):
    text = format_display(micros)
    assert parse_amount(text, allow_negative=True) == micros
    assert len(text.split(".")[1]) >= 2


@given(st.integers(min_value=0, max_value=MAX_MICROS))
def test_parse_of_generated_decimal_strings(micros):
    whole, frac = divmod(micros, MICRO)
    digits = f"{frac:06d}".rstrip("0")
    text = f"{whole}.{digits}" if digits else str(whole)
    assert parse_amount(text) == micros
