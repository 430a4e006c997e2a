"""GC pause probe for a server under benchmark (not part of callguard).

Put this directory on the server's PYTHONPATH (agi_load.py / supervise.py --gc-probe):
Python imports sitecustomize at start. Every collection's duration is recorded; at
exit (SIGTERM included) and every 10 s a summary line goes to stderr:

  GCPROBE {"gen2": [count, total_ms, max_ms], "gen1": [...], "gen0": [...], "slow": [...]}

CALLGUARD_BENCH_GC_THRESHOLD="700,10,10" sets gc thresholds (an experiment, not a fix);
CALLGUARD_BENCH_GC_FREEZE_AFTER=SECONDS calls gc.freeze() that long after start.
"""

import atexit
import gc
import json
import os
import sys
import threading
import time

_stats = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
_slow: list = []
_start = [0.0]
_t0 = time.monotonic()


def _callback(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _start[0]) * 1000
    s = _stats[info["generation"]]
    s[0] += 1
    s[1] += ms
    s[2] = max(s[2], ms)
    if ms > 5 and len(_slow) < 200:
        _slow.append((round(time.monotonic() - _t0, 1), info["generation"], round(ms, 1),
                      info.get("collected", 0)))


def _line():
    data = {f"gen{g}": [s[0], round(s[1], 1), round(s[2], 1)] for g, s in _stats.items()}
    data["slow"] = _slow[-20:]
    data["objects"] = len(gc.get_objects()) if os.environ.get("CALLGUARD_BENCH_GC_COUNT") else None
    data["uptime"] = round(time.monotonic() - _t0, 1)
    sys.stderr.write("GCPROBE " + json.dumps(data) + "\n")
    sys.stderr.flush()


def _ticker():
    while True:
        time.sleep(10)
        _line()


if os.environ.get("CALLGUARD_BENCH_GC_PROBE"):
    gc.callbacks.append(_callback)
    atexit.register(_line)
    threading.Thread(target=_ticker, daemon=True).start()
    threshold = os.environ.get("CALLGUARD_BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    freeze = os.environ.get("CALLGUARD_BENCH_GC_FREEZE_AFTER")
    if freeze:
        threading.Timer(float(freeze), gc.freeze).start()
