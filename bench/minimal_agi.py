"""The floor for FastAGI throughput: the least a FastAGI server can do per call.

It reads the request headers until the blank line, writes the same six SET VARIABLE
commands callguard writes for an ALLOW (in one write), half-closes, reads Asterisk's
replies to EOF and closes. No parsing beyond the blank line, no Redis, no decision.
Same event loop as `callguard serve asterisk` (uvloop where installed).

    .venv/bin/python bench/minimal_agi.py --port 4574
"""

from __future__ import annotations

import argparse
import asyncio
import signal

REPLY = (
    b'SET VARIABLE CALLGUARD_RESULT "ALLOW"\n'
    b'SET VARIABLE CALLGUARD_REASON "OK"\n'
    b'SET VARIABLE CALLGUARD_GRANT "60"\n'
    b'SET VARIABLE CALLGUARD_MAXSEC "1000"\n'
    b'SET VARIABLE CALLGUARD_SESSION "41440000000/1795236355.1310"\n'
    b'SET VARIABLE TIMEOUT(absolute) "182"\n'
)


class MinimalAGI(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "replied")

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        self.replied = False

    def data_received(self, data):
        if self.replied:
            return  # Asterisk's "200 result=1" replies and HANGUP: read and drop
        self.buffer += data
        if b"\n\n" in self.buffer:
            self.replied = True
            self.buffer = b""
            self.transport.write(REPLY)
            self.transport.write_eof()

    def eof_received(self):
        self.transport.close()
        return True


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MinimalAGI, host, port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"minimal FastAGI server on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4574)
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main(args.host, args.port))
            return
    asyncio.run(main(args.host, args.port))


if __name__ == "__main__":
    cli()
