"""Several `serve` processes on one call-setup port: `serve asterisk|freeswitch --workers N`
and processes started on their own with CALLGUARD_REUSE_PORT=1. Real processes on real
sockets (SO_REUSEPORT: the kernel spreads the connections), the simulated PBXs, this
test's Redis and books; the dialplan's address is the one port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from callguard import workers
from callguard.cli import cli
from callguard.config import ConfigError, load_settings
from callguard.engine import state
from callguard.engine.core import shard_of
from callguard.nodes import Holder
from callguard.simulator.asterisk import SimulatedAsterisk
from callguard.simulator.freeswitch import SimulatedFreeSWITCH

from asterisk_rig import ACCT, PREMIUM, run, until
from engine_helpers import prepaid, setup_plan, snapshot
from servers import bindable, free_port

BALANCE = 50_000_000


@pytest.fixture
def plan(app):
    setup_plan(app)
    prepaid(app, ACCT, balance=BALANCE)
    return app


def two_free_ports() -> int:
    """A port whose next one is free too: worker k serves HTTP on the first + k - 1."""
    while True:
        port = free_port()
        if bindable(port + 1):
            return port


class Notify:
    """A notify socket as systemd's (SO_PASSCRED: each datagram with its sender's pid)."""

    def __init__(self):
        self.name = f"callguard-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + self.name.encode())
        self.heard: list[tuple[int, str]] = []  # (pid, datagram)

    def poll(self) -> list[tuple[int, str]]:
        size = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
            except BlockingIOError:
                return self.heard
            pid = struct.unpack("3i", ancillary[0][2][:size])[0]
            self.heard.append((pid, data.decode()))

    def said(self, what: str) -> list[tuple[int, str]]:
        return [(pid, d) for pid, d in self.poll() if what in d.split("\n")]


class Serve:
    """`callguard serve PBX [ARGS]` as its own process (tree), stderr in a file."""

    def __init__(self, app, tmp: Path, pbx: str, link: str, port: int, node: str,
                 http: int, *args: str, name: str = "serve", **extra: str):
        s = app.settings
        self.app, self.args, self.pbx = app, args, pbx
        self.http = http
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CALLGUARD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        bind = "CALLGUARD_AGI_BIND" if pbx == "asterisk" else "CALLGUARD_ESL_BIND"
        self.env.update(CALLGUARD_HOME=str(s.home), CALLGUARD_REDIS_URL=s.redis_url,
                        CALLGUARD_DATABASE_URL=s.database_url,
                        CALLGUARD_KEY_PREFIX=s.key_prefix, CALLGUARD_NODE=node,
                        CALLGUARD_HTTP_BIND=f"127.0.0.1:{http}",
                        CALLGUARD_AGI_BUDGET_MS="2000",  # a loaded box is slow, not down
                        **{bind: f"127.0.0.1:{port}",
                           "CALLGUARD_AMI_URL" if pbx == "asterisk" else "CALLGUARD_ESL_URL":
                           link}, **extra)
        self.log = tmp / f"{name}.log"
        self.root: list[str] = []  # root options, before `serve`
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        with open(self.log, "wb") as err:
            # A process group of its own: whatever a failed test leaves is killed whole.
            self.proc = subprocess.Popen([sys.executable, "-m", "callguard", *self.root, "serve",
                                          self.pbx, *self.args], env=self.env, stderr=err,
                                         stdout=subprocess.DEVNULL, start_new_session=True)
        return self

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def answers(self, k: int, path: str = "/readyz") -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http + k - 1}{path}",
                             timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def gauge(self, k: int, name: str) -> float | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.http + k - 1}/metrics", timeout=5).text
        except httpx.TransportError:
            return None  # restarting
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{"))

    def _ready(self, workers: int) -> bool:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.logged()}"
        return all(self.answers(k) for k in range(1, workers + 1))

    async def ready(self, workers: int = 1) -> None:
        await until(lambda: self._ready(workers),
                    f"{workers} serve process(es) ready (Redis, node, PBX link)", timeout=60,
                    diagnose=self.logged)

    async def stop(self) -> int:
        """SIGTERM, then its exit status (waited for off the loop: the PBX double runs
        there, and a draining serve may still talk to it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def stop_group(self) -> int:
        """SIGTERM to every process at once, as systemd stops a unit (KillMode=control-group):
        the parent and its workers alike."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def holder(app, node: str) -> int:
    """The pid holding a node identity (its lease in Redis), 0 if nobody."""
    token = app.redis.get(app.keys.node(node))
    return Holder.parse(token).pid if token else 0


def by_node(app) -> dict[str, list[dict]]:
    sessions: dict[str, list[dict]] = {}
    for s in state.live_sessions(app.redis, app.keys):
        sessions.setdefault(s["node"], []).append(s)
    return sessions


def commits(app) -> list[dict]:
    stream = app.keys.events(shard_of(ACCT))
    return [f for _, f in app.redis.xrange(stream) if f.get("type") == "commit"]


async def calls_on(app, place, nodes: set[str], most: int = 40) -> list[asyncio.Task]:
    """Calls, placed one after another, until every node in `nodes` holds one (the kernel
    spreads connections by a hash of their addresses: a few calls do)."""
    calls: list[asyncio.Task] = []
    while set(by_node(app)) < nodes:
        assert len(calls) < most, f"calls reached only {set(by_node(app))}"
        calls.append(asyncio.ensure_future(place()))
        await until(lambda: len(state.live_sessions(app.redis, app.keys)) == len(calls),
                    "the call authorised", timeout=30)
    return calls


def answered(app) -> bool:
    return all(s.get("st") == "ans" for s in state.live_sessions(app.redis, app.keys))


def assert_all_billed(app, owners: dict[str, str], cause: str = "16") -> None:
    """Every call committed once, by the PBX's hangup (not swept, not gone, not a ghost),
    on the node that authorised it; nothing reserved or held; the balance down by exactly
    what the commits charged."""
    done = {c["session"]: c for c in commits(app)}
    assert set(done) == set(owners)
    assert {s: c["node"] for s, c in done.items()} == owners
    assert {c["cause"] for c in done.values()} == {cause}
    assert all(int(c["dur"]) >= 1 for c in done.values())
    after = snapshot(app, ACCT)
    assert (after["reserved"], after["channels"]) == (0, 0)
    assert BALANCE - after["balance"] == sum(int(c["cost"]) for c in done.values())


def test_two_workers_share_the_fastagi_port_each_with_its_own_calls(plan, tmp_path):
    """Two workers behind the dialplan's one port both take setups; each is told of every
    channel by its own AMI link (no setup is a ghost suspect), and after the links drop
    each reconciles its own calls only. SIGTERM to the parent drains both, exit 0."""
    port, http, notify = free_port(), two_free_ports(), Notify()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=port)
        await sim.start()
        serve = Serve(plan, tmp_path, "asterisk", sim.ami_url, port, "wk", http,
                      "--workers", "2", NOTIFY_SOCKET="@" + notify.name).start()
        try:
            await until(lambda: notify.said("READY=1"), "READY=1 from the parent",
                        timeout=60, diagnose=serve.logged)
            await serve.ready(workers=2)
            calls = await calls_on(plan, lambda: sim.call(ACCT, PREMIUM, ring=0.2, talk=600),
                                   {"wk", "wk.2"})
            await until(lambda: answered(plan), "every call answered", timeout=30)
            owners = {s["session"]: node for node, ss in by_node(plan).items() for s in ss}
            seen = {"ghosts": [serve.gauge(k, "callguard_ghost_sessions_total")
                               for k in (1, 2)],
                    "suspects": [serve.gauge(k, "callguard_unconfirmed_sessions")
                                 for k in (1, 2)]}
            logins = sum(a["Action"] == "Login" for a in sim.actions)
            sim.drop_ami()  # both links: each worker logs in again and reconciles
            await until(lambda: serve.logged().count("reconciled with Asterisk") >= 4,
                        "both workers reconciled after the drop", timeout=30,
                        diagnose=serve.logged)
            mine = {node: len(ss) for node, ss in by_node(plan).items()}
            seen["supervised"] = {node: serve.gauge(k, "callguard_live_calls")
                                  for k, node in ((1, "wk"), (2, "wk.2"))}
            seen["up"] = len(sim.calls)
            await asyncio.sleep(1.0)  # a second of talk for each
            for call in list(sim.calls.values()):
                sim.hangup(call, 16)
            await asyncio.gather(*calls)
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "every call committed")
            seen["logins"] = sum(a["Action"] == "Login" for a in sim.actions) - logins
        finally:
            status = await serve.stop()
            await sim.stop()
        assert sim.violations == []
        return status, seen, owners, mine, len(calls)

    status, seen, owners, mine, placed = run(scenario())
    log = serve_log(tmp_path)
    assert status == 0, log
    ready = notify.said("READY=1")
    assert len(ready) == 1 and "with 2 of 2 workers" in ready[0][1]  # from the parent alone
    assert seen["ghosts"] == [0, 0] and seen["suspects"] == [0, 0]
    assert seen["logins"] >= 2 and seen["up"] == placed  # a link of its own each
    assert seen["supervised"] == mine  # after the reconcile: its own calls, no other's
    assert_all_billed(plan, owners)
    assert log.count("stopped; 0 call(s) stay in Redis") == 2 and "Traceback" not in log
    # One stderr for all: each worker's lines name its node.
    assert "INFO [wk.2] callguard.control: reconciled with Asterisk" in log
    assert "INFO [wk] callguard.control: reconciled with Asterisk" in log


def serve_log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")


def test_a_worker_killed_with_calls_up_is_restarted_and_takes_them_back(plan, tmp_path):
    """SIGKILL one worker mid-call: the parent starts it again under its node; it takes its
    calls back (pushes their deadlines again) and commits them at their hangup; the other
    worker and its calls go on untouched; no reservation is left."""
    port, http = free_port(), two_free_ports()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=port)
        await sim.start()
        serve = Serve(plan, tmp_path, "asterisk", sim.ami_url, port, "wk", http,
                      "--workers", "2").start()
        try:
            await serve.ready(workers=2)
            calls = await calls_on(plan, lambda: sim.call(ACCT, PREMIUM, ring=0.2, talk=600),
                                   {"wk", "wk.2"})
            await until(lambda: answered(plan), "every call answered", timeout=30)
            owners = {s["session"]: node for node, ss in by_node(plan).items() for s in ss}
            victim, other = holder(plan, "wk.2"), holder(plan, "wk")
            theirs = {s["ch"] for s in by_node(plan)["wk.2"]}
            since = len(sim.actions)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: holder(plan, "wk.2") not in (0, victim),
                        "worker 2 started again under its node", timeout=60,
                        diagnose=serve.logged)
            await serve.ready(workers=2)
            await until(lambda: serve.gauge(2, "callguard_live_calls") == len(theirs),
                        "worker 2 took its calls back", timeout=30, diagnose=serve.logged)
            # The gauge counts its calls once resumed; their pushes follow.
            def pushed_again():
                pushed = {a["Channel"] for a in sim.actions[since:]
                          if a["Action"] == "AbsoluteTimeout"}
                return {sim.calls[ch].channel for ch in theirs} <= pushed

            await until(pushed_again, "worker 2 pushed its calls' deadlines again",
                        timeout=30, diagnose=serve.logged)
            seen = {"up": len(sim.calls), "other": holder(plan, "wk") == other}
            await asyncio.sleep(1.0)  # a second of talk since the restart
            for call in list(sim.calls.values()):
                sim.hangup(call, 16)
            await asyncio.gather(*calls)
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "every call committed")
        finally:
            status = await serve.stop()
            await sim.stop()
        assert sim.violations == []
        return status, seen, owners, len(calls)

    status, seen, owners, placed = run(scenario())
    log = serve_log(tmp_path)
    assert status == 0, log
    assert seen == {"up": placed, "other": True}
    assert "worker 2 (node wk.2" in log and "was killed by SIGKILL" in log
    assert_all_billed(plan, owners)


def test_the_urls_given_as_options_reach_the_workers_off_their_command_lines(plan, tmp_path):
    """--redis-url and --database-url may carry passwords: ps shows the parent's command
    line (it warns), but not once more for each worker."""
    port, http = free_port(), two_free_ports()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=port)
        await sim.start()
        serve = Serve(plan, tmp_path, "asterisk", sim.ami_url, port, "wk", http,
                      "--workers", "2")
        serve.root = ["--redis-url", serve.env.pop("CALLGUARD_REDIS_URL"),
                      "--database-url", serve.env.pop("CALLGUARD_DATABASE_URL")]
        serve.start()
        try:
            await serve.ready(workers=2)  # each on the test's Redis and books
            children = Path(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children")
            return [Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                    for pid in children.read_text().split()]
        finally:
            assert await serve.stop() == 0
            await sim.stop()

    workers_argv = run(scenario())
    assert len(workers_argv) == 2
    for argv in workers_argv:
        assert "serve" in argv and not {"--redis-url", "--database-url"} & set(argv), argv
        assert plan.settings.redis_url not in argv


def test_processes_started_on_their_own_share_the_port_with_reuse_port(plan, tmp_path):
    """CALLGUARD_REUSE_PORT=1 on each: two serve processes with their own nodes share the
    port and both take setups. The same node again is refused with one line; a process
    without the setting cannot bind (and is told how); a --workers whose first node is
    taken stops and exits 1."""
    port = free_port()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=port)
        await sim.start()

        def serve(node: str, name: str, *args, **extra) -> Serve:
            return Serve(plan, tmp_path, "asterisk", sim.ami_url, port, node,
                         two_free_ports(), *args, name=name, **extra)

        a = serve("ind-a", "a", CALLGUARD_REUSE_PORT="1").start()
        b = serve("ind-b", "b", CALLGUARD_REUSE_PORT="1").start()
        try:
            await a.ready()
            await b.ready()
            calls = await calls_on(plan, lambda: sim.call(ACCT, PREMIUM, ring=0.2, talk=600),
                                   {"ind-a", "ind-b"})
            clash = serve("ind-a", "clash", CALLGUARD_REUSE_PORT="1").start()
            taken = serve("ind-c", "taken").start()
            parent = serve("ind-b", "parent", "--workers", "2").start()
            statuses = [await p.wait() for p in (clash, taken, parent)]
            up = len(sim.calls)
            for call in list(sim.calls.values()):
                sim.hangup(call, 16)
            await asyncio.gather(*calls)
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "every call committed")
        finally:
            stopped = [await a.stop(), await b.stop()]
            await sim.stop()
        return statuses + stopped, up, len(calls), (clash, taken, parent)

    statuses, up, placed, (clash, taken, parent) = run(scenario())
    assert statuses == [1, 1, 1, 0, 0]
    assert up == placed  # the processes refused took no call away
    lines = clash.logged().strip().splitlines()
    assert lines[-1].startswith("callguard: node ind-a is in use by pid ")
    assert lines[-1].endswith(": give each serve and worker process its own CALLGUARD_NODE")
    assert "Traceback" not in clash.logged()
    line = taken.logged().strip().splitlines()[-1]
    assert line.startswith(f"callguard: cannot listen for FastAGI on 127.0.0.1:{port}: ")
    assert "already in use" in line.lower() and line.endswith(
        " (for several serve processes on one port: --workers N, or CALLGUARD_REUSE_PORT=1 "
        "on each, each with its own CALLGUARD_NODE)")
    log = parent.logged()
    assert "callguard: node ind-b is in use by pid " in log
    assert "worker 1 (node ind-b" in log and "before every worker was ready" in log
    assert {c["node"] for c in commits(plan)} == {"ind-a", "ind-b"}


def test_two_workers_share_the_outbound_esl_port(plan, tmp_path):
    """The same for FreeSWITCH: the dialplan's one `socket` address, two workers each with
    its own inbound ESL link, both take setups and commit their own calls. Stopped as
    systemd stops a unit, SIGTERM to every process at once: a clean stop, no restart."""
    port, http = free_port(), two_free_ports()

    async def scenario():
        sim = SimulatedFreeSWITCH(outbound_port=port)
        await sim.start()
        serve = Serve(plan, tmp_path, "freeswitch", sim.esl_url, port, "fs", http,
                      "--workers", "2").start()
        try:
            await serve.ready(workers=2)
            calls = await calls_on(plan, lambda: sim.call(ACCT, PREMIUM, ring=0.2, talk=600),
                                   {"fs", "fs.2"})
            await until(lambda: answered(plan), "every call answered", timeout=30)
            owners = {s["session"]: node for node, ss in by_node(plan).items() for s in ss}
            await asyncio.sleep(1.0)
            for channel in list(sim.calls.values()):
                sim.hangup(channel, "NORMAL_CLEARING")
            await asyncio.gather(*calls)
            await until(lambda: snapshot(plan, ACCT)["channels"] == 0, "every call committed")
        finally:
            status = await serve.stop_group()
            await sim.stop()
        assert sim.violations == []
        return status, owners

    status, owners = run(scenario())
    log = serve_log(tmp_path)
    assert status == 0, log
    assert "starting it again" not in log and log.count("stopped; 0 call(s) stay") == 2
    assert_all_billed(plan, owners)


def test_a_worker_whose_loop_hangs_is_killed_by_the_parents_watchdog(plan, tmp_path):
    """systemd's watchdog (WATCHDOG_USEC) is passed on to the workers: one that stops
    pinging (SIGSTOP: its loop frozen) is killed and started again."""
    port, http, notify = free_port(), two_free_ports(), Notify()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=port)
        await sim.start()
        serve = Serve(plan, tmp_path, "asterisk", sim.ami_url, port, "wd", http,
                      "--workers", "2", NOTIFY_SOCKET="@" + notify.name,
                      WATCHDOG_USEC="4000000").start()
        try:
            await serve.ready(workers=2)
            frozen = holder(plan, "wd.2")
            os.kill(frozen, signal.SIGSTOP)
            try:
                await until(lambda: holder(plan, "wd.2") not in (0, frozen),
                            "worker 2 killed and started again", timeout=60,
                            diagnose=serve.logged)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(frozen, signal.SIGCONT)  # else nothing could stop it
            await serve.ready(workers=2)
        finally:
            status = await serve.stop()
            await sim.stop()
        return status

    assert run(scenario()) == 0
    log = serve_log(tmp_path)
    assert "sent no watchdog ping for 4 s: killing it" in log and "was killed by SIGKILL" in log
    pings = {pid for pid, _ in notify.said("WATCHDOG=1")}
    assert len(pings) == 1  # the parent's own, to systemd; the workers' went to the parent


# -- what the parent decides before it starts anything ----------------------------------

def settings_with(tmp_path, **env):
    return load_settings(env={"CALLGUARD_HOME": str(tmp_path), **env})


def test_worker_nodes_and_http_ports(tmp_path):
    slots = workers.plan(settings_with(tmp_path, CALLGUARD_NODE="pbx1",
                                       CALLGUARD_HTTP_BIND="127.0.0.1:9470"),
                         "asterisk", "agi_bind", 3)
    assert [(s.node, s.http_bind) for s in slots] == [
        ("pbx1", "127.0.0.1:9470"), ("pbx1.2", "127.0.0.1:9471"), ("pbx1.3", "127.0.0.1:9472")]
    host = socket.gethostname().split(".")[0]
    default = workers.plan(settings_with(tmp_path, CALLGUARD_HTTP_BIND="off"), "freeswitch",
                           "esl_bind", 2)
    assert [(s.node, s.http_bind) for s in default] == [(f"{host}:8084", "off"),
                                                         (f"{host}:8084.2", "off")]
    v6 = workers.plan(settings_with(tmp_path, CALLGUARD_HTTP_BIND="[::1]:9470"), "asterisk",
                      "agi_bind", 2)
    assert v6[1].http_bind == "[::1]:9471"


@pytest.mark.parametrize("env,message", [
    ({}, "9465 is callguard-worker's in contrib/systemd/"),
    ({"CALLGUARD_HTTP_BIND": "127.0.0.1:9466"}, "9467 is callguard-api's"),
    ({"CALLGUARD_HTTP_BIND": "127.0.0.1:65535"}, "the last is past 65535"),
    ({"CALLGUARD_AGI_BIND": "127.0.0.1:0"}, "needs a port other than 0"),
    ({"CALLGUARD_NODE": "n" * 63, "CALLGUARD_HTTP_BIND": "off"}, "of worker 2: at most 64"),
])
def test_workers_that_could_not_work_are_refused_before_any_starts(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        workers.plan(settings_with(tmp_path, **env), "asterisk", "agi_bind", 2)


def test_reuse_port_setting(tmp_path):
    assert settings_with(tmp_path).reuse_port is False
    assert settings_with(tmp_path, CALLGUARD_REUSE_PORT="1").reuse_port is True
    assert settings_with(tmp_path, CALLGUARD_REUSE_PORT="off").reuse_port is False
    with pytest.raises(ConfigError, match="reuse_port must be 1 or 0"):
        settings_with(tmp_path, CALLGUARD_REUSE_PORT="maybe")


def test_a_worker_gets_the_parents_root_options_and_no_workers(tmp_path, monkeypatch):
    seen = {}

    def fake_serve(command, slots, serving):
        seen.update(command=command, nodes=[s.node for s in slots], serving=serving)
        return 0

    monkeypatch.setattr(workers, "serve", fake_serve)
    config = tmp_path / "callguard.toml"
    config.write_text('node = "cfg"\nhttp_bind = "127.0.0.1:9470"\n')
    result = CliRunner().invoke(cli, ["-vv", "--config", str(config), "--home", str(tmp_path),
                                      "--log-format", "json", "serve", "freeswitch",
                                      "--workers", "2"], env={"CALLGUARD_HOME": None})
    assert result.exit_code == 0, result.output
    assert seen == {"command": [sys.executable, "-m", "callguard", "--config", str(config),
                                "--home", str(tmp_path), "--verbose", "--verbose",
                                "--log-format", "json", "serve", "freeswitch"],
                    "nodes": ["cfg", "cfg.2"], "serving": "outbound ESL on 127.0.0.1:8084"}


def test_the_serve_help_says_how_workers_share_the_port():
    text = CliRunner().invoke(cli, ["serve", "asterisk", "--help"]).output
    assert "--workers" in text and "CALLGUARD_REUSE_PORT=1" in text and "--slot" not in text
    assert "port + k - 1" in text


@pytest.mark.parametrize("reuse", [False, True])
def test_a_single_serve_shares_its_port_only_when_told(plan, reuse):
    """--workers 1 (the default) is one process, as before: its listener refuses to share
    the port unless CALLGUARD_REUSE_PORT says so."""
    import dataclasses

    from callguard.adapters.asterisk import AsteriskAdapter

    from asterisk_rig import app_with

    async def scenario():
        adapter = AsteriskAdapter(app_with(plan, dataclasses.replace(plan.settings,
                                                                     reuse_port=reuse)))
        await adapter.start("127.0.0.1", 0)
        try:
            return adapter.server.sockets[0].getsockopt(socket.SOL_SOCKET,
                                                        socket.SO_REUSEPORT)
        finally:
            await adapter.stop()

    assert bool(run(scenario())) is reuse
