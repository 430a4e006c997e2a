"""Real services for the tests: the machine's Redis and PostgreSQL when they
answer, the embedded Redis and SQLite otherwise; a Redis Cluster started from
the same redis-server binary; MariaDB/MySQL when CALLGUARD_TEST_MYSQL_URL is set, for
the books' own tests (MARIADB_TESTS). Every test gets its own key prefix and schema
(a database of its own on MariaDB)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import hypothesis
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from callguard.books.database import make_engine, upgrade
from callguard.cli import cli
from callguard.config import load_settings
from callguard.engine.connect import connect, ensure_embedded, redis_binary, stop_embedded
from callguard.service import App

from servers import ACL_USER, ADMIN, RedisServer, acl_file, answers, bindable, free_port

FIXTURES = Path(__file__).with_name("fixtures")

# A loaded 2-core CI machine can stall any example for a moment: no per-example deadline.
hypothesis.settings.register_profile("callguard", deadline=None)
hypothesis.settings.load_profile("callguard")


@pytest.fixture(scope="session")
def single_redis_url(tmp_path_factory):
    if os.environ.get("CALLGUARD_TEST_REDIS_URL"):
        yield os.environ["CALLGUARD_TEST_REDIS_URL"]
    elif answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        _delete_test_keys("redis://127.0.0.1:6379/0")
    else:
        home = tmp_path_factory.mktemp("embedded-redis")
        yield ensure_embedded(home)
        stop_embedded(home)


_KEY_PREFIXES: set[str] = set()  # the prefixes this session's tests used


def _delete_test_keys(url: str) -> None:
    """Leave the machine's Redis as we found it: only this session's prefixes go."""
    client = redis.Redis.from_url(url)
    doomed = [key for key in client.scan_iter("t*", count=1000)
              if key.split(b":", 1)[0].decode(errors="replace") in _KEY_PREFIXES]
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start:start + 1000])


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, to pause, kill and restart."""
    server = RedisServer(tmp_path / "private-redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_url(single_redis_url):
    return single_redis_url


@pytest.fixture(scope="session")
def acl_redis_url(tmp_path_factory):
    """A redis-server of the suite's own with the shipped ACL loaded (servers.acl_file), no
    default user: what connects as `callguard` may run only what contrib/redis/callguard.acl
    allows, and a command it leaves out fails the test (NOPERM)."""
    base = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    with open(base / "redis.log", "w") as log:
        proc = subprocess.Popen(
            [shutil.which("redis-server") or redis_binary(), "--port", str(port), "--bind",
             "127.0.0.1", "--aclfile", str(acl_file(base / "users.acl")), "--dir", str(base),
             "--save", "", "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://{ACL_USER}@127.0.0.1:{port}/0"
    try:
        _until_up(url, [proc], base / "redis.log")
        yield url
    finally:
        _stop([proc])


def _until_up(url: str, procs: list[subprocess.Popen], log: Path) -> None:
    client = connect(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"redis-server exited: {log.read_text()[-500:]}") from None
            assert time.monotonic() < deadline, f"redis-server did not start: see {log}"
            time.sleep(0.05)
        finally:
            client.close()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory):
    """A real 3-master Redis Cluster on loopback, started from the machine's redis-server
    (the embedded one where the machine has none), with the shipped ACL loaded as for
    acl_redis_url: the tests connect as `callguard`."""
    try:
        binary = shutil.which("redis-server") or redis_binary()
    except RuntimeError:
        pytest.skip("no redis-server binary to start a cluster with")
    cli_binary = shutil.which("redis-cli", path=str(Path(binary).parent)) or shutil.which(
        "redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))
    if not Path(cli_binary).exists():
        pytest.skip("no redis-cli to create a cluster with")
    procs: list[subprocess.Popen] = []
    try:
        for attempt in range(3):  # a port taken between probing and binding: try others
            try:
                yield _start_cluster(binary, cli_binary, tmp_path_factory.mktemp("cluster"),
                                     procs)
                return
            except ClusterStartFailed:
                _stop(procs)
                if attempt == 2:
                    raise
    finally:
        _stop(procs)


class ClusterStartFailed(RuntimeError):
    pass


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=10)
    procs.clear()


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus ports (port + 10000, fixed by Redis) are free too, both below
    the ephemeral range: Redis refuses a port above 55535."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(10000, 22000)
        if port not in ports and bindable(port + 10000):
            ports.append(port)
    return ports


def _start_cluster(binary: str, cli_binary: str, base: Path, procs: list) -> str:
    ports = _cluster_ports(3)
    acl = acl_file(base / "users.acl")
    for port in ports:
        node_dir = base / str(port)
        node_dir.mkdir()
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no", "--aclfile", str(acl)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
    admin, password = ADMIN.split(":")
    deadline = time.monotonic() + 10
    while not all(_up(p) for p in ports):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise ClusterStartFailed("cluster nodes did not start")
        time.sleep(0.05)
    try:
        subprocess.run(
            [cli_binary, "--user", admin, "--pass", password, "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )
        deadline = time.monotonic() + 15
        while not all(_admin(p).cluster("info").get("cluster_state") == "ok" for p in ports):
            if time.monotonic() > deadline:
                raise ClusterStartFailed("cluster did not become ok")
            time.sleep(0.1)
    except (subprocess.SubprocessError, redis.RedisError) as exc:
        raise ClusterStartFailed(f"cluster create failed: {exc}") from exc
    return f"redis+cluster://{ACL_USER}@127.0.0.1:{ports[0]}"


def _admin(port: int) -> redis.Redis:
    admin, password = ADMIN.split(":")
    return redis.Redis(port=port, username=admin, password=password, decode_responses=True,
                       socket_timeout=5)


def _up(port: int) -> bool:
    try:
        return _admin(port).ping()
    except redis.ConnectionError:
        return False


def _database_urls():
    urls = ["sqlite"]
    if os.environ.get("CALLGUARD_TEST_DATABASE_URL"):
        urls.append("postgres")
    if os.environ.get("CALLGUARD_TEST_MYSQL_URL"):
        urls.append("mariadb")
    return urls


# MariaDB/MySQL runs the tests of the books' SQL only: these modules (with the machine's
# single Redis: a Redis Cluster under them tests no SQL), and any test marked `mariadb`.
# The other ~300 tests that take a database (the engine, the PBX adapters, the CLI's words)
# test no SQL of their own, and a database plus a migration per test on the server would
# add minutes to the suite (measured: test_cli.py alone, 57 s); their `[mariadb]` items
# are deselected. These ~110 cost about 65 s on MariaDB (2 cores).
MARIADB_TESTS = {"test_books.py", "test_books_backends.py", "test_topup.py", "test_notify.py",
                 "test_limits.py", "test_review_limits.py", "test_suggest_limit.py",
                 "test_cli_books.py"}


def _on_mariadb_too(item) -> bool:
    if item.get_closest_marker("mariadb") is not None:
        return True
    return item.path.name in MARIADB_TESTS and item.callspec.params.get("redis_url") != "cluster"


# The PBX adapters' protocol and fault tests, the CLI's words and the console run on
# SQLite only: the books under them are the same code whatever the database (the worker's
# faults, the API's and the books' own tests run on PostgreSQL too, and a test marked
# `postgres` here still does), and on PostgreSQL they doubled ~5 minutes of the suite.
SQLITE_ONLY = {"test_asterisk.py", "test_freeswitch.py", "test_protocol_esl.py",
               "test_protocol_agi.py", "test_metrics.py", "test_console.py",
               "test_asterisk_faults.py", "test_asterisk_tls.py", "test_cli.py",
               "test_ghosts.py"}


# Their database URL carries a password on PostgreSQL: there, where there is one, instead
# of SQLite (whose URL has none).
POSTGRES_INSTEAD = {"test_secrets.py"}


def _dropped(item) -> bool:
    database = getattr(item, "callspec", None) and item.callspec.params.get("database_url")
    if database == "postgres" and item.callspec.params.get("redis_url") == "acl":
        return True  # the ACL's test is Redis's: once, on SQLite
    if database == "mariadb":
        return not _on_mariadb_too(item)
    if item.path.name in POSTGRES_INSTEAD:
        return database == "sqlite" and "postgres" in _database_urls()
    return database == "postgres" and item.path.name in SQLITE_ONLY and \
        item.get_closest_marker("postgres") is None


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        (dropped if _dropped(item) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=_database_urls())
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'books.db'}"
        return
    if request.param == "mariadb":
        yield from _mysql_database()
        return
    base = os.environ["CALLGUARD_TEST_DATABASE_URL"]
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = make_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def mariadb_url():
    """A database of this test's own on MariaDB/MySQL (CALLGUARD_TEST_MYSQL_URL)."""
    if not os.environ.get("CALLGUARD_TEST_MYSQL_URL"):
        pytest.skip("needs MariaDB/MySQL (CALLGUARD_TEST_MYSQL_URL)")
    yield from _mysql_database()


def _mysql_database():
    """Yield the URL of a new database `cg_test_<hex>` on the server of
    CALLGUARD_TEST_MYSQL_URL, dropped afterwards; no other database is touched (the URL's
    own, `test`, only serves to connect)."""
    base = make_url(os.environ["CALLGUARD_TEST_MYSQL_URL"])
    name = "cg_test_" + uuid.uuid4().hex[:12]
    admin = make_engine(base.render_as_string(hide_password=False))
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            # A connection a test left behind in a transaction would hold the drop forever.
            conn.exec_driver_sql("SET SESSION lock_wait_timeout = 30")
            conn.exec_driver_sql(f"DROP DATABASE {name}")
        admin.dispose()


@pytest.fixture
def settings(tmp_path, redis_url, database_url):
    prefix = "t" + uuid.uuid4().hex[:10]
    _KEY_PREFIXES.add(prefix)
    return load_settings(
        env={}, home=str(tmp_path / "home"), redis_url=redis_url, database_url=database_url,
        key_prefix=prefix, node="test-node",
    )


@pytest.fixture
def app(settings):
    application = App(settings)
    upgrade(application.books.engine)
    yield application
    application.books.engine.dispose()


@pytest.fixture
def run(settings, app):
    """Run the CLI as an operator would, against this test's services."""
    env = {
        "CALLGUARD_HOME": str(settings.home), "CALLGUARD_REDIS_URL": settings.redis_url,
        "CALLGUARD_DATABASE_URL": settings.database_url,
        "CALLGUARD_KEY_PREFIX": settings.key_prefix, "CALLGUARD_NODE": "test-node",
    }
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(cli, list(args), env=env, input=input, catch_exceptions=False)

    return invoke
