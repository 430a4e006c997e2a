"""`callguard rates ...`: import and look up rate plans."""

from __future__ import annotations

from pathlib import Path

import click

from .. import service
from ..money import format_display, format_full, parse_amount
from ..rating import PlanError, normalize_number, parse_rates_csv
from .base import Refused, app_of, cli, emit, refusals


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
    version = service.import_plan(app_of(ctx), plan, direction, parsed)
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
    app = app_of(ctx)
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
    emit(data, as_json, human)
