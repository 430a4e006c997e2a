"""/metrics, /healthz and /readyz of real `serve asterisk` and `worker` processes, over
HTTP, against the simulated Asterisk; and every metric the shipped Grafana dashboard and
Prometheus alerts use is one these processes export."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from callguard.adapters.asterisk import AsteriskAdapter
from callguard.engine import state
from callguard.simulator.asterisk import SimulatedAsterisk
from callguard.sync import Drain
from callguard.worker import observe

from asterisk_rig import ACCT, PREMIUM, run, until
from engine_helpers import T0, answered, prepaid, setup_plan
from freeswitch_rig import ACCT as FS_ACCT
from freeswitch_rig import PREMIUM as FS_PREMIUM
from freeswitch_rig import fs_rig
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BROKE = "41440000009"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def env_for(app, **extra) -> dict:
    s = app.settings
    return {**os.environ, "CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
            "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
            **extra}


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as systemd stops it; what it logged."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    return err.decode()


def get(port: int, path: str) -> tuple[int, dict]:
    reply = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return reply.status_code, reply.json()


@pytest.fixture
def plan(app):
    setup_plan(app)
    return app


def test_serve_counts_a_call_from_setup_to_cut_off_and_is_ready_with_its_link(plan):
    prepaid(plan, ACCT, balance=300_000)  # CHF 0.30 at CHF 3.00/min: 6 s of talk
    prepaid(plan, BROKE, balance=0)
    agi_port, http_port = free_port(), free_port()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=agi_port)
        await sim.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "callguard", "serve", "asterisk"],
            env=env_for(plan, CALLGUARD_NODE="node-m", CALLGUARD_AMI_URL=sim.ami_url,
                        CALLGUARD_AGI_BIND=f"127.0.0.1:{agi_port}",
                        CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}",
                        CALLGUARD_QUOTA_SECONDS="2", CALLGUARD_GRACE_SECONDS="1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: any(a["Action"] == "Login" for a in sim.actions), "AMI login",
                        timeout=15, diagnose=lambda: proc.poll() is not None and proc.stderr.read())
            await until(lambda: get(http_port, "/readyz")[0] == 200, "ready", timeout=5)
            denied = await sim.call(BROKE, PREMIUM, ring=0.1, talk=1)
            call = asyncio.ensure_future(sim.call(ACCT, PREMIUM, ring=0.1, talk=60))
            await until(lambda: value(scrape(http_port), "callguard_live_calls",
                                      pbx="asterisk") == 1, "the call supervised")
            during = scrape(http_port)
            ended = await asyncio.wait_for(call, 20)
            await until(lambda: value(scrape(http_port), "callguard_live_calls",
                                      pbx="asterisk") == 0, "the call committed")
            sim.drop_ami()
            await until(lambda: value(scrape(http_port), "callguard_pbx_link_reconnects_total",
                                      pbx="asterisk") == 1, "a reconnect counted", timeout=15)
            after = scrape(http_port)
        finally:
            log = stop(proc)
            await sim.stop()
        return denied, ended, during, after, log

    denied, ended, during, after, log = run(scenario())
    assert not denied.allowed and ended.allowed and ended.cause == 16
    assert value(during, "callguard_reserved_money", pbx="asterisk") > 0
    assert value(during, "callguard_pbx_link_up", pbx="asterisk") == 1
    assert value(after, "callguard_call_setups_total", pbx="asterisk", result="allow",
                 reason="OK") == 1
    assert value(after, "callguard_call_setups_total", pbx="asterisk", result="deny",
                 reason="NO_FUNDS") == 1
    assert value(after, "callguard_call_setup_duration_seconds_count", pbx="asterisk") == 2
    assert value(after, "callguard_redis_round_trip_seconds_count", op="authorize") >= 2
    assert value(after, "callguard_extends_total", pbx="asterisk", result="ok") >= 1
    assert value(after, "callguard_deadline_pushes_total", pbx="asterisk", result="ok") >= 1
    assert value(after, "callguard_cutoffs_total", pbx="asterisk", reason="no_credit") == 1
    assert value(after, "callguard_reserved_money", pbx="asterisk") == 0
    assert value(after, "callguard_ready") in (0, 1)  # read at scrape: the link was back or not
    assert value(after, "process_cpu_seconds_total") > 0
    # The operator's log: the denial, the clean stop.
    assert f"denied outbound call of {BROKE} to {PREMIUM}: NO_FUNDS" in log
    assert "stopping (SIGTERM)" in log and "stopped;" in log


def test_serve_is_alive_but_not_ready_without_its_pbx_link(plan):
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "callguard", "serve", "asterisk"],
        env=env_for(plan, CALLGUARD_NODE="node-n", CALLGUARD_AGI_BIND=f"127.0.0.1:{free_port()}",
                    CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}", CALLGUARD_AMI_URL=""),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run(until(lambda: _answers(http_port), "the HTTP endpoints", timeout=15,
                  diagnose=lambda: proc.poll() is not None and proc.stderr.read()))
        assert get(http_port, "/healthz") == (200, {"status": "ok", "process": "serve asterisk"})
        status, body = get(http_port, "/readyz")
        missing = httpx.get(f"http://127.0.0.1:{http_port}/nothing", timeout=5).status_code
    finally:
        stop(proc)
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["redis"] == {"ok": True}
    assert body["checks"]["pbx_link"] == {
        "ok": False, "error": "CALLGUARD_AMI_URL is not set: no event link"}
    assert missing == 404


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_worker_is_ready_with_redis_and_its_books_and_counts_what_it_books(plan):
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "callguard", "worker"],
        env=env_for(plan, CALLGUARD_NODE="worker-m", CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run(until(lambda: _answers(http_port) and get(http_port, "/readyz")[0] == 200,
                  "the worker ready", timeout=15,
                  diagnose=lambda: proc.poll() is not None and proc.stderr.read()))
        status, body = get(http_port, "/readyz")
        samples = scrape(http_port)
    finally:
        log = stop(proc)
    assert status == 200 and body["checks"] == {"redis": {"ok": True}, "books": {"ok": True}}
    assert value(samples, "callguard_ready") == 1
    assert value(samples, "callguard_stream_lag_entries", shard="0") == 0
    assert value(samples, "callguard_dead_letters") == 0
    assert ("callguard_calls_booked_total", frozenset()) in samples
    assert "worker worker-m started" in log and "worker worker-m stopped" in log


def test_the_worker_is_not_ready_while_its_books_are_away(plan, tmp_path):
    http_port = free_port()
    dead_port = free_port()  # nothing listens there
    proc = subprocess.Popen(
        [sys.executable, "-m", "callguard", "worker"],
        env=env_for(plan, CALLGUARD_NODE="worker-n", CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}",
                    CALLGUARD_DATABASE_URL=f"postgresql+psycopg://u@127.0.0.1:{dead_port}/x"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run(until(lambda: _answers(http_port), "the HTTP endpoints", timeout=15,
                  diagnose=lambda: proc.poll() is not None and proc.stderr.read()))
        status, body = get(http_port, "/readyz")
        waiting = proc.poll() is None  # it waits the outage out, as at any other time
    finally:
        log = stop(proc)
    assert waiting, log
    assert "the books" in log
    assert status == 503 and body["checks"]["redis"] == {"ok": True}
    assert body["checks"]["books"]["ok"] is False
    assert "u@" not in json.dumps(body)  # the URL is not repeated


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b((?:callguard|process)_[a-z_]+)", text))


def exported_names(app) -> set[str]:
    """Every sample name a serve and a worker process export, read from their registries
    (against this test's real Redis and books)."""
    adapter = AsteriskAdapter(app)
    registries = [adapter.metrics.registry,
                  observe(app, Drain(app, "names")).registry]
    state.ensure_groups(app.redis, app.keys)  # as the worker does at its start
    return {sample.name for registry in registries for family in registry.collect()
            for sample in family.samples}


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported(plan):
    exported = exported_names(plan)
    for path in ("contrib/grafana/callguard.json", "contrib/prometheus/alerts.yml"):
        used = metric_names_in((ROOT / path).read_text())
        assert used, path
        assert used <= exported, f"{path} uses metrics nobody exports: {used - exported}"


def test_serve_freeswitch_counts_under_its_own_label(plan):
    prepaid(plan, FS_ACCT, balance=50_000_000)

    async def scenario():
        async with fs_rig(plan) as (sim, [adapter]):
            await sim.call(FS_ACCT, FS_PREMIUM, ring=0.05, talk=0.1)
            await until(lambda: not adapter.supervisor.sessions, "the call committed")
            registry = adapter.metrics.registry
            return registry, registry.get_sample_value("callguard_pbx_link_up",
                                                       {"pbx": "freeswitch"})

    registry, link_up = run(scenario())
    assert link_up == 1
    assert registry.get_sample_value("callguard_call_setups_total", {
        "pbx": "freeswitch", "result": "allow", "reason": "OK"}) == 1
    assert registry.get_sample_value("callguard_deadline_pushes_total", {
        "pbx": "freeswitch", "result": "ok"}) >= 1


def test_the_scripts_tell_the_money_they_hold_for_each_call(plan):
    """What `callguard_reserved_money` adds up: the hold Redis keeps per session."""
    prepaid(plan, ACCT, balance=50_000_000)
    eng = plan.engine
    decision = answered(eng, ACCT, "ch-1", PREMIUM)
    session_key = plan.keys.session(ACCT, "ch-1")
    assert decision.hold == 3_000_000 == int(plan.redis.hget(session_key, "hold"))  # 60 s
    grant = eng.extend(decision.session, decision.grant, now_ms=T0 + 55_000)
    assert grant.grant == 120 and grant.hold == 6_000_000 == int(
        plan.redis.hget(session_key, "hold"))
    again = eng.extend(decision.session, decision.grant, now_ms=T0 + 56_000)  # stale: no-op
    assert again.hold == 6_000_000
    assert eng.answer(decision.session, now_ms=T0).hold is None  # answer moves no money


@pytest.mark.parametrize("command", [("serve", "asterisk"), ("worker",), ("api",)])
def test_systemd_hears_ready_the_watchdog_and_stopping(plan, tmp_path, command):
    """The real process under a $NOTIFY_SOCKET as systemd's (Type=notify, WatchdogSec=):
    READY=1 once it serves, WATCHDOG=1 again and again, STOPPING=1 on SIGTERM."""
    import socket as sockets

    path = str(tmp_path / "notify")
    receiver = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(15)
    proc = subprocess.Popen(
        [sys.executable, "-m", "callguard", *command],
        env=env_for(plan, CALLGUARD_NODE="node-w", NOTIFY_SOCKET=path, WATCHDOG_USEC="200000",
                    CALLGUARD_HTTP_BIND="off", CALLGUARD_AGI_BIND=f"127.0.0.1:{free_port()}",
                    CALLGUARD_API_BIND=f"127.0.0.1:{free_port()}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    heard = []
    try:
        while heard.count("WATCHDOG=1") < 3:
            heard.append(receiver.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in heard:
            heard.append(receiver.recv(4096).decode())
    finally:
        stop(proc)
        receiver.close()
    ready = [i for i, message in enumerate(heard) if message.startswith("READY=1")]
    assert len(ready) == 1 and heard[-1] == "STOPPING=1"


def test_idle_and_excess_http_clients_cost_bounded_threads_and_no_tracebacks(
        monkeypatch, capfd):
    """A port scanner, a load balancer's TCP check, a slow client: at most CONNECTIONS
    threads, each given up after the handler's timeout, without a traceback; then the
    endpoints answer as before."""
    import socket as sockets
    import threading

    from prometheus_client import CollectorRegistry

    from callguard import health

    monkeypatch.setattr(health._QuietHandler, "timeout", 1.0)
    probe = health.Health("test", CollectorRegistry(), {"ok": lambda: None})
    port = probe.start(f"127.0.0.1:{free_port()}")
    before = threading.active_count()
    idle = [sockets.create_connection(("127.0.0.1", port)) for _ in range(3 * health.CONNECTIONS)]
    try:
        peak = 0
        for _ in range(50):  # while the handlers wait for their requests
            peak = max(peak, threading.active_count() - before)
            time.sleep(0.01)
        assert 0 < peak <= health.CONNECTIONS
        run(until(lambda: threading.active_count() <= before, "the idle ones given up"))
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/readyz") == (200, {"status": "ready", "process": "test",
                                              "checks": {"ok": {"ok": True}}})
    finally:
        for sock in idle:
            sock.close()
        probe.stop()
    assert "Traceback" not in capfd.readouterr().err
