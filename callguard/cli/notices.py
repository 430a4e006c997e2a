"""`callguard notices ...`: the notices outbox and how each notice's delivery stands."""

from __future__ import annotations

import click

from .. import notify
from .base import app_of, cli, emit, refusals


@cli.group()
def notices():
    """Notices to customers (low balance, credit limit, top-ups, fraud) and their delivery.

    \b
    Example:
      callguard notices list --account 41441234567
    """


def _when(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def notice_line(r: dict) -> str:
    state = r["state"]
    if state == "retrying":
        state += f" (attempt {r['attempts']}, next {_when(r['next_attempt_at'])})"
    elif state == "failed":
        state += f" (after {r['attempts']} attempt{'s' if r['attempts'] != 1 else ''})"
    error = f"  {r['last_error']}" if r["last_error"] and r["state"] != "sent" else ""
    return f"{r['id']}  {_when(r['at'])}  {r['account']}  {r['type']}  {state}{error}"


@notices.command("list")
@click.option("--account", "account_id", metavar="ACCT", help="Only this account's notices.")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="Show at most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def notices_list(ctx, account_id, limit, as_json):
    """Show notices and how their delivery stands, newest first.

    One line a notice: id, time (UTC), account, type, state (pending, retrying with the
    attempt and the next try, sent, failed, or kept: no mail or webhook is configured for
    it) and the last error.

    \b
    Example:
      callguard notices list --account 41441234567 --json
    """
    rows = notify.notice_rows(app_of(ctx), account_id, limit)
    emit(rows, as_json, "\n".join(map(notice_line, rows)) if rows else "no notices")
