"""Engine creation and schema migration for the books."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..config import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")

# The drivers callguard's extras install: (database, the extra) by the driver's name.
_EXTRAS = {"pymysql": ("MySQL", "mysql"), "psycopg": ("PostgreSQL", "postgres")}
_MYSQL = ("mysql", "mariadb")
CONNECT_TIMEOUT = 5  # seconds


def make_engine(url: str, pool_size: int | None = None) -> Engine:
    """`pool_size`: connections kept open for that many threads at once (the API's thread
    pool); SQLAlchemy's default keeps 5 and opens and closes up to 10 more as needed,
    which under load means a new connection for many requests."""
    sizing = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 0}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            # Customers' addresses, balances, payment tokens: for this user's eyes only
            # (SQLite gives its -wal and -shm files the database file's mode).
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_engine(url, connect_args={"timeout": 30}, **sizing)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the worker write while the CLI reads; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("the database URL is not a valid SQLAlchemy URL "
                          "(dialect[+driver]://user:password@host/database)") from None
    options: dict = {"pool_pre_ping": True, **sizing}
    if parsed.get_backend_name() in ("postgresql", *_MYSQL) and (
            "connect_timeout" not in parsed.query):
        # A black-holed server must not hold a command (or the worker, past its systemd
        # watchdog) for the ~2 min of TCP's own retries.
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    if parsed.get_backend_name() in _MYSQL:
        parsed = _mysql_url(parsed)
        # Read committed, as on PostgreSQL: the books re-read after waiting for a row lock
        # (a concurrent booking of the same key, a second top-up request) and must see
        # what the other transaction committed, not REPEATABLE READ's older snapshot.
        options["isolation_level"] = "READ COMMITTED"
    try:
        return create_engine(parsed, **options)
    except NoSuchModuleError:
        raise ConfigError(f"the database URL names a database or driver SQLAlchemy does not "
                          f"know: {parsed.drivername}") from None
    except ImportError as exc:  # the dialect's import_dbapi: its driver is not installed
        raise ConfigError(_missing_driver(parsed, exc)) from None


def _mysql_url(url: URL) -> URL:
    """mysql:// and mariadb:// without a driver use PyMySQL (pure Python: mysqlclient
    needs the libmysqlclient headers to build), all of them utf8mb4."""
    if "+" not in url.drivername:
        url = url.set(drivername=f"{url.drivername}+pymysql")
    if "charset" not in url.query:
        url = url.update_query_dict({"charset": "utf8mb4"})
    return url


def table_options(conn) -> dict:
    """What the migrations give every table they create. On MySQL/MariaDB: utf8mb4,
    compared byte for byte as on SQLite and PostgreSQL; the servers' default collations
    find 'ACME' = 'acme' = 'acmé' (and 'x' = 'x '), so a new account would be an old one, a
    new reference one booked before. Nothing elsewhere."""
    if conn.dialect.name not in _MYSQL:
        return {}
    collation = "utf8mb4_nopad_bin" if conn.dialect.is_mariadb else "utf8mb4_0900_bin"
    return {"mysql_charset": "utf8mb4", "mysql_collate": collation}


def _missing_driver(url: URL, exc: ImportError) -> str:
    """One line, without the URL (its password): what to install."""
    driver = url.get_driver_name()
    if driver in _EXTRAS:
        database, extra = _EXTRAS[driver]
        return f"the database URL needs the {database} driver: pip install 'callguard[{extra}]'"
    module = exc.name or driver
    return (f"the database URL needs the Python module {module!r} (driver {driver!r} of "
            f"{url.get_backend_name()}), which is not installed")


def alembic_config(engine: Engine):
    # Imported here: Alembic costs a serving process ~10 MB it never uses.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # configparser treats % as interpolation: escape it (search_path options carry %3D).
    url = engine.url.render_as_string(hide_password=False).replace("%", "%%")
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def upgrade(engine: Engine) -> None:
    """Create or migrate the schema to the newest revision."""
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
