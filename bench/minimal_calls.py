"""The floor for whole calls on Asterisk: the least any server must do per call.

FastAGI as bench/minimal_agi.py (headers in, the same six SET VARIABLEs out, no
Redis, no decision), plus an AMI client in the same event loop: it logs in, splits
what Asterisk sends into frames on the blank line only, and looks at no frame but a
DialEnd with ANSWER (its Channel and Uniqueid) and a Hangup (its Uniqueid). For each
answered call it sends the AbsoluteTimeouts callguard would, at the same times: one at
answer (quota + grace), then one each quota slice, `lead` seconds before the slice
ends (quota + lead + grace), until the call's Hangup. Same event loop as `callguard
serve asterisk` (uvloop where installed).

    .venv/bin/python bench/minimal_calls.py --port 4573 \\
        --ami-url ami://callguard:secret@127.0.0.1:5038 --quota 20
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minimal_agi import MinimalAGI  # noqa: E402


def field(frame: bytes, key: bytes) -> bytes:
    """The value of `key` (b"\\r\\nUniqueid: ") in one frame; b"" if absent."""
    start = frame.find(key)
    if start < 0:
        return b""
    start += len(key)
    end = frame.find(b"\r\n", start)
    return frame[start:] if end < 0 else frame[start:end]


class MinimalAMI(asyncio.Protocol):
    def __init__(self, username: str, secret: str, quota: int, grace: int, lead: float,
                 lost: asyncio.Future):
        self.login = (f"Action: Login\r\nActionID: m0\r\nUsername: {username}\r\n"
                      f"Secret: {secret}\r\nEvents: call\r\n\r\n").encode()
        self.quota, self.grace, self.lead = quota, grace, lead
        self.lost = lost
        self.buffer = b""
        self.timers: dict[bytes, asyncio.TimerHandle] = {}  # Uniqueid -> next push
        self.ids = 0
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.login)

    def data_received(self, data: bytes) -> None:
        *frames, self.buffer = (self.buffer + data).split(b"\r\n\r\n")
        for frame in frames:
            if frame.startswith(b"Event: DialEnd\r\n"):
                if b"\r\nDialStatus: ANSWER" in frame:
                    self.answered(field(frame, b"\r\nUniqueid: "),
                                  field(frame, b"\r\nChannel: "))
            elif frame.startswith(b"Event: Hangup\r\n"):
                timer = self.timers.pop(field(frame, b"\r\nUniqueid: "), None)
                if timer is not None:
                    timer.cancel()

    def answered(self, uniqueid: bytes, channel: bytes) -> None:
        if uniqueid in self.timers:
            return
        self.push(channel, self.quota + self.grace)
        self.schedule(uniqueid, channel, self.quota - self.lead)

    def schedule(self, uniqueid: bytes, channel: bytes, delay: float) -> None:
        self.timers[uniqueid] = asyncio.get_running_loop().call_later(
            delay, self.extend, uniqueid, channel)

    def extend(self, uniqueid: bytes, channel: bytes) -> None:
        # The next slice: its end is `quota + lead` away, the next extend `quota`.
        self.push(channel, self.quota + self.lead + self.grace)
        self.schedule(uniqueid, channel, self.quota)

    def push(self, channel: bytes, seconds: float) -> None:
        self.ids += 1
        self.transport.write(b"Action: AbsoluteTimeout\r\nActionID: m%d\r\nChannel: %s\r\n"
                             b"Timeout: %s\r\n\r\n" % (self.ids, channel,
                                                       f"{seconds:g}".encode()))

    def connection_lost(self, exc) -> None:
        for timer in self.timers.values():
            timer.cancel()
        if not self.lost.done():
            self.lost.set_result(None)


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MinimalAGI, args.host, args.port, reuse_address=True,
                                      backlog=1024)
    url = urlsplit(args.ami_url)
    lead = min(5.0, args.quota / 2)  # as callguard's Supervisor
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"minimal whole-call server: FastAGI on {args.host}:{args.port}, AMI "
          f"{url.hostname}:{url.port}", flush=True)
    while not stop.is_set():  # the AMI peer may come and go: log in again
        lost = loop.create_future()
        ami = MinimalAMI(unquote(url.username or ""), unquote(url.password or ""),
                         args.quota, args.grace, lead, lost)
        try:
            await loop.create_connection(lambda ami=ami: ami, url.hostname, url.port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        await asyncio.wait([lost, asyncio.ensure_future(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    server.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4573)
    parser.add_argument("--ami-url", required=True, help="ami://user:secret@host:port")
    parser.add_argument("--quota", type=int, default=60, help="seconds per slice (60)")
    parser.add_argument("--grace", type=int, default=2,
                        help="added to each pushed deadline, as callguard's grace (2)")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main(args))
            return
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
