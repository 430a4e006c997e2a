"""The `callguard` command: operator CLI, servers and worker."""

from __future__ import annotations

import sys

# Each module registers its commands.
from . import (  # noqa: F401
    accounts,
    api,
    audit,
    books,
    calls,
    embedded,
    limits,
    notices,
    processes,
    rates,
)
from .base import cli


def main() -> None:
    try:
        cli(prog_name="callguard")
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["cli", "main"]
