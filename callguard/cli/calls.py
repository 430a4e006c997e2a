"""`callguard calls ...`: calls in progress, and ending one."""

from __future__ import annotations

import click

from .. import service, views
from ..engine.core import SessionId
from .base import Refused, app_of, cli, emit, refusals


@cli.group()
def calls():
    """Calls in progress.

    \b
    Example:
      callguard calls list --account 41441234567
    """


@calls.command("list")
@click.option("--account", "account_id", metavar="ACCT", help="Only this account's calls.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def calls_list(ctx, account_id, as_json):
    """Show live sessions: account, destination, node, state (ringing, talking, or ending
    on a last grant), talk time, seconds left of the grant and cost so far.

    \b
    Example:
      callguard calls list --account 41441234567
    """
    rows = views.live_calls(app_of(ctx), account_id)
    lines = [f"{'SESSION':<40} {'DESTINATION':<16} {'NODE':<12} {'STATE':<8} {'TALK':>6} "
             f"{'LEFT':>6} COST"]
    for r in rows:
        # A ringing call's grant has not started: its clock runs from the answer.
        left = "-" if r["left_seconds"] is None else f"{r['left_seconds']}s"
        lines.append(f"{r['session']:<40} {r['destination']:<16} {r['node']:<12} "
                     f"{r['state']:<8} {r['answered_for']:>5}s {left:>6} {r['cost_so_far']}")
    emit(rows, as_json, "\n".join(lines) if rows else "no calls in progress")


@calls.command("kill")
@click.argument("session")
@click.option("--reason", help="Why: recorded in the books with who hung it up "
                               "(`account actions`).")
@click.pass_context
@refusals
def calls_kill(ctx, session, reason):
    """Hang up one call now, on whichever serve process holds it.

    \b
    Example:
      callguard calls kill 41441234567/1795236355.1310/7 --reason "calls to +882"
    """
    app = app_of(ctx)
    if not any(s["session"] == session for s in
               service.live_sessions(app, SessionId.parse(session).account)):
        raise Refused(f"no call in progress with session {session}")
    if not service.kill(app, [session], reason=reason):
        raise Refused("no serve process is listening; the PBX's own timeout will end the call")
    click.echo(f"hanging up {session}")
