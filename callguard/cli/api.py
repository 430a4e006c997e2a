"""`callguard api`: the HTTP API and the live console, and the tokens that open them."""

from __future__ import annotations

import json

import click

from ..api import tokens
from ..books.models import SCOPES
from .base import Refused, app_of, cli, emit, refusals


@cli.group(invoke_without_command=True)
@click.option("--bind", metavar="HOST:PORT",
              help="Where to listen (CALLGUARD_API_BIND; default 127.0.0.1:8080).")
@click.option("--tls-cert", metavar="FILE", help="PEM certificate (chain): serve HTTPS "
                                                 "(CALLGUARD_API_TLS_CERT).")
@click.option("--tls-key", metavar="FILE", help="Its PEM private key (CALLGUARD_API_TLS_KEY).")
@click.pass_context
@refusals
def api(ctx, bind, tls_cert, tls_key):
    """Serve the HTTP API under /v1/ and the live console at /.

    Requests need a bearer token (`callguard api token create`). The OpenAPI 3.1
    document is at /v1/openapi.json.

    \b
    Examples:
      callguard api --bind 127.0.0.1:8080
      callguard api token create --scope money --name billing
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..api.server import run
    from .processes import service_logging

    service_logging()
    app = app_of(ctx)
    s = app.settings
    try:
        status = run(app, bind or s.api_bind, tls_cert or s.api_tls_cert,
                     tls_key or s.api_tls_key)
    except SystemExit as exc:  # uvicorn's, when it cannot listen (it logged why)
        if exc.code:
            raise Refused(f"cannot serve the API on {bind or s.api_bind}") from None
        raise
    ctx.exit(status)


@api.command("openapi")
@click.option("--output", type=click.Path(dir_okay=False), help="Write it to this file.")
@click.pass_context
def api_openapi(ctx, output):
    """Print the OpenAPI document (docs/openapi.json is this output).

    \b
    Example:
      callguard api openapi --output docs/openapi.json
    """
    from ..api.app import create

    text = json.dumps(create(app_of(ctx), console=False).openapi(), indent=2) + "\n"
    if output:
        with open(output, "w") as fh:
            fh.write(text)
    else:
        click.echo(text, nl=False)


@api.group()
def token():
    """Bearer tokens: each has a name (what the logs say), a scope and maybe an account.

    \b
    Example:
      callguard api token create --scope read --name portal-41441234567 --account 41441234567
    """


@token.command("create")
@click.option("--name", required=True, help="What the logs call it, e.g. portal, billing.")
@click.option("--scope", required=True, type=click.Choice(SCOPES),
              help="read: look; money: also book top-ups and payments; admin: also change "
                   "and block accounts, hang calls up.")
@click.option("--account", "account_id", metavar="ACCT",
              help="Only this account (a customer portal); never what the operator decides.")
@click.pass_context
@refusals
def token_create(ctx, name, scope, account_id):
    """Make a token and print it, once: only its digest is kept.

    \b
    Example:
      callguard api token create --scope money --name billing > billing.token
    """
    app = app_of(ctx)
    row, secret = tokens.create(app.books, name, scope, account_id,
                                pepper=app.settings.api_token_pepper)
    click.echo(secret)
    click.echo(f"callguard: token {row.name} ({row.scope}"
               f"{', account ' + row.account if row.account else ''}) made; it is shown this "
               "once", err=True)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@refusals
def token_list(ctx, as_json):
    """List tokens (never the tokens themselves).

    \b
    Example:
      callguard api token list --json
    """
    from ..views import iso

    rows = [{"name": t.name, "scope": t.scope, "account": t.account,
             "created_at": iso(t.created_at), "revoked_at": iso(t.revoked_at)}
            for t in tokens.listed(app_of(ctx).books)]
    lines = [f"{r['name']:<24} {r['scope']:<6} {r['account'] or '-':<20} "
             f"{'revoked ' + r['revoked_at'] if r['revoked_at'] else 'active'}" for r in rows]
    emit(rows, as_json, "\n".join(lines) if rows else "no tokens")


@token.command("revoke")
@click.argument("name")
@click.pass_context
@refusals
def token_revoke(ctx, name):
    """Revoke a token: refused within 2 seconds by every API process.

    \b
    Example:
      callguard api token revoke portal
    """
    row = tokens.revoke(app_of(ctx).books, name)
    click.echo(f"revoked token {row.name}")
