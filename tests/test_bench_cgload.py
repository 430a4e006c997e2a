"""bench/cgload.c, the compiled Asterisk of bench/calls.py, against the real `callguard
serve asterisk` and `callguard worker`: every call allowed, answered, extended over AMI
before Asterisk's own deadline, hung up and booked. Counts only, no timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler to build bench/cgload.c")


def test_whole_calls_through_serve_and_worker(single_redis_url):
    # 100 calls, quota 2 s: a call not extended would hit its first deadline (quota +
    # grace = 4 s after answer) before its 4.5 s of talk end, and count as cut off.
    argv = [sys.executable, str(ROOT / "bench" / "calls.py"), "--target", "callguard",
            "--rate", "50", "--duration", "2", "--ring", "0.2", "--talk", "4.5", "--quota", "2",
            "--accounts", "5", "--runs", "1", "--warmup", "0", "--pause", "0", "--no-pin",
            "--redis-url", single_redis_url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])["targets"]["callguard"]
    run = result["runs"][0]
    assert (run["sent"], run["ok"], run["denied"], run["errors"]) == (100, 100, 0, 0), run
    assert (run["answered"], run["completed"], run["cutoff"], run["unfinished"]) == \
        (100, 100, 0, 0), run
    # Pushed at answer and extended at least once each; every push answered "Timeout Set".
    assert run["answered_without_push"] == 0
    assert run["pushes"] >= 2 * run["answered"]
    assert run["ami_actions"]["absolutetimeout"] == run["pushes"]
    books = result["books"]
    assert books["ok"], books
    assert books["cdrs"] == books["allowed"] == 100
    assert out.returncode == 0
