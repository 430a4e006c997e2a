"""The SQL books: schema through Alembic, an append-only ledger with idempotency keys,
balance = sum(ledger), CDRs booked once, rate plans replaced atomically.

Runs on SQLite and, with CALLGUARD_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from callguard import service
from callguard.books.database import make_engine
from callguard.books.ledger import Books, BooksError
from callguard.books.models import Base
from callguard.cli import cli
from callguard.rating import Rate

TABLES = {"accounts", "rate_plans", "rates", "ledger", "cdrs", "notifications", "redis_outbox",
          "auto_topups", "api_tokens", "operator_actions"}


def cdr(session: str, account: str, cost: int, duration: int = 61) -> dict:
    return {
        "session": session, "account": account, "channel": session.split("/", 1)[1],
        "node": "n1", "direction": "outbound", "destination": "41791234567",
        "prefix": "417", "rate_per_min": 400_000, "connect_fee": 50_000,
        "initial_increment": 30, "subsequent_increment": 6, "setup_ms": 1_000,
        "answer_ms": 2_000 if cost else None, "end_ms": 2_000 + duration * 1000,
        "duration": duration, "billed": duration, "cost": cost, "cause": "16",
    }


@pytest.fixture
def books(app) -> Books:
    return app.books


def account_row(books, account_id):
    return books.get_account(account_id)


# -- schema ------------------------------------------------------------------------

def test_db_upgrade_creates_the_schema_and_is_repeatable(settings):
    """On a fresh database (not touched by the `app` fixture) through the CLI."""
    env = {
        "CALLGUARD_HOME": str(settings.home), "CALLGUARD_REDIS_URL": settings.redis_url,
        "CALLGUARD_DATABASE_URL": settings.database_url,
        "CALLGUARD_KEY_PREFIX": settings.key_prefix,
    }
    engine = make_engine(settings.sql_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
        runner = CliRunner()
        for _ in range(2):
            result = runner.invoke(cli, ["db", "upgrade"], env=env, catch_exceptions=False)
            assert result.exit_code == 0, result.stderr
            assert result.stdout.strip() == "database schema is up to date"
            assert result.stderr == ""
        names = set(inspect(engine).get_table_names())
        assert TABLES | {"alembic_version"} <= names
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() \
                == ["0005"]
        # The migration builds what the models describe: same columns, table by table.
        insp = inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in insp.get_columns(table.name)} == set(table.columns.keys())
        ledger_unique = {tuple(u["column_names"]) for u in insp.get_unique_constraints("ledger")}
        ledger_unique |= {tuple(i["column_names"]) for i in insp.get_indexes("ledger")
                          if i["unique"]}
        assert ("idempotency_key",) in ledger_unique
    finally:
        engine.dispose()


# -- accounts ------------------------------------------------------------------------

def test_accounts_create_get_list_update(books):
    books.create_account("p1", kind="prepaid", max_channels=3)
    books.create_account("a0", kind="postpaid", credit_limit=300_000_000)
    row = books.get_account("p1")
    assert (row.kind, row.currency, row.plan, row.status, row.balance, row.max_channels) == \
        ("prepaid", "CHF", "default", "active", 0, 3)
    assert [a.id for a in books.list_accounts()] == ["a0", "p1"]
    books.update_account("p1", max_channels=7, status="blocked", block_reason="fraud")
    row = books.get_account("p1")
    assert (row.max_channels, row.status, row.block_reason) == (7, "blocked", "fraud")


def test_account_refusals(books):
    books.create_account("p1", kind="prepaid")
    with pytest.raises(BooksError, match="already exists"):
        books.create_account("p1", kind="postpaid")
    assert books.get_account("p1").kind == "prepaid"
    with pytest.raises(BooksError, match="unknown account nope"):
        books.get_account("nope")
    with pytest.raises(BooksError, match="unknown account nope"):
        books.update_account("nope", max_channels=1)


# -- ledger ---------------------------------------------------------------------------

def test_same_key_books_once(books):
    books.create_account("p1", kind="prepaid")
    first = books.book("p1", "topup", 20_000_000, "topup:p1:X", reference="X")
    again = books.book("p1", "topup", 20_000_000, "topup:p1:X", reference="X")
    assert first.created is True and again.created is False
    assert again.entry_id == first.entry_id and again.amount == 20_000_000
    # A retry with a different amount under the same key still changes nothing.
    third = books.book("p1", "topup", 99_000_000, "topup:p1:X")
    assert (third.created, third.entry_id, third.amount) == (False, first.entry_id, 20_000_000)
    assert books.get_account("p1").balance == 20_000_000
    entries = books.ledger("p1")
    assert [(e.kind, e.amount, e.idempotency_key, e.reference) for e in entries] == \
        [("topup", 20_000_000, "topup:p1:X", "X")]


def test_ledger_is_append_only_and_signed(books):
    books.create_account("q1", kind="postpaid", credit_limit=100_000_000)
    books.book("q1", "call_charge", -1_250_000, "k1", session="q1/c1")
    books.book("q1", "payment", 1_000_000, "k2")
    books.book("q1", "adjustment", -5, "k3")
    entries = books.ledger("q1")
    assert [(e.kind, e.amount) for e in entries] == \
        [("call_charge", -1_250_000), ("payment", 1_000_000), ("adjustment", -5)]
    assert entries[0].id < entries[1].id < entries[2].id
    assert books.get_account("q1").balance == -250_005 == books.ledger_sum("q1")


def test_booking_on_an_unknown_account_is_refused_and_leaves_nothing(books):
    books.create_account("p1", kind="prepaid")
    with pytest.raises(BooksError, match="unknown account ghost"):
        books.book("ghost", "topup", 1_000_000, "k-ghost")
    assert books.ledger("ghost") == []
    assert books.ledger_sum("ghost") == 0
    # The key was not burnt: it can still be booked on a real account.
    assert books.book("p1", "topup", 1_000_000, "k-ghost").created is True


def test_opening_balance_is_a_ledger_entry(app):
    service.create_account(app, "p1", opening_balance=50_000_000, kind="prepaid")
    entries = app.books.ledger("p1")
    assert [(e.kind, e.amount, e.idempotency_key) for e in entries] == \
        [("topup", 50_000_000, "open:p1")]
    assert app.books.get_account("p1").balance == 50_000_000


# -- calls -------------------------------------------------------------------------------

def test_record_call_twice_books_one_cdr_and_one_charge(books):
    books.create_account("p1", kind="prepaid")
    books.book("p1", "topup", 10_000_000, "t1")
    assert books.record_call(cdr("p1/c1", "p1", 290_000)) is True
    assert books.record_call(cdr("p1/c1", "p1", 290_000)) is False
    assert books.record_call(cdr("p1/c1", "p1", 999_999)) is False
    cdrs = books.cdrs("p1")
    assert [(c.session, c.cost, c.duration, c.channel) for c in cdrs] == \
        [("p1/c1", 290_000, 61, "c1")]
    charges = [(e.kind, e.amount, e.idempotency_key, e.session)
               for e in books.ledger("p1") if e.kind == "call_charge"]
    assert charges == [("call_charge", -290_000, "call:p1/c1", "p1/c1")]
    assert books.get_account("p1").balance == 9_710_000 == books.ledger_sum("p1")


def test_unanswered_call_books_a_cdr_but_no_charge(books):
    books.create_account("p1", kind="prepaid")
    assert books.record_call(cdr("p1/c2", "p1", 0, duration=0)) is True
    assert [c.cost for c in books.cdrs("p1")] == [0]
    assert books.ledger("p1") == []
    assert books.cdrs("other") == []
    assert len(books.cdrs()) == 1


# -- the invariant ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2])
def test_balance_is_the_sum_of_the_ledger_after_random_movements(books, seed):
    rnd = random.Random(seed)
    kinds = {"p1": "prepaid", "p2": "prepaid", "q1": "postpaid"}
    for account, kind in kinds.items():
        books.create_account(account, kind=kind, credit_limit=500_000_000)
    expected = dict.fromkeys(kinds, 0)
    booked_keys: set[str] = set()
    sessions: set[str] = set()
    entries = cdr_count = 0
    for step in range(100):
        account = rnd.choice(list(kinds))
        op = rnd.choice(["money", "money", "adjustment", "call", "call", "retry"])
        if op == "retry" and booked_keys:
            key = rnd.choice(sorted(booked_keys))
            assert books.book(account, "adjustment", 123, key).created is False
        elif op == "call":
            # Sessions repeat now and then: the worker may deliver a commit twice.
            session = f"{account}/c{rnd.randrange(40)}"
            cost = rnd.choice([0, 1, 1_167, rnd.randrange(1, 5_000_000)])
            created = books.record_call(cdr(session, account, cost))
            assert created is (session not in sessions)
            if created:
                sessions.add(session)
                cdr_count += 1
                if cost:
                    expected[account] -= cost
                    entries += 1
        else:
            if op == "adjustment":
                kind, amount = "adjustment", rnd.randrange(-3_000_000, 3_000_000) or 1
            else:
                kind = "topup" if kinds[account] == "prepaid" else "payment"
                amount = rnd.randrange(1, 50_000_000)
            key = f"{kind}:{account}:{rnd.randrange(1_000_000)}"
            booking = books.book(account, kind, amount, key)
            assert booking.created is (key not in booked_keys)
            if booking.created:
                booked_keys.add(key)
                expected[account] += amount
                entries += 1
        if step % 25 == 24:
            for acct in kinds:
                assert books.get_account(acct).balance == books.ledger_sum(acct) == expected[acct]
    for acct in kinds:
        assert books.get_account(acct).balance == books.ledger_sum(acct) == expected[acct]
        assert books.get_account(acct).balance == sum(e.amount for e in books.ledger(acct))
    assert sum(len(books.ledger(a)) for a in kinds) == entries
    assert len(books.cdrs()) == cdr_count
    assert entries > 40 and cdr_count > 10  # the loop did real work


# -- rate plans ---------------------------------------------------------------------------

CH = Rate("41", "Switzerland", 100_000, 0, 60, 60)
MOBILE = Rate("417", "CH mobile", 400_000, 50_000, 30, 6)
DE = Rate("49", "Germany", 200_000, 0, 1, 1, blocked=True)


def test_replace_plan_versions_and_swaps_rows(books):
    assert books.replace_plan("default", "outbound", [CH, MOBILE]) == 1
    assert books.replace_plan("default", "inbound", [CH]) == 2
    plans = books.load_plans()
    assert plans[("default", "outbound")].rates() == [CH, MOBILE]
    assert plans[("default", "inbound")].rates() == [CH]
    assert books.replace_plan("default", "outbound", [DE]) == 3
    plans = books.load_plans()
    assert plans[("default", "outbound")].rates() == [DE]  # 41 and 417 are gone
    assert plans[("default", "outbound")].version == 3
    assert plans[("default", "inbound")].rates() == [CH]  # the other direction is untouched
    assert books.plan_versions() == {"default": 3}
    assert books.plan_exists("default") and not books.plan_exists("other")


def test_a_failed_replace_leaves_the_plan_as_it_was(books):
    books.replace_plan("default", "outbound", [CH, MOBILE])
    with pytest.raises(IntegrityError):
        books.replace_plan("default", "outbound", [DE, DE])  # the primary key refuses
    assert books.load_plans()[("default", "outbound")].rates() == [CH, MOBILE]
    assert books.plan_versions() == {"default": 1}


def test_bookings_stay_within_what_redis_can_hold(books):
    max_micros = 2**53 - 1
    books.create_account("p1", kind="prepaid")
    books.book("p1", "topup", max_micros - 5, "t1")
    with pytest.raises(BooksError, match="too large"):
        books.book("p1", "topup", 6, "t2")
    assert books.book("p1", "topup", 5, "t3").created is True
    # Refused bookings leave no entry and do not burn their key; retries still say "booked".
    assert books.book("p1", "topup", 5, "t3").created is False
    assert [e.idempotency_key for e in books.ledger("p1")] == ["t1", "t3"]
    assert books.get_account("p1").balance == max_micros == books.ledger_sum("p1")
    books.create_account("q1", kind="postpaid")
    books.book("q1", "adjustment", -max_micros, "a1")
    with pytest.raises(BooksError, match="too large"):
        books.record_call(cdr("q1/c1", "q1", 1))
    assert books.cdrs("q1") == []  # the CDR went back with its charge
    assert books.get_account("q1").balance == -max_micros == books.ledger_sum("q1")


def test_a_booking_is_one_transaction_with_its_balance_move(books):
    """Entry and balance commit or roll back together (on SQLite a SAVEPOINT opened
    before the first write would commit the entry on its own)."""
    books.create_account("p1", kind="prepaid")
    with pytest.raises(RuntimeError), books.session.begin() as db:
        assert books.book("p1", "topup", 5_000_000, "k1", db=db).created
        raise RuntimeError("crash after booking, before commit")
    assert books.ledger("p1") == []
    assert books.get_account("p1").balance == 0 == books.ledger_sum("p1")
    assert books.book("p1", "topup", 5_000_000, "k1").created is True
    assert books.get_account("p1").balance == 5_000_000 == books.ledger_sum("p1")
