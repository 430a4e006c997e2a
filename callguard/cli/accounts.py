"""`callguard account ...`: create, show and change accounts, and move their money."""

from __future__ import annotations

import re

import click
from redis import RedisError

from .. import service, views
from ..engine import state
from ..engine.core import valid_account
from ..money import format_display, parse_amount
from .base import Refused, amount_option, app_of, cli, emit, refusals, report


@cli.group()
def account():
    """Create, show and change customer accounts.

    \b
    Examples:
      callguard account create 41441234567 --prepaid --balance 50.00
      callguard account show 41441234567
    """


def account_json(app: service.App, row) -> dict:
    return views.account_of(app, row)


def account_text(data: dict) -> str:
    cur = data["currency"]

    def money(name):
        return f"{format_display(parse_amount(data[name], allow_negative=True))} {cur}"

    status = data["status"] + (f" ({data['block_reason']})" if data["block_reason"] else "")
    if data["status"] == "blocked":
        by = data["blocked_by"]
        status += f" by {by['actor']} at {by['at']}" if by else " by unknown"
    if data["limit_state"] == "exhausted" and data["status"] == "active":
        status = ("blocked both ways: no credit left until a "
                  + ("top-up" if data["kind"] == "prepaid" else "payment"))
    elif data["limit_state"] == "warned":
        status += " (below its warning level)"
    lines = [f"account     {data['account']} ({data['kind']}, plan {data['plan']})",
             f"status      {status}"]
    if data["kind"] == "prepaid":
        lines.append(f"balance     {money('balance')}")
    else:
        lines += [f"outstanding {money('outstanding')}", f"credit      {money('credit_limit')}"]
    lines += [f"reserved    {money('reserved')}", f"available   {money('available')}",
              f"channels    {data['channels']} of {data['max_channels'] or 'unlimited'}"]
    if data["auto_topup"]:
        lines.append(f"auto top-up {data['auto_topup']['amount']} {cur} when below "
                     f"{data['auto_topup']['below']} {cur}")
    controls = [f"{data['max_calls_per_minute']} calls/min"] if data["max_calls_per_minute"] \
        else []
    if data["max_spend_per_hour"]:
        controls.append(f"{money('max_spend_per_hour')}/hour")
    if data["blocked_prefixes"]:
        controls.append("blocked " + " ".join(data["blocked_prefixes"]))
    if controls:
        lines.append(f"fraud       {', '.join(controls)}; on fraud: {data['on_fraud']}")
    if data["recent_actions"]:
        lines.append("actions     latest first (all: callguard account actions "
                     f"{data['account']})")
        lines += [f"  {action_text(a)}" for a in data["recent_actions"]]
    return "\n".join(lines)


def action_text(a: dict) -> str:
    """One operator action on one line: when, who, what, why. A block's or unblock's status
    change is the action itself."""
    what = a["action"] + (f" {a['session']}" if a["session"] else "")
    changes = ", ".join(f"{name} {_none(c['old'])} -> {_none(c['new'])}"
                        for name, c in a["changes"].items()
                        if name not in ("status", "block_reason"))
    return (f"{a['at']}  {a['actor']}  {what}" + (f": {changes}" if changes else "")
            + (f" ({a['reason']})" if a["reason"] else ""))


def _none(value) -> str:
    return "none" if value is None or value == "" else str(value)


reason_option = click.option("--reason", help="Why: recorded in the books with who did it "
                                              "(`account show`, `account actions`).")


@account.command("create")
@click.argument("account_id", metavar="ACCT")
@click.option("--prepaid", is_flag=True, help="Pays in advance: a balance.")
@click.option("--postpaid", is_flag=True, help="Pays by invoice: a credit limit.")
@click.option("--balance", callback=amount_option, help="Opening balance (prepaid).")
@click.option("--credit-limit", callback=amount_option, help="Credit limit (postpaid).")
@click.option("--warn-below", callback=amount_option, help="Prepaid warning level, e.g. 10.00.")
@click.option("--warn-at", callback=amount_option, help="Postpaid warning level.")
@click.option("--currency", default="CHF", show_default=True, help="ISO 4217 code.")
@click.option("--max-channels", type=click.IntRange(0, 100000), default=10, show_default=True,
              help="Concurrent calls allowed (0: unlimited).")
@click.option("--cps-limit", type=click.IntRange(0, 10000), default=0,
              help="Call setups per second allowed (0: unlimited).")
@click.option("--plan", help="Rate plan (default: 'default').")
@click.option("--email", help="Contact address for notices.")
@click.pass_context
@refusals
def account_create(ctx, account_id, prepaid, postpaid, balance, credit_limit, warn_below,
                   warn_at, currency, max_channels, cps_limit, plan, email):
    """Create an account; ACCT is the PBX accountcode.

    \b
    Examples:
      callguard account create 41441234567 --prepaid --balance 50.00 --warn-below 10.00
      callguard account create 4144555 --postpaid --credit-limit 300.00 --warn-at 200.00
    """
    if prepaid == postpaid:
        raise click.UsageError("say --prepaid or --postpaid" + (", not both" if prepaid else ""))
    kind = "prepaid" if prepaid else "postpaid"
    if not valid_account(account_id):
        raise Refused(f"invalid account id {account_id!r} (letters, digits, . _ -; up to 64)")
    if kind == "prepaid" and (credit_limit is not None or warn_at is not None):
        raise Refused("a prepaid account has no credit limit (use --balance, --warn-below)")
    if kind == "postpaid" and (balance is not None or warn_below is not None):
        raise Refused("a postpaid account has no balance to set (use --credit-limit, --warn-at)")
    if len(currency) != 3 or not currency.isalpha():
        raise Refused(f"currency must be a three-letter code, not {currency!r}")
    row, applied = service.create_account(
        app_of(ctx), account_id, opening_balance=balance or 0, kind=kind,
        currency=currency.upper(), credit_limit=credit_limit or 0, warn_below=warn_below,
        warn_at=warn_at, max_channels=max_channels, cps_limit=cps_limit, plan=plan, email=email,
    )
    report(applied, f"created {row.kind} account {row.id}")


@account.command("show")
@click.argument("account_id", metavar="ACCT")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def account_show(ctx, account_id, as_json):
    """Show an account's money, status and channels, live from Redis.

    \b
    Example:
      callguard account show 41441234567 --json
    """
    app = app_of(ctx)
    row = app.books.get_account(account_id)
    data = account_json(app, row) | views.who_and_why(app, row)
    emit(data, as_json, account_text(data))


@account.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def account_list(ctx, as_json):
    """List every account.

    \b
    Example:
      callguard account list --json
    """
    app = app_of(ctx)
    rows = [account_json(app, row) for row in app.books.list_accounts()]
    lines = [f"{'ACCOUNT':<20} {'KIND':<9} {'STATUS':<8} {'AVAILABLE':>14} CHANNELS"]
    for d in rows:
        avail = format_display(parse_amount(d["available"], allow_negative=True))
        lines.append(f"{d['account']:<20} {d['kind']:<9} {d['status']:<8} "
                     f"{avail + ' ' + d['currency']:>14} {d['channels']}/{d['max_channels']}")
    emit(rows, as_json, "\n".join(lines))


@account.command("set")
@click.argument("account_id", metavar="ACCT")
@click.option("--max-channels", type=click.IntRange(0, 100000))
@click.option("--cps-limit", type=click.IntRange(0, 10000))
@click.option("--warn-below", callback=amount_option)
@click.option("--credit-limit", callback=amount_option)
@click.option("--warn-at", callback=amount_option)
@click.option("--plan")
@click.option("--email")
@click.option("--payment-method", help="Token of the stored card for auto top-up.")
@click.option("--auto-topup-below", callback=amount_option,
              help="Charge the card when available credit falls below this (prepaid).")
@click.option("--auto-topup-amount", callback=amount_option, help="How much each charge tops up.")
@click.option("--no-auto-topup", is_flag=True, default=None, help="Stop topping up by card.")
@click.option("--max-calls-per-minute", type=click.IntRange(0, 100000),
              help="Call attempts per minute allowed (0: unlimited); beyond: RATE_LIMIT.")
@click.option("--max-spend-per-hour", callback=amount_option,
              help="Spend per hour allowed, live calls included (0: unlimited); beyond: "
                   "VELOCITY_LIMIT and a fraud notice.")
@click.option("--block-prefix", multiple=True, help="Deny calls to numbers starting so "
                                                    "(DEST_BLOCKED); repeatable.")
@click.option("--unblock-prefix", multiple=True, help="Lift an account-level --block-prefix.")
@click.option("--on-fraud", type=click.Choice(["notify", "block"]),
              help="When fraud is suspected: only notify, or also block the account and "
                   "hang its calls up.")
@reason_option
@click.pass_context
@refusals
def account_set(ctx, account_id, block_prefix, unblock_prefix, reason, **options):
    """Change an account's limits, plan, contact, auto top-up or fraud controls.

    \b
    Examples:
      callguard account set 41441234567 --max-channels 4 --warn-below 5.00
      callguard account set 41441234567 --payment-method tok_4242 \\
          --auto-topup-below 10.00 --auto-topup-amount 20.00
      callguard account set 4144555 --max-spend-per-hour 50.00 --block-prefix +41900 \\
          --on-fraud block
    """
    changes = {k: v for k, v in options.items() if v is not None}
    if changes.pop("no_auto_topup", None):
        changes.update(auto_topup_below=None, auto_topup_amount=None)
    if not changes and not block_prefix and not unblock_prefix:
        raise click.UsageError("nothing to change: give at least one option")
    app = app_of(ctx)
    row, applied = service.update_account(app, account_id, block=block_prefix,
                                          unblock=unblock_prefix, reason=reason, **changes)
    done = f"updated account {account_id}: {', '.join(sorted(changes) or ['blocked prefixes'])}"
    if "credit_limit" in changes and applied.in_redis and _no_credit(app, account_id):
        done += (f"\n{account_id} now has no credit left under its limit: it is blocked "
                 "both ways (NO_FUNDS) until a payment")
    if block_prefix or unblock_prefix:
        done += f"; blocked prefixes: {row.blocked_prefixes or 'none'}"
    report(applied, done)


def _live(app: service.App, account_id: str) -> dict | None:
    """The account in Redis, or None when Redis is away (a movement then waits in the
    outbox, and there is nothing to say about it yet)."""
    try:
        return state.account_state(app.redis, app.keys, account_id) or {}
    except (OSError, RedisError):
        return None


def _no_credit(app: service.App, account_id: str) -> bool:
    """Refused both ways for want of money (the engine's automatic block)."""
    live = _live(app, account_id)
    return live is not None and (live.get("lv") == "2"
                                 or live.get("available", state.CENT) < state.CENT)


def _limit_state(app: service.App, account_id: str) -> str | None:
    live = _live(app, account_id)
    return None if live is None else views.LIMIT_STATES.get(str(live.get("lv", "")))


# "-5", "-2.50": what follows the dash is a number, and no option is named so.
_NEGATIVE = re.compile(r"-[0-9.]")


class MoneyCommand(click.Command):
    """A command with an AMOUNT argument: a negative amount ("-5.00") is that argument,
    refused or taken as any other amount is, not an unknown option; an unknown option
    (`--bogus`, `-x`) is still one ("No such option"). Click reads every word that
    starts with "-" as an option: such an amount is moved behind a `--`, where click
    takes words as arguments (AMOUNT is the last argument, so the order holds)."""

    def parse_args(self, ctx, args):
        if "--" not in args:
            # A --ref or --reason value may look like an amount too: it stays with its option.
            moved = {i for i, arg in enumerate(args) if _NEGATIVE.match(arg)
                     and (i == 0 or args[i - 1] not in ("--ref", "--reason"))}
            if moved:
                args = ([a for i, a in enumerate(args) if i not in moved] + ["--"]
                        + [a for i, a in enumerate(args) if i in moved])
        return super().parse_args(ctx, args)


def _money_command(kind: str):
    @click.argument("account_id", metavar="ACCT")
    @click.argument("amount")
    @click.option("--ref", help="Reference (bank transfer, receipt); the same reference is "
                                "never booked twice.")
    @click.option("--reason", help="Why: recorded on the ledger entry with who booked it.")
    @click.pass_context
    @refusals
    def command(ctx, account_id, amount, ref, reason):
        micros = parse_amount(amount, allow_zero=False, allow_negative=kind == "adjustment")
        app = app_of(ctx)
        was = _limit_state(app, account_id)
        booking, applied = service.move_money(app, account_id, kind, micros, ref,
                                              reason=reason)
        if booking.created:
            done = (f"booked {kind} of {format_display(micros)} on {account_id} "
                    f"(entry {booking.entry_id})")
        else:
            done = f"already booked as entry {booking.entry_id}"
            if booking.amount != micros:
                done += f" for {format_display(booking.amount)}, not {format_display(micros)}"
            if applied.now:
                done += "; applied to Redis now"
            elif applied.in_redis:
                done += "; nothing changed"
        if was == "exhausted" and applied.in_redis and _limit_state(app, account_id) != was:
            done += f"\nunblocked {account_id}: calls are allowed again, both ways"
        report(applied, done)

    return command


account.command(
    "topup", cls=MoneyCommand,
    help="Add prepaid credit; lifts a NO_FUNDS block.\n\n\b\nExample:\n"
         "  callguard account topup 41441234567 20.00 --ref BANK-2026-118",
)(_money_command("topup"))
account.command(
    "payment", cls=MoneyCommand,
    help="Book a payment on a postpaid account: lowers what is outstanding and lifts a "
         "credit-limit block.\n\n\b\nExample:\n  callguard account payment 4144555 250.00 "
         "--ref INV-2026-11",
)(_money_command("payment"))
account.command(
    "adjust", cls=MoneyCommand,
    help="Correct a balance either way (a refund, a chargeback); negative lowers it.\n\n"
         "\b\nExample:\n  callguard account adjust 41441234567 -2.50 --ref TICKET-7731",
)(_money_command("adjustment"))


@account.command("block")
@click.argument("account_id", metavar="ACCT")
@click.option("--reason", default="blocked by operator", show_default=True,
              help="Why: the account's block reason, recorded with who blocked it.")
@click.option("--hangup", is_flag=True, help="Also end the account's calls in progress.")
@click.pass_context
@refusals
def account_block(ctx, account_id, reason, hangup):
    """Block an account for calls in both directions.

    \b
    Example:
      callguard account block 41441234567 --reason "fraud suspected" --hangup
    """
    app = app_of(ctx)
    _, applied, hung_up = service.block_account(app, account_id, reason, hangup)
    message = f"blocked {account_id}"
    if hung_up is None:
        message += " in the books; its calls go on until Redis has it"
    elif hangup:
        message += f"; hanging up {hung_up} call(s)"
    report(applied, message)


@account.command("unblock")
@click.argument("account_id", metavar="ACCT")
@reason_option
@click.pass_context
@refusals
def account_unblock(ctx, account_id, reason):
    """Lift an operator's block.

    \b
    Example:
      callguard account unblock 41441234567 --reason "customer called back"
    """
    app = app_of(ctx)
    _, applied = service.unblock_account(app, account_id, reason=reason)
    done = f"unblocked {account_id}"
    if applied.in_redis and _no_credit(app, account_id):
        done += ("; it has no credit left: calls are refused (NO_FUNDS) until a "
                 "top-up or payment")
    report(applied, done)
