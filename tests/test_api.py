"""The HTTP API over real HTTP on loopback: scopes per route, account-bound tokens, money
booked once per Idempotency-Key, bad input as 4xx problems that book nothing, the same
one-line refusals as the CLI, paging; on SQLite and PostgreSQL. The `callguard api`
process itself (TLS, SIGTERM, its log) runs as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import hypothesis
import pytest
import redis
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import func, select

from callguard.api import tokens
from callguard.api.server import configure
from callguard.books import actors
from callguard.books.ledger import BooksError
from callguard.books.models import ApiToken, LedgerEntry
from callguard.engine.runner import SyncEngine

from engine_helpers import T0, answered, postpaid, prepaid, setup_plan
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
ACCT, OTHER, POST = "41441234567", "41449999999", "4144555"
PROBLEM = "application/problem+json"


class Api:
    def __init__(self, app, port: int):
        self.app, self.port = app, port
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)

    def token(self, scope: str, account: str | None = None, name: str | None = None) -> str:
        name = name or f"{scope}-{account or 'all'}-{time.monotonic_ns()}"
        return tokens.create(self.app.books, name, scope, account)[1]

    def call(self, method: str, path: str, token: str | None = None, **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def topup(self, token, account, amount, key, kind="topups"):
        return self.call("POST", f"/v1/accounts/{account}/{kind}", token,
                         json={"amount": amount}, headers={"Idempotency-Key": key})


@pytest.fixture
def api(app):
    setup_plan(app)
    server = configure(app, f"127.0.0.1:{free_port()}")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    client = Api(app, server.config.port)
    yield client
    client.http.close()
    server.should_exit = True
    thread.join(10)


def entries(app, account=ACCT) -> int:
    with app.books.session() as db:
        return db.scalar(select(func.count()).select_from(LedgerEntry)
                         .where(LedgerEntry.account == account))


def problem(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    body = reply.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    return body["detail"]


def test_each_route_needs_its_scope(api):
    prepaid(api.app, ACCT)
    read, money, admin = api.token("read"), api.token("money"), api.token("admin")
    assert problem(api.call("GET", f"/v1/accounts/{ACCT}"), 401) == \
        "a bearer token is required (Authorization: Bearer cg_...)"
    assert api.call("GET", f"/v1/accounts/{ACCT}").headers["www-authenticate"] == \
        'Bearer realm="callguard"'
    assert problem(api.call("GET", f"/v1/accounts/{ACCT}", "cg_" + "x" * 43), 401) == \
        "unknown or revoked token"
    assert api.call("GET", f"/v1/accounts/{ACCT}", read).json()["balance"] == "50.000000"
    assert api.call("GET", "/v1/accounts", read).json()["items"][0]["account"] == ACCT
    detail = problem(api.topup(read, ACCT, "5", "r-1"), 403)
    assert detail.endswith("has scope read; this needs money")
    assert api.topup(money, ACCT, "5", "m-1").status_code == 201
    for method, path, body in (("PATCH", f"/v1/accounts/{ACCT}", {"max_channels": 3}),
                               ("POST", f"/v1/accounts/{ACCT}/block", {}),
                               ("POST", f"/v1/accounts/{ACCT}/unblock", None),
                               ("POST", "/v1/accounts", {"account": "X", "kind": "prepaid"})):
        assert problem(api.call(method, path, money, json=body), 403).endswith("needs admin")
    assert api.call("PATCH", f"/v1/accounts/{ACCT}", admin,
                    json={"max_channels": 3}).json()["max_channels"] == 3
    assert entries(api.app) == 2  # the opening balance and the one top-up


def test_a_revoked_token_is_refused_within_its_cache_time(api):
    prepaid(api.app, ACCT)
    token = api.token("read", name="portal")
    assert api.call("GET", f"/v1/accounts/{ACCT}", token).status_code == 200
    tokens.revoke(api.app.books, "portal")
    deadline = time.monotonic() + 10  # the verifier keeps an answer 2 s
    while api.call("GET", f"/v1/accounts/{ACCT}", token).status_code == 200:
        assert time.monotonic() < deadline, "a revoked token still works"
        time.sleep(0.2)
    assert problem(api.call("GET", f"/v1/accounts/{ACCT}", token), 401) == \
        "unknown or revoked token"


def test_an_account_token_sees_and_changes_its_own_account_only(api):
    app = api.app
    prepaid(app, ACCT)
    prepaid(app, OTHER)
    mine = api.token("admin", ACCT)
    with pytest.raises(BooksError, match="a token bound to an account cannot move money"):
        api.token("money", ACCT)
    assert api.call("GET", f"/v1/accounts/{ACCT}", mine).status_code == 200
    # Another account is as if it did not exist.
    assert problem(api.call("GET", f"/v1/accounts/{OTHER}", mine), 404) == \
        f"unknown account {OTHER}"
    assert problem(api.call("GET", f"/v1/cdrs?account={OTHER}", mine), 404)
    assert problem(api.call("GET", f"/v1/calls?account={OTHER}", mine), 404)
    assert problem(api.call("GET", "/v1/accounts", mine), 403).endswith(
        "needs an operator's token")
    # What the customer portal changes: warnings, contact, auto top-up.
    changed = api.call("PATCH", f"/v1/accounts/{ACCT}", mine,
                       json={"warn_below": "7.50", "email": "a@example.com", "reason": "mine"})
    assert changed.status_code == 200 and changed.json()["warn_below"] == "7.500000"
    # What the operator decides, never.
    for body in ({"max_channels": 100}, {"max_spend_per_hour": "0"}, {"plan": "default"}):
        assert "the operator sets those" in problem(
            api.call("PATCH", f"/v1/accounts/{ACCT}", mine, json=body), 403)
    for path in ("block", "unblock"):
        assert problem(api.call("POST", f"/v1/accounts/{ACCT}/{path}", mine, json={}), 403)
    # Money a customer's own token moved would be money nobody paid.
    for kind, amount in (("topups", "1000"), ("adjustments", "-1"), ("topups", "5")):
        assert problem(api.topup(mine, ACCT, amount, f"self-{kind}", kind=kind), 403).endswith(
            "needs an operator's token")
    assert problem(api.topup(mine, OTHER, "5", "x-1"), 403)
    assert entries(app, ACCT) == 1 and entries(app, OTHER) == 1
    assert app.books.get_account(ACCT).max_channels == 0


def test_a_top_up_is_booked_once_per_idempotency_key_however_often_it_is_sent(api, run):
    app = api.app
    prepaid(app, ACCT)
    token = api.token("money", name="billing")
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: api.topup(token, ACCT, "20.00", "BANK-118"),
                                range(32)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * 31 + [201], statuses
    assert len({r.json()["entry"] for r in replies}) == 1
    assert all(r.json()["created"] == (r.status_code == 201) for r in replies)
    assert entries(app) == 2
    assert api.call("GET", f"/v1/accounts/{ACCT}", token).json()["balance"] == "70.000000"
    # The same key for another amount: refused, nothing booked.
    detail = problem(api.topup(token, ACCT, "25.00", "BANK-118"), 422)
    assert detail.startswith("already booked as entry ") and "for 20.00, not 25.00" in detail
    # The key is the CLI's --ref: the same transfer is never booked twice either way.
    out = run("account", "topup", ACCT, "20.00", "--ref", "BANK-118")
    assert out.stdout.startswith("already booked as entry")
    run("account", "topup", ACCT, "3.00", "--ref", "BANK-119")
    assert api.topup(token, ACCT, "3.00", "BANK-119").json()["created"] is False
    assert entries(app) == 3
    assert app.books.get_account(ACCT).balance == 73_000_000
    assert problem(api.call("POST", f"/v1/accounts/{ACCT}/topups", token,
                            json={"amount": "1"}), 422) == \
        "Idempotency-Key (header): Field required"


def test_one_reference_is_one_movement_whatever_its_kind_or_spelling(api, run):
    """The review's: a key booked as a top-up was booked again as an adjustment; "é" came
    through the header as "Ã©" and the CLI booked the same reference again; a reference
    spelled like another's digest ("sha256:...") took that one's place."""
    import hashlib

    prepaid(api.app, ACCT)
    token = api.token("admin")
    assert api.topup(token, ACCT, "5", "cross-1").status_code == 201
    detail = problem(api.topup(token, ACCT, "5", "cross-1", kind="adjustments"), 422)
    assert detail == f"reference 'cross-1' is already booked on {ACCT} as a topup (entry 2)"
    key = "é-ünicode"
    booked = api.call("POST", f"/v1/accounts/{ACCT}/topups", token, json={"amount": "1"},
                      headers={"Idempotency-Key": key.encode()})
    assert booked.status_code == 201
    assert run("account", "topup", ACCT, "1", "--ref", key).stdout.startswith(
        "already booked as entry")
    long = "BANK-" + "9" * 190
    digest = hashlib.sha256(long.encode()).hexdigest()
    assert api.topup(token, ACCT, "5", f"sha256:{digest}").status_code == 201
    assert run("account", "topup", ACCT, "5", "--ref", long).stdout.startswith("booked topup")
    assert entries(api.app) == 5


def test_bad_input_is_a_4xx_problem_and_books_nothing(api):
    app = api.app
    prepaid(app, ACCT)
    postpaid(app, POST)
    token = api.token("admin")
    url = f"/v1/accounts/{ACCT}/topups"
    key = {"Idempotency-Key": "k"}
    cases = [
        (api.topup(token, ACCT, "5.1234567", "a"), 422,
         "amount: too many decimals in '5.1234567' (at most 6)"),
        (api.topup(token, ACCT, "-5", "b"), 422, "amount: amount must not be negative: '-5'"),
        (api.topup(token, ACCT, "0", "c"), 422, "amount must be greater than zero: '0'"),
        (api.topup(token, ACCT, "1e3", "d"), 422,
         "amount: not a decimal amount: '1e3' (write e.g. 50 or 50.00)"),
        (api.topup(token, ACCT, "99999999999", "e"), 422, "amount: amount too large: "
                                                          "'99999999999'"),
        (api.call("POST", url, token, json={"amount": 5}, headers=key), 422,
         "amount: Input should be a valid string"),
        (api.call("POST", url, token, json={"amount": "5", "extra": 1}, headers=key), 422,
         "extra: Extra inputs are not permitted"),
        (api.call("POST", url, token, content=b"{not json", headers={
            **key, "content-type": "application/json"}), 422, None),
        (api.call("POST", url, token, json=["5"], headers=key), 422, None),
        (api.call("POST", url, token, content=b"x" * 70_000, headers={
            **key, "content-type": "application/json"}), 413, "the body is over 65536 bytes"),
        (api.topup(token, POST, "5", "f"), 422,
         f"cannot top up postpaid account {POST} (use payment)"),
        (api.topup(token, "no-such", "5", "g"), 404, "unknown account no-such"),
        (api.topup(token, ACCT, "5", "k" * 181), 422, None),
        (api.call("GET", "/v1/cdrs?limit=100000", token), 422,
         "limit (query): Input should be less than or equal to 1000"),
        (api.call("GET", "/v1/cdrs?limit=0", token), 422, None),
        (api.call("GET", "/v1/cdrs?after=zz", token), 422, "not a cursor of this list: 'zz'"),
        (api.call("GET", f"/v1/cdrs?acount={ACCT}", token), 422,
         "unknown query parameter(s): 'acount'"),
        (api.call("GET", "/v1/cdrs?after=99999999999999999999999999.1", token), 422, None),
        (api.call("GET", f"/v1/accounts/{ACCT}/ledger?after=99999999999999999999", token),
         422, None),
        (api.call("GET", "/v1/cdrs", token, params={"since": "0001-01-01T00:00:00+01:00"}),
         422, "not a date: '0001-01-01T00:00:00+01:00' (YYYY-MM-DD or an ISO 8601 time)"),
        (api.call("GET", f"/v1/accounts/{ACCT}/ledger", token,
                  params={"until": "9999-12-31T23:00:00-05:00"}), 422, None),
        (api.call("GET", "/v1/cdrs?since=yesterday", token), 422,
         "not a date: 'yesterday' (YYYY-MM-DD or an ISO 8601 time)"),
        (api.call("GET", "/v1/accounts/bad%20id", token), 422, None),
        (api.call("GET", "/v1/accounts?after=a%00b", token), 422, None),  # PostgreSQL: a 500
        (api.call("PATCH", f"/v1/accounts/{ACCT}", token, json={}), 422,
         "nothing to change: give at least one field"),
        (api.call("PATCH", f"/v1/accounts/{ACCT}", token, json={"max_channels": "3"}), 422,
         "max_channels: Input should be a valid integer"),
        (api.call("PATCH", f"/v1/accounts/{ACCT}", token, json={"credit_limit": "5"}), 422,
         f"account {ACCT} is prepaid: it has no credit limit"),
        (api.call("PATCH", f"/v1/accounts/{ACCT}", token, json={"email": "nope"}), 422,
         "not an email address: 'nope'"),
        (api.call("POST", "/v1/accounts", token, json={"account": ACCT, "kind": "prepaid"}),
         409, f"account {ACCT} already exists"),
        (api.call("DELETE", "/v1/calls/not-a-session", token), 404,
         "no call in progress with session not-a-session"),
        (api.call("GET", "/v1/nothing-here", token), 404, "Not Found"),
        (api.call("PUT", f"/v1/accounts/{ACCT}", token), 405, "Method Not Allowed"),
    ]
    for reply, status, detail in cases:
        got = problem(reply, status)
        if detail is not None:
            assert got == detail
    assert entries(app) == 1 and entries(app, POST) == 0
    assert app.books.get_account(ACCT).balance == 50_000_000


@pytest.mark.parametrize("length", [None, 10])
def test_a_body_that_does_not_say_its_length_is_refused(api, length):
    """Chunked, with or without a Content-Length beside it: h11 reads the chunks however
    many the length claims (the review sent 200 MB behind "Content-Length: 10")."""
    prepaid(api.app, ACCT)
    token = api.token("money")
    claimed = f"Content-Length: {length}\r\n" if length else ""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/accounts/{ACCT}/topups HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\nIdempotency-Key: chunk\r\n"
                     f"Content-Type: application/json\r\n{claimed}"
                     "Transfer-Encoding: chunked\r\n\r\n"
                     "10\r\n{\"amount\": \"5\"} \r\n0\r\n\r\n".encode())
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 411 ")
    assert entries(api.app) == 1


@pytest.mark.parametrize("sent", [b"", b"GET /v1/openapi.json HTTP/1.1\r\nHost"])
def test_a_connection_that_sends_no_request_is_closed(api, monkeypatch, sent):
    """512 idle or half-sent connections used to take every slot of the server for ever."""
    from callguard.api import server

    monkeypatch.setattr(server, "HEADER_SECONDS", 0.3)
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(sent)
        assert sock.recv(4096) == b""  # closed by the server, not by the 10 s timeout
    assert api.call("GET", "/v1/openapi.json").status_code == 200


def test_money_moves_and_blocks_are_logged_with_the_token_name_never_the_token(api, caplog):
    prepaid(api.app, ACCT)
    token = api.token("admin", name="billing")
    with caplog.at_level("INFO", logger="callguard.api"):
        api.topup(token, ACCT, "5.00", "INV-1")
        api.topup(token, ACCT, "5.00", "INV-1")
        api.call("POST", f"/v1/accounts/{ACCT}/block", token, json={"reason": "fraud"})
    lines = [r.getMessage() for r in caplog.records]
    assert f"topup of 5.00 on {ACCT} by token billing: booked entry 2" in lines
    assert f"topup of 5.00 on {ACCT} by token billing: already booked entry 2" in lines
    assert f"account {ACCT} blocked by token billing (fraud)" in lines
    assert not any(token in line for line in lines)


def test_block_with_hangup_ends_the_calls_and_unblock_lifts_it(api):
    app = api.app
    prepaid(app, ACCT)
    engine = SyncEngine(app.redis, app.ops(node="n1"))
    first = answered(engine, ACCT, "PJSIP-a-1", "41901234567", at=T0)
    second = answered(engine, ACCT, "PJSIP-a-2", "41901234568", at=T0)
    admin = api.token("admin")
    listener = redis.Redis.from_url(app.redis_url, decode_responses=True).pubsub()
    listener.subscribe(app.keys.kill_channel)
    listener.get_message(timeout=5)  # the subscription itself
    live = api.call("GET", f"/v1/accounts/{ACCT}", admin).json()["live_calls"]
    assert {c["session"] for c in live} == {first.session, second.session}
    assert {c["state"] for c in live} == {"talking"}
    hung = api.call("DELETE", f"/v1/calls/{first.session}", admin)
    assert hung.status_code == 202 and hung.json() == {"session": first.session,
                                                       "listeners": 1}
    assert listener.get_message(timeout=5)["data"] == first.session
    blocked = api.call("POST", f"/v1/accounts/{ACCT}/block", admin,
                       json={"reason": "fraud suspected", "hangup": True}).json()
    assert (blocked["status"], blocked["block_reason"], blocked["hung_up"]) == (
        "blocked", "fraud suspected", 2)
    assert set(listener.get_message(timeout=5)["data"].split()) == {first.session,
                                                                    second.session}
    assert app.books.get_account(ACCT).status == "blocked"
    unblocked = api.call("POST", f"/v1/accounts/{ACCT}/unblock", admin).json()
    assert unblocked["status"] == "active" and unblocked["block_reason"] is None
    listener.close()


def test_each_action_is_booked_with_the_token_name_and_its_reason(api):
    """Money movements, a settings change, a block, an unblock and a kill: who (the token's
    name) and why (`reason`), in the books, shown where the API shows entries and actions."""
    app = api.app
    prepaid(app, ACCT)
    call = answered(SyncEngine(app.redis, app.ops(node="n1")), ACCT, "PJSIP-a-1",
                    "41901234567", at=T0)
    listener = redis.Redis.from_url(app.redis_url, decode_responses=True).pubsub()
    listener.subscribe(app.keys.kill_channel)
    listener.get_message(timeout=5)  # the subscription itself
    billing, portal = api.token("admin", name="billing"), api.token("admin", name="portal")
    url = f"/v1/accounts/{ACCT}"

    def topup(token):
        return api.call("POST", f"{url}/topups", token, json={
            "amount": "5", "reason": "bank transfer"}, headers={"Idempotency-Key": "INV-9"})

    booked = topup(billing).json()
    assert (booked["actor"], booked["reason"]) == ("api:billing", "bank transfer")
    assert topup(portal).json()["actor"] == "api:billing"  # a repeat changes nothing
    for method, path, body in (("PATCH", "", {"max_channels": 3, "reason": "contract"}),
                               ("POST", "/block", {"reason": "fraud"}),
                               ("POST", "/unblock", {"reason": "cleared"})):
        assert api.call(method, url + path, billing, json=body).status_code == 200
    assert api.call("DELETE", f"/v1/calls/{call.session}?reason=stuck",
                    portal).status_code == 202
    listener.close()
    actions = api.call("GET", f"{url}/actions", billing).json()["items"]
    assert [(a["action"], a["actor"], a["reason"]) for a in actions] == [
        ("create", actors.local(), None), ("change", "api:billing", "contract"),
        ("block", "api:billing", "fraud"), ("unblock", "api:billing", "cleared"),
        ("kill", "api:portal", "stuck")]
    assert actions[1]["changes"] == {"max_channels": {"old": 0, "new": 3}}
    assert actions[-1]["session"] == call.session
    first = api.call("GET", f"{url}/actions?limit=2", billing).json()
    rest = api.call("GET", f"{url}/actions?after={first['next']}", billing).json()
    assert first["items"] + rest["items"] == actions and rest["next"] is None
    shown = api.call("GET", url, billing).json()
    assert [a["action"] for a in shown["recent_actions"]] == ["kill", "unblock", "block",
                                                              "change", "create"]
    assert shown["blocked_by"] is None
    ledger = api.call("GET", f"{url}/ledger", billing).json()["items"]
    assert [(e["actor"], e["reason"]) for e in ledger] == [
        (actors.local(), None), ("api:billing", "bank transfer")]
    # A token bound to the account sees its own name and that an operator acted, not who.
    mine = api.token("admin", ACCT, name="customer")
    assert api.call("PATCH", url, mine, json={"warn_below": "2"}).status_code == 200
    seen = [(a["action"], a["actor"]) for a in api.call("GET", f"{url}/actions",
                                                        mine).json()["items"]]
    assert seen == [("create", "operator"), ("change", "operator"), ("block", "operator"),
                        ("unblock", "operator"), ("kill", "operator"),
                        ("change", "api:customer")]
    shown = api.call("GET", url, mine).json()
    assert {a["actor"] for a in shown["recent_actions"]} == {"operator", "api:customer"}
    assert [e["actor"] for e in api.call("GET", f"{url}/ledger", mine).json()["items"]] == \
        ["operator", "operator"]


def test_ledger_cdrs_and_notices_page_by_time(api):
    app = api.app
    prepaid(app, ACCT)
    token = api.token("read")
    for n in range(5):
        app.books.book(ACCT, "topup", 1_000_000, f"t{n}", reference=f"T-{n}")
    seen, after = [], None
    while True:
        page = api.call("GET", f"/v1/accounts/{ACCT}/ledger", token,
                        params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += page["items"]
        after = page["next"]
        if after is None:
            break
    assert [e["balance"] for e in seen] == [f"{50 + n}.000000" for n in range(6)]
    assert [e["reference"] for e in seen[1:]] == [f"T-{n}" for n in range(5)]
    cdrs = [{"session": f"{ACCT}/c{n}/{n}", "account": ACCT, "channel": f"c{n}",
             "direction": "outbound", "destination": "41901234567", "setup_ms": T0 + n,
             "answer_ms": T0 + n, "end_ms": T0 + 60_000 * n, "duration": 60, "billed": 60,
             "cost": 3_000_000, "cause": "16"} for n in range(5)]
    app.books.record_calls(cdrs)
    pages, after = [], None
    while True:
        page = api.call("GET", "/v1/cdrs", token, params={
            "account": ACCT, "limit": 2, **({"after": after} if after else {})}).json()
        pages.append([c["session"] for c in page["items"]])
        if (after := page["next"]) is None:
            break
    assert pages == [[f"{ACCT}/c0/0", f"{ACCT}/c1/1"], [f"{ACCT}/c2/2", f"{ACCT}/c3/3"],
                     [f"{ACCT}/c4/4"]]
    start = cdrs[2]["end_ms"]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start / 1000)) + "Z"
    window = api.call("GET", "/v1/cdrs", token, params={"since": since}).json()["items"]
    assert [c["session"] for c in window] == [f"{ACCT}/c{n}/{n}" for n in (2, 3, 4)]
    assert window[0]["cost"] == "3.000000" and window[0]["end"].endswith("Z")
    assert api.call("GET", "/v1/notices", token).json() == {"items": [], "next": None}


def test_redis_away_is_a_503_for_reads_and_money_is_booked_for_later(api, private_redis):
    # A second API on a Redis of its own, which then goes away.
    from callguard.config import load_settings
    from callguard.service import App

    app = api.app
    own = App(load_settings(home=str(app.settings.home), redis_url=private_redis.url,
                            database_url=app.settings.sql_url,
                            env={"CALLGUARD_KEY_PREFIX": app.settings.key_prefix}))
    prepaid(own, ACCT)
    server = configure(own, f"127.0.0.1:{free_port()}")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    other = Api(own, server.config.port)
    token = other.token("money")
    try:
        private_redis.kill()
        assert problem(other.call("GET", f"/v1/accounts/{ACCT}", token), 503).startswith(
            "Redis unavailable:")
        booked = other.topup(token, ACCT, "5", "while-away")
        assert booked.status_code == 201 and booked.json()["in_redis"] is False
        assert own.books.get_account(ACCT).balance == 55_000_000
    finally:
        other.http.close()
        server.should_exit = True
        thread.join(10)
        own.close()


def test_the_published_openapi_document_is_the_one_in_docs(api):
    served = api.call("GET", "/v1/openapi.json").json()
    assert served["openapi"].startswith("3.1")
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == checked_in, "run: callguard api openapi --output docs/openapi.json"
    problems = {code for path in served["paths"].values() for op in path.values()
                for code, answer in op["responses"].items()
                if int(code) >= 400 and "application/problem+json" not in answer["content"]}
    assert not problems


def test_tokens_are_kept_as_digests_and_shown_once(run, app):
    prepaid(app, ACCT)
    out = run("api", "token", "create", "--scope", "read", "--name", "portal",
              "--account", ACCT)
    token = out.stdout.strip()
    assert token.startswith("cg_") and len(token) == 46
    assert out.stderr == (f"callguard: token portal (read, account {ACCT}) made; it is shown "
                          "this once\n")
    with app.books.session() as db:
        row = db.scalar(select(ApiToken))
    assert row.digest == tokens.digest(token) and token not in repr(row.__dict__)
    listed = json.loads(run("api", "token", "list", "--json").stdout)
    assert [(t["name"], t["scope"], t["account"], t["revoked_at"]) for t in listed] == [
        ("portal", "read", ACCT, None)]
    assert token not in run("api", "token", "list").stdout
    again = run("api", "token", "create", "--scope", "read", "--name", "portal")
    assert again.stderr == "callguard: a token named portal exists already (revoke it first)\n"
    assert run("api", "token", "revoke", "portal").stdout == "revoked token portal\n"
    assert run("api", "token", "revoke", "nobody").stderr == "callguard: no token named nobody\n"
    assert tokens.Verifier(app.books)(token) is None


# -- the process ----------------------------------------------------------------------

def _env(app, **extra) -> dict:
    s = app.settings
    return {**os.environ, "CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
            "CALLGUARD_DATABASE_URL": s.sql_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
            "CALLGUARD_HTTP_BIND": "off", **extra}


def _until_up(proc, url: str, **client) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.communicate(timeout=5)[1].decode()
        try:
            httpx.get(url, timeout=2, **client)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)


def test_the_api_process_speaks_tls_stops_cleanly_and_says_why_it_cannot_start(app, tmp_path):
    prepaid(app, ACCT)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token = tokens.create(app.books, "ops", "read")[1]
    trust = ssl.create_default_context(cafile=str(cert))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "callguard", "api", "--bind",
                             f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key",
                             str(key)], env=_env(app), stderr=subprocess.PIPE)
    try:
        _until_up(proc, f"https://127.0.0.1:{port}/v1/openapi.json", verify=trust)
        reply = httpx.get(f"https://127.0.0.1:{port}/v1/accounts/{ACCT}", verify=trust,
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert reply.json()["account"] == ACCT
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/v1/openapi.json", timeout=5).raise_for_status()
        # The port is taken: one line, exit 1.
        clash = subprocess.run([sys.executable, "-m", "callguard", "api", "--bind",
                                f"127.0.0.1:{port}"], env=_env(app), capture_output=True,
                               timeout=60)
        assert clash.returncode == 1
        assert clash.stderr.decode().splitlines()[-1] == \
            f"callguard: cannot serve the API on 127.0.0.1:{port}"
        assert "Traceback" not in clash.stderr.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    log = err.decode()
    assert proc.returncode == 0, log
    assert f"api serving on https://127.0.0.1:{port}/v1/ (console at /)" in log
    assert "stopping (SIGTERM)" in log and "Traceback" not in log and token not in log
    half = subprocess.run([sys.executable, "-m", "callguard", "api", "--tls-cert", str(cert)],
                          env=_env(app), capture_output=True, timeout=60)
    assert (half.returncode, half.stderr.decode()) == (1, (
        "callguard: TLS needs both a certificate and its key (CALLGUARD_API_TLS_CERT, "
        "CALLGUARD_API_TLS_KEY)\n"))


# -- the document against the server: schemathesis ---------------------------------

@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_answer_matches_the_document_and_none_is_a_500(api, mode):
    """Requests schemathesis makes from the document, to every route: valid ones
    (positive) and ones the document says are invalid (negative). No 5xx; every status,
    media type and body as documented; what is invalid is refused with a 4xx and books
    nothing. (Its pytest plugin's `from_fixture` does not run on pytest 9.2: the
    strategies are driven by hand.)"""
    prepaid(api.app, ACCT)
    postpaid(api.app, POST)
    # Through the document's own security scheme, so that a case that leaves the token out
    # on purpose (expecting a 401) is sent without it.
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": api.token("admin")}}}})
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{api.port}/v1/openapi.json",
                                           config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    answered_2xx: set[str] = set()
    for operation in operations:
        strategy = operation.as_strategy(schemathesis.GenerationMode(mode))

        @hypothesis.given(case=strategy)
        @hypothesis.settings(max_examples=10, database=None, deadline=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            # A request the document allows may still be refused by the books, with a 422
            # and the CLI's line ("unknown rate plan X"): not a schema violation.
            reply = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            if reply.status_code < 300:
                answered_2xx.add(case.operation.label)

        check()
    if mode == "positive":  # the token was sent: the routes did their work, not only 401s
        assert {f"GET /v1/{p}" for p in ("accounts", "accounts/{account}", "calls", "cdrs",
                                          "notices")} <= answered_2xx, answered_2xx
    else:
        # Only the opening balances: nothing invalid was booked.
        assert entries(api.app, ACCT) == 1 and entries(api.app, POST) == 0


def test_the_api_process_is_measured_and_ready_with_redis_and_its_books(app):
    prepaid(app, ACCT)
    token = tokens.create(app.books, "ops", "read")[1]
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "callguard", "api", "--bind",
                             f"127.0.0.1:{port}"], stderr=subprocess.PIPE,
                            env=_env(app, CALLGUARD_HTTP_BIND=f"127.0.0.1:{http_port}"))
    try:
        _until_up(proc, f"http://127.0.0.1:{http_port}/healthz")
        ready = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10).json()
        assert (ready["process"], set(ready["checks"])) == ("api", {"redis", "books"})
        _until_up(proc, f"http://127.0.0.1:{port}/v1/openapi.json")
        for _ in range(3):
            httpx.get(f"http://127.0.0.1:{port}/v1/accounts/{ACCT}", timeout=10,
                      headers={"Authorization": f"Bearer {token}"})
        httpx.get(f"http://127.0.0.1:{port}/v1/accounts/nobody", timeout=10,
                  headers={"Authorization": f"Bearer {token}"})
        text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert 'callguard_api_requests_total{route="/v1/accounts/{account}",status="200"} 3.0' \
        in text
    assert 'callguard_api_requests_total{route="/v1/accounts/{account}",status="404"} 1.0' \
        in text
    assert 'callguard_api_request_duration_seconds_count{route="/v1/accounts/{account}"} 4.0' \
        in text


def test_a_stop_ends_the_console_streams_rather_than_waiting_for_them(app):
    token = tokens.create(app.books, "noc", "read")[1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "callguard", "api", "--bind",
                             f"127.0.0.1:{port}"], env=_env(app), stderr=subprocess.PIPE)
    try:
        _until_up(proc, f"http://127.0.0.1:{port}/v1/openapi.json")
        with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/console/events", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as events:
            lines = events.iter_lines()
            while not next(lines).startswith("event: snapshot"):
                pass
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the server ends the stream: this returns
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "graceful shutdown exceeded" not in err.decode(), err.decode()
    assert all(not line.startswith("event: error") for line in rest)
