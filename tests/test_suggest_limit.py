"""`callguard account suggest-limit`: the seed's rule of thumb (average monthly cost over
the last 3 full months x 3) on real CDRs in SQL, the months it counts and leaves out,
rounding, refusals, and --apply."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime

from sqlalchemy import update

from callguard.books.history import epoch_ms, month_starts
from callguard.books.models import Account
from callguard.engine import state

Q = "4144555"  # postpaid, limit CHF 300.00
P = "41441234567"  # prepaid
TODAY = "2026-12-05"  # full months: 2026-09, 2026-10, 2026-11


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def refused(result, *words) -> None:
    """Exit 1, one line on stderr, nothing on stdout."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("callguard: ")
    for word in words:
        assert word in result.stderr


def cdr(session: str, account: str, cost: int, end: datetime | int) -> dict:
    end_ms = end if isinstance(end, int) else int(end.timestamp() * 1000)
    return {
        "session": f"n1-{session}/SIP/x-{session}", "account": account,
        "channel": f"SIP/x-{session}",
        "node": "n1", "direction": "outbound", "destination": "41791234567", "prefix": "417",
        "rate_per_min": 400_000, "connect_fee": 0, "initial_increment": 1,
        "subsequent_increment": 1, "setup_ms": end_ms - 61_000, "answer_ms": end_ms - 60_000,
        "end_ms": end_ms, "duration": 60, "billed": 60, "cost": cost, "cause": "16",
    }


def day(y, m, d, h=12) -> datetime:
    return datetime(y, m, d, h, tzinfo=UTC)


def created(app, account: str, when: datetime) -> None:
    with app.books.session.begin() as db:
        db.execute(update(Account).where(Account.id == account).values(created_at=when))


LONG_AGO = datetime(2026, 1, 10, tzinfo=UTC)


def postpaid(run, app, since=LONG_AGO, warn_at=None):
    args = ["account", "create", Q, "--postpaid", "--credit-limit", "300.00"]
    ok(run(*args, *(["--warn-at", warn_at] if warn_at else [])))
    created(app, Q, since)


def suggest(run, *args):
    return run("account", "suggest-limit", *args, "--today", TODAY)


def test_month_starts_are_the_full_months_before_today_and_wrap_the_year():
    assert month_starts(date(2027, 1, 31)) == [date(2026, 10, 1), date(2026, 11, 1),
                                               date(2026, 12, 1), date(2027, 1, 1)]
    assert month_starts(date(2026, 12, 1)) == [date(2026, 9, 1), date(2026, 10, 1),
                                               date(2026, 11, 1), date(2026, 12, 1)]
    assert epoch_ms(date(2026, 9, 1)) == int(datetime(2026, 9, 1, tzinfo=UTC).timestamp()) * 1000


def test_three_full_months_average_times_three_rounded_up_to_ten(run, app):
    postpaid(run, app)
    ok(run("account", "create", "other", "--postpaid", "--credit-limit", "10"))
    created(app, "other", day(2026, 1, 1))
    app.books.record_calls([
        cdr("s1", Q, 100_000_000, epoch_ms(date(2026, 9, 1))),  # the first ms of September
        cdr("s2", Q, 50_005_000, day(2026, 9, 30, 23)),
        cdr("o1", Q, 90_000_000, day(2026, 10, 15)),
        # November: no call, a month that cost nothing
        cdr("a1", Q, 1_000_000_000, day(2026, 8, 31, 23)),  # before the window
        cdr("d1", Q, 1_000_000_000, epoch_ms(date(2026, 12, 1))),  # the current month
        cdr("x1", "other", 5_000_000_000, day(2026, 10, 1)),  # another account's
    ])
    data = json.loads(ok(suggest(run, Q, "--json")))
    assert data == {
        "account": Q, "currency": "CHF",
        "months": [{"month": "2026-09", "calls": 2, "cost": "150.005000"},
                   {"month": "2026-10", "calls": 1, "cost": "90.000000"},
                   {"month": "2026-11", "calls": 0, "cost": "0.000000"}],
        "average": "80.001667",  # 240.005 / 3
        "suggested": "250.000000",  # 240.005 x 3 / 3 = 240.005, up to a multiple of 10
        "full_months": 3, "complete": True, "applied": False,
    }
    text = ok(suggest(run, Q))
    assert "suggested credit limit 250.00 CHF" in text
    assert "rounded up to a multiple of 10" in text
    assert "INCOMPLETE" not in text
    assert app.books.get_account(Q).credit_limit == 300_000_000  # not without --apply


def test_an_exact_multiple_is_not_rounded_up(run, app):
    postpaid(run, app)
    app.books.record_calls([cdr("s1", Q, 30_000_000, day(2026, 10, 2))])
    data = json.loads(ok(suggest(run, Q, "--json")))
    assert (data["average"], data["suggested"]) == ("10.000000", "30.000000")


def test_a_newer_account_counts_only_the_months_it_existed_for_and_says_so(run, app):
    postpaid(run, app, since=day(2026, 10, 15))
    app.books.record_calls([cdr("s1", Q, 40_000_000, day(2026, 10, 20)),  # half a month
                            cdr("s2", Q, 61_000_000, day(2026, 11, 3))])
    data = json.loads(ok(suggest(run, Q, "--json")))
    assert data["months"] == [{"month": "2026-11", "calls": 1, "cost": "61.000000"}]
    assert (data["full_months"], data["complete"]) == (1, False)
    assert (data["average"], data["suggested"]) == ("61.000000", "190.000000")
    assert "INCOMPLETE: only 1 of 3 full months" in ok(suggest(run, Q))


def test_calls_from_before_the_account_was_created_count_as_history(run, app):
    """CDRs brought over from another system: the account existed then."""
    postpaid(run, app, since=day(2026, 12, 2))
    app.books.record_calls([cdr("s1", Q, 10_000_000, day(2026, 8, 20)),
                            cdr("s2", Q, 60_000_000, day(2026, 11, 20))])
    data = json.loads(ok(suggest(run, Q, "--json")))
    assert [m["month"] for m in data["months"]] == ["2026-09", "2026-10", "2026-11"]
    assert (data["suggested"], data["complete"]) == ("60.000000", True)


def test_months_are_utc_whatever_the_machine_s_time_zone(run, app, monkeypatch):
    """Created at 00:00 UTC on 1 September: September counts, also in New York."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        postpaid(run, app, since=datetime(2026, 9, 1, tzinfo=UTC))
        app.books.record_calls([cdr("s1", Q, 30_000_000, day(2026, 9, 2))])
        data = json.loads(ok(suggest(run, Q, "--json")))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert (data["full_months"], data["suggested"]) == (3, "30.000000")


def test_no_history_is_refused(run, app):
    postpaid(run, app, since=day(2026, 11, 2))  # no full month yet
    app.books.record_calls([cdr("s1", Q, 0, day(2026, 11, 20))])
    refused(suggest(run, Q), "no full month of history", Q)
    created(app, Q, day(2026, 1, 1))  # three months, but nothing charged in them
    refused(suggest(run, Q, "--apply"), "no charged calls", Q)
    assert app.books.get_account(Q).credit_limit == 300_000_000
    refused(suggest(run, "nobody"), "unknown account nobody")


def test_apply_sets_the_credit_limit_in_the_books_and_redis(run, app):
    postpaid(run, app, warn_at="200.00")
    app.books.record_calls([cdr(f"s{m}", Q, 50_000_000, day(2026, m, 2)) for m in (9, 10, 11)])
    text = ok(suggest(run, Q, "--apply"))
    assert "applied: credit limit of 4144555 set to 150.00 CHF (was 300.00)" in text
    assert "warning level (200.00) is not below the new limit" in text
    assert app.books.get_account(Q).credit_limit == 150_000_000
    assert state.account_state(app.redis, app.keys, Q)["credit"] == 150_000_000
    data = json.loads(ok(suggest(run, Q, "--apply", "--json")))
    assert (data["applied"], data["in_redis"], data["suggested"]) == (True, True, "150.000000")


def test_a_prepaid_account_gets_the_figure_but_apply_is_refused(run, app):
    ok(run("account", "create", P, "--prepaid", "--balance", "100.00"))
    created(app, P, day(2026, 1, 1))
    app.books.record_calls([cdr("s1", P, 20_000_000, day(2026, 10, 2))])
    text = ok(suggest(run, P))
    assert "suggested credit limit 20.00 CHF" in text
    assert "prepaid account has no credit limit" in text
    refused(suggest(run, P, "--apply"), "prepaid", "no credit limit", "without --apply")
    assert app.books.get_account(P).credit_limit == 0

