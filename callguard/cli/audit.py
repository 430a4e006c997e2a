"""`callguard audit ...`: a PBX's configuration against the operator's security policy.
Reads files only: no Redis, no SQL."""

from __future__ import annotations

import click

from ..audit import AuditError, audit
from .base import Refused, cli, emit


class Unreadable(Refused):
    """Input the audit cannot read: one line, exit 2, no verdict on the rest."""

    exit_code = 2


@cli.group("audit")
def audit_group():
    """Check a PBX's configuration against the security policy.

    \b
    Example:
      callguard audit passwords /etc/asterisk/pjsip.conf
    """


@audit_group.command("passwords")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_passwords(ctx, paths, as_json):
    """List the SIP secrets that break the password policy: at least 9 characters, three
    of upper case, lower case, digits and specials, no ordered sequence (1234, abcd,
    qwertz, either way) or run of one character (4 or more), not the user name.

    PATH: an Asterisk pjsip.conf (its #includes followed), FreeSWITCH directory XML, or a
    folder of them. Says the file, line and user, never the secret. Exit 1 when a secret
    breaks the policy, 2 when a file cannot be read.

    \b
    Examples:
      callguard audit passwords /etc/asterisk/pjsip.conf
      callguard audit passwords /etc/freeswitch/directory --json
    """
    try:
        report = audit(list(paths))
    except AuditError as exc:
        raise Unreadable(str(exc)) from None
    failed = len(report.failures)
    summary = {"files": len(report.files), "secrets": report.checked, "failed": failed,
               "passed": report.checked - failed}
    if failed:
        verdict = f"{failed} of {report.checked} SIP secrets break the policy"
    elif report.checked:
        verdict = f"all {report.checked} SIP secrets pass the policy"
    else:
        verdict = "no SIP secrets found"
    lines = [f.text() for f in report.failures] + [f"note: {n}" for n in report.notes]
    lines.append(f"{verdict} ({len(report.files)} file(s) read)")
    data = {"failures": [f.as_json() for f in report.failures], "notes": report.notes,
            "summary": summary}
    emit(data, as_json, "\n".join(lines))
    ctx.exit(1 if failed else 0)
