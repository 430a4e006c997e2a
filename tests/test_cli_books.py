"""`callguard cdr list`, `account ledger`, `--version`: the books as an operator reads them,
on real SQL (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from importlib.metadata import version

from callguard import service
from callguard.money import format_full

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
