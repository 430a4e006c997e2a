"""The `callguard` command: operator CLI, servers and worker."""

from __future__ import annotations

import sys

from . import accounts, audit, calls, limits, notices, processes, rates  # noqa: F401 - they register their commands
from .base import cli


def main() -> None:
    try:
        cli(prog_name="callguard")
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["cli", "main"]
