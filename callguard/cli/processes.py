"""The long-running processes (`serve`, `worker`), the books against Redis
(`reconcile`, `rebuild`) and `demo`."""

from __future__ import annotations

import errno
import logging
import os
import sys

import click

from .. import sync
from ..logs import tag_lines
from ..nodes import default_node
from .base import PARENT_OPTION, Refused, app_of, cli, emit, refusals


@cli.group()
def serve():
    """Run a PBX adapter.

    \b
    Example:
      callguard serve asterisk
    """


WORKERS_HELP = """\b
Several processes on one port (one Python process uses one core):
  --workers N starts N serve processes that share the port (SO_REUSEPORT):
  worker 1 is node CALLGUARD_NODE (default HOST:PORT) with HTTP on
  CALLGUARD_HTTP_BIND, worker k node NODE.k with HTTP on that port + k - 1
  (/metrics, /healthz, /readyz of each: scrape them all). A worker that dies
  is started again under its node and resumes its calls. Or start processes
  yourself, each with CALLGUARD_REUSE_PORT=1 and its own CALLGUARD_NODE and
  CALLGUARD_HTTP_BIND."""


def serve_options(fn):
    fn = click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
                      help="Serve processes sharing the port (SO_REUSEPORT), each with its "
                           "own node, event link and HTTP port.")(fn)
    # A worker of --workers: which one, and its parent (it stops when the parent dies).
    fn = click.option("--slot", type=click.IntRange(1, 64), hidden=True)(fn)
    return click.option("--parent", type=int, hidden=True)(fn)


@serve.command("asterisk", epilog=WORKERS_HELP)
@serve_options
@click.pass_context
@refusals
def serve_asterisk(ctx, workers, slot, parent):
    """FastAGI server for the dialplan's authorize, AMI client for supervision.

    Needs CALLGUARD_AMI_URL (ami://user:secret@host:5038, or amis://...:5039 for AMI over
    TLS, with CALLGUARD_AMI_TLS_CA for a CA of your own) to supervise calls, or
    CALLGUARD_AMI_URL_FILE naming a file that holds it.

    \b
    Example:
      CALLGUARD_AMI_URL_FILE=/etc/credstore/callguard.ami_url callguard serve asterisk
      CALLGUARD_HTTP_BIND=127.0.0.1:9470 callguard serve asterisk --workers 2
    """
    from ..adapters.asterisk import AsteriskAdapter

    _serve(ctx, AsteriskAdapter, workers, slot, parent)


@serve.command("freeswitch", epilog=WORKERS_HELP)
@serve_options
@click.pass_context
@refusals
def serve_freeswitch(ctx, workers, slot, parent):
    """Outbound ESL server for the dialplan's `socket`, inbound ESL client for supervision.

    Needs CALLGUARD_ESL_URL (esl://:password@host:8021) to supervise calls, or
    CALLGUARD_ESL_URL_FILE naming a file that holds it.

    \b
    Example:
      CALLGUARD_ESL_URL_FILE=/etc/credstore/callguard.esl_url callguard serve freeswitch
      CALLGUARD_HTTP_BIND=127.0.0.1:9480 callguard serve freeswitch --workers 2
    """
    from ..adapters.freeswitch import FreeSWITCHAdapter

    _serve(ctx, FreeSWITCHAdapter, workers, slot, parent)


def service_logging() -> None:
    """A long-running process says when it starts and stops, what it did each minute and
    each denial (throttled): INFO, unless -v asked for more."""
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


def _serve(ctx, adapter_class, workers: int = 1, slot: int | None = None,
           parent: int | None = None) -> None:
    from ..adapters.common import serve as run

    service_logging()
    app = app_of(ctx)
    if workers > 1:
        ctx.exit(_serve_workers(ctx, adapter_class, workers))
    if parent and not _workers().child_of(parent):
        raise Refused(f"the --workers process that started this one (pid {parent}) is gone")
    adapter = adapter_class(app)
    if slot:
        tag_lines(adapter.control.node)
    try:
        status = run(adapter)
    except OSError as exc:
        bind = getattr(adapter.settings, adapter.bind_setting)
        hint = ""
        if exc.errno == errno.EADDRINUSE and not adapter.settings.reuse_port:
            hint = (" (for several serve processes on one port: --workers N, or "
                    "CALLGUARD_REUSE_PORT=1 on each, each with its own CALLGUARD_NODE)")
        raise Refused(f"cannot listen for {adapter.setup_protocol} on {bind}: "
                      f"{exc.strerror or exc}{hint}") from None
    ctx.exit(status)


def _workers():
    from .. import workers  # the parent's part: only for --workers

    return workers


def _serve_workers(ctx, adapter_class, workers: int) -> int:
    """The parent of `--workers N`: it serves nothing itself (workers.py)."""
    settings = app_of(ctx).settings
    pbx = adapter_class.name.lower()
    bind = getattr(settings, adapter_class.bind_setting)
    slots = _workers().plan(settings, pbx, adapter_class.bind_setting, workers)
    return _workers().serve(_worker_command(ctx), slots, f"{adapter_class.setup_protocol} "
                            f"on {bind}")


def _worker_command(ctx) -> list[str]:
    """This command line for a worker: the root options as they were given (or came from
    the environment; --redis-url and --database-url through it instead), the same serve
    command, no --workers."""
    root = ctx.find_root()
    argv = [sys.executable, "-m", "callguard"]
    for param in root.command.params:
        value = root.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or value is False:
            continue
        if param.name in ("redis_url", "database_url"):
            # A password in them would show in ps once more per worker: the environment
            # carries them (base.cli takes them back as the option).
            os.environ[PARENT_OPTION + param.name.upper()] = value
            continue
        flag = param.opts[-1]
        if param.count:
            argv += [flag] * value
        elif param.is_flag:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return [*argv, ctx.parent.info_name, ctx.info_name]


@cli.command()
@click.option("--once", is_flag=True, help="Drain what is there and exit.")
@click.pass_context
@refusals
def worker(ctx, once):
    """Book finished calls into SQL, apply booked changes to Redis, close stale sessions.

    \b
    Example:
      callguard worker
    """
    from ..worker import run

    if not once:
        service_logging()
    app = app_of(ctx)
    run(app, app.settings.node or default_node("worker"), once=once)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--requeue-dead-letters", is_flag=True,
              help="First put commits the worker set aside back in line (after mending what "
                   "made them fail).")
@click.pass_context
@refusals
def reconcile(ctx, as_json, requeue_dead_letters):
    """Compare Redis with the SQL books for every account; exit 1 on any difference.

    Charges still waiting for the worker count as booked; commits the worker set aside
    (dead letters) and changes not yet applied to Redis are listed.

    \b
    Example:
      callguard reconcile
    """
    app = app_of(ctx)
    if requeue_dead_letters:
        click.echo(f"requeued {sync.requeue_dead_letters(app)} dead letter(s); "
                   "`callguard worker` books them", err=True)
    diffs = sync.reconcile(app)
    data = [d.__dict__ for d in diffs]
    lines = [f"{d.account}: {d.field}: books {d.books}, redis {d.redis}" for d in diffs]
    emit(data, as_json, "\n".join(lines) or "Redis and the books agree")
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
    count = sync.rebuild(app_of(ctx))
    click.echo(f"rebuilt {count} account(s) in Redis")


@cli.command()
@click.option("--calls", type=click.IntRange(1, 500), default=30, show_default=True)
@click.option("--speed", type=click.FloatRange(1, 100), default=10, show_default=True,
              help="How much faster than wall time the simulated PBX runs.")
@click.option("--pbx", type=click.Choice(["asterisk", "freeswitch"]), default="asterisk",
              show_default=True, help="Which PBX to simulate (and which adapter to run).")
@click.option("--fraud-controls/--no-fraud-controls", default=True, show_default=True,
              help="Give the account a CHF 20.00 spend-per-hour limit that blocks it on a "
                   "suspicion; without, its credit alone bounds the loss.")
@click.pass_context
@refusals
def demo(ctx, calls, speed, pbx, fraud_controls):
    """See callguard stop a fraud: 30 simultaneous premium calls on CHF 50 of credit.

    Starts the real `serve asterisk` (or `serve freeswitch`) and a simulated PBX that
    places the calls over FastAGI and AMI (or ESL), shows live progress, then compares
    the loss with what rating after the call would have lost. Uses the embedded Redis;
    leaves nothing behind.

    \b
    Example:
      callguard demo
      callguard demo --pbx freeswitch
    """
    from .. import demo as scenario
    from ..adapters.common import run_loop

    app, tmp = scenario.throwaway_app(app_of(ctx).settings)
    sc = scenario.Scenario(calls=calls, speed=speed, pbx=pbx)
    if not fraud_controls:
        sc.max_spend_per_hour = None
    controls = (f", may spend {scenario.money(sc.max_spend_per_hour)} an hour and is blocked "
                "on a fraud suspicion" if sc.max_spend_per_hour else "")
    click.echo(f"A hacked PBX places {calls} simultaneous calls to a CHF 3.00/min premium "
               f"number;\nthe prepaid account holds {scenario.money(sc.balance)}{controls}. "
               f"PBX time runs {speed:g}x faster than wall time.\n")

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
