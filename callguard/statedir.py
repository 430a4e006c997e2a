"""The state directory (CALLGUARD_HOME): the SQLite books, the embedded Redis's data and
its socket, for this user only.

A directory another user owns, or may write in, could hold a fake Redis on our socket
path or a planted database: refused before anything there is started, opened or
connected to. One of ours that others may only read is tightened to 0700: its files are
0600 already, but a readable directory lets another user open the lock files and hold
their locks (every command would wait on redis.lock).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from .config import ConfigError, user_name

log = logging.getLogger(__name__)


def private_dir(path: Path, create: bool = True) -> Path:
    """`path`, created 0700 (parents as needed) unless it exists; ConfigError when it
    belongs to another user or others may write in it."""
    me = os.geteuid()
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The checks and the chmod on one open directory: not on whatever the path names next.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(path, os.fstat(fd), me, fd)
    finally:
        os.close(fd)
    return path


def _check(path: Path, st: os.stat_result, me: int, fd: int) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != me:
        raise ConfigError(f"the state directory {path} belongs to {user_name(st.st_uid)}, not to "
                          f"this user ({user_name(me)}): set CALLGUARD_HOME to a directory of "
                          "this user's")
    if mode & 0o022:
        raise ConfigError(f"the state directory {path} is writable by other users (mode "
                          f"{mode:04o}): make sure nothing in it was planted, then `chmod 700 "
                          f"{path}`, or set CALLGUARD_HOME to another directory")
    if mode & 0o077:
        os.fchmod(fd, 0o700)
        log.warning("the state directory %s was readable by other users (mode %04o): made "
                    "it 0700", path, mode)
