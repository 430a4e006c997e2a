"""Rating: number normalisation, longest-prefix match, the cost of a call, the CSV format.

Expected costs are worked out by hand and written out, not recomputed with the
formula under test.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callguard.rating import (
    CSV_HEADER,
    NumberError,
    PlanError,
    Rate,
    RatePlan,
    normalize_number,
    parse_rates_csv,
)

# -- normalisation -------------------------------------------------------------


@pytest.mark.parametrize("dialled,normalized", [
    ("+41791234567", "41791234567"),
    ("0041791234567", "41791234567"),
    ("41791234567", "41791234567"),
    ("0791234567", "0791234567"),  # national dialling stays as dialled
    ("+0041", "0041"),  # only one international marker is stripped
    ("0", "0"),
    ("000", "0"),
    ("1" * 32, "1" * 32),
    ("+" + "1" * 32, "1" * 32),
    ("00" + "1" * 32, "1" * 32),
])
def test_normalize(dialled, normalized):
    assert normalize_number(dialled) == normalized


@pytest.mark.parametrize("dialled", [
    "", "+", "00", "++41", "00+41", "+41 79 123 45 67", "41 79", "41\t79",
    "4179abc", "ABC", "*99#", "41*79", "#41", "41-79", "(044)1234567", "41.79",
    "٤١٧٩", "４１",  # non-ASCII digits
    "1" * 33, "+" + "1" * 33, "00" + "1" * 33,  # too long
])
def test_normalize_refuses_junk(dialled):
    with pytest.raises(NumberError):
        normalize_number(dialled)


def test_normalize_refuses_non_strings():
    with pytest.raises(NumberError):
        normalize_number(41791234567)
    with pytest.raises(NumberError):
        normalize_number(None)


# -- longest prefix --------------------------------------------------------------

PLAN = RatePlan("default", [
    Rate("4", "zone 4", 1, 0, 1, 1),
    Rate("41", "Switzerland", 2, 0, 1, 1),
    Rate("417", "CH mobile", 3, 0, 1, 1),
    Rate("4179", "CH mobile Swisscom", 4, 0, 1, 1),
    Rate("4190", "CH premium", 5, 0, 1, 1, blocked=True),
    Rate("1", "NANP", 6, 0, 1, 1),
])


@pytest.mark.parametrize("dialled,prefix", [
    ("+41791234567", "4179"),
    ("0041791234567", "4179"),
    ("41781234567", "417"),
    ("41441234567", "41"),
    ("4190123", "4190"),
    ("49301234567", "4"),
    ("4179", "4179"),  # the whole number is the prefix
    ("417", "417"),
    ("41", "41"),
    ("12125551234", "1"),
])
def test_longest_prefix_wins(dialled, prefix):
    rate = PLAN.lookup(normalize_number(dialled))
    assert rate is not None and rate.prefix == prefix


@pytest.mark.parametrize("dialled", ["33123456789", "0791234567", "5", "2"])
def test_no_match(dialled):
    assert PLAN.lookup(normalize_number(dialled)) is None


def test_blocked_row_is_matched_not_skipped():
    rate = PLAN.lookup("419012345")
    assert rate.prefix == "4190" and rate.blocked is True


def test_plan_basics():
    assert len(PLAN) == 6
    assert [r.prefix for r in PLAN.rates()] == ["1", "4", "41", "417", "4179", "4190"]
    assert RatePlan("empty", []).lookup("41") is None


# -- cost --------------------------------------------------------------------------

R60 = Rate("41", "60/60 at 0.10/min", 100_000, 0, 60, 60)
R30 = Rate("417", "30/6 at 0.40/min + 0.05", 400_000, 50_000, 30, 6)
R1 = Rate("4190", "1/1 at 0.07/min", 70_000, 0, 1, 1)
TINY = Rate("1", "1/1 at 0.000205/min", 205, 0, 1, 1)


@pytest.mark.parametrize("duration,billed,cost", [
    (0, 60, 100_000),
    (1, 60, 100_000),
    (59, 60, 100_000),
    (60, 60, 100_000),
    (61, 120, 200_000),
    (120, 120, 200_000),
    (121, 180, 300_000),
    (3600, 3600, 6_000_000),
    (3601, 3660, 6_100_000),
    (86400, 86400, 144_000_000),
])
def test_cost_60_60(duration, billed, cost):
    assert R60.billed_seconds(duration) == billed
    assert R60.cost(duration) == cost


@pytest.mark.parametrize("duration,billed,cost", [
    (0, 30, 250_000),  # 0.05 connect + 30 s of 0.40/min (0.20)
    (1, 30, 250_000),
    (30, 30, 250_000),
    (31, 36, 290_000),  # 0.05 + 36 s = 0.24
    (36, 36, 290_000),
    (37, 42, 330_000),  # 0.05 + 42 s = 0.28
    (60, 60, 450_000),
    (3600, 3600, 24_050_000),
    (3601, 3606, 24_090_000),
    (86400, 86400, 576_050_000),
])
def test_cost_30_6(duration, billed, cost):
    assert R30.billed_seconds(duration) == billed
    assert R30.cost(duration) == cost


@pytest.mark.parametrize("duration,billed,cost", [
    # 0.07/min is 1166.66... micro-units a second: every non-multiple of 3 s rounds up.
    (0, 1, 1_167),
    (1, 1, 1_167),
    (2, 2, 2_334),
    (3, 3, 3_500),
    (60, 60, 70_000),
    (61, 61, 71_167),
    (3600, 3600, 4_200_000),
    (86400, 86400, 100_800_000),
    (86401, 86401, 100_801_167),
])
def test_cost_1_1_rounds_up_to_the_micro_unit(duration, billed, cost):
    assert R1.billed_seconds(duration) == billed
    assert R1.cost(duration) == cost


@pytest.mark.parametrize("duration,cost", [
    (1, 4),  # 205/60 = 3.42
    (59, 202),  # 201.58
    (60, 205),
    (61, 209),  # 208.42
    (3600, 12_300),
])
def test_sub_micro_rate_rounds_up(duration, cost):
    assert TINY.cost(duration) == cost


def test_unanswered_calls_cost_nothing():
    for rate in (R60, R30, R1, TINY):
        for duration in (0, 1, 61, 3600):
            assert rate.cost(duration, answered=False) == 0


def test_rate_as_json_uses_decimal_strings():
    assert R30.as_json() == {
        "prefix": "417", "description": "30/6 at 0.40/min + 0.05",
        "rate_per_min": "0.400000", "connect_fee": "0.050000",
        "initial_increment": 30, "subsequent_increment": 6, "blocked": False,
    }


rates = st.builds(
    Rate,
    prefix=st.just("1"),
    description=st.just(""),
    rate_per_min=st.integers(0, 2_500_000_000),
    connect_fee=st.integers(0, 10_000_000),
    initial_increment=st.integers(1, 3600),
    subsequent_increment=st.integers(1, 3600),
)


@given(rates, st.integers(0, 1_000_000), st.integers(0, 1_000_000))
def test_cost_is_monotonic_and_at_least_the_connect_fee(rate, a, b):
    short, long = sorted((a, b))
    assert rate.cost(short) <= rate.cost(long)
    assert rate.cost(short) >= rate.connect_fee
    assert rate.cost(short, answered=False) == 0


@given(rates, st.integers(0, 1_000_000))
def test_billing_never_undercharges(rate, duration):
    billed = rate.billed_seconds(duration)
    floor = max(duration, rate.initial_increment)
    assert floor <= billed < floor + rate.subsequent_increment
    assert (billed - rate.initial_increment) % rate.subsequent_increment == 0
    cost = rate.cost(duration)
    # Never below the exact price of the billed seconds, and less than one micro-unit above.
    exact_times_60 = rate.rate_per_min * billed
    assert (cost - rate.connect_fee) * 60 >= exact_times_60
    assert (cost - rate.connect_fee - 1) * 60 < exact_times_60


# -- CSV ------------------------------------------------------------------------------

HEADER = ",".join(CSV_HEADER)


def csv_text(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def test_parse_valid_file():
    rates_ = parse_rates_csv(csv_text(
        "41,Switzerland,0.10,0,60,60,0",
        "417,CH mobile,0.40,0.05,30,6,no",
        '4190,"Premium, blocked",3.00,0,1,1,yes',
        "1,NANP,0.000205,0.000001,1,1,",
    ))
    assert rates_ == [
        Rate("41", "Switzerland", 100_000, 0, 60, 60, False),
        Rate("417", "CH mobile", 400_000, 50_000, 30, 6, False),
        Rate("4190", "Premium, blocked", 3_000_000, 0, 1, 1, True),
        Rate("1", "NANP", 205, 1, 1, 1, False),
    ]


def test_header_is_case_and_space_insensitive_and_blank_lines_are_skipped():
    header = " Prefix , DESCRIPTION,rate_per_min,connect_fee,initial_increment," \
             "subsequent_increment,Blocked"
    got = parse_rates_csv(csv_text("41,CH,0.10,0,60,60,0", "", " , ,", "49,DE,0.20,0,1,1,1",
                                   header=header))
    assert [(r.prefix, r.blocked) for r in got] == [("41", False), ("49", True)]


@pytest.mark.parametrize("value,blocked", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("y", True), ("Y", True),
    ("0", False), ("false", False), ("no", False), ("n", False), ("", False), (" no ", False),
])
def test_blocked_values(value, blocked):
    (rate,) = parse_rates_csv(csv_text(f"41,CH,0.10,0,60,60,{value}"))
    assert rate.blocked is blocked


def test_every_bad_row_is_reported_by_line_number():
    text = csv_text(
        "41,Switzerland,0.10,0,60,60,0",  # line 2: good
        "+49,Germany,0.20,0,1,1,0",  # line 3: prefix with a plus
        "33,France,1e3,0,1,1,0",  # line 4: scientific notation
        "44,UK,0.10,0,60,60,0",  # line 5: good
        "",  # line 6: blank, skipped
        "45,Denmark,0.10,0,0,1,0",  # line 7: zero increment
        "46,Sweden,0.10,0,1,1,maybe",  # line 8: bad flag
        "47,Norway,0.10,0,1,1",  # line 9: six columns
        "41,Switzerland again,0.20,0,1,1,0",  # line 10: duplicate of line 2
        "48,Poland,-0.10,0,1,1,0",  # line 11: negative
        "49,Germany,0.10,1,5,0,1,0",  # line 12: eight columns ("1,5")
    )
    with pytest.raises(PlanError) as info:
        parse_rates_csv(text)
    problems = info.value.problems
    assert [line for line, _ in problems] == [3, 4, 7, 8, 9, 10, 11, 12]
    messages = dict(problems)
    assert "prefix" in messages[3]
    assert "'1e3'" in messages[4]
    assert "initial_increment" in messages[7]
    assert "blocked" in messages[8]
    assert "found 6" in messages[9]
    assert "already on line 2" in messages[10]
    assert "negative" in messages[11]
    assert "found 8" in messages[12]
    assert str(info.value) == "8 bad row(s)"


@pytest.mark.parametrize("row,word", [
    (",empty prefix,0.10,0,1,1,0", "prefix"),
    ("41a,letters,0.10,0,1,1,0", "prefix"),
    ("4 1,space,0.10,0,1,1,0", "prefix"),
    ("1" * 17 + ",long,0.10,0,1,1,0", "prefix"),
    ("41,CH,,0,1,1,0", "amount"),
    ("41,CH,0.10,,1,1,0", "amount"),
    ("41,CH,0.1234567,0,1,1,0", "decimals"),
    ("41,CH,1,5,0,1,1,0", "columns"),
    ("41,CH,NaN,0,1,1,0", "amount"),
    ("41,CH,0.10,-0.01,1,1,0", "negative"),
    ("41,CH,2600,0,1,1,0", "too large"),
    ("41,CH,0.10,0,3601,1,0", "initial_increment"),
    ("41,CH,0.10,0,1,0,0", "subsequent_increment"),
    ("41,CH,0.10,0,1.5,1,0", "initial_increment"),
    ("41,CH,0.10,0,-1,1,0", "initial_increment"),
    ("41,CH,0.10,0,60,,0", "subsequent_increment"),
    ("41,CH,0.10,0,60,60,2", "blocked"),
])
def test_bad_rows(row, word):
    with pytest.raises(PlanError) as info:
        parse_rates_csv(csv_text("40,ok,0.10,0,60,60,0", row))
    ((line, message),) = info.value.problems
    assert line == 3
    assert word in message


def test_limits_are_inclusive():
    (rate,) = parse_rates_csv(csv_text("1" * 16 + ",long,2500,0,3600,3600,0"))
    assert (len(rate.prefix), rate.rate_per_min, rate.initial_increment) == (16, 2_500_000_000,
                                                                              3600)


@pytest.mark.parametrize("header", [
    "prefix,description,rate,connect_fee,initial_increment,subsequent_increment,blocked",
    "description,prefix,rate_per_min,connect_fee,initial_increment,subsequent_increment,blocked",
    "prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment",
    "41,Switzerland,0.10,0,60,60,0",  # no header at all
])
def test_wrong_header(header):
    with pytest.raises(PlanError) as info:
        parse_rates_csv(csv_text("41,Switzerland,0.10,0,60,60,0", header=header))
    ((line, message),) = info.value.problems
    assert line == 1 and "header must be" in message


@pytest.mark.parametrize("text", ["", HEADER, HEADER + "\n", HEADER + "\n\n,,,,,,\n"])
def test_empty_files(text):
    with pytest.raises(PlanError) as info:
        parse_rates_csv(text)
    assert len(info.value.problems) == 1


def test_description_longer_than_the_books_hold_is_a_bad_row():
    with pytest.raises(PlanError) as info:
        parse_rates_csv(csv_text("41," + "x" * 201 + ",0.10,0,60,60,0"))
    ((line, message),) = info.value.problems
    assert line == 2 and "description" in message
    (rate,) = parse_rates_csv(csv_text("41," + "x" * 200 + ",0.10,0,60,60,0"))
    assert len(rate.description) == 200


def test_control_characters_in_a_description_are_a_bad_row():
    with pytest.raises(PlanError) as info:
        parse_rates_csv(csv_text("41,a\x00b,0.10,0,60,60,0", '42,"two\nlines",0.10,0,60,60,0'))
    assert [line for line, _ in info.value.problems] == [2, 4]


def test_unreadable_csv_rows_are_reported_not_raised():
    text = csv_text(
        "41,CH,0.10,0,60,60,0",  # line 2
        "42," + "x" * 200_000 + ",0.10,0,60,60,0",  # line 3: over the csv module's field limit
        "43,ok,0.10,0,60,60,0",  # line 4
        "44,bad,0.10,0,60,60,9",  # line 5
    )
    with pytest.raises(PlanError) as info:
        parse_rates_csv(text)
    assert [line for line, _ in info.value.problems] == [3, 5]
    assert "not a readable CSV row" in info.value.problems[0][1]
    with pytest.raises(PlanError) as info:
        parse_rates_csv("x" * 200_000 + "\n41,CH,0.10,0,60,60,0\n")
    assert info.value.problems[0][0] == 1
