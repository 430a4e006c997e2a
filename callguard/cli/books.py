"""`callguard cdr list`, `callguard account ledger`, `callguard account actions`: the books
at the operator's fingertips.

Rows stream from SQL in pages (`yield_per`), so a book of millions of CDRs is printed with
the memory of one page. Money as decimal strings, times as ISO 8601 UTC, CSV with a header
that a spreadsheet opens as it is."""

from __future__ import annotations

import csv
import json
import sys

import click

from .. import views
from .accounts import account, action_text
from .base import app_of, cli, refusals

PAGE = 1000


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
    if account_id:
        app.books.get_account(account_id)  # an unknown account is refused, not empty
    query = views.cdr_query(account_id, views.epoch_ms(since), views.epoch_ms(until, end=True))
    with app.books.session() as db:
        rows = (views.cdr_view(c) for c in db.scalars(query.execution_options(yield_per=PAGE)))
        _write(rows, views.CDR_COLUMNS, as_json, as_csv, lambda r: (
            f"{r['end']}  {r['session']}  {r['destination']}  {r['duration']}s  {r['cost']}"
            f"  {r['cause']}"))


@account.command("ledger")
@click.argument("account_id", metavar="ACCT")
@_output_options
@click.pass_context
@refusals
def account_ledger(ctx, account_id, as_json, as_csv):
    """List an account's ledger entries with the running balance, oldest first, each with
    who booked it and why (unknown: booked before callguard recorded it).

    \b
    Example:
      callguard account ledger 41441234567 --csv
    """
    if as_json and as_csv:
        raise click.UsageError("say --json or --csv, not both")
    app = app_of(ctx)
    app.books.get_account(account_id)
    query = views.ledger_query(account_id).execution_options(yield_per=PAGE)
    with app.books.session() as db:
        entries = views.ledger_views(db.scalars(query))
        _write(entries, views.LEDGER_COLUMNS, as_json, as_csv, lambda r: (
            f"{r['at']}  {r['entry']:>8}  {r['kind']:<11} {r['amount']:>18}  "
            f"{r['balance']:>18}  {r['reference'] or ''}  by {r['actor'] or 'unknown'}"
            + (f" ({r['reason']})" if r["reason"] else "")))


@account.command("actions")
@click.argument("account_id", metavar="ACCT")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def account_actions(ctx, account_id, as_json):
    """List who created, changed, blocked or unblocked an account or hung up its calls, and
    why, oldest first (money movements: `account ledger`).

    \b
    Example:
      callguard account actions 41441234567
    """
    app = app_of(ctx)
    app.books.get_account(account_id)
    query = views.actions_query(account_id).execution_options(yield_per=PAGE)
    with app.books.session() as db:
        actions = (views.action_view(a) for a in db.scalars(query))
        _write(actions, (), as_json, False, action_text)
