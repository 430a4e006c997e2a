"""A tiny sd_notify(3) client: tell systemd (or any supervisor that speaks its protocol)
that a process is ready, what it is doing, that it is stopping, and that it is alive.

No dependency on libsystemd.  The protocol is one AF_UNIX datagram per message, sent to
the socket named by ``$NOTIFY_SOCKET``: a filesystem path (``/run/systemd/notify``) or,
when it starts with ``@``, a name in the abstract namespace (the ``@`` stands for a
leading NUL byte).  The datagram holds newline-separated ``VARIABLE=value`` assignments,
e.g. ``READY=1\\nSTATUS=serving FastAGI on 127.0.0.1:4573``.  Outside systemd, or in a
unit that takes no notifications (systemd sets ``NOTIFY_SOCKET`` only when the unit's
``NotifyAccess=`` is not ``none``, which ``Type=notify`` and ``WatchdogSec=`` imply), the
variable is unset and every call here is a cheap no-op that returns False.  As sd_notify(3) advises,
a failure to send is not an error for the caller: the functions return False and never
raise.  ``vsock:`` addresses (systemd 254 and later, for VMs) are not supported: False.

With ``NotifyAccess=main`` (the shipped units, ``contrib/systemd/``) systemd accepts
messages from the main process only, which is the callguard process itself; a child such
as the embedded redis-server could not send any (and does not: it is started without
``--supervised``).  The environment is left as it is, so a child inherits
``NOTIFY_SOCKET``; that is harmless under ``NotifyAccess=main``.

What callguard sends (the shipped units are ``Type=notify`` with ``WatchdogSec=``):
``serve`` sends ``READY=1`` once its call-setup listener accepts calls, ``WATCHDOG=1``
from its event loop every ``watchdog_interval()``, ``STOPPING=1`` on SIGTERM; ``worker``
sends ``READY=1`` once it holds its node lease, ``WATCHDOG=1`` from its main loop (also
while it waits for Redis or the books at its start), ``STOPPING=1`` on SIGTERM.
``worker --once`` and the other commands send nothing.

``serve --workers N`` (callguard/workers.py): the parent is the main process and the one
that speaks to systemd. Its workers' ``NOTIFY_SOCKET`` is a socket of the parent's own,
where they send what a single serve sends; the parent sends ``READY=1`` once every
worker has, ``STATUS=`` lines of how many serve, ``WATCHDOG=1`` from its own loop and
``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import os
import socket

#: How long one send may block when the supervisor's queue is full (it normally takes
#: the datagram at once).  A stalled send costs at most this; then the message is lost.
SEND_TIMEOUT = 1.0


def _address(value: str) -> str | bytes | None:
    """The AF_UNIX address of a NOTIFY_SOCKET value, or None if it names none we can use."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    return None  # relative paths are invalid, vsock:... is not supported


def notify(state: str, env=None) -> bool:
    """Send `state` (newline-separated ``VAR=value`` assignments) to $NOTIFY_SOCKET.

    True if the datagram was sent; False, silently, when NOTIFY_SOCKET is unset or empty,
    names no usable socket, or the send fails.  Sending does not mean the supervisor
    accepted it (with ``NotifyAccess=main`` it drops messages from other processes).
    """
    if not state:
        return False
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    address = _address(value) if value else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError:  # no such socket, refused, queue full past the timeout, too long
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines()).strip()


def ready(status: str | None = None) -> bool:
    """READY=1: startup is finished, the process does its job (with a STATUS= line)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown has begun (systemd shows "deactivating")."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def status(text: str) -> bool:
    """STATUS=: one line for ``systemctl status``; newlines are folded into spaces."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC=: the start-up or shutdown now under way needs `seconds` more
    from now (systemd 236 and later); send again before they are up to extend further."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog_timeout(env=None) -> float | None:
    """The unit's WatchdogSec= in seconds if the watchdog is on for this process, else
    None: as sd_watchdog_enabled(3), from WATCHDOG_USEC, and only when WATCHDOG_PID is
    unset or is this process's PID (a child that inherited the variables is not meant)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


def watchdog_interval(env=None) -> float | None:
    """How often to send ``watchdog()``: half the watchdog timeout, as sd_watchdog_enabled(3)
    recommends, or None when the watchdog is off for this process."""
    timeout = watchdog_timeout(env)
    return None if timeout is None else timeout / 2


def watchdog() -> bool:
    """WATCHDOG=1: the keep-alive ping.  Send it every ``watchdog_interval()`` seconds."""
    return notify("WATCHDOG=1")


async def watchdog_loop() -> None:
    """WATCHDOG=1 from the event loop itself (a unit's WatchdogSec=): a stuck loop stops
    pinging, and systemd restarts the process. Returns at once without a watchdog."""
    import asyncio

    every = watchdog_interval()
    while every:
        watchdog()
        await asyncio.sleep(every)
