#!/usr/bin/env python3
"""greenswitch 0.0.19 and Genesis against a fake FreeSWITCH on 127.0.0.1.

Why callguard has its own ESL reader. Setup, once (outside callguard's own venv):
    python3 -m venv /tmp/eslvenv && /tmp/eslvenv/bin/pip install greenswitch==0.0.19 genesis gevent
Run (about 80 s; binds only 127.0.0.1, kills its children, stops by itself):
    python3 bench/esl_libraries.py [--python /tmp/eslvenv/bin/python] [--ours .venv/bin/python]

Each library runs in a child process; the fake FreeSWITCH (stdlib only) is here.
  blackhole       peer accepts auth, then swallows all: how long `api status` waits (10 s cap)
  close_inflight  peer closes on receiving `api status`: what the caller gets
  close           peer closes 0.5 s after auth; `api status` 1.5 s later; connections seen in 3 s
  hugeline        a valid frame with one 10 MB header line, then a normal HEARTBEAT
  manylines       a header block that never ends, 100-byte lines (200 MB or 5 s), then close
  biglen          `Content-Length: 2000000000`, 200 MB of body (or 5 s), then close
  parse           CPU us/event, a real CHANNEL_HANGUP_COMPLETE, 5 runs x 10,000, `taskset -c 1`,
                  from bytes in memory, no socket, no dispatch: greenswitch's receive loop on
                  io.BytesIO; Genesis's Protocol.handler() on a fed StreamReader; its FSM alone.
Peak RSS is the child's VmHWM (interpreter and imported library included).
"""
import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # common, imported where the parent needs it (not in the children)
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "freeswitch", "inbound-events-call.jsonl")
HB_BODY = b"Event-Name: HEARTBEAT\nCore-UUID: 1f35b8ec\nEvent-Sequence: 1\n\n"
HB = b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(HB_BODY), HB_BODY)
MB = 1 << 20
CAP_S, PUSH_S, PUSH_BYTES = 10.0, 5.0, 200 * MB
SCENARIOS = ("blackhole", "close_inflight", "close", "hugeline", "manylines", "biglen")
BOUNDS = ("hugeline", "manylines", "biglen")


def hangup_frame():
    """The first CHANNEL_HANGUP_COMPLETE frame of the recorded call, as bytes."""
    with open(FIXTURE) as f:
        data = "".join(m["data"] for m in map(json.loads, f) if m["dir"] == "from_fs").encode()
    start = data.rindex(b"Content-Length: ", 0, data.index(b"CHANNEL_HANGUP_COMPLETE"))
    body = data.index(b"\n\n", start) + 2
    return data[start : body + int(data[start + 16 : data.index(b"\n", start)])]


def out(**kw):  # child -> parent, one JSON object a line
    print(json.dumps(kw), flush=True)


def rss_kb(pid="self", key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------ child side (in the libraries' venv)
def done(t, reply=None, error=None):
    what = f"raised {type(error).__name__}" if error else f"returned {reply!r:.30}"
    out(done=f"{what} after {time.monotonic() - t:.3f} s")


def child_greenswitch(port, scenario):
    import gevent
    import greenswitch

    gevent.spawn(lambda: [gevent.sleep(0.1) for _ in iter(int, 1)])  # the rest of an app
    fs = greenswitch.InboundESL("127.0.0.1", port, "X")
    fs.connect()
    fs.register_handle("HEARTBEAT", lambda e: out(ev=e.headers.get("Event-Name")))
    out(ready=rss_kb())
    gevent.sleep(1.5 if scenario == "close" else 0)
    if scenario not in BOUNDS:
        t = time.monotonic()
        try:
            done(t, fs.send("api status").data)
        except BaseException as e:  # gevent's LoopExit is one
            done(t, error=e)
    gevent.sleep(60)


async def child_genesis(port, scenario):
    from genesis import Inbound

    client = Inbound("127.0.0.1", port, "X")
    await client.start()

    async def on_heartbeat(event):
        out(ev=event.get("Event-Name"))
    client.on("HEARTBEAT", on_heartbeat)
    out(ready=rss_kb())
    await asyncio.sleep(1.5 if scenario == "close" else 0)
    if scenario not in BOUNDS:
        t = time.monotonic()
        try:
            done(t, (await client.send("api status")).body)
        except BaseException as e:
            done(t, error=e)
    await asyncio.sleep(60)


def parse_greenswitch(data):
    from greenswitch.esl import ESLProtocol

    p = ESLProtocol()
    p.sock = p.sock_file = io.BytesIO(data)
    p.connected = True
    p.receive_events()  # its own loop: readline() to the blank line, then read(Content-Length)
    return [e.headers for e in p._esl_event_queue.queue]


def parse_genesis(data):
    from genesis import Inbound

    async def run():
        p = Inbound("127.0.0.1", 0, "X")
        p.reader = asyncio.StreamReader(limit=2**16)  # open_connection()'s default limit
        p.reader.feed_data(data)
        p.reader.feed_eof()
        p.is_connected = True
        await p.handler()  # its own read loop, up to its events queue
        return [e for e in p.events._queue if e is not None]
    return asyncio.run(run())


def parse_genesis_fsm(data):
    from genesis.protocol.reader_fsm import ESLReaderFSM

    fsm, events, pos = ESLReaderFSM(), [], 0
    while pos < len(data):
        cut = data.index(b"\n\n", pos) + 2
        got, length = fsm.process_headers(data[pos:cut].decode())
        events += got + (fsm.process_body(data[cut : cut + length]) if length else [])
        pos = cut + length
    return events


def parse_ours(data: bytes) -> list:
    """HOOK: callguard's own sans-IO reader, bytes in, parsed frames out (--ours PYTHON)."""
    from callguard.protocol.esl import ESLReader

    return ESLReader().feed(data)


PARSERS = {"greenswitch": parse_greenswitch, "genesis": parse_genesis,
           "genesis-fsm": parse_genesis_fsm, "ours": parse_ours}


def child_parse(lib, n=10_000, runs=5):
    frame, per_event = hangup_frame(), []
    PARSERS[lib](frame)  # warm-up: imports
    for _ in range(runs):
        t = time.process_time()
        events = PARSERS[lib](frame * n)
        per_event.append((time.process_time() - t) / n * 1e6)
        assert len(events) == n, (lib, len(events))
        if lib != "ours":
            assert events[-1]["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"
            assert events[-1]["variable_billsec"] == "3"
    out(us=per_event)


# ------------------------------------------------ parent side: the fake FreeSWITCH
async def fake_fs(reader, writer, scenario, st):
    st["conns"] += 1
    if st["conns"] > 1:
        return writer.close()
    writer.write(b"Content-Type: auth/request\n\n")
    await reader.readuntil(b"\n\n")
    writer.write(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
    await st["ready"].wait()
    if scenario == "blackhole":
        return await swallow(reader, st)
    if scenario == "close":
        await asyncio.sleep(0.5)
    elif scenario == "close_inflight":
        await reader.readuntil(b"\n\n")
    else:
        asyncio.create_task(swallow(reader, st))
        t, cpu = time.monotonic(), cpu_s(st["pid"])
        await push(writer, scenario, st)
        await asyncio.sleep(1)
        st["cpu_open"] = (cpu_s(st["pid"]) - cpu) / (time.monotonic() - t)
        st["rss_open"] = rss_kb(st["pid"], "VmHWM") / 1024
        st["events_open"], st["dropped"] = st["events"], st["client_eof"]
    st["closed_at"], st["cpu0"] = time.monotonic(), cpu_s(st["pid"])
    writer.close()


async def swallow(reader, st):
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:  # the client closed with our bytes unread: RST
        pass
    st["client_eof"] = True


async def push(writer, scenario, st):
    deadline = time.monotonic() + PUSH_S
    if scenario == "hugeline":
        head = b"Content-Length: %d\nContent-Type: text/event-plain\nX-Pad: " % len(HB_BODY)
        chunks = [head] + [b"a" * MB] * 10 + [b"\n\n" + HB_BODY + HB]
    elif scenario == "manylines":
        line = b"X-Pad: " + b"a" * 92 + b"\n"
        chunks = [b"Content-Type: text/event-plain\n"] + [line * (MB // 100)] * (PUSH_BYTES // MB)
    else:
        head = b"Content-Length: 2000000000\nContent-Type: text/event-plain\n\n"
        chunks = [head] + [b"a" * MB] * (PUSH_BYTES // MB)
    for chunk in chunks:
        writer.write(chunk)
        try:
            await asyncio.wait_for(writer.drain(), max(0.01, deadline - time.monotonic()))
        except (TimeoutError, ConnectionError):
            break
        st["pushed"] += len(chunk)


async def run_case(py, lib, scenario):
    st = dict(conns=0, ready=asyncio.Event(), pushed=0, events=0, client_eof=False, done=None)
    server = await asyncio.start_server(lambda r, w: fake_fs(r, w, scenario, st), "127.0.0.1", 0)
    port = str(server.sockets[0].getsockname()[1])
    proc = await asyncio.create_subprocess_exec(
        py, __file__, "--child", lib, scenario, port,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    st["pid"] = proc.pid

    async def read_child():
        async for line in proc.stdout:
            msg = json.loads(line) if line.startswith(b"{") else {}
            st["events"] += "ev" in msg
            st["done"] = msg.get("done", st["done"])
            if "ready" in msg:
                st["ready"].set()
    reading = asyncio.create_task(read_child())
    try:
        await asyncio.wait_for(st["ready"].wait(), 15)
        t0 = time.monotonic()
        limit = 3.0 if scenario == "close" else PUSH_S + 4 if scenario in BOUNDS else CAP_S
        while time.monotonic() - t0 < limit and not (st["done"] and scenario != "close"):
            if scenario in BOUNDS and time.monotonic() - st.get("closed_at", 1e18) > 2:
                break
            await asyncio.sleep(0.05)
        st["peak_mb"] = rss_kb(proc.pid, "VmHWM") / 1024
        if "closed_at" in st:
            st["cpu_after"] = (cpu_s(proc.pid) - st["cpu0"]) / (time.monotonic() - st["closed_at"])
    finally:
        proc.kill()
        await proc.wait()
        reading.cancel()
        server.close()
    st["done"] = st["done"] or f"> {CAP_S:.0f} s, still waiting"
    if scenario not in BOUNDS:
        conns = f"; connections in 3 s: {st['conns']}" if scenario == "close" else ""
        return st, st["done"] + conns
    return st, (f"{st['pushed'] / MB:.0f} MB sent, {st['events_open']} events, "
                f"RSS {st['rss_open']:.0f} MB, {st['cpu_open']:.0%} CPU, "
                f"{'it dropped the link' if st['dropped'] else 'link kept'}; after close: "
                f"{st['cpu_after']:.0%} CPU, RSS {st['peak_mb']:.0f} MB")


def run_parse(py, lib):
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    res = subprocess.run(pin + [py, __file__, "--child", lib, "parse", "0"],
                         capture_output=True, text=True, timeout=600, check=True)
    us = json.loads(res.stdout.strip().splitlines()[-1])["us"]
    return us, f"{statistics.median(us):.1f} ({min(us):.1f}-{max(us):.1f})"


async def main(args):
    rows, result = [], {}
    for lib in ("greenswitch", "genesis"):
        for scenario in SCENARIOS:
            st, text = await run_case(args.python, lib, scenario)
            result[f"{lib}/{scenario}"] = {k: v for k, v in st.items() if k != "ready"}
            rows.append((scenario, lib, text))
            print(f"  {lib} {scenario}: {text}", file=sys.stderr)
    parsers = [(lib, args.python) for lib in ("greenswitch", "genesis", "genesis-fsm")]
    for lib, py in parsers + ([("ours", args.ours)] if args.ours else []):
        result[f"{lib}/parse_us"], text = run_parse(py, lib)
        rows.append(("parse us/event", lib, text))
    print(f"\n{os.cpu_count()} CPUs; frame: CHANNEL_HANGUP_COMPLETE, {len(hangup_frame())} bytes")
    print("bounds: while the peer pushes (5 s cap) and 1 s more; the 2 s after the peer closes")
    print("parse: CPU us/event, median (min-max) of 5 runs of 10,000 events\n")
    print("| case | library | result |\n|---|---|---|")
    print("\n".join(f"| {case} | {lib} | {text} |" for case, lib, text in rows))
    import common

    common.emit_json(result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        lib, scenario, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if scenario == "parse":
            child_parse(lib)
        elif lib == "greenswitch":
            child_greenswitch(port, scenario)
        else:
            asyncio.run(child_genesis(port, scenario))
        sys.exit(0)
    import common

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default="/tmp/eslvenv/bin/python", help="has both libraries")
    ap.add_argument("--ours", help="a python with callguard installed: adds our parser's row")
    common.add_results_args(ap)
    cli = ap.parse_args()
    common.keep_results(cli)
    asyncio.run(main(cli))
