"""The books through real faults: `callguard worker` SIGKILLed at the point that
matters and again at random, SQL and Redis going away under it, poisoned stream
entries, operator movements while Redis is down, node identities that clash.
Real processes, a private redis-server, the test's SQL database (SQLite, and
PostgreSQL when configured) and a TCP proxy to cut it."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import sqlalchemy.exc
from click.testing import CliRunner
from sqlalchemy import func, select, text

from callguard import service, sync
from callguard.books.models import Account, Cdr, RedisOutbox
from callguard.cli import cli
from callguard.engine import state
from callguard.engine.core import SHARDS, shard_of
from callguard.service import App

from engine_helpers import T0, setup_plan
from servers import Proxy

ACCT = "41441234567"


@pytest.fixture
def books_app(app, private_redis):
    """The test's books, on a Redis of its own that the test may kill."""
    other = App(dataclasses.replace(app.settings, redis_url=private_redis.url))
    other.__dict__["books"] = app.books
    setup_plan(other)
    service.create_account(other, ACCT, opening_balance=10_000_000_000, kind="prepaid",
                           max_channels=0)
    yield other
    other.redis.close()


def env_of(app: App, **extra) -> dict[str, str]:
    s = app.settings
    return {**os.environ, "CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
            "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
            "CALLGUARD_NODE": "worker-t", **extra}


def worker(app: App, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "callguard", "worker", *args],
                            env=env_of(app, **extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def calls_ended(app: App, count: int, start: int = 0) -> list[str]:
    """`count` answered calls committed in Redis (each 10 s at CHF 3.00/min)."""
    sessions = []
    for i in range(start, start + count):
        d = app.engine.authorize(ACCT, "41901234567", "outbound", f"c{i}", now_ms=T0)
        app.engine.answer(d.session, now_ms=T0)
        app.engine.commit(d.session, "16", now_ms=T0 + 10_000)
        sessions.append(d.session)
    return sessions


def taken(app: App) -> int:
    """Entries a worker read and has not settled (0 before any worker made its group)."""
    try:
        return sum(app.redis.xpending(app.keys.events(n), "books")["pending"]
                   for n in range(SHARDS))
    except redis.ResponseError:
        return 0


def cdr_count(app: App) -> int:
    with app.books.session() as db:
        return db.scalar(select(func.count()).select_from(Cdr))


def pending(app: App) -> int:
    """Stream entries anyone took and nobody settled, plus entries not taken yet."""
    r, keys = app.redis, app.keys
    return sum(r.xlen(keys.events(n)) for n in range(SHARDS))


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def all_booked(app: App, commits: int) -> None:
    assert cdr_count(app) == commits  # every commit exactly once
    assert pending(app) == 0
    assert app.books.get_account(ACCT).balance == state.account_state(
        app.redis, app.keys, ACCT)["balance"]
    assert sync.reconcile(app) == []


def test_a_worker_killed_between_booking_and_acknowledging_loses_and_doubles_nothing(
        books_app, private_redis):
    app = books_app
    calls_ended(app, 300)
    r = private_redis.client()  # to pause it
    # Hold the account's row: the worker reads the entries, then its booking waits on us.
    with app.books.engine.connect() as conn:
        lock = conn.begin()
        conn.execute(text("UPDATE accounts SET max_channels = max_channels WHERE id = :a"),
                     {"a": ACCT})
        proc = worker(app)
        try:
            wait_for(lambda: taken(app) == 300, "the worker taking them")
            r.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # its acknowledgement waits
            lock.commit()  # its booking goes through
            wait_for(lambda: cdr_count(app) == 300, "the booking committed")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            r.execute_command("CLIENT", "UNPAUSE")
            stop(proc)
    assert pending(app) == 300  # booked, none acknowledged
    # Booked but still in the stream: neither reconcile nor rebuild counts it twice.
    assert sync.reconcile(app) == []
    sync.rebuild(app)
    assert sync.reconcile(app) == []
    # The same node identity starts again and takes back what it had taken.
    again = worker(app, "--once")
    assert again.wait(timeout=60) == 0, again.stderr.read()
    all_booked(app, 300)


def test_a_worker_killed_again_and_again_strands_nothing(books_app):
    app = books_app
    rnd = random.Random(8)
    committed: list[str] = []
    producing = threading.Event()
    producing.set()

    def produce():
        while producing.is_set():
            committed.extend(calls_ended(app, 5, len(committed)))
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0
    try:
        for n in range(6):
            proc = worker(app)
            if n == 0:  # one that surely booked, however slowly a loaded machine starts it
                wait_for(lambda: cdr_count(app) > 0, "the first worker's first booking")
            time.sleep(rnd.uniform(0.3, 1.2))  # anywhere: reading, booking, settling
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
    finally:
        producing.clear()
        producer.join()
    assert kills == 6 and cdr_count(app) > 0  # it booked between the kills
    last = worker(app, "--once")
    assert last.wait(timeout=60) == 0, last.stderr.read()
    all_booked(app, len(committed))


def test_the_worker_waits_out_redis_going_away(books_app, private_redis):
    app = books_app
    proc = worker(app)
    try:
        calls_ended(app, 20)
        wait_for(lambda: cdr_count(app) == 20, "the first calls booked")
        private_redis.kill()
        time.sleep(1.5)
        assert proc.poll() is None  # still there, waiting
        private_redis.start()  # with its append-only file: nothing acknowledged is lost
        calls_ended(app, 20, 20)
        wait_for(lambda: cdr_count(app) == 40 and pending(app) == 0,
                 "the calls after the outage booked")
    finally:
        stop(proc)
    all_booked(app, 40)


def test_the_worker_waits_out_the_database_going_away(books_app):
    app = books_app
    url = urlsplit(app.settings.database_url)
    if not url.scheme.startswith("postgresql"):
        pytest.skip("needs a database server to cut off (CALLGUARD_TEST_DATABASE_URL)")
    proxy = Proxy((url.hostname, url.port or 5432))
    via_proxy = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    proc = worker(app, CALLGUARD_DATABASE_URL=via_proxy)
    try:
        calls_ended(app, 20)
        wait_for(lambda: cdr_count(app) == 20, "the first calls booked")
        proxy.cut()  # the database stopped: connections gone, new ones refused
        calls_ended(app, 20, 20)
        time.sleep(2)
        assert proc.poll() is None and cdr_count(app) == 20
        proxy.heal()
        # Booked, and settled: a commit whose reply the cut lost is booked (exactly once)
        # and settled by the pass after the outage's backoff.
        wait_for(lambda: cdr_count(app) == 40 and pending(app) == 0,
                 "the calls booked and settled after the outage")
    finally:
        stop(proc)
        proxy.close()
    all_booked(app, 40)


def test_a_poisoned_entry_is_set_aside_and_the_others_are_booked(books_app, caplog):
    app = books_app
    service.create_account(app, "4155", opening_balance=50_000_000, kind="prepaid",
                           max_channels=0)
    [good] = calls_ended(app, 1)
    shard = shard_of(ACCT)
    stream = app.keys.events(shard)
    [(_, fields)] = app.redis.xrange(stream)
    poisons = [
        {"type": "commit", "session": "41441234567/x/1"},  # fields missing
        {**fields, "session": "nosuch/c9/9"},  # no such account in the books
        {**fields, "session": ACCT + "/" + "x" * 300 + "/1"},  # longer than any column
        {**fields, "session": f"{ACCT}/c8/8", "dst": "41\x00901"},  # NUL: PostgreSQL refuses
    ]
    other = app.engine.authorize("4155", "41901234567", "outbound", "c1", now_ms=T0)
    app.engine.commit(other.session, "16", now_ms=T0 + 1)
    [(other_id, _)] = app.redis.xrange(app.keys.events(shard_of("4155")))
    # Entry ids repeat across streams: a dead letter must not take another shard's entry
    # with it.
    app.redis.xadd(stream, poisons[0], id=other_id)
    for poison in poisons[1:]:
        app.redis.xadd(stream, poison)
    with caplog.at_level(logging.ERROR, logger="callguard.sync"):
        sync.drain(app, "w1")
    booked = {c.session for c in app.books.cdrs()}
    assert {good, other.session} <= booked
    dead = app.redis.xrange(app.keys.dead(shard))
    assert pending(app) == 0
    assert len(booked) + len(dead) == 2 + len(poisons)
    assert all(f.get("error") for _, f in dead)
    assert "dead letter" in caplog.text
    diffs = sync.reconcile(app)
    assert diffs and {d.field for d in diffs} >= {"dead letter"}
    # Mended or not, they can be put back in line; booking stays idempotent.
    assert sync.requeue_dead_letters(app) == len(dead)
    sync.drain(app, "w1")
    assert len(app.redis.xrange(app.keys.dead(shard))) == len(dead)


def cli_env(app: App) -> dict[str, str]:
    s = app.settings
    return {"CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
            "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix}


def test_a_topup_while_redis_is_down_is_booked_once_and_applied_once(books_app, private_redis):
    app = books_app
    runner = CliRunner()

    def callguard(*args):
        return runner.invoke(cli, list(args), env=cli_env(app), catch_exceptions=False)

    before = state.account_state(app.redis, app.keys, ACCT)["balance"]
    private_redis.kill()
    first = callguard("account", "topup", ACCT, "20.00")
    assert first.exit_code == 0 and first.stdout.startswith("booked topup of 20.00")
    assert "Redis will be updated when it is reachable" in first.stderr
    retried = callguard("account", "topup", ACCT, "5.00", "--ref", "BANK-7")
    again = callguard("account", "topup", ACCT, "5.00", "--ref", "BANK-7")
    assert retried.exit_code == again.exit_code == 0
    assert again.stdout.startswith("already booked as entry")
    with app.books.session() as db:
        assert db.scalar(select(func.count()).select_from(RedisOutbox)) == 2
    private_redis.start()
    applied = callguard("account", "topup", ACCT, "5.00", "--ref", "BANK-7")
    assert "applied to Redis now" in applied.stdout
    assert state.account_state(app.redis, app.keys, ACCT)["balance"] == before + 25_000_000
    # Once applied, nothing marks it any more, and nothing can apply it again: the books'
    # key is what recognises a retry, for ever.
    assert not list(app.redis.scan_iter(f"{app.keys.prefix}:*:mv:*"))
    assert "nothing changed" in callguard("account", "topup", ACCT, "5.00", "--ref",
                                          "BANK-7").stdout
    assert state.account_state(app.redis, app.keys, ACCT)["balance"] == before + 25_000_000
    assert sync.reconcile(app) == []


def test_a_block_while_redis_is_down_reaches_redis_through_the_worker(books_app, private_redis):
    app = books_app
    private_redis.kill()
    blocked = CliRunner().invoke(cli, ["account", "block", ACCT, "--reason", "fraud"],
                                 env=cli_env(app), catch_exceptions=False)
    assert blocked.exit_code == 0 and "its calls go on until Redis has it" in blocked.stdout
    private_redis.start()
    assert sync.reconcile(app)  # not yet in Redis: said so
    proc = worker(app, "--once")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert state.account_state(app.redis, app.keys, ACCT)["status"] == "blocked"
    d = app.engine.authorize(ACCT, "41901234567", "outbound", "late", now_ms=T0)
    assert d.reason == "BLOCKED"
    with app.books.session() as db:
        assert db.get(Account, ACCT).status == "blocked"
    assert sync.reconcile(app) == []


def test_an_account_redis_lost_does_not_hold_up_the_others(books_app):
    """Its top-up cannot be applied (rebuild will): it waits in the outbox, and the worker
    books and applies everything else."""
    app = books_app
    service.create_account(app, "4155", opening_balance=10_000_000, kind="prepaid")
    app.redis.delete(app.keys.account("4155"))  # evicted, or lost
    _, applied = service.move_money(app, "4155", "topup", 1_000_000, "lost-1")
    assert not applied.in_redis and "rebuild" in applied.error
    calls_ended(app, 3)
    service.move_money(app, ACCT, "topup", 2_000_000, "kept-1")
    proc = worker(app, "--once")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert cdr_count(app) == 3 and len(app.books.outbox()) == 1
    sync.rebuild(app)
    assert sync.reconcile(app) == []


def test_a_second_worker_with_the_same_node_is_refused(books_app):
    app = books_app
    first = worker(app, CALLGUARD_HTTP_BIND="off")  # the two would share a metrics port
    try:
        wait_for(lambda: app.redis.exists(app.keys.node("worker-t")), "the first worker's lease")
        second = worker(app, CALLGUARD_HTTP_BIND="off")
        assert second.wait(timeout=30) == 1
        message = second.stderr.read().strip().splitlines()
        assert len(message) == 1 and "node worker-t is in use by pid" in message[0]
        assert first.poll() is None
    finally:
        stop(first)
    # SIGKILLed: the next start on this host takes the identity over at once.
    restarted = worker(app, "--once")
    assert restarted.wait(timeout=30) == 0, restarted.stderr.read()


def test_entries_taken_before_an_outage_are_read_again_by_the_same_worker(books_app,
                                                                         monkeypatch):
    """The database fails half way through a pass: what the worker took stays pending under
    its name, and its next pass (not only its next start) books it."""
    app = books_app
    calls_ended(app, 3)
    record, failures = app.books.record_calls, []

    def flaky(cdrs, then=None):
        if not failures:
            failures.append(len(cdrs))
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed"))
        return record(cdrs, then)

    monkeypatch.setattr(app.books, "record_calls", flaky)
    drain = sync.Drain(app, "w1")
    with pytest.raises(sqlalchemy.exc.OperationalError):
        drain.run_once()
    assert drain.run_once() == 3
    all_booked(app, 3)
