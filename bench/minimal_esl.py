"""The floor for outbound ESL throughput: the least a `socket` server can do per call.

On each connection it sends `connect`, reads FreeSWITCH's reply up to its blank line,
writes the five `sendmsg execute set` commands callguard wrote for an ALLOW before
21e27e2 (--multiset: the one `multiset` it writes since) and
`exit` (in one write, without waiting for any reply or event), then reads and drops
whatever comes until FreeSWITCH closes. No parsing beyond the blank line, no Redis,
no decision, no sched_hangup; no `myevents` unless --myevents (then FreeSWITCH's
events come and are dropped with the rest). Same event loop as `callguard serve
freeswitch` (uvloop where installed).

    .venv/bin/python bench/minimal_esl.py --port 8084
"""

from __future__ import annotations

import argparse
import asyncio
import signal


def sendmsg_set(arg: str) -> bytes:
    return (f"sendmsg\ncall-command: execute\nexecute-app-name: set\nexecute-app-arg: {arg}\n"
            "event-lock: true\n\n").encode()


VARIABLES = (
    "callguard_result=ALLOW",
    "callguard_reason=OK",
    "callguard_grant=60",
    "callguard_maxsec=1000",
    "callguard_session=41440000000/75f2f3a9-b3e6-463a-899c-cc76353db7dd",
)
SETS = b"".join(sendmsg_set(v) for v in VARIABLES)
MULTISET = sendmsg_set(" ".join(VARIABLES)).replace(b"app-name: set\n",
                                                   b"app-name: multiset\n")
CONNECT = b"connect\n\n"


class MinimalESL(asyncio.Protocol):
    __slots__ = ("transport", "buffer", "replied", "reply")

    def __init__(self, myevents: bool = False, multiset: bool = False):
        self.reply = (b"myevents\n\n" if myevents else b"") + (
            MULTISET if multiset else SETS) + b"exit\n\n"

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        self.replied = False
        transport.write(CONNECT)

    def data_received(self, data):
        if self.replied:
            return  # replies, events, +OK bye, the disconnect notice: read and drop
        self.buffer += data
        if b"\n\n" in self.buffer:
            self.replied = True
            self.buffer = b""
            self.transport.write(self.reply)

    def eof_received(self):
        self.transport.close()
        return True


async def main(host: str, port: int, myevents: bool, multiset: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MinimalESL(myevents, multiset), host, port,
                                      reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"minimal outbound ESL server on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8084)
    parser.add_argument("--myevents", action="store_true",
                        help="send myevents first (FreeSWITCH then sends the channel's events)")
    parser.add_argument("--multiset", action="store_true",
                        help="one `sendmsg execute multiset` instead of five `set`")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio event loop")
    args = parser.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main(args.host, args.port, args.myevents, args.multiset))
            return
    asyncio.run(main(args.host, args.port, args.myevents, args.multiset))


if __name__ == "__main__":
    cli()
