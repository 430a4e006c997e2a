"""`callguard calls ...`: calls in progress, and ending one."""

from __future__ import annotations

import click

from .. import service
from ..engine.core import SessionId
from ..money import format_full
from ..rating import Rate
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
    app = app_of(ctx)
    now = service.redis_now_ms(app.redis)
    rows = []
    for s in service.live_sessions(app, account_id):
        answered = int(s["ans"]) if s.get("ans") else None
        talk = max(0, now - answered) // 1000 if answered else 0
        rate = Rate(s.get("pfx", ""), "", int(s["r"]), int(s["cf"]), int(s["i"]), int(s["s"]))
        grant_end = int(s["ge"]) if s.get("ge") else None
        left = max(0, grant_end - now) // 1000 if grant_end is not None else None
        rows.append({
            "session": s["session"], "account": s["account"], "direction": s["dir"],
            "destination": s["dst"], "node": s.get("node", ""),
            "state": call_state(s, left),
            "answered_for": talk,
            "granted_until": grant_end // 1000 if grant_end else None,
            "granted_seconds": int(s.get("g", 0)),
            "left_seconds": left,
            "cost_so_far": format_full(rate.cost(talk, answered is not None)),
            "reserved": format_full(int(s.get("hold", 0))),
        })
    lines = [f"{'SESSION':<40} {'DESTINATION':<16} {'NODE':<12} {'STATE':<8} {'TALK':>6} "
             f"{'LEFT':>6} COST"]
    for r in rows:
        # A ringing call's grant has not started: its clock runs from the answer.
        left = "-" if r["left_seconds"] is None else f"{r['left_seconds']}s"
        lines.append(f"{r['session']:<40} {r['destination']:<16} {r['node']:<12} "
                     f"{r['state']:<8} {r['answered_for']:>5}s {left:>6} {r['cost_so_far']}")
    emit(rows, as_json, "\n".join(lines) if rows else "no calls in progress")


def call_state(session: dict, left: int | None) -> str:
    """What the session hash says (authorize.lua, answer.lua, extend.lua): `st` auth is
    ringing, ans is answered; `fin` 1 means the grant it holds is its last (no credit for
    more), so the call ends when it runs out, as it does once nothing of it is left."""
    if session.get("st") != "ans":
        return "ringing"
    if session.get("fin") == "1" or left == 0:
        return "ending"
    return "talking"


@calls.command("kill")
@click.argument("session")
@click.pass_context
@refusals
def calls_kill(ctx, session):
    """Hang up one call now, on whichever serve process holds it.

    \b
    Example:
      callguard calls kill 41441234567/1795236355.1310/7
    """
    app = app_of(ctx)
    if not any(s["session"] == session for s in
               service.live_sessions(app, SessionId.parse(session).account)):
        raise Refused(f"no call in progress with session {session}")
    if not service.kill(app, [session]):
        raise Refused("no serve process is listening; the PBX's own timeout will end the call")
    click.echo(f"hanging up {session}")
