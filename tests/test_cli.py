"""The operator CLI per CONTRACT.md: output, refusals (one line, exit 1, nothing
changed), usage errors (exit 2), --json, rates import/lookup, --help everywhere."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from callguard.cli import cli
from callguard.decisions import Reason

from engine_helpers import T0

P = "41441234567"  # prepaid, CHF 50.00
Q = "4144555"  # postpaid, limit CHF 300.00

RATES = (
    "prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,blocked\n"
    "41,Switzerland,0.10,0,60,60,0\n"
    "417,CH mobile,0.40,0.05,30,6,0\n"
    "4190,CH premium,3.00,0,1,1,1\n"
    "1,NANP,0.07,0,1,1,0\n"
)


def refused(result, *words):
    """Exit 1 with one line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("callguard: ")
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""
    return lines[0]


def usage_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Error:" in result.stderr
    for word in words:
        assert word in result.stderr
    return result.stderr


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def show(run, account):
    return json.loads(ok(run("account", "show", account, "--json")))


def everything(app, run):
    """What a refusal must leave alone: every account as shown, every ledger, every CDR."""
    listed = json.loads(ok(run("account", "list", "--json")))
    ledgers = {a["account"]: [(e.id, e.kind, e.amount, e.idempotency_key)
                              for e in app.books.ledger(a["account"])] for a in listed}
    rows = [(r.id, r.kind, r.status, r.balance, r.credit_limit, r.max_channels, r.plan)
            for r in app.books.list_accounts()]
    return listed, ledgers, rows, app.books.plan_versions(), len(app.books.cdrs())


@pytest.fixture
def accounts(app, run):
    ok(run("account", "create", P, "--prepaid", "--balance", "50.00", "--warn-below", "10"))
    ok(run("account", "create", Q, "--postpaid", "--credit-limit", "300.00", "--warn-at", "200"))


@pytest.fixture
def rates_file(tmp_path):
    path = tmp_path / "rates.csv"
    path.write_text(RATES)
    return path


# -- accounts ------------------------------------------------------------------------

def test_create_and_show_prepaid(run, accounts):
    shown = show(run, P)
    [created] = shown.pop("recent_actions")  # who did what: tests/test_cli_books.py
    assert created["action"] == "create" and shown.pop("blocked_by") is None
    assert shown == {
        "account": P, "kind": "prepaid", "currency": "CHF", "status": "active",
        "block_reason": None, "plan": "default",
        "balance": "50.000000", "credit_limit": "0.000000", "outstanding": "0.000000",
        "reserved": "0.000000", "available": "50.000000", "channels": 0, "max_channels": 10,
        "cps_limit": 0, "warn_below": "10.000000", "warn_at": None, "email": None,
        "limit_state": "ok", "auto_topup": None, "max_calls_per_minute": 0,
        "max_spend_per_hour": None, "blocked_prefixes": [], "on_fraud": "notify",
    }
    text = ok(run("account", "show", P))
    assert f"account     {P} (prepaid, plan default)" in text
    assert "balance     50.00 CHF" in text
    assert "available   50.00 CHF" in text
    assert "channels    0 of 10" in text


def test_create_and_show_postpaid(run, accounts):
    data = show(run, Q)
    assert {k: data[k] for k in ("kind", "balance", "credit_limit", "outstanding", "reserved",
                                 "available", "warn_at", "warn_below")} == {
        "kind": "postpaid", "balance": "0.000000", "credit_limit": "300.000000",
        "outstanding": "0.000000", "reserved": "0.000000", "available": "300.000000",
        "warn_at": "200.000000", "warn_below": None,
    }
    text = ok(run("account", "show", Q))
    assert "outstanding 0.00 CHF" in text and "credit      300.00 CHF" in text


def test_create_message_and_options(run, app):
    assert ok(run("account", "create", "acme.main-1", "--prepaid")) == \
        "created prepaid account acme.main-1\n"
    ok(run("account", "create", "eur1", "--postpaid", "--credit-limit", "0.5",
           "--currency", "eur", "--max-channels", "0", "--email", "ops@example.com"))
    data = show(run, "eur1")
    assert (data["currency"], data["max_channels"], data["email"], data["available"]) == \
        ("EUR", 0, "ops@example.com", "0.500000")
    assert "channels    0 of unlimited" in ok(run("account", "show", "eur1"))
    assert show(run, "acme.main-1")["balance"] == "0.000000"
    assert app.books.ledger("acme.main-1") == []  # no opening balance, no entry


def test_list(run, accounts):
    rows = json.loads(ok(run("account", "list", "--json")))
    assert [(r["account"], r["kind"], r["available"]) for r in rows] == \
        [(P, "prepaid", "50.000000"), (Q, "postpaid", "300.000000")]
    text = ok(run("account", "list")).splitlines()
    assert text[0].split() == ["ACCOUNT", "KIND", "STATUS", "AVAILABLE", "CHANNELS"]
    assert text[1].split() == [P, "prepaid", "active", "50.00", "CHF", "0/10"]
    assert text[2].split() == [Q, "postpaid", "active", "300.00", "CHF", "0/10"]


def test_list_empty(run):
    assert json.loads(ok(run("account", "list", "--json"))) == []


def test_set(run, accounts):
    out = ok(run("account", "set", Q, "--max-channels", "4", "--credit-limit", "500",
                 "--warn-at", "400.5"))
    assert out == f"updated account {Q}: credit_limit, max_channels, warn_at\n"
    data = show(run, Q)
    assert (data["max_channels"], data["credit_limit"], data["warn_at"], data["available"]) == \
        (4, "500.000000", "400.500000", "500.000000")
    ok(run("account", "set", P, "--warn-below", "0.000205", "--email", "a@b.ch"))
    data = show(run, P)
    assert (data["warn_below"], data["email"], data["balance"]) == \
        ("0.000205", "a@b.ch", "50.000000")


def test_block_and_unblock(run, accounts):
    assert ok(run("account", "block", P, "--reason", "fraud suspected")) == f"blocked {P}\n"
    data = show(run, P)
    assert (data["status"], data["block_reason"]) == ("blocked", "fraud suspected")
    assert "status      blocked (fraud suspected)" in ok(run("account", "show", P))
    assert ok(run("account", "block", Q, "--hangup")) == \
        f"blocked {Q}; hanging up 0 call(s)\n"
    assert show(run, Q)["block_reason"] == "blocked by operator"
    assert ok(run("account", "unblock", P)) == f"unblocked {P}\n"
    data = show(run, P)
    assert (data["status"], data["block_reason"]) == ("active", None)


def test_block_stops_calls_in_redis_too(app, run, accounts, rates_file):
    ok(run("rates", "import", str(rates_file)))
    ok(run("account", "block", P))
    app.plans.replace(app.books.load_plans())
    d = app.engine.authorize(P, "41791234567", "outbound", "c1", now_ms=T0)
    assert (d.allow, d.reason) == (False, Reason.BLOCKED)


# -- money ------------------------------------------------------------------------

def test_topup(app, run, accounts):
    out = ok(run("account", "topup", P, "20", "--ref", "BANK-1"))
    assert out.startswith(f"booked topup of 20.00 on {P} (entry ")
    assert show(run, P)["balance"] == "70.000000"
    ok(run("account", "topup", P, "0.000205"))
    assert show(run, P)["balance"] == "70.000205"
    assert app.books.get_account(P).balance == 70_000_205 == app.books.ledger_sum(P)


def test_topup_with_the_same_ref_books_once(app, run, accounts):
    first = ok(run("account", "topup", P, "20", "--ref", "X"))
    assert first.startswith("booked topup of 20.00")
    entry = first.rsplit("entry ", 1)[1].rstrip(")\n")
    before = everything(app, run)
    second = ok(run("account", "topup", P, "20", "--ref", "X"))
    assert second == f"already booked as entry {entry}; nothing changed\n"
    third = ok(run("account", "topup", P, "99", "--ref", "X"))
    assert "already booked" in third
    assert everything(app, run) == before
    assert show(run, P)["balance"] == "70.000000"
    assert [(e.kind, e.amount, e.reference) for e in app.books.ledger(P)] == \
        [("topup", 50_000_000, "opening balance"), ("topup", 20_000_000, "X")]


def test_a_reference_as_long_as_its_column_books_once(app, run, accounts):
    ref = "R" * 200
    assert ok(run("account", "topup", P, "1", "--ref", ref)).startswith("booked topup of 1.00")
    assert "nothing changed" in ok(run("account", "topup", P, "1", "--ref", ref))
    assert show(run, P)["balance"] == "51.000000"
    assert app.books.ledger(P)[-1].reference == ref


def test_adjust_moves_the_balance_either_way(app, run, accounts):
    assert ok(run("account", "adjust", P, "-2.50", "--ref", "T-1")).startswith(
        "booked adjustment of -2.50")
    ok(run("account", "adjust", Q, "1.25", "--ref", "T-2"))
    assert ok(run("account", "adjust", P, "--ref", "T-3", "-0.50")).startswith(
        "booked adjustment of -0.50")  # after an option too
    assert show(run, P)["balance"] == "47.000000"
    assert show(run, Q)["outstanding"] == "-1.250000"
    assert [e.kind for e in app.books.ledger(P)][-1] == "adjustment"


def test_a_retry_with_another_amount_says_what_was_booked(run, accounts):
    ok(run("account", "topup", P, "1.00", "--ref", "A"))
    assert "for 1.00, not 99.00" in ok(run("account", "topup", P, "99.00", "--ref", "A"))


def test_topups_without_ref_are_separate(run, accounts):
    ok(run("account", "topup", P, "1"))
    ok(run("account", "topup", P, "1"))
    assert show(run, P)["balance"] == "52.000000"


def test_payment_lowers_outstanding(app, run, accounts, rates_file):
    ok(run("rates", "import", str(rates_file)))
    app.plans.replace(app.books.load_plans())
    eng = app.engine
    d = eng.authorize(Q, "41791234567", "outbound", "c1", now_ms=T0)
    assert d.allow
    eng.answer(d.session, now_ms=T0)
    # 30/6: 61 s bill as 30 + 6 x 6 = 66 s; 0.05 + 66 s at 0.40/min = 0.49
    assert eng.commit(d.session, "16", now_ms=T0 + 61_000).cost == 490_000
    data = show(run, Q)
    assert (data["balance"], data["outstanding"], data["available"]) == \
        ("-0.490000", "0.490000", "299.510000")
    assert "outstanding 0.49 CHF" in ok(run("account", "show", Q))
    out = ok(run("account", "payment", Q, "0.49", "--ref", "INV-1"))
    assert out.startswith(f"booked payment of 0.49 on {Q}")
    data = show(run, Q)
    assert (data["outstanding"], data["available"]) == ("0.000000", "300.000000")
    assert "already booked" in ok(run("account", "payment", Q, "0.49", "--ref", "INV-1"))
    assert show(run, Q)["outstanding"] == "0.000000"


# -- refusals: one line, exit 1, nothing changed ------------------------------------

REFUSALS = [
    (("account", "show", "nobody"), "unknown account nobody"),
    (("account", "show", "nobody", "--json"), "unknown account nobody"),
    (("account", "set", "nobody", "--max-channels", "3"), "unknown account nobody"),
    (("account", "topup", "nobody", "5"), "unknown account nobody"),
    (("account", "payment", "nobody", "5"), "unknown account nobody"),
    (("account", "block", "nobody"), "unknown account nobody"),
    (("account", "unblock", "nobody"), "unknown account nobody"),
    (("account", "topup", P, "--", "-5"), "negative"),
    (("account", "topup", P, "0"), "greater than zero"),
    (("account", "topup", P, "0.000000"), "greater than zero"),
    (("account", "topup", Q, "5"), "postpaid"),
    (("account", "payment", P, "5"), "prepaid"),
    (("account", "topup", P, "1,5"), "'1,5'"),
    (("account", "topup", P, "1e3"), "'1e3'"),
    (("account", "topup", P, "abc"), "'abc'"),
    (("account", "topup", P, "1.0000001"), "at most 6"),
    (("account", "topup", P, "NaN"), "'NaN'"),
    (("account", "topup", P, "+5"), "'+5'"),
    (("account", "topup", P, ""), "''"),
    (("account", "topup", P, "99999999999"), "too large"),
    (("account", "payment", Q, "1,5"), "'1,5'"),
    (("account", "payment", Q, "--", "-0.01"), "negative"),
    (("account", "create", P, "--prepaid"), "already exists"),
    (("account", "create", P, "--prepaid", "--balance", "99"), "already exists"),
    (("account", "create", Q, "--postpaid", "--credit-limit", "1"), "already exists"),
    (("account", "create", "bad id", "--prepaid"), "invalid account id"),
    (("account", "create", "a/b", "--prepaid"), "invalid account id"),
    (("account", "create", "x" * 65, "--prepaid"), "invalid account id"),
    (("account", "create", "", "--prepaid"), "invalid account id"),
    (("account", "create", "new1", "--prepaid", "--plan", "gold"), "unknown rate plan gold"),
    (("account", "create", "new1", "--prepaid", "--credit-limit", "100"), "no credit limit"),
    (("account", "create", "new1", "--prepaid", "--warn-at", "100"), "no credit limit"),
    (("account", "create", "new1", "--postpaid", "--balance", "100"), "no balance"),
    (("account", "create", "new1", "--prepaid", "--balance", "1,5"), "balance", "'1,5'"),
    (("account", "create", "new1", "--prepaid", "--balance", "1e3"), "'1e3'"),
    (("account", "create", "new1", "--prepaid", "--currency", "CHFX"), "currency"),
    (("account", "create", "new1", "--prepaid", "--email", "nope"), "email"),
    (("account", "set", P, "--credit-limit", "100"), "prepaid", "no credit limit"),
    (("account", "set", P, "--plan", "gold"), "unknown rate plan gold"),
    (("account", "set", P, "--warn-below", "abc"), "warn-below", "'abc'"),
    (("account", "set", Q, "--credit-limit", "1e3"), "credit-limit", "'1e3'"),
    # Text is checked against its column before SQL sees it (PostgreSQL would raise,
    # SQLite would keep 5,000 characters); a refused block leaves the account active.
    (("account", "topup", P, "5", "--ref", "r" * 201), "reference is longer than 200"),
    (("account", "block", P, "--reason", "x" * 5000), "reason is longer than 200"),
    (("account", "block", P, "--reason", "a\x00b"), "control characters"),
    (("account", "block", P, "--reason", "a\x9b31mb"), "control characters"),  # C1 CSI
    (("account", "topup", P, "5", "--ref", "INV-\u202e1-VNI"), "control characters"),  # bidi
    (("account", "set", P, "--email", "notanemail"), "not an email address"),
    (("account", "set", P, "--email", "a@b.c" + "c" * 250), "email is longer than 254"),
    (("account", "set", P, "--payment-method", "t" * 201), "payment method is longer"),
    (("account", "topup", P, "-5"), "negative"),
    # A negative amount is the AMOUNT, with the same refusal as "-- -5", not an option.
    (("account", "topup", P, "-5", "--ref", "R-1"), "amount must not be negative: '-5'"),
    (("account", "topup", P, "--ref", "R-1", "-0.01"), "amount must not be negative"),
    (("account", "payment", Q, "-5"), "amount must not be negative: '-5'"),
    (("account", "payment", Q, "-250.00", "--ref", "INV-1"), "amount must not be negative"),
    (("account", "topup", P, "-1,5"), "'-1,5'"),
    (("account", "adjust", P, "-1e3"), "'-1e3'"),
    (("account", "adjust", P, "0"), "greater than zero"),
    (("account", "adjust", P, "1e3"), "'1e3'"),
]


@pytest.mark.parametrize("argv,words", [(r[0], r[1:]) for r in REFUSALS],
                         ids=[" ".join(r[0]) for r in REFUSALS])
def test_refusals_change_nothing(app, run, accounts, argv, words):
    before = everything(app, run)
    refused(run(*argv), *words)
    assert everything(app, run) == before
    assert [a.id for a in app.books.list_accounts()] == sorted([P, Q])


def test_topup_beyond_what_a_balance_can_hold_is_refused_before_booking(app, run, accounts):
    """Redis (Lua doubles) holds at most 2**53-1 micro-units; the books must not run ahead."""
    before = everything(app, run)
    refused(run("account", "topup", P, "9007199254.740991"), "too large")
    assert everything(app, run) == before
    ok(run("account", "topup", P, "9007199204.740991"))  # exactly up to the bound
    assert show(run, P)["balance"] == "9007199254.740991"
    before = everything(app, run)
    refused(run("account", "topup", P, "0.000001"), "too large")
    assert everything(app, run) == before
    assert app.books.get_account(P).balance == 2**53 - 1 == app.books.ledger_sum(P)


USAGE_ERRORS = [
    (("account", "create", "new1"), "--prepaid or --postpaid"),
    (("account", "create", "new1", "--balance", "5"), "--prepaid or --postpaid"),
    (("account", "create", "new1", "--prepaid", "--bogus"), "--bogus"),
    (("account", "show", P, "--bogus"), "--bogus"),
    # A money command still knows an unknown option from a negative amount.
    (("account", "topup", P, "5", "--bogus"), "No such option '--bogus'"),
    (("account", "topup", P, "--bogus", "5"), "No such option '--bogus'"),
    (("account", "payment", "--bogus", Q, "5"), "No such option '--bogus'"),
    (("account", "adjust", P, "-x"), "No such option '-x'"),
    (("account", "adjust", P, "-2.50", "--rf", "T-1"), "No such option '--rf'"),
    (("account", "set", P), "nothing to change"),
    (("account", "set", P, "--max-channels", "abc"), "max-channels"),
    (("account", "set", P, "--max-channels", "-1"), "max-channels"),
    (("account", "topup", P), "AMOUNT"),
    (("account", "topup",), "ACCT"),
    (("account", "show",), "ACCT"),
    (("account", "frobnicate", P), "frobnicate"),
    (("nosuchgroup",), "nosuchgroup"),
    (("rates", "import"), "FILE.csv"),
    (("rates", "import", "/nonexistent/rates.csv"), "does not exist"),
    (("rates", "lookup"), "NUMBER"),
]


@pytest.mark.parametrize("argv,word", USAGE_ERRORS, ids=[" ".join(u[0]) for u in USAGE_ERRORS])
def test_usage_errors_exit_2_and_change_nothing(app, run, accounts, argv, word):
    before = everything(app, run)
    usage_error(run(*argv), word)
    assert everything(app, run) == before


# -- rates --------------------------------------------------------------------------

def test_rates_import_and_lookup(run, rates_file):
    out = ok(run("rates", "import", str(rates_file)))
    assert out == "imported 4 outbound rates into plan default (version 1)\n"
    text = ok(run("rates", "lookup", "+41791234567")).splitlines()
    assert [line.split() for line in text] == [
        ["number", "41791234567"],
        ["prefix", "417", "(CH", "mobile)"],
        ["rate", "0.40/min,", "connect", "fee", "0.05,", "increments", "30/6"],
        ["1", "s", "0.25"],  # 0.05 + 30 s at 0.40/min
        ["60", "s", "0.45"],  # 0.05 + 60 s
        ["61", "s", "0.49"],  # 0.05 + 66 s
    ]
    data = json.loads(ok(run("rates", "lookup", "0041791234567", "--json")))
    assert data == {
        "number": "41791234567", "plan": "default",
        "rate": {"prefix": "417", "description": "CH mobile", "rate_per_min": "0.400000",
                 "connect_fee": "0.050000", "initial_increment": 30,
                 "subsequent_increment": 6, "blocked": False},
        "cost": {"1": "0.250000", "60": "0.450000", "61": "0.490000"},
    }
    # 0.07/min in 1/1: 1 s rounds 1166.67 micro-units up.
    data = json.loads(ok(run("rates", "lookup", "12125551234", "--json")))
    assert data["cost"] == {"1": "0.001167", "60": "0.070000", "61": "0.071167"}
    assert ["1", "s", "0.001167"] in [ln.split() for ln in
                                      ok(run("rates", "lookup", "12125551234")).splitlines()]
    assert ok(run("rates", "lookup", "41441234567", "--json")).count('"prefix": "41"') == 1
    text = ok(run("rates", "lookup", "4190123"))
    assert "prefix      4190 (CH premium)  BLOCKED" in text
    assert json.loads(ok(run("rates", "lookup", "4190123", "--json")))["rate"]["blocked"] is True


def test_rates_lookup_refusals(run, rates_file):
    refused(run("rates", "lookup", "41791234567"), "no outbound rates in plan default")
    ok(run("rates", "import", str(rates_file)))
    refused(run("rates", "lookup", "41791234567", "--plan", "gold"),
            "no outbound rates in plan gold")
    refused(run("rates", "lookup", "41791234567", "--inbound"), "no inbound rates")
    refused(run("rates", "lookup", "33123456789"), "no rate for 33123456789")
    refused(run("rates", "lookup", "33123456789", "--json"), "no rate for 33123456789")
    refused(run("rates", "lookup", "41 79 123"), "not a dialable number")
    refused(run("rates", "lookup", "*99#"), "not a dialable number")
    refused(run("rates", "lookup", "1" * 40), "too long")


def test_bad_rows_are_all_reported_and_nothing_is_imported(app, run, rates_file, tmp_path):
    ok(run("rates", "import", str(rates_file)))
    before = ok(run("rates", "lookup", "41791234567", "--json"))
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,"
        "blocked\n"
        "41,Switzerland,0.20,0,60,60,0\n"  # 2: good (and would change the 41 rate)
        "417,CH mobile,1e3,0,30,6,0\n"  # 3
        "33,France,0.10,0,1,1,0\n"  # 4: good (and new)
        "x9,junk,0.10,0,1,1,0\n"  # 5
        "49,Germany,0.10,0,1,1,maybe\n"  # 6
        "41,Switzerland,0.10,0,60,60,0\n"  # 7: duplicate of 2
    )
    result = run("rates", "import", str(bad))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[1] for line in lines[:-1]] == ["3", "5", "6", "7"]
    assert all(line.startswith(f"{bad}:") for line in lines[:-1])
    assert "already on line 2" in lines[3]
    assert lines[-1] == f"callguard: {bad}: 4 bad row(s); nothing imported"
    assert result.stdout == ""
    assert ok(run("rates", "lookup", "41791234567", "--json")) == before
    refused(run("rates", "lookup", "33123456789"), "no rate for 33123456789")
    assert app.books.plan_versions() == {"default": 1}


def test_reimport_replaces_the_plan(app, run, rates_file, tmp_path):
    ok(run("rates", "import", str(rates_file)))
    new = tmp_path / "new.csv"
    new.write_text(
        "prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,"
        "blocked\n"
        "4179,Swisscom mobile,0.30,0,1,1,0\n"
        "33,France,0.10,0,60,60,0\n"
    )
    assert ok(run("rates", "import", str(new))) == \
        "imported 2 outbound rates into plan default (version 2)\n"
    assert json.loads(ok(run("rates", "lookup", "41791234567", "--json")))["rate"]["prefix"] == \
        "4179"
    refused(run("rates", "lookup", "41781234567"), "no rate for")  # 417 and 41 are gone
    refused(run("rates", "lookup", "12125551234"), "no rate for")
    assert json.loads(ok(run("rates", "lookup", "33123456789", "--json")))["cost"]["61"] == \
        "0.200000"
    assert app.books.plan_versions() == {"default": 2}
    assert sorted(r.prefix for r in app.books.load_plans()[("default", "outbound")].rates()) == \
        ["33", "4179"]


def test_named_and_inbound_plans(app, run, rates_file):
    assert "into plan gold (version 1)" in ok(run("rates", "import", str(rates_file),
                                                   "--plan", "gold"))
    assert "1 inbound" not in ok(run("rates", "import", str(rates_file), "--plan", "gold",
                                     "--inbound"))
    assert json.loads(ok(run("rates", "lookup", "41441234567", "--plan", "gold", "--inbound",
                             "--json")))["rate"]["prefix"] == "41"
    refused(run("rates", "lookup", "41441234567"), "no outbound rates in plan default")
    ok(run("account", "create", "g1", "--prepaid", "--plan", "gold"))
    assert show(run, "g1")["plan"] == "gold"
    ok(run("account", "set", "g1", "--plan", "default"))  # the built-in name is always fine
    usage_error(run("rates", "import", str(rates_file), "--plan", "x" * 65), "1-64")


@pytest.mark.parametrize("content,words", [
    (b"", ("header must be",)),
    ((b"prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,"
      b"blocked\n"), ("no rates",)),
    ((b"prefix;description;rate_per_min;connect_fee;initial_increment;subsequent_increment;"
      b"blocked\n41;CH;0.10;0;60;60;0\n"), ("header must be",)),
    (b"41,CH,0.10,0,60,60,0\n", ("header must be",)),
    ((b"prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,"
      b"blocked\n41,Z\xfcrich,0.10,0,60,60,0\n"), ("not UTF-8",)),
    (b"\xff\xfe\x00\x00", ("not UTF-8",)),
    ((b"prefix,description,rate_per_min,connect_fee,initial_increment,subsequent_increment,"
      b"blocked\n41," + b"x" * 201 + b",0.10,0,60,60,0\n"), ("description",)),
])
def test_bad_files_are_refused(app, run, rates_file, tmp_path, content, words):
    ok(run("rates", "import", str(rates_file)))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    result = run("rates", "import", str(bad))
    assert result.exit_code == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"callguard: {bad}")
    for word in words:
        assert word in result.stderr
    assert app.books.plan_versions() == {"default": 1}
    assert len(app.books.load_plans()[("default", "outbound")]) == 4


def test_utf8_with_bom_and_crlf_is_fine(run, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeff".encode() + RATES.replace("\n", "\r\n")
                     .replace("Switzerland", "Schweiz Zürich").encode())
    assert "imported 4" in ok(run("rates", "import", str(path)))
    data = json.loads(ok(run("rates", "lookup", "41441234567", "--json")))
    assert data["rate"]["description"] == "Schweiz Zürich"


# -- --help everywhere ---------------------------------------------------------------

def all_commands(command=cli, path=()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from all_commands(sub, (*path, name))


COMMANDS = list(all_commands())


def test_the_contract_commands_exist():
    names = {" ".join(path) for path, _ in COMMANDS}
    for wanted in ("db upgrade", "account create", "account show", "account list", "account set",
                   "account topup", "account payment", "account block", "account unblock",
                   "rates import", "rates lookup"):
        assert wanted in names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "cli")
def test_help_everywhere_has_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "Example" in result.stdout
    assert result.stderr == ""
