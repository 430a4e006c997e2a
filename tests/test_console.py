"""The live console of `callguard api`: its event stream read over HTTP by a real
`callguard api` process, and the page driven in a real headless Chromium against a real
`serve asterisk` on the simulated Asterisk: a call shows up on its own, and the page's
buttons hang it up and block its account."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_metrics import env_for, stop

from callguard.api import console, tokens
from callguard.service import App
from callguard.simulator.asterisk import SimulatedAsterisk

from asterisk_rig import ACCT, PREMIUM
from engine_helpers import prepaid, setup_plan
from servers import free_port

OTHER = "41449999999"
CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # a clone without the test extras' browser driver
    sync_playwright = None

needs_browser = pytest.mark.skipif(
    sync_playwright is None or shutil.which(CHROMIUM) is None,
    reason=f"the browser tests drive {CHROMIUM} with Playwright (pip install playwright; "
           "apt install chromium): one of them is missing")


@pytest.fixture
def plan(app):
    setup_plan(app)
    return app


@contextlib.contextmanager
def api_server(app):
    """`callguard api` on a free loopback port, stopped (SIGTERM) afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "callguard", "api", "--bind",
                             f"127.0.0.1:{port}"], env=env_for(app, CALLGUARD_HTTP_BIND="off"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"callguard api exited: {proc.stderr.read().decode()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("callguard api did not answer within 15 s")
        yield base
    finally:
        log = stop(proc)
        assert "Traceback" not in log, log


def token(app, name: str, scope: str, account: str | None = None) -> str:
    return tokens.create(app.books, name, scope, account)[1]


class Feed:
    """The console's event stream, read a block at a time."""

    def __init__(self, base: str, secret: str | None):
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.client = httpx.Client(timeout=httpx.Timeout(5, read=20))
        self.reply = self.client.send(self.client.build_request(
            "GET", base + "/v1/console/events", headers=headers), stream=True)
        self.lines = self.reply.iter_lines()

    def next(self) -> tuple[str, dict]:
        """The next event, or ("comment", {}) for a comment line."""
        event, data = "message", ""
        for line in self.lines:
            if line == "":
                if data:
                    return event, json.loads(data)
                event = "message"
                continue
            if line.startswith(":"):
                return "comment", {}
            name, _, value = line.partition(":")
            if name == "event":
                event = value.strip()
            elif name == "data":
                data += value.removeprefix(" ")
        raise AssertionError("the stream ended")

    def until(self, predicate, what: str, timeout: float = 10) -> dict:
        """The first update `predicate` accepts, within `timeout` s (checked at each event:
        a heartbeat comes every 15 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event, data = self.next()
            if event == "update" and predicate(data):
                return data
        raise AssertionError(f"no update with {what} within {timeout} s")

    def close(self) -> None:
        self.reply.close()
        self.client.close()


def test_the_page_is_plain_and_carries_no_data_and_the_feed_needs_a_token(plan):
    with api_server(plan) as base:
        page = httpx.get(base + "/", timeout=5)
        openapi = httpx.get(base + "/v1/openapi.json", timeout=5).json()
        missing = httpx.get(base + "/v1/console/events", timeout=5)
        wrong = httpx.get(base + "/v1/console/events", timeout=5,
                          headers={"Authorization": "Bearer cg_not-a-token"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert "<script src" not in page.text and "http" not in page.text.split("<script>")[1]
    assert "/v1/console/events" not in openapi["paths"] and "/" not in openapi["paths"]
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["detail"].startswith("a bearer token is required")
    assert wrong.json()["detail"] == "unknown or revoked token"


def test_the_feed_sends_a_snapshot_then_only_what_changed(plan):
    prepaid(plan, ACCT, balance=50_000_000)
    secret = token(plan, "console-read", "read")
    with api_server(plan) as base:
        feed, decision = Feed(base, secret), None
        try:
            assert feed.reply.headers["content-type"].startswith("text/event-stream")
            event, first = feed.next()
            if event == "comment":  # the first line of every stream
                event, first = feed.next()
            assert event == "snapshot" and first["calls"] == [] and first["accounts"] == []
            decision = plan.engine.authorize(ACCT, PREMIUM, "outbound", "1795236355.77")
            assert decision.allow
            started = feed.until(lambda d: d["upsert"], "the new call")
            plan.engine.answer(decision.session)
            talking = feed.until(lambda d: any(c["state"] == "talking" for c in d["upsert"]),
                                 "the answer")
            plan.engine.commit(decision.session, "16")
            ended = feed.until(lambda d: d["remove"], "the call gone")
        finally:
            feed.close()
            if decision is not None and decision.allow:
                plan.engine.commit(decision.session, "16")  # a second time does nothing
    call = started["upsert"][0]
    assert call["session"] == decision.session and call["state"] == "ringing"
    assert set(call) == {"session", "account", "direction", "destination", "node", "state",
                         "answered_at", "answered_for", "granted_until", "grant_end",
                         "granted_seconds", "left_seconds", "cost_so_far", "reserved"}
    assert [a["account"] for a in started["accounts"]] == [ACCT]
    assert started["accounts"][0]["channels"] == 1
    assert talking["upsert"][0]["answered_at"] is not None
    assert ended["remove"] == [decision.session] and ended["upsert"] == []


def test_a_token_bound_to_an_account_sees_that_account_only(plan):
    prepaid(plan, ACCT)
    prepaid(plan, OTHER)
    mine = plan.engine.authorize(ACCT, PREMIUM, "outbound", "1795236355.81")
    theirs = plan.engine.authorize(OTHER, PREMIUM, "outbound", "1795236355.82")
    assert mine.allow and theirs.allow
    bound = token(plan, "console-customer", "read", account=ACCT)
    operator = token(plan, "console-operator", "read")
    try:
        with api_server(plan) as base:
            customer, everything = Feed(base, bound), Feed(base, operator)
            try:
                (_, _), (_, _) = customer.next(), everything.next()  # their first comments
                (kind, seen), (_, all_seen) = customer.next(), everything.next()
                plan.engine.answer(theirs.session)  # a change the customer must not see
                everything.until(lambda d: d["upsert"], "the other account's answer")
                plan.engine.answer(mine.session)
                update = customer.until(lambda d: True, "anything")
            finally:
                customer.close()
                everything.close()
    finally:
        for session in (mine.session, theirs.session):
            plan.engine.commit(session, "16")
    assert kind == "snapshot"
    assert [c["session"] for c in seen["calls"]] == [mine.session]
    assert [a["account"] for a in seen["accounts"]] == [ACCT]
    assert sorted(c["session"] for c in all_seen["calls"]) == sorted(
        [mine.session, theirs.session])
    assert [c["session"] for c in update["upsert"]] == [mine.session]
    assert all(a["account"] == ACCT for a in update["accounts"])


def _call(session: str, **changed) -> dict:
    return {"session": session, "account": session.split("/")[0], "direction": "outbound",
            "destination": PREMIUM, "node": "n", "state": "talking",
            "answered_at": "2030-03-17T17:46:40.000Z", "answered_for": 10,
            "granted_until": 1900000060, "grant_end": "2030-03-17T17:47:40.000Z",
            "granted_seconds": 60, "left_seconds": 50, "cost_so_far": "0.500000",
            "reserved": "3.000000", **changed}


def test_what_ticks_by_itself_is_not_a_change_and_a_cost_alone_goes_as_a_cost():
    one, two = f"{ACCT}/1.1/1", f"{OTHER}/1.2/1"
    before = console.Reading(1000, {one: _call(one), two: _call(two)}, {}, {"": []})
    after = console.Reading(2000, {one: _call(one, answered_for=11, left_seconds=49),
                                   two: _call(two, answered_for=11, left_seconds=49,
                                              cost_so_far="0.550000")}, {}, {"": []})
    change = console.diff(before, after)
    assert change["upsert"] == [] and change["remove"] == []
    assert change["costs"] == {two: "0.550000"}
    assert console.update_for(change, ACCT) is None  # nothing of its own moved
    assert console.update_for(change, OTHER)["costs"] == {two: "0.550000"}
    extended = console.Reading(3000, {one: _call(one, granted_seconds=120)}, {}, {"": []})
    change = console.diff(after, extended)
    assert [c["session"] for c in change["upsert"]] == [one] and change["remove"] == [two]


def test_redis_away_is_one_error_event_and_the_next_read_a_snapshot(plan):
    dead = App(dataclasses.replace(plan.settings, redis_url=f"redis://127.0.0.1:{free_port()}"))
    dead.__dict__["books"] = plan.books

    async def scenario():
        hub = console.Hub(dead)
        sub = hub.subscribe(None)
        hub.task.cancel()  # polled by hand here
        await hub._once()
        await hub._once()  # the same error again: nothing more sent
        first = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        hub.poller.app = plan  # Redis is back
        await hub._once()
        second = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        hub.leave(sub)
        return first, second

    first, second = asyncio.run(scenario())
    assert len(first) == 1 and first[0].startswith(b"event: error\ndata: ")
    assert json.loads(first[0].split(b"data: ", 1)[1])["message"].startswith(
        "Redis unavailable: ")
    assert len(second) == 1 and second[0].startswith(b"event: snapshot\n")


# -- the page in a real browser ---------------------------------------------------------

class LoopThread:
    """The simulated Asterisk on an event loop of its own: Playwright's sync API owns
    this thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def pbx(app):
    """A simulated Asterisk and a real `serve asterisk` on it, linked and ready."""
    agi_port, http_port = free_port(), free_port()
    loop = LoopThread()
    sim = SimulatedAsterisk(agi_port=agi_port)
    loop.run(sim.start())
    proc = subprocess.Popen(
        [sys.executable, "-m", "callguard", "serve", "asterisk"],
        env=env_for(app, CALLGUARD_NODE="node-console", CALLGUARD_AMI_URL=sim.ami_url,
                    CALLGUARD_AGI_BIND=f"127.0.0.1:{agi_port}",
                    CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait(lambda: any(a["Action"] == "Login" for a in list(sim.actions)), "AMI login", 15,
             lambda: proc.poll() is not None and proc.stderr.read().decode())
        wait(lambda: _ready(http_port), "serve asterisk ready", 10)
        yield sim, loop
    finally:
        stop(proc)
        loop.run(sim.stop())
        loop.stop()
        assert sim.violations == []


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait(predicate, what: str, timeout: float = 10, diagnose=lambda: "") -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what} {diagnose() or ''}")


@contextlib.contextmanager
def browser(tmp_path):
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: m.type == "error"
                    and not m.text.startswith("Failed to load resource")  # a 403 we provoke
                    and errors.append(m.text))
            yield page
            assert errors == []  # no script error, no policy violation
        finally:
            context.close()


def open_console(page, base: str, secret: str) -> None:
    page.goto(base + "/")
    page.fill("#token", secret)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#link.live", timeout=10_000)


def place(sim, loop, account: str = ACCT):
    """A call placed through the simulated dialplan, talking a minute; (future, when the
    authorize was asked for, perf_counter)."""
    before = time.perf_counter()
    return loop.spawn(sim.call(account, PREMIUM, ring=0.2, talk=60)), before


def row_of(page, account: str, timeout: float = 10_000):
    return page.wait_for_selector(f"#calls tbody tr:has(td:text-is('{account}'))",
                                  timeout=timeout)


def hangups(sim) -> list[dict]:
    return [a for a in list(sim.actions) if a["Action"].lower() == "hangup"]


@needs_browser
def test_a_call_shows_up_on_its_own_and_the_hang_up_button_ends_it(plan, tmp_path):
    prepaid(plan, ACCT, balance=50_000_000)
    secret = token(plan, "console-admin", "admin")
    with api_server(plan) as base, pbx(plan) as (sim, loop), browser(tmp_path) as page:
        open_console(page, base, secret)
        assert page.locator("#calls tbody tr").count() == 0
        call, before = place(sim, loop)
        row = row_of(page, ACCT)
        shown = time.perf_counter()
        simcall = next(iter(sim.calls.values()))
        wait(lambda: simcall.setup_latency > 0, "the authorize answered")
        latency = shown - before - simcall.setup_latency
        print(f"\nconsole: the call's row appeared {latency * 1000:.0f} ms after its "
              f"authorize ({(shown - before) * 1000:.0f} ms after the call was placed)")
        session = row.get_attribute("data-session")
        assert session.startswith(f"{ACCT}/{simcall.uniqueid}/")
        page.wait_for_selector(f"#calls tr[data-session='{session}'] td:text-is('talking')",
                               timeout=10_000)
        assert page.locator("#accounts tbody tr", has_text=ACCT).count() == 1
        row.query_selector("button").click()
        ended = call.result(15)
        page.wait_for_selector(f"#calls tr[data-session='{session}']", state="detached",
                               timeout=10_000)
        message = page.text_content("#message")
    assert [a["Channel"] for a in hangups(sim)] == [simcall.channel]
    assert ended.cause == 16 and ended.answered_at is not None
    assert message == f"Hanging up {session}"


@needs_browser
def test_a_read_only_token_may_not_hang_up_and_the_block_button_blocks_and_hangs_up(
        plan, tmp_path):
    prepaid(plan, ACCT)
    viewer, admin = token(plan, "console-viewer", "read"), token(plan, "console-admin", "admin")
    with api_server(plan) as base, pbx(plan) as (sim, loop), browser(tmp_path) as page:
        open_console(page, base, viewer)
        calls = [place(sim, loop)[0] for _ in range(2)]
        wait(lambda: page.locator("#calls tbody tr").count() == 2, "both rows")
        page.locator("#calls tbody tr button").first.click()
        page.wait_for_selector("#message.bad", timeout=10_000)
        refused = page.text_content("#message")
        time.sleep(0.5)  # a hangup sent anyway would have reached the PBX by now
        still_up, sent = not any(c.done() for c in calls) and len(sim.calls) == 2, hangups(sim)
        page.click("#signout")
        open_console(page, base, admin)
        wait(lambda: page.locator("#calls tbody tr").count() == 2, "both rows again")
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        page.locator("#accounts tbody tr", has_text=ACCT).locator("button").click()
        ended = [c.result(15) for c in calls]
        page.wait_for_selector("#accounts tbody tr td.bad:text-matches('^blocked')",
                               timeout=10_000)
        wait(lambda: page.locator("#calls tbody tr").count() == 0, "the rows gone")
        status = page.text_content("#accounts tbody tr td.bad")
    assert "token console-viewer has scope read; this needs admin" in refused
    assert still_up and sent == []
    account = plan.books.get_account(ACCT)
    assert account.status == "blocked" and account.block_reason == "blocked from the console"
    assert dialogs == [f"Block account {ACCT} both ways and hang up its calls?"]
    assert len(hangups(sim)) == 2 and all(c.cause == 16 for c in ended)
    assert status == "blocked (blocked from the console)"


def test_a_revoked_token_loses_its_open_stream_and_one_token_holds_few(plan):
    """The review's: a revoked operator token went on receiving every account's live
    calls; one customer's token could fill every stream slot and lock operators out."""
    prepaid(plan, ACCT)
    call = plan.engine.authorize(ACCT, PREMIUM, "outbound", "1795236355.91")
    plan.engine.answer(call.session)  # 1/1 billing: its cost moves every second
    secret = token(plan, "noc-night", "read")
    customer = token(plan, "portal-1", "read", account=ACCT)
    try:
        with api_server(plan) as base:
            feeds = [Feed(base, customer) for _ in range(console.PER_TOKEN)]
            try:
                refused = httpx.get(base + "/v1/console/events", timeout=10,
                                    headers={"Authorization": f"Bearer {customer}"})
            finally:
                for feed in feeds:
                    feed.close()
            feed = Feed(base, secret)
            try:
                assert feed.next()[0] == "comment" and feed.next()[0] == "snapshot"
                tokens.revoke(plan.books, "noc-night")
                events, give_up = [], time.monotonic() + 60  # a bound, not a window
                with contextlib.suppress(AssertionError):  # "the stream ended"
                    while time.monotonic() < give_up:
                        events.append(feed.next())
            finally:
                feed.close()
    finally:
        plan.engine.commit(call.session, "16")
    assert refused.status_code == 503
    assert refused.json()["detail"] == (f"token portal-1 has {console.PER_TOKEN} console "
                                        "streams open already")
    assert events[-1] == ("error", {"message": "this token was revoked"})
