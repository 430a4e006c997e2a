"""An account's call history, for the seed's rule of thumb on a credit limit: the average
monthly cost x 3.

Months are calendar months in UTC; a CDR belongs to the month its call ended in. Only full
months count: the last three before the current one, and of those only the months the
account existed for from their first day (it was created before, or had calls in an
earlier month: CDRs brought over from another system count). A month the account existed
for without a call counts, as a month that cost nothing; a month it was created in does
not: half a month would pull the average down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import func, select

from ..money import MICRO
from .ledger import Books, BooksError
from .models import Account, Cdr

WINDOW = 3  # full months
FACTOR = 3  # the rule of thumb: monthly cost x 3
STEP = 10 * MICRO  # a proposal is rounded up to a multiple of 10 currency units


@dataclass(frozen=True)
class Month:
    month: str  # "2026-09"
    calls: int
    cost: int  # micro-units


@dataclass(frozen=True)
class Suggestion:
    account: Account
    months: list[Month]  # the months counted, oldest first
    average: int  # micro-units a month
    suggested: int  # average x 3, rounded up to STEP

    @property
    def complete(self) -> bool:
        return len(self.months) == WINDOW


def month_starts(today: date, count: int = WINDOW) -> list[date]:
    """The first days of the `count` full months before `today`'s, oldest first, and of
    `today`'s month last (where the window ends)."""
    year, month = today.year, today.month
    starts = [date(year, month, 1)]
    for _ in range(count):
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        starts.insert(0, date(year, month, 1))
    return starts


def epoch_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def monthly_costs(books: Books, account_id: str, today: date) -> tuple[Account, list[Month]]:
    """The account and its counted months (see the module's docstring), summed in SQL."""
    account = books.get_account(account_id)
    created = account.created_at
    if created.tzinfo is None:  # SQLite hands it back naive; it is stored in UTC
        created = created.replace(tzinfo=UTC)
    starts = month_starts(today)
    months = []
    with books.session() as db:
        first_call = db.scalar(select(func.min(Cdr.end_ms)).where(Cdr.account == account_id))
        since = int(created.timestamp() * 1000)
        if first_call is not None:
            since = min(since, first_call)
        for start, end in zip(starts, starts[1:], strict=False):
            if since > epoch_ms(start):
                continue  # not yet there on the 1st
            calls, cost = db.execute(
                select(func.count(), func.coalesce(func.sum(Cdr.cost), 0))
                .where(Cdr.account == account_id, Cdr.end_ms >= epoch_ms(start),
                       Cdr.end_ms < epoch_ms(end))
            ).one()
            months.append(Month(f"{start:%Y-%m}", int(calls), int(cost)))
    return account, months


def suggest_limit(books: Books, account_id: str, today: date | None = None) -> Suggestion:
    """Average monthly cost over the counted months x 3, rounded up to 10 currency units.
    Refused when there is nothing to go on: no full month, or no cost in any."""
    today = today or datetime.now(UTC).date()
    account, months = monthly_costs(books, account_id, today)
    if not months:
        raise BooksError(f"no full month of history for {account_id} yet (created "
                         f"{account.created_at:%Y-%m-%d}): nothing to base a limit on")
    total = sum(m.cost for m in months)
    if not total:
        raise BooksError(f"{account_id} had no charged calls in the last {len(months)} full "
                         "month(s): nothing to base a limit on")
    n = len(months)
    average = (2 * total + n) // (2 * n)  # to the nearest micro-unit
    suggested = -(-total * FACTOR // (n * STEP)) * STEP  # exact, then up to the step
    return Suggestion(account, months, average, suggested)
