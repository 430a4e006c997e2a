"""`callguard cdr list`, `account ledger`, `account show` and `actions`, `--version`: the
books as an operator reads them, who did what and why, on real SQL (SQLite, and PostgreSQL
and MariaDB when configured)."""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
from datetime import UTC, datetime
from importlib.metadata import version

import redis

from callguard import service
from callguard.books import actors
from callguard.books.models import OperatorAction
from callguard.money import format_full

from engine_helpers import setup_plan

ACCT, OTHER = "41441234567", "41449990000"
DAY = 86_400_000
NOV_30 = int(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp() * 1000)


def cdr(session: str, end_ms: int, cost: int) -> dict:
    account, channel, _ = session.split("/")
    return {"session": session, "account": account, "channel": channel, "node": "n1",
            "direction": "outbound", "destination": "41791234567", "prefix": "417",
            "rate_per_min": 400_000, "connect_fee": 50_000, "initial_increment": 30,
            "subsequent_increment": 6, "setup_ms": end_ms - 70_000,
            "answer_ms": end_ms - 61_000, "end_ms": end_ms, "duration": 61, "billed": 66,
            "cost": cost, "cause": "16"}


def books(app):
    service.create_account(app, ACCT, kind="prepaid", opening_balance=50_000_000)
    service.create_account(app, OTHER, kind="prepaid", opening_balance=1_000_000)
    app.books.record_calls([cdr(f"{ACCT}/c1/1", NOV_30 - DAY, 490_000),  # 29 Nov
                            cdr(f"{ACCT}/c2/2", NOV_30, 1),  # the last second of 30 Nov
                            cdr(f"{ACCT}/c3/3", NOV_30 + 1000, 250_000),  # 1 Dec
                            cdr(f"{OTHER}/c4/4", NOV_30, 90_000)])


def test_cdr_list_filters_by_account_and_whole_days_in_utc(app, run):
    books(app)
    result = run("cdr", "list", "--account", ACCT, "--since", "2026-11-30", "--until",
                 "2026-11-30", "--json")
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["session"] == f"{ACCT}/c2/2" and row["end"] == "2026-11-30T23:59:59.000Z"
    assert (row["cost"], row["rate_per_min"], row["duration"]) == ("0.000001", "0.400000", 61)
    everything = json.loads(run("cdr", "list", "--json").stdout)
    assert [r["session"].split("/")[1] for r in everything] == ["c1", "c2", "c4", "c3"]


def test_cdr_csv_opens_as_a_table(app, run):
    books(app)
    result = run("cdr", "list", "--account", ACCT, "--csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["cost"] for r in rows] == ["0.490000", "0.000001", "0.250000"]
    assert rows[0]["answer"] == "2026-11-29T23:58:58.000Z"


def test_the_ledger_shows_every_entry_with_its_running_balance(app, run):
    books(app)
    service.move_money(app, ACCT, "topup", 5_000_000, "bank-1")
    rows = json.loads(run("account", "ledger", ACCT, "--json").stdout)
    assert [(r["kind"], r["amount"], r["balance"]) for r in rows] == [
        ("topup", "50.000000", "50.000000"), ("call_charge", "-0.490000", "49.510000"),
        ("call_charge", "-0.000001", "49.509999"), ("call_charge", "-0.250000", "49.259999"),
        ("topup", "5.000000", "54.259999")]
    assert rows[-1]["reference"] == "bank-1" and rows[1]["session"] == f"{ACCT}/c1/1"
    assert rows[1]["actor"] == "callguard:calls" and rows[1]["reason"] is None
    assert rows[-1]["balance"] == format_full(app.books.get_account(ACCT).balance)
    text = run("account", "ledger", ACCT).stdout.splitlines()
    assert len(text) == 5 and "bank-1" in text[-1]


def test_refusals_are_one_line(app, run):
    books(app)
    for args in (("cdr", "list", "--account", "nobody"), ("account", "ledger", "nobody"),
                 ("cdr", "list", "--since", "30.11.2026")):
        result = run(*args)
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert run("cdr", "list", "--json", "--csv").exit_code == 2


def test_version(run):
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"callguard {version('callguard')}"


def test_an_account_is_prepaid_or_postpaid_not_both(run):
    result = run("account", "create", "4144", "--prepaid", "--postpaid", "--balance", "5")
    assert result.exit_code == 2 and "say --prepaid or --postpaid, not both" in result.stderr
    assert run("account", "create", "4144", "--balance", "5").exit_code == 2
    assert run("account", "show", "4144").exit_code == 1  # nothing was created


# -- who did what, and why ------------------------------------------------------------------

def ok(result):
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_every_operator_action_says_who_did_it_and_why(app, run, monkeypatch):
    """Money movements, a settings change, a block, an unblock and a kill from the CLI: each
    booked with the OS user (and the one sudo names) and its --reason, shown by `account
    ledger`, `account show` and `account actions`."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    me = pwd.getpwuid(os.getuid()).pw_name
    ok(run("account", "create", ACCT, "--prepaid", "--balance", "50"))
    ok(run("account", "create", OTHER, "--postpaid", "--credit-limit", "100"))
    monkeypatch.setenv("SUDO_USER", "alice")
    sudo = f"alice (sudo as {me})"
    ok(run("account", "topup", ACCT, "5", "--ref", "BANK-1", "--reason", "bank transfer"))
    ok(run("account", "adjust", ACCT, "-1.50", "--reason", "-1.50 goodwill, reversed"))
    ok(run("account", "payment", OTHER, "20", "--reason", "invoice 11"))
    ok(run("account", "set", ACCT, "--max-channels", "4", "--warn-below", "5", "--reason",
           "customer asked"))
    setup_plan(app)
    call = app.engine.authorize(ACCT, "41901234567", "outbound", "1795236355.1310")
    ok(run("account", "block", ACCT, "--reason", "chargeback"))
    listener = redis.Redis.from_url(app.redis_url).pubsub()  # a serve process stands in
    listener.subscribe(app.keys.kill_channel)
    listener.get_message(timeout=5)
    ok(run("calls", "kill", call.session, "--reason", "stuck"))
    listener.close()
    shown = json.loads(ok(run("account", "show", ACCT, "--json")))  # the block, not the kill
    assert (shown["blocked_by"]["actor"], shown["blocked_by"]["reason"]) == (sudo, "chargeback")
    assert f"blocked (chargeback) by {sudo} at 20" in ok(run("account", "show", ACCT))
    ok(run("account", "unblock", ACCT, "--reason", "paid"))

    ledger = json.loads(ok(run("account", "ledger", ACCT, "--json")))
    assert [(e["kind"], e["actor"], e["reason"]) for e in ledger] == [
        ("topup", me, None), ("topup", sudo, "bank transfer"),
        ("adjustment", sudo, "-1.50 goodwill, reversed")]
    assert ok(run("account", "ledger", ACCT)).splitlines()[-1].endswith(
        f"by {sudo} (-1.50 goodwill, reversed)")
    paid = json.loads(ok(run("account", "ledger", OTHER, "--json")))
    assert [(e["actor"], e["reason"]) for e in paid] == [(sudo, "invoice 11")]
    actions = json.loads(ok(run("account", "actions", ACCT, "--json")))
    assert [(a["action"], a["actor"], a["reason"]) for a in actions] == [
        ("create", me, None), ("change", sudo, "customer asked"), ("block", sudo, "chargeback"),
        ("kill", sudo, "stuck"), ("unblock", sudo, "paid")]
    assert actions[1]["changes"] == {"max_channels": {"old": 10, "new": 4},
                                     "warn_below": {"old": None, "new": "5.000000"}}
    assert actions[2]["changes"]["status"] == {"old": "active", "new": "blocked"}
    assert actions[3]["session"] == call.session
    shown = json.loads(ok(run("account", "show", ACCT, "--json")))
    assert shown["recent_actions"] == actions[::-1] and shown["blocked_by"] is None
    text = ok(run("account", "show", ACCT))
    assert f"  {sudo}  kill {call.session} (stuck)" in text
    assert f"  {sudo}  change: max_channels 10 -> 4, warn_below none -> 5.000000 " \
           "(customer asked)" in text


def test_a_reason_the_books_cannot_keep_refuses_the_change_with_it(app, run):
    """A change and its record are one transaction: no change without who and why."""
    service.create_account(app, ACCT, kind="prepaid", opening_balance=1_000_000)
    for args in (("account", "set", ACCT, "--max-channels", "4", "--reason", "x" * 201),
                 ("account", "unblock", ACCT, "--reason", "bell\a"),
                 ("account", "topup", ACCT, "5", "--reason", "x" * 201)):
        result = run(*args)
        assert result.exit_code == 1 and "reason" in result.stderr, result.stderr
    assert app.books.get_account(ACCT).max_channels == 10
    assert len(app.books.ledger(ACCT)) == 1
    with app.books.session() as db:
        assert [a.action for a in db.query(OperatorAction)] == ["create"]


def test_an_actor_from_the_environment_is_printable_and_bounded():
    """SUDO_USER is anyone's to set: what a terminal or log would act on is dropped, the
    length bounded, and the real user always said."""
    me = pwd.getpwuid(os.getuid()).pw_name
    actor = actors.local({"SUDO_USER": "\x1b[2J\u202emallory\n" + "x" * 500})
    assert actor.startswith("[2Jmallory") and actor.endswith(f" (sudo as {me})")
    assert actor.isprintable() and len(actor) <= actors.LENGTH
    assert actors.local({"SUDO_USER": me}) == actors.local({}) == me
