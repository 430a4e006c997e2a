"""Who did it: the actor the books record with every ledger entry and operator action.

One rule per edge: a local process (the CLI) is its OS user, and the user sudo says ran
it; the HTTP API is its bearer token's name; callguard's own automatic actions say which
part of callguard acted. An actor's text comes from the environment or the books, never
from a request body: it is stripped of what a terminal or a log would interpret, and
bounded to fit its column whatever SUDO_USER holds."""

from __future__ import annotations

import os
import pwd

LENGTH = 100  # the actor columns' width
_PART = 40  # each user name in a local actor: both always fit

FRAUD = "callguard:fraud"  # the engine's fraud block (limit_events)
AUTO_TOPUP = "callguard:auto-topup"  # a top-up charged to the card on file (the worker)
CALLS = "callguard:calls"  # a finished call's charge


def clean(text: str, limit: int = LENGTH) -> str:
    """Printable characters only (no control, escape or bidi characters), bounded."""
    return "".join(c for c in text if c.isprintable()).strip()[:limit]


def local(environ=None) -> str:
    """This process's operator: the user of its real uid, and the one sudo names
    ("alice (sudo as root)"). SUDO_USER is only a claim (anyone can set it), so the real
    user is always said next to it."""
    env = os.environ if environ is None else environ
    uid = os.getuid()
    try:
        user = clean(pwd.getpwuid(uid).pw_name, _PART)
    except KeyError:  # a container's uid with no passwd entry
        user = ""
    user = user or f"uid {uid}"
    sudo = clean(env.get("SUDO_USER", ""), _PART)
    return f"{sudo} (sudo as {user})" if sudo and sudo != user else user


def api(token_name: str) -> str:
    return clean(f"api:{token_name}")
