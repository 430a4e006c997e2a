"""The `callguard` command: operator CLI, servers and worker."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click
import redis
import sqlalchemy.exc

from . import service
from .books.database import upgrade
from .books.ledger import BooksError
from .config import ConfigError, Settings, load_settings
from .engine.connect import RedisUnavailable
from .engine.core import valid_account
from .money import AmountError, format_display, format_full, parse_amount
from .rating import NumberError, PlanError, Rate, normalize_number, parse_rates_csv

log = logging.getLogger("callguard")


class Refused(click.ClickException):
    """An operation callguard refused: one line on stderr, exit 1."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"callguard: {self.message}", err=True)


def refusals(fn):
    """Turn expected failures into one clear line; the details go to the log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BooksError, AmountError, NumberError, ConfigError, ValueError) as exc:
            raise Refused(str(exc)) from None
        except (redis.RedisError, RedisUnavailable) as exc:
            log.debug("redis failure", exc_info=True)
            raise Refused(f"Redis unavailable: {exc}") from None
        except sqlalchemy.exc.OperationalError as exc:
            log.debug("database failure", exc_info=True)
            raise Refused(f"database unavailable or not migrated (run `callguard db upgrade`): "
                          f"{exc.orig}") from None

    return wrapper


def _app(ctx: click.Context) -> service.App:
    return ctx.find_object(service.App)


def _amount(_ctx, param, value):
    if value is None:
        return None
    try:
        return parse_amount(value)
    except AmountError as exc:
        raise Refused(f"{param.name.replace('_', '-')}: {exc}") from None


def _emit(data, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML settings file (also CALLGUARD_CONFIG).")
@click.option("--home", help="State directory (CALLGUARD_HOME, default ./.callguard).")
@click.option("--redis-url", help="Redis URL (CALLGUARD_REDIS_URL); default: embedded Redis.")
@click.option("--database-url", help="SQLAlchemy URL (CALLGUARD_DATABASE_URL); default: SQLite.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx, config_file, home, redis_url, database_url, verbose):
    """Live credit control for Asterisk and FreeSWITCH.

    \b
    Example:
      callguard db upgrade
      callguard account create 41441234567 --prepaid --balance 50.00
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config_file, home=home, redis_url=redis_url,
                                 database_url=database_url)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    ctx.obj = service.App(settings)
    ctx.call_on_close(ctx.obj.close)


# -- db -------------------------------------------------------------------------

@cli.group()
def db():
    """The SQL books' schema.

    \b
    Example:
      callguard db upgrade
    """


@db.command("upgrade")
@click.pass_context
@refusals
def db_upgrade(ctx):
    """Create the schema or migrate it to this version.

    \b
    Example:
      callguard db upgrade
    """
    upgrade(_app(ctx).books.engine)
    click.echo("database schema is up to date")


# -- accounts -------------------------------------------------------------------

@cli.group()
def account():
    """Create, show and change customer accounts.

    \b
    Examples:
      callguard account create 41441234567 --prepaid --balance 50.00
      callguard account show 41441234567
    """


def account_json(app: service.App, row) -> dict:
    live = service.state.account_state(app.redis, app.keys, row.id) or {}
    reserved = live.get("reserved", 0)
    balance = live.get("balance", row.balance)
    credit = row.credit_limit if row.kind == "postpaid" else 0
    return {
        "account": row.id,
        "kind": row.kind,
        "currency": row.currency,
        "status": row.status,
        "block_reason": row.block_reason,
        "plan": row.plan,
        "balance": format_full(balance),
        "credit_limit": format_full(credit),
        "outstanding": format_full(-balance if row.kind == "postpaid" else 0),
        "reserved": format_full(reserved),
        "available": format_full(balance + credit - reserved),
        "channels": live.get("channels", 0),
        "max_channels": row.max_channels,
        "cps_limit": row.cps_limit,
        "warn_below": format_full(row.warn_below) if row.warn_below is not None else None,
        "warn_at": format_full(row.warn_at) if row.warn_at is not None else None,
        "email": row.email,
    }


def account_text(data: dict) -> str:
    cur = data["currency"]

    def money(name):
        return f"{format_display(parse_amount(data[name], allow_negative=True))} {cur}"

    status = data["status"] + (f" ({data['block_reason']})" if data["block_reason"] else "")
    lines = [f"account     {data['account']} ({data['kind']}, plan {data['plan']})",
             f"status      {status}"]
    if data["kind"] == "prepaid":
        lines.append(f"balance     {money('balance')}")
    else:
        lines += [f"outstanding {money('outstanding')}", f"credit      {money('credit_limit')}"]
    lines += [f"reserved    {money('reserved')}", f"available   {money('available')}",
              f"channels    {data['channels']} of {data['max_channels'] or 'unlimited'}"]
    return "\n".join(lines)


@account.command("create")
@click.argument("account_id", metavar="ACCT")
@click.option("--prepaid", "kind", flag_value="prepaid", help="Pays in advance: a balance.")
@click.option("--postpaid", "kind", flag_value="postpaid", help="Pays by invoice: a credit limit.")
@click.option("--balance", callback=_amount, help="Opening balance (prepaid).")
@click.option("--credit-limit", callback=_amount, help="Credit limit (postpaid).")
@click.option("--warn-below", callback=_amount, help="Prepaid warning level, e.g. 10.00.")
@click.option("--warn-at", callback=_amount, help="Postpaid warning level.")
@click.option("--currency", default="CHF", show_default=True, help="ISO 4217 code.")
@click.option("--max-channels", type=click.IntRange(0, 100000), default=10, show_default=True,
              help="Concurrent calls allowed (0: unlimited).")
@click.option("--cps-limit", type=click.IntRange(0, 10000), default=0,
              help="Call setups per second allowed (0: unlimited).")
@click.option("--plan", help="Rate plan (default: 'default').")
@click.option("--email", help="Contact address for notices.")
@click.pass_context
@refusals
def account_create(ctx, account_id, kind, balance, credit_limit, warn_below, warn_at, currency,
                   max_channels, cps_limit, plan, email):
    """Create an account; ACCT is the PBX accountcode.

    \b
    Examples:
      callguard account create 41441234567 --prepaid --balance 50.00 --warn-below 10.00
      callguard account create 4144555 --postpaid --credit-limit 300.00 --warn-at 200.00
    """
    if kind is None:
        raise click.UsageError("say --prepaid or --postpaid")
    if not valid_account(account_id):
        raise Refused(f"invalid account id {account_id!r} (letters, digits, . _ -; up to 64)")
    if kind == "prepaid" and (credit_limit is not None or warn_at is not None):
        raise Refused("a prepaid account has no credit limit (use --balance, --warn-below)")
    if kind == "postpaid" and (balance is not None or warn_below is not None):
        raise Refused("a postpaid account has no balance to set (use --credit-limit, --warn-at)")
    if len(currency) != 3 or not currency.isalpha():
        raise Refused(f"currency must be a three-letter code, not {currency!r}")
    if email is not None and ("@" not in email or len(email) > 254 or " " in email):
        raise Refused(f"not an email address: {email!r}")
    row = service.create_account(
        _app(ctx), account_id, opening_balance=balance or 0, kind=kind,
        currency=currency.upper(), credit_limit=credit_limit or 0, warn_below=warn_below,
        warn_at=warn_at, max_channels=max_channels, cps_limit=cps_limit, plan=plan, email=email,
    )
    click.echo(f"created {row.kind} account {row.id}")


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
    app = _app(ctx)
    data = account_json(app, app.books.get_account(account_id))
    _emit(data, as_json, account_text(data))


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
    app = _app(ctx)
    rows = [account_json(app, row) for row in app.books.list_accounts()]
    lines = [f"{'ACCOUNT':<20} {'KIND':<9} {'STATUS':<8} {'AVAILABLE':>14} CHANNELS"]
    for d in rows:
        avail = format_display(parse_amount(d["available"], allow_negative=True))
        lines.append(f"{d['account']:<20} {d['kind']:<9} {d['status']:<8} "
                     f"{avail + ' ' + d['currency']:>14} {d['channels']}/{d['max_channels']}")
    _emit(rows, as_json, "\n".join(lines))


@account.command("set")
@click.argument("account_id", metavar="ACCT")
@click.option("--max-channels", type=click.IntRange(0, 100000))
@click.option("--cps-limit", type=click.IntRange(0, 10000))
@click.option("--warn-below", callback=_amount)
@click.option("--credit-limit", callback=_amount)
@click.option("--warn-at", callback=_amount)
@click.option("--plan")
@click.option("--email")
@click.option("--payment-method", help="Token of the stored card for auto top-up.")
@click.option("--auto-topup-below", callback=_amount)
@click.option("--auto-topup-amount", callback=_amount)
@click.pass_context
@refusals
def account_set(ctx, account_id, **options):
    """Change an account's limits, plan or contact.

    \b
    Example:
      callguard account set 41441234567 --max-channels 4 --warn-below 5.00
    """
    changes = {k: v for k, v in options.items() if v is not None}
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    service.update_account(_app(ctx), account_id, **changes)
    click.echo(f"updated account {account_id}: {', '.join(sorted(changes))}")


def _money_command(kind: str):
    @click.argument("account_id", metavar="ACCT")
    @click.argument("amount")
    @click.option("--ref", help="Reference (bank transfer, receipt); the same reference is "
                                "never booked twice.")
    @click.pass_context
    @refusals
    def command(ctx, account_id, amount, ref):
        micros = parse_amount(amount, allow_zero=False)
        booking = service.move_money(_app(ctx), account_id, kind, micros, ref)
        if booking.created:
            click.echo(f"booked {kind} of {format_display(micros)} on {account_id} "
                       f"(entry {booking.entry_id})")
        else:
            click.echo(f"already booked as entry {booking.entry_id}; nothing changed")

    return command


account.command(
    "topup",
    help="Add prepaid credit; lifts a NO_FUNDS block.\n\n\b\nExample:\n"
         "  callguard account topup 41441234567 20.00 --ref BANK-2026-118",
)(_money_command("topup"))
account.command(
    "payment",
    help="Book a payment on a postpaid account: lowers what is outstanding and lifts a "
         "credit-limit block.\n\n\b\nExample:\n  callguard account payment 4144555 250.00 "
         "--ref INV-2026-11",
)(_money_command("payment"))


@account.command("block")
@click.argument("account_id", metavar="ACCT")
@click.option("--reason", default="blocked by operator", show_default=True)
@click.option("--hangup", is_flag=True, help="Also end the account's calls in progress.")
@click.pass_context
@refusals
def account_block(ctx, account_id, reason, hangup):
    """Block an account for calls in both directions.

    \b
    Example:
      callguard account block 41441234567 --reason "fraud suspected" --hangup
    """
    app = _app(ctx)
    service.update_account(app, account_id, status="blocked", block_reason=reason)
    message = f"blocked {account_id}"
    if hangup:
        sessions = [s["session"] for s in service.live_sessions(app, account_id)]
        service.kill(app, sessions)
        message += f"; hanging up {len(sessions)} call(s)"
    click.echo(message)


@account.command("unblock")
@click.argument("account_id", metavar="ACCT")
@click.pass_context
@refusals
def account_unblock(ctx, account_id):
    """Lift an operator's block.

    \b
    Example:
      callguard account unblock 41441234567
    """
    service.update_account(_app(ctx), account_id, status="active", block_reason=None)
    click.echo(f"unblocked {account_id}")


# -- rates ----------------------------------------------------------------------

@cli.group()
def rates():
    """Rate plans: import and look up.

    \b
    Examples:
      callguard rates import rates.csv
      callguard rates lookup +41791234567
    """


@rates.command("import")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(exists=True, dir_okay=False))
@click.option("--plan", default="default", show_default=True)
@click.option("--inbound", is_flag=True, help="Rates for incoming calls (default: outgoing).")
@click.pass_context
@refusals
def rates_import(ctx, csv_file, plan, inbound):
    """Import a plan from CSV, all or nothing; replaces the plan's rows atomically.

    Header: prefix,description,rate_per_min,connect_fee,initial_increment,
    subsequent_increment,blocked

    \b
    Example:
      callguard rates import rates.csv --plan default
    """
    if not plan or len(plan) > 64:
        raise click.UsageError("plan names are 1-64 characters")
    try:
        text = Path(csv_file).read_text(encoding="utf-8-sig")
        parsed = parse_rates_csv(text)
    except UnicodeDecodeError:
        raise Refused(f"{csv_file}: not UTF-8 text") from None
    except PlanError as exc:
        for line, problem in exc.problems:
            click.echo(f"{csv_file}:{line}: {problem}", err=True)
        raise Refused(f"{csv_file}: {len(exc.problems)} bad row(s); nothing imported") from None
    direction = "inbound" if inbound else "outbound"
    version = service.import_plan(_app(ctx), plan, direction, parsed)
    click.echo(f"imported {len(parsed)} {direction} rates into plan {plan} (version {version})")


@rates.command("lookup")
@click.argument("number")
@click.option("--plan", default="default", show_default=True)
@click.option("--inbound", is_flag=True, help="Look up an incoming rate.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def rates_lookup(ctx, number, plan, inbound, as_json):
    """Show the rate a number matches and what 1, 60 and 61 seconds cost.

    \b
    Example:
      callguard rates lookup +41791234567
    """
    app = _app(ctx)
    normalized = normalize_number(number)
    direction = "inbound" if inbound else "outbound"
    table = app.books.load_plans().get((plan, direction))
    if table is None:
        raise Refused(f"no {direction} rates in plan {plan}")
    rate = table.lookup(normalized)
    if rate is None:
        raise Refused(f"no rate for {normalized} in plan {plan}")
    costs = {str(d): format_full(rate.cost(d)) for d in (1, 60, 61)}
    data = {"number": normalized, "plan": plan, "rate": rate.as_json(), "cost": costs}
    human = "\n".join([
        f"number      {normalized}",
        f"prefix      {rate.prefix} ({rate.description})" + ("  BLOCKED" if rate.blocked else ""),
        f"rate        {format_display(rate.rate_per_min)}/min, connect fee "
        f"{format_display(rate.connect_fee)}, increments "
        f"{rate.initial_increment}/{rate.subsequent_increment}",
        *(f"{d + ' s':<11} {format_display(parse_amount(c))}" for d, c in costs.items()),
    ])
    _emit(data, as_json, human)


# -- calls ----------------------------------------------------------------------

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
    """Show live sessions: account, destination, node, talk time, grant and cost so far.

    \b
    Example:
      callguard calls list --account 41441234567
    """
    app = _app(ctx)
    now = service.redis_now_ms(app.redis)
    rows = []
    for s in service.live_sessions(app, account_id):
        answered = int(s["ans"]) if s.get("ans") else None
        talk = (now - answered) // 1000 if answered else 0
        rate = Rate(s.get("pfx", ""), "", int(s["r"]), int(s["cf"]), int(s["i"]), int(s["s"]))
        rows.append({
            "session": s["session"], "account": s["account"], "direction": s["dir"],
            "destination": s["dst"], "node": s.get("node", ""),
            "state": "talking" if answered else "ringing",
            "answered_for": talk,
            "granted_until": int(s["ge"]) // 1000 if s.get("ge") else None,
            "granted_seconds": int(s.get("g", 0)),
            "cost_so_far": format_full(rate.cost(talk, answered is not None)),
            "reserved": format_full(int(s.get("hold", 0))),
        })
    lines = [f"{'SESSION':<40} {'DESTINATION':<16} {'NODE':<12} {'TALK':>6} {'LEFT':>6} COST"]
    for r in rows:
        left = max(0, r["granted_until"] - now // 1000) if r["granted_until"] else "-"
        lines.append(f"{r['session']:<40} {r['destination']:<16} {r['node']:<12} "
                     f"{r['answered_for']:>5}s {left!s:>5}s {r['cost_so_far']}")
    _emit(rows, as_json, "\n".join(lines) if rows else "no calls in progress")


@calls.command("kill")
@click.argument("session")
@click.pass_context
@refusals
def calls_kill(ctx, session):
    """Hang up one call now, on whichever serve process holds it.

    \b
    Example:
      callguard calls kill 41441234567/1795236355.1310
    """
    app = _app(ctx)
    if not any(s["session"] == session for s in
               service.live_sessions(app, service.split_session(session)[0])):
        raise Refused(f"no call in progress with session {session}")
    if not service.kill(app, [session]):
        raise Refused("no serve process is listening; the PBX's own timeout will end the call")
    click.echo(f"hanging up {session}")


# -- processes ----------------------------------------------------------------------

@cli.group()
def serve():
    """Run a PBX adapter.

    \b
    Example:
      callguard serve asterisk
    """


@serve.command("asterisk")
@click.pass_context
@refusals
def serve_asterisk(ctx):
    """FastAGI server for the dialplan's authorize, AMI client for supervision.

    Needs CALLGUARD_AMI_URL (ami://user:secret@host:5038) to supervise calls.

    \b
    Example:
      CALLGUARD_AMI_URL=ami://callguard:secret@127.0.0.1:5038 callguard serve asterisk
    """
    from .adapters.asterisk import serve as run

    app = _app(ctx)
    try:
        run(app)
    except OSError as exc:
        raise Refused(f"cannot listen for FastAGI on {app.settings.agi_bind}: "
                      f"{exc.strerror or exc}") from None


@cli.command()
@click.option("--once", is_flag=True, help="Drain what is there and exit.")
@click.pass_context
@refusals
def worker(ctx, once):
    """Book finished calls into SQL, close stale sessions.

    \b
    Example:
      callguard worker
    """
    from .worker import run

    run(_app(ctx), once=once)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def reconcile(ctx, as_json):
    """Compare Redis with the SQL books for every account; exit 1 on any difference.

    Charges still waiting for the worker count as booked.

    \b
    Example:
      callguard reconcile
    """
    diffs = service.reconcile(_app(ctx))
    data = [d.__dict__ for d in diffs]
    lines = [f"{d.account}: {d.field}: books {d.books}, redis {d.redis}" for d in diffs]
    _emit(data, as_json, "\n".join(lines) or "Redis and the books agree")
    if diffs:
        ctx.exit(1)


@cli.command()
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.pass_context
@refusals
def rebuild(ctx, yes):
    """Reload Redis from the SQL books (after Redis lost its data).

    \b
    Example:
      callguard rebuild --yes
    """
    if not yes:
        click.confirm("Overwrite Redis balances with the books'?", abort=True)
    count = service.rebuild(_app(ctx))
    click.echo(f"rebuilt {count} account(s) in Redis")


@cli.command()
@click.option("--calls", type=click.IntRange(1, 500), default=30, show_default=True)
@click.option("--speed", type=click.FloatRange(1, 100), default=10, show_default=True,
              help="How much faster than wall time the simulated PBX runs.")
@click.pass_context
@refusals
def demo(ctx, calls, speed):
    """See callguard stop a fraud: 30 simultaneous premium calls on CHF 50 of credit.

    Starts the real `serve asterisk` and a simulated Asterisk that places the calls over
    FastAGI and AMI, shows live progress, then compares the loss with what rating after
    the call would have lost. Uses the embedded Redis; leaves nothing behind.

    \b
    Example:
      callguard demo
    """
    from . import demo as scenario
    from .adapters.asterisk import run_loop

    app, tmp = scenario.throwaway_app(_app(ctx).settings)
    sc = scenario.Scenario(calls=calls, speed=speed)
    click.echo(f"A hacked PBX places {calls} simultaneous calls to a CHF 3.00/min premium "
               f"number;\nthe prepaid account holds {scenario.money(sc.balance)}. PBX time runs "
               f"{speed:g}x faster than wall time.\n")

    def progress(snap, active, cut, pbx_seconds):
        click.echo(f"  t={pbx_seconds:6.1f}s  balance {scenario.money(snap['balance']):>12}  "
                   f"reserved {scenario.money(snap['reserved']):>11}  "
                   f"active {active:3d}  cut off {cut:3d}")

    try:
        scenario.prepare(app, sc)
        outcome = run_loop(scenario.run_fraud(app, sc, progress))
    finally:
        scenario.cleanup(app)
        tmp.cleanup()
    rows = [("", "with callguard", "rated after the call")] + scenario.summary(outcome)
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    click.echo("")
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip())
    click.echo(f"\nfinished in {outcome.wall_seconds:.1f} s of wall time")
    if outcome.overshoot > 100_000 or not outcome.books_agree:
        raise Refused("the demo did not hold the bound; see above")


def main() -> None:
    try:
        cli(prog_name="callguard")
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["cli", "main", "Settings"]
