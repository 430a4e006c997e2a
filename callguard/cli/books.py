"""`callguard cdr list`, `callguard account ledger`: the books at the operator's fingertips.

Rows stream from SQL in pages (`yield_per`), so a book of millions of CDRs is printed with
the memory of one page. Money as decimal strings, times as ISO 8601 UTC, CSV with a header
that a spreadsheet opens as it is."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, date, datetime, time

import click
from sqlalchemy import select

from ..books.ledger import BooksError
from ..books.models import Cdr, LedgerEntry, as_utc
from ..money import format_full
from .accounts import account
from .base import app_of, cli, refusals

PAGE = 1000

CDR_COLUMNS = ("session", "account", "direction", "destination", "prefix", "setup", "answer",
               "end", "duration", "billed", "rate_per_min", "connect_fee", "cost", "cause",
               "node")
LEDGER_COLUMNS = ("entry", "at", "kind", "amount", "balance", "reference", "session")


def _iso_ms(ms: int | None) -> str | None:
    return None if ms is None else _iso(datetime.fromtimestamp(ms / 1000, UTC))


def _iso(at: datetime) -> str:
    return as_utc(at).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cdr_row(c: Cdr) -> dict:
    return {"session": c.session, "account": c.account, "direction": c.direction,
            "destination": c.destination, "prefix": c.prefix, "setup": _iso_ms(c.setup_ms),
            "answer": _iso_ms(c.answer_ms), "end": _iso_ms(c.end_ms), "duration": c.duration,
            "billed": c.billed, "rate_per_min": format_full(c.rate_per_min),
            "connect_fee": format_full(c.connect_fee), "cost": format_full(c.cost),
            "cause": c.cause, "node": c.node}


def _day(value: str | None, end: bool) -> int | None:
    """A date (or an ISO time) as epoch ms; a bare --until date includes that whole day."""
    if value is None:
        return None
    try:
        at = (datetime.combine(date.fromisoformat(value), time.max if end else time.min, UTC)
              if len(value) == 10 else as_utc(datetime.fromisoformat(value)))
    except ValueError:
        raise BooksError(f"not a date: {value!r} (YYYY-MM-DD or an ISO 8601 time)") from None
    return int(at.timestamp() * 1000)


def _write(rows, columns: tuple[str, ...], as_json: bool, as_csv: bool, human) -> None:
    out = sys.stdout
    if as_csv:
        writer = csv.DictWriter(out, columns, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    elif as_json:
        out.write("[")
        for n, row in enumerate(rows):
            out.write(("," if n else "") + "\n  " + json.dumps(row))
        out.write("\n]\n")
    else:
        for row in rows:
            out.write(human(row) + "\n")


def _output_options(fn):
    fn = click.option("--csv", "as_csv", is_flag=True, help="CSV with a header.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


@cli.group()
def cdr():
    """Call detail records: every finished call as the books hold it.

    \b
    Example:
      callguard cdr list --account 41441234567 --since 2026-11-01 --csv > november.csv
    """


@cdr.command("list")
@click.option("--account", "account_id", metavar="ACCT", help="Only this account's calls.")
@click.option("--since", help="Calls that ended on or after this date (YYYY-MM-DD, UTC).")
@click.option("--until", help="Calls that ended up to this date, included.")
@_output_options
@click.pass_context
@refusals
def cdr_list(ctx, account_id, since, until, as_json, as_csv):
    """List CDRs, oldest first.

    \b
    Examples:
      callguard cdr list --account 41441234567 --json
      callguard cdr list --since 2026-11-01 --until 2026-11-30 --csv
    """
    if as_json and as_csv:
        raise click.UsageError("say --json or --csv, not both")
    app = app_of(ctx)
    query = select(Cdr).order_by(Cdr.end_ms, Cdr.id)
    if account_id:
        app.books.get_account(account_id)  # an unknown account is refused, not empty
        query = query.where(Cdr.account == account_id)
    if (low := _day(since, end=False)) is not None:
        query = query.where(Cdr.end_ms >= low)
    if (high := _day(until, end=True)) is not None:
        query = query.where(Cdr.end_ms <= high)
    with app.books.session() as db:
        rows = (cdr_row(c) for c in db.scalars(query.execution_options(yield_per=PAGE)))
        _write(rows, CDR_COLUMNS, as_json, as_csv, lambda r: (
            f"{r['end']}  {r['session']}  {r['destination']}  {r['duration']}s  {r['cost']}"
            f"  {r['cause']}"))


@account.command("ledger")
@click.argument("account_id", metavar="ACCT")
@_output_options
@click.pass_context
@refusals
def account_ledger(ctx, account_id, as_json, as_csv):
    """List an account's ledger entries with the running balance, oldest first.

    \b
    Example:
      callguard account ledger 41441234567 --csv
    """
    if as_json and as_csv:
        raise click.UsageError("say --json or --csv, not both")
    app = app_of(ctx)
    app.books.get_account(account_id)
    query = (select(LedgerEntry).where(LedgerEntry.account == account_id)
             .order_by(LedgerEntry.id).execution_options(yield_per=PAGE))

    def rows(entries):
        balance = 0
        for e in entries:
            balance += e.amount
            yield {"entry": e.id, "at": _iso(e.created_at), "kind": e.kind,
                   "amount": format_full(e.amount), "balance": format_full(balance),
                   "reference": e.reference, "session": e.session}

    with app.books.session() as db:
        _write(rows(db.scalars(query)), LEDGER_COLUMNS, as_json, as_csv, lambda r: (
            f"{r['at']}  {r['entry']:>8}  {r['kind']:<11} {r['amount']:>18}  "
            f"{r['balance']:>18}  {r['reference'] or ''}"))
