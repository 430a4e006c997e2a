"""What the books must mean the same on every SQL backend (SQLite, PostgreSQL, MariaDB/MySQL
with CALLGUARD_TEST_MYSQL_URL), where MySQL's defaults differ: keys compared byte for
byte, times to the microsecond, a transaction that waited for a row lock seeing what the
other one committed. And the database URL: `mysql://` uses PyMySQL, a driver that is not
installed is one line naming the extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import MetaData, Table, insert, select, text
from sqlalchemy.engine import make_url

from callguard import views
from callguard.books import actors
from callguard.books.database import make_engine
from callguard.books.models import Account, AutoTopup, as_utc
from callguard.config import ConfigError
from callguard.topup import request_topup

from conftest import _KEY_PREFIXES

ACCT = "41441234567"


# -- keys, times, concurrency: on every backend -------------------------------------------

def test_ids_and_keys_compare_byte_for_byte(app):
    """MySQL's default collations find 'ACME' = 'acme', 'cafe' = 'café' and 'x' = 'x ':
    a second account would be the first, a new reference an old one (not booked)."""
    books = app.books
    books.create_account("acme", kind="prepaid")
    books.create_account("ACME", kind="prepaid")
    assert books.get_account("ACME").id == "ACME"
    refs = ["INV-1", "inv-1", "cafe", "café", "x", "x "]
    for n, ref in enumerate(refs):
        assert books.book("acme", "topup", 10 ** n, f"topup:acme:{ref}", reference=ref).created
    assert books.get_account("acme").balance == books.ledger_sum("acme") == 111111
    assert books.get_account("ACME").balance == 0
    assert [e.reference for e in books.ledger("acme")] == refs


def test_times_keep_their_microseconds(app):
    """An operator's unblock is weighed against the engine's fraud block to the millisecond
    (limit_events._unblocked_since): MySQL's DATETIME would drop the fraction."""
    at = datetime(2026, 3, 2, 9, 0, 0, 987654, tzinfo=UTC)
    app.books.create_account(ACCT, kind="prepaid")
    app.books.update_account(ACCT, unblocked_at=at)
    row = app.books.get_account(ACCT)
    assert as_utc(row.unblocked_at) == at
    assert as_utc(row.created_at).microsecond or as_utc(row.updated_at).microsecond


def test_a_booking_that_lost_the_race_for_its_key_sees_the_winner(app):
    """The loser of two bookings of one key finds the winner's entry once the insert says
    the key is taken: on MariaDB's REPEATABLE READ it would read its older snapshot, find
    nothing and fail."""
    books = app.books
    books.create_account(ACCT, kind="prepaid")
    with books.session.begin() as late:
        late.get(Account, ACCT)  # the transaction has read: its snapshot, if any, is taken
        first = books.book(ACCT, "topup", 5_000_000, "topup:race")  # commits meanwhile
        again = books.book(ACCT, "topup", 5_000_000, "topup:race", db=late)
    assert (again.entry_id, again.created) == (first.entry_id, False)
    assert books.get_account(ACCT).balance == books.ledger_sum(ACCT) == 5_000_000


def test_a_second_topup_request_that_waited_sees_the_first_one_pending(app):
    """request_topup locks the account, then looks for a pending top-up: the one another
    transaction committed meanwhile must be seen (one pending per account)."""
    books = app.books
    books.create_account(ACCT, 5_000_000, kind="prepaid", payment_method="tok_visa",
                         auto_topup_below=10_000_000, auto_topup_amount=20_000_000)
    with books.session.begin() as late:
        row = late.get(Account, ACCT)
        with books.session.begin() as first:
            assert request_topup(first, first.get(Account, ACCT), f"topup:{ACCT}:1-0")
        assert request_topup(late, row, f"topup:{ACCT}:2-0") is None
    with books.session() as db:
        assert list(db.scalars(select(AutoTopup.key))) == [f"topup:{ACCT}:1-0"]


# -- a migration on books that hold rows: on every backend -----------------------------------

def test_revision_0005_keeps_what_was_booked_and_shows_its_actor_as_unknown(settings):
    """A database at 0004 with an account, blocked, and its ledger: after the upgrade the
    old entries and the old block are there, their actor unknown (null; "by unknown" in
    the text), and what is done from then on says who did it."""
    from alembic import command
    from click.testing import CliRunner

    from callguard.books.database import alembic_config
    from callguard.cli import cli
    from callguard.service import App

    engine = make_engine(settings.sql_url)
    cfg = alembic_config(engine)

    def migrate(revision):
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    migrate("0004")
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with engine.begin() as conn:
        tables = MetaData()
        accounts, ledger = (Table(name, tables, autoload_with=conn)
                            for name in ("accounts", "ledger"))
        conn.execute(insert(accounts).values(
            id=ACCT, kind="prepaid", currency="CHF", plan="default", status="blocked",
            block_reason="old block", max_channels=10, cps_limit=0, balance=7_000_000,
            credit_limit=0, created_at=now, updated_at=now))
        conn.execute(insert(ledger), [
            {"account": ACCT, "kind": "topup", "amount": 10_000_000, "created_at": now,
             "idempotency_key": "open:" + ACCT, "reference": "opening balance"},
            {"account": ACCT, "kind": "adjustment", "amount": -3_000_000, "created_at": now,
             "idempotency_key": f"adjustment:{ACCT}:T-1", "reference": "T-1"}])
    migrate("head")
    engine.dispose()
    env = {"CALLGUARD_HOME": str(settings.home), "CALLGUARD_REDIS_URL": settings.redis_url,
           "CALLGUARD_DATABASE_URL": settings.database_url,
           "CALLGUARD_KEY_PREFIX": settings.key_prefix}

    def run(*args) -> str:
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    run("rebuild", "--yes")  # Redis learns the account the old books hold
    rows = json.loads(run("account", "ledger", ACCT, "--json"))
    assert [(r["amount"], r["balance"], r["reference"], r["actor"], r["reason"])
            for r in rows] == [("10.000000", "10.000000", "opening balance", None, None),
                               ("-3.000000", "7.000000", "T-1", None, None)]
    assert all(line.endswith("by unknown") for line in run("account", "ledger", ACCT)
               .splitlines())
    shown = json.loads(run("account", "show", ACCT, "--json"))
    assert (shown["blocked_by"], shown["recent_actions"]) == (None, [])
    assert "status      blocked (old block) by unknown" in run("account", "show", ACCT)
    run("account", "unblock", ACCT, "--reason", "migrated")
    run("account", "adjust", ACCT, "1", "--reason", "goodwill")
    app = App(settings)
    try:
        [unblock] = views.who_and_why(app, app.books.get_account(ACCT))["recent_actions"]
        assert (unblock["action"], unblock["reason"]) == ("unblock", "migrated")
        assert unblock["actor"] == app.books.ledger(ACCT)[-1].actor == actors.local()
    finally:
        app.close()


# -- the database URL -----------------------------------------------------------------------

@pytest.mark.parametrize("url, driver", [
    ("mysql://cg:pw@db.example/books", "mysql+pymysql"),
    ("mariadb://cg:pw@db.example/books", "mariadb+pymysql"),
    ("mysql+pymysql://cg:pw@db.example/books", "mysql+pymysql"),
])
def test_mysql_urls_use_pymysql_in_utf8mb4(url, driver):
    engine = make_engine(url)  # no connection yet; READ COMMITTED: the MariaDB CLI test
    assert engine.url.drivername == driver
    assert engine.url.query["charset"] == "utf8mb4"
    assert make_engine(url + "?charset=utf8").url.query["charset"] == "utf8"  # as asked


@pytest.mark.parametrize("url, hidden, line", [
    ("mysql://cg:s3cret@db/books", "pymysql",
     "the database URL needs the MySQL driver: pip install 'callguard[mysql]'"),
    ("mariadb+pymysql://cg:s3cret@db/books", "pymysql",
     "the database URL needs the MySQL driver: pip install 'callguard[mysql]'"),
    ("postgresql://cg:s3cret@db/books", "psycopg",
     "the database URL needs the PostgreSQL driver: pip install 'callguard[postgres]'"),
    ("mysql+mysqldb://cg:s3cret@db/books", "MySQLdb",
     "the database URL needs the Python module 'MySQLdb' (driver 'mysqldb' of mysql), which "
     "is not installed"),
])
def test_a_driver_that_is_not_installed_is_named_with_its_extra(monkeypatch, url, hidden,
                                                                 line):
    monkeypatch.setitem(sys.modules, hidden, None)  # `import <hidden>` fails
    with pytest.raises(ConfigError) as refused:
        make_engine(url)
    assert str(refused.value) == line


@pytest.mark.parametrize("url", ["mysql+nosuch://cg:s3cret@db/books",
                                 "nosuchdb://cg:s3cret@db/books", "not a URL s3cret"])
def test_an_unknown_database_or_driver_is_one_line_without_the_password(url):
    with pytest.raises(ConfigError) as refused:
        make_engine(url)
    assert "s3cret" not in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_without_pymysql_says_what_to_install(tmp_path):
    """The real `callguard` in a process of its own, PyMySQL hidden (a sitecustomize that
    makes `import pymysql` fail): one line, exit 1, no traceback, no password."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['pymysql'] = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
    env |= {"PYTHONPATH": str(shim), "CALLGUARD_HOME": str(tmp_path / "home"),
            "CALLGUARD_DATABASE_URL": "mysql://root:s3cret@127.0.0.1:3306/x"}
    done = subprocess.run(
        [sys.executable, "-m", "callguard", "db", "upgrade"],
        env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "callguard: the database URL needs the MySQL driver: "
               "pip install 'callguard[mysql]'\n")


# -- MariaDB from the CLI -----------------------------------------------------------------

def test_db_upgrade_then_the_books_work_on_mariadb_from_the_cli(mariadb_url, redis_url,
                                                                 tmp_path):
    """`callguard db upgrade` on an empty MariaDB database through a plain mysql:// URL (no
    driver named: PyMySQL), then accounts and money from the CLI, process by process."""
    url = make_url(mariadb_url).set(drivername="mysql").render_as_string(hide_password=False)
    prefix = "t" + uuid.uuid4().hex[:10]
    _KEY_PREFIXES.add(prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
    env |= {"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_DATABASE_URL": url,
            "CALLGUARD_REDIS_URL": redis_url, "CALLGUARD_KEY_PREFIX": prefix}

    def callguard(*args) -> str:
        done = subprocess.run([sys.executable, "-m", "callguard", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (0, ""), (args, done.stdout, done.stderr)
        return done.stdout

    assert callguard("db", "upgrade").strip() == "database schema is up to date"
    assert callguard("db", "upgrade").strip() == "database schema is up to date"
    callguard("account", "create", "Acme-1", "--prepaid", "--balance", "50.00")
    assert "booked topup of 20.00" in callguard("account", "topup", "Acme-1", "20.00",
                                                "--ref", "BANK-1")
    assert "booked topup of 5.00" in callguard("account", "topup", "Acme-1", "5.00",
                                               "--ref", "bank-1")  # another reference
    assert "already booked" in callguard("account", "topup", "Acme-1", "20.00",
                                         "--ref", "BANK-1")
    shown = json.loads(callguard("account", "show", "Acme-1", "--json"))
    assert (shown["account"], shown["balance"], shown["available"]) == (
        "Acme-1", "75.000000", "75.000000")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT @@tx_isolation")) == "READ-COMMITTED"
            database = make_url(url).database
            collations = set(conn.scalars(text(
                "SELECT table_collation FROM information_schema.tables "
                "WHERE table_schema = :db AND table_name <> 'alembic_version'"), {"db": database}))
            assert collations in ({"utf8mb4_nopad_bin"}, {"utf8mb4_0900_bin"})
            assert conn.scalar(text(
                "SELECT datetime_precision FROM information_schema.columns WHERE "
                "table_schema = :db AND table_name = 'ledger' AND column_name = 'created_at'"),
                {"db": database}) == 6
    finally:
        engine.dispose()


def test_books_not_set_up_are_one_line_on_every_backend(database_url, tmp_path):
    """Before `db upgrade` every backend says so in one line: SQLite's "no such table" is an
    OperationalError, PostgreSQL's and MariaDB's missing table a ProgrammingError."""
    from click.testing import CliRunner

    from callguard.cli import cli

    result = CliRunner().invoke(cli, ["--database-url", database_url, "--home",
                                      str(tmp_path / "home"), "account", "show", ACCT],
                                env={"CALLGUARD_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 1, result.output
    assert result.output.startswith("callguard: the books are not set up (run `callguard db "
                                    "upgrade`)")
    assert len(result.output.splitlines()) == 1
