"""`callguard embedded status|stop`: the embedded Redis of the state directory, seen and
stopped (its lifetime is in callguard.engine.connect's docstring and the README)."""

from __future__ import annotations

import click

from ..engine.connect import EmbeddedBusy, embedded_status, stop_unless_serving
from .base import Refused, app_of, cli, emit, refusals

NOT_IN_USE = "no embedded Redis is in use: CALLGUARD_REDIS_URL (or --redis-url) is set"


@cli.group()
def embedded():
    """The embedded Redis, used when no CALLGUARD_REDIS_URL is set.

    The first callguard process that needs it starts it; it stays up while `serve` or
    `worker` uses it, and after them; a one-shot command that had to start it stops it
    when it exits. Its data (an append-only file) stays in the state directory.

    \b
    Example:
      callguard embedded status
      callguard embedded stop
    """


@embedded.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def embedded_status_cmd(ctx, as_json):
    """Whether the embedded Redis runs, its pid, socket and data, and who uses it.

    Starts nothing.

    \b
    Example:
      callguard embedded status --json
    """
    settings = app_of(ctx).settings
    if settings.redis_url:
        emit({"embedded": False}, as_json, NOT_IN_USE)
        return
    status = {"embedded": True, **embedded_status(settings.home)}
    if status["running"]:
        lines = [f"embedded Redis: running, pid {status['pid']}"]
    else:
        lines = ["embedded Redis: not running (the next command that needs it starts it)"]
    lines += [f"  socket: {status['socket']}", f"  data:   {status['data_dir']}",
              f"  log:    {status['log']}"]
    if status["users"] is not None and (status["running"] or status["users"]):
        serving = status["long_running_users"]
        lines.append(f"  used by {status['users']} process(es)"
                     + (f", {serving} long-running (serve, worker)" if serving else ""))
    if status["running"]:
        lines.append("  stops when the last command using it exits"
                     if status["stops_with_last_command"]
                     else "  stays up until `callguard embedded stop`")
    emit(status, as_json, "\n".join(lines))


@embedded.command("stop")
@click.option("--force", is_flag=True,
              help="Stop it even while serve or worker uses it (they lose Redis until "
                   "restarted).")
@click.pass_context
@refusals
def embedded_stop(ctx, force):
    """Stop the embedded Redis, its data saved; the next command that needs it starts it
    again from that data.

    Refused while a long-running process (serve, worker) uses it, unless --force.

    \b
    Example:
      callguard embedded stop
    """
    settings = app_of(ctx).settings
    if settings.redis_url:
        raise Refused(f"{NOT_IN_USE}: nothing to stop")
    try:
        stopped = stop_unless_serving(settings.home, force=force)
    except EmbeddedBusy as exc:
        raise Refused(str(exc)) from None
    click.echo(f"embedded Redis stopped; its data is kept in {settings.home}" if stopped
               else "embedded Redis is not running")
