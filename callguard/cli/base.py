"""The root `callguard` group and what every command shares: one clear line for an
expected failure, money arguments, output."""

from __future__ import annotations

import functools
import json
import logging
import os

import click

from .. import service
from ..books.database import upgrade
from ..config import ConfigError, carries_password, load_settings
from ..logs import TEXT_FORMAT, JsonFormatter
from ..money import AmountError, parse_amount
from ..refusals import explain

PARENT_OPTION = "_CALLGUARD_PARENT_OPTION_"  # + the setting, for serve --workers
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
        except Exception as exc:
            known = explain(exc)
            if known is None:
                raise
            raise Refused(known[1]) from None

    return wrapper


def app_of(ctx: click.Context) -> service.App:
    return ctx.find_object(service.App)


def amount_option(_ctx, param, value):
    if value is None:
        return None
    try:
        return parse_amount(value)
    except AmountError as exc:
        raise Refused(f"{param.name.replace('_', '-')}: {exc}") from None


def emit(data, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)


def report(applied: service.Applied, done: str) -> None:
    """What an operator operation did: booked, and in Redis now or later."""
    click.echo(done)
    if not applied.in_redis:
        click.echo(f"callguard: Redis unavailable ({applied.error}): it is booked; Redis will "
                   "be updated when it is reachable (by `callguard worker`, or the next "
                   "callguard command)", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callguard", message="callguard %(version)s")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML settings file (also CALLGUARD_CONFIG).")
@click.option("--home", help="State directory (CALLGUARD_HOME; default "
              "$XDG_DATA_HOME/callguard, i.e. ~/.local/share/callguard; "
              "/var/lib/callguard for a service).")
@click.option("--redis-url", help="Redis URL (CALLGUARD_REDIS_URL); default: embedded Redis. "
              "Other users see options in ps: a password goes in CALLGUARD_REDIS_URL_FILE.")
@click.option("--database-url", help="SQLAlchemy URL (CALLGUARD_DATABASE_URL); default: SQLite. "
              "A password goes in CALLGUARD_DATABASE_URL_FILE.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, envvar="CALLGUARD_LOG_FORMAT",
              help="Log lines on stderr: text, or one JSON object a line for log shippers "
                   "(also CALLGUARD_LOG_FORMAT).")
@click.pass_context
def cli(ctx, config_file, home, redis_url, database_url, verbose, log_format):
    """Live credit control for Asterisk and FreeSWITCH.

    \b
    Example:
      callguard db upgrade
      callguard account create 41441234567 --prepaid --balance 50.00
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    if log_format == "json":
        handler = logging.StreamHandler()  # stderr, as for text
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    for option, value in (("--redis-url", redis_url), ("--database-url", database_url)):
        if carries_password(value):
            name = "CALLGUARD_" + option[2:].replace("-", "_").upper()
            log.warning("%s is visible to other users in ps; use %s_FILE or a systemd "
                        "credential", option, name)
    # From a `serve --workers` parent: its --redis-url / --database-url, kept off the
    # workers' command lines (ps); taken as the option, so they win as they did there.
    redis_url = os.environ.pop(PARENT_OPTION + "REDIS_URL", None) or redis_url
    database_url = os.environ.pop(PARENT_OPTION + "DATABASE_URL", None) or database_url
    try:
        settings = load_settings(config_file, home=home, redis_url=redis_url,
                                 database_url=database_url)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    ctx.obj = service.App(settings, one_shot=True)  # serve and worker say otherwise
    ctx.call_on_close(ctx.obj.close)


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
    upgrade(app_of(ctx).books.engine)
    click.echo("database schema is up to date")
