"""`callguard account suggest-limit`: a credit limit from the account's own history."""

from __future__ import annotations

import json
from datetime import date

import click

from .. import service
from ..books.history import FACTOR, STEP, WINDOW, suggest_limit
from ..money import MICRO, format_display, format_full
from .accounts import account, reason_option
from .base import Refused, app_of, emit, refusals, report


def _day(_ctx, _param, value):
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        raise click.BadParameter(f"not a date (YYYY-MM-DD): {value!r}") from None


@account.command("suggest-limit")
@click.argument("account_id", metavar="ACCT")
@click.option("--apply", "apply_it", is_flag=True, help="Set the suggested credit limit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--today", callback=_day, hidden=True, help="Take this day as today (tests).")
@reason_option
@click.pass_context
@refusals
def account_suggest_limit(ctx, account_id, apply_it, as_json, today, reason):
    """Propose a credit limit by the rule of thumb: the average monthly cost over the last
    3 full calendar months (UTC) x 3, rounded up to a multiple of 10; with --apply, set it.

    Months before the account existed are left out (said so); a month without calls counts
    as one that cost nothing. A prepaid account gets the figure but has no limit to set.

    \b
    Examples:
      callguard account suggest-limit 4144555
      callguard account suggest-limit 4144555 --apply
    """
    app = app_of(ctx)
    if apply_it and app.books.get_account(account_id).kind != "postpaid":
        raise Refused(f"account {account_id} is prepaid: it has no credit limit to set "
                      "(the suggestion alone: without --apply)")
    s = suggest_limit(app.books, account_id, today)
    row, cur = s.account, s.account.currency
    data = {
        "account": row.id, "currency": cur,
        "months": [{"month": m.month, "calls": m.calls, "cost": format_full(m.cost)}
                   for m in s.months],
        "average": format_full(s.average), "suggested": format_full(s.suggested),
        "full_months": len(s.months), "complete": s.complete, "applied": False,
    }
    lines = [f"account {row.id} ({row.kind}), costs by month:"]
    lines += [f"  {m.month}  {m.calls:>6} call(s)  {format_display(m.cost):>12} {cur}"
              for m in s.months]
    if not s.complete:
        lines.append(f"INCOMPLETE: only {len(s.months)} of {WINDOW} full months of history "
                     "(the account is newer): the suggestion rests on what there is")
    lines.append(f"average {format_display(s.average)} {cur} a month x {FACTOR}, rounded up "
                 f"to a multiple of {STEP // MICRO}: suggested credit limit "
                 f"{format_display(s.suggested)} {cur}")
    if row.kind == "prepaid":
        lines.append("a prepaid account has no credit limit: nothing to apply")
    elif not apply_it:
        lines.append(f"credit limit now {format_display(row.credit_limit)} {cur}; "
                     "--apply sets the suggestion")
    if not apply_it:
        emit(data, as_json, "\n".join(lines))
        return
    _, applied = service.update_account(app, row.id, credit_limit=s.suggested,
                                        reason=reason or "suggest-limit --apply")
    data.update(applied=True, in_redis=applied.in_redis)
    lines.append(f"applied: credit limit of {row.id} set to {format_display(s.suggested)} "
                 f"{cur} (was {format_display(row.credit_limit)})")
    if row.warn_at is not None and row.warn_at >= s.suggested:
        lines.append(f"note: its warning level ({format_display(row.warn_at)}) is not below "
                     "the new limit: set --warn-at")
    report(applied, json.dumps(data, indent=2) if as_json else "\n".join(lines))
