"""State that stays put: the default state directory (XDG, whatever the current
directory), and the embedded Redis's lifetime with real processes: the real CLI in
subprocesses, a real `callguard worker`, real redis-server processes looked at with
`ps` and through their socket. Every server a test starts is stopped by its fixture."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import func, select

from callguard.books.models import Cdr
from callguard.cli import cli
from callguard.config import load_settings
from callguard.engine.connect import socket_address, socket_path, stop_embedded
from callguard.service import App

from engine_helpers import T0, setup_plan

ACCT = "41441234567"

# A one-shot callguard process that stays in the middle of its work until told: what a
# CLI command is (the CLI's root group makes this very App), held open as long as the
# test needs. Reads a line, leaves (App.close, as the CLI does), says so.
HOLDER = """
import sys
from callguard.config import load_settings
from callguard.service import App
app = App(load_settings(), one_shot=True)
app.redis.ping()
print("joined", flush=True)
sys.stdin.readline()
app.close()
print("left", flush=True)
"""


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
    return {**env, **extra}


def callguard(env, *args, cwd=None) -> subprocess.CompletedProcess:
    """A one-shot command: the real CLI in this process (its locks are its own open files,
    so to the others it is one more process, at a fraction of a subprocess's cost), or in
    a subprocess where it must run in another directory."""
    if cwd is not None:
        return subprocess.run([sys.executable, "-m", "callguard", *args], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=120)
    unset = {k: None for k in os.environ if k not in env}
    done = CliRunner().invoke(cli, list(args), env={**unset, **env})
    return subprocess.CompletedProcess(args, done.exit_code, done.stdout, done.stderr)


def ok(env, *args, cwd=None) -> subprocess.CompletedProcess:
    done = callguard(env, *args, cwd=cwd)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def started_pids(home: Path) -> list[int]:
    """Every redis-server ever started for `home`: its log names each one's pid."""
    log = home / "redis.log"
    text = log.read_text() if log.exists() else ""
    return sorted({int(pid) for pid in re.findall(r"^(\d+):M ", text, re.M)})


def running(pid: int) -> bool:
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                          text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")  # a zombie has exited


def live_servers(home: Path) -> list[int]:
    return [pid for pid in started_pids(home) if running(pid)]


def answers(home: Path) -> bool:
    try:
        return redis.Redis(unix_socket_path=socket_address(home), socket_timeout=5,
                           retry=Retry(NoBackoff(), 0)).ping()  # no answer is the answer
    except (redis.ConnectionError, FileNotFoundError):
        return False


def status(env) -> dict:
    return json.loads(ok(env, "embedded", "status", "--json").stdout)


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def homes():
    """The state directories a test uses: whatever server runs there at the end, stopped
    (also when the test failed)."""
    used: list[Path] = []
    yield used.append
    for home in used:
        stop_embedded(home)
        for pid in live_servers(home):  # one the socket no longer reaches
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs():
    """Processes a test started: terminated at the end, before the servers are stopped."""
    started: list[subprocess.Popen] = []
    yield started.append
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def home(tmp_path, homes, procs):  # procs after homes: processes go first
    path = tmp_path / "state"
    homes(path)
    return path


def worker(env, procs) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "callguard", "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs(proc)
    return proc


def holder(env, procs) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    procs(proc)
    assert proc.stdout.readline().strip() == "joined"
    return proc


def leave(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "left"
    assert proc.wait(timeout=60) == 0


def test_one_shot_commands_leave_no_server_behind(home):
    env = clean_env(CALLGUARD_HOME=str(home))
    ok(env, "db", "upgrade")
    for args in (["account", "create", ACCT, "--prepaid", "--balance", "5"],
                 ["account", "topup", ACCT, "1", "--ref", "t1"],
                 ["account", "show", ACCT, "--json"]):
        ok(env, *args)
        assert started_pids(home)  # it did start one
        assert live_servers(home) == [] and not answers(home), args
    assert status(env)["running"] is False


def test_a_balance_survives_a_stop_and_start(home):
    """Each command starts the server from the append-only file and stops it, flushed."""
    env = clean_env(CALLGUARD_HOME=str(home))
    ok(env, "db", "upgrade")
    ok(env, "account", "create", ACCT, "--prepaid", "--balance", "5")
    ok(env, "account", "topup", ACCT, "2.50", "--ref", "t1")
    assert len(started_pids(home)) == 2 and not live_servers(home)
    shown = json.loads(ok(env, "account", "show", ACCT, "--json").stdout)
    assert (shown["balance"], shown["available"]) == ("7.500000", "7.500000")
    assert not live_servers(home)
    ok(env, "embedded", "stop")  # a no-op now, and says so
    ok(env, "reconcile")  # Redis (started again from its file) agrees with the books


def test_a_worker_keeps_the_server_and_cli_commands_do_not_stop_it(home, procs):
    env = clean_env(CALLGUARD_HOME=str(home))
    ok(env, "db", "upgrade")
    running_worker = worker(env, procs)
    wait_for(lambda: status(env)["long_running_users"] == 1, "the worker to join")
    [pid] = live_servers(home)
    for args in (["account", "create", ACCT, "--prepaid", "--balance", "50"],
                 ["account", "topup", ACCT, "1", "--ref", "t1"],
                 ["account", "show", ACCT], ["calls", "list"], ["reconcile"]):
        ok(env, *args)
        assert live_servers(home) == [pid] and answers(home), args
    # The worker still works: a call ended in Redis is booked into SQL by it.
    app = App(load_settings(env={"CALLGUARD_HOME": str(home),
                                 "CALLGUARD_REDIS_URL": f"unix://{socket_path(home)}"}))
    try:
        setup_plan(app)
        d = app.engine.authorize(ACCT, "41901234567", "outbound", "c1", now_ms=T0)
        app.engine.answer(d.session, now_ms=T0)
        app.engine.commit(d.session, "16", now_ms=T0 + 10_000)

        def booked():
            with app.books.session() as db:
                return db.scalar(select(func.count()).select_from(Cdr)) == 1

        wait_for(booked, "the worker to book the call")
    finally:
        app.close()
    assert running_worker.poll() is None
    assert json.loads(ok(env, "cdr", "list", "--json").stdout)[0]["cost"] == "0.500000"
    st = status(env)
    assert (st["running"], st["pid"], st["users"], st["long_running_users"]) == \
        (True, pid, 1, 1)
    refused = callguard(env, "embedded", "stop")
    assert refused.returncode == 1 and answers(home)
    assert refused.stderr.splitlines() == [
        f"callguard: the embedded Redis is in use by a long-running process (pid "
        f"{running_worker.pid}): stop `serve`/`worker` first, or use --force"]
    forced = ok(env, "embedded", "stop", "--force")
    assert "stopped" in forced.stdout and live_servers(home) == [] and not answers(home)


def test_the_last_of_two_one_shot_users_stops_it(home, procs):
    """The one that started it leaves first: the server stays for the other, which
    stops it when it leaves, though it did not start it."""
    env = clean_env(CALLGUARD_HOME=str(home))
    first = holder(env, procs)
    [pid] = live_servers(home)
    second = holder(env, procs)
    assert status(env)["users"] == 2
    refused = callguard(env, "embedded", "stop")  # not under a command at work
    assert refused.returncode == 1 and "in use by a command under way" in refused.stderr
    leave(first)
    assert live_servers(home) == [pid] and answers(home)
    leave(second)
    assert live_servers(home) == [] and not answers(home)


def test_a_long_running_user_keeps_a_server_a_one_shot_command_started(home, procs):
    """It stays up after the worker too (a restarted serve finds its state), until
    `embedded stop`; stopping keeps the data."""
    env = clean_env(CALLGUARD_HOME=str(home))
    ok(env, "db", "upgrade")
    command = holder(env, procs)
    [pid] = live_servers(home)
    assert status(env)["stops_with_last_command"] is True
    running_worker = worker(env, procs)
    wait_for(lambda: status(env)["long_running_users"] == 1, "the worker to join")
    leave(command)
    assert live_servers(home) == [pid]
    running_worker.send_signal(signal.SIGTERM)
    assert running_worker.wait(timeout=60) == 0
    ok(env, "account", "create", ACCT, "--prepaid", "--balance", "5")
    st = status(env)
    assert (st["running"], st["pid"], st["users"], st["stops_with_last_command"]) == \
        (True, pid, 0, False)
    assert live_servers(home) == [pid]
    stopped = ok(env, "embedded", "stop")
    assert stopped.stdout.strip() == f"embedded Redis stopped; its data is kept in {home}"
    assert live_servers(home) == [] and status(env)["running"] is False
    shown = json.loads(ok(env, "account", "show", ACCT, "--json").stdout)
    assert shown["available"] == "5.000000"


def test_status_and_stop_say_no_embedded_redis_is_used_with_a_url(home):
    # Nothing listens there: neither command may try it, nor start anything.
    env = clean_env(CALLGUARD_HOME=str(home), CALLGUARD_REDIS_URL="redis://127.0.0.1:9/0")
    line = "no embedded Redis is in use: CALLGUARD_REDIS_URL (or --redis-url) is set"
    assert ok(env, "embedded", "status").stdout.strip() == line
    assert status(env) == {"embedded": False}
    stop = callguard(env, "embedded", "stop")
    assert (stop.returncode, stop.stdout, stop.stderr) == (
        1, "", f"callguard: {line}: nothing to stop\n")
    assert not home.exists()


def test_the_default_home_is_the_same_from_any_directory(tmp_path, homes):
    xdg, user = tmp_path / "xdg", tmp_path / "user"
    homes(xdg / "callguard")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    env = clean_env(XDG_DATA_HOME=str(xdg), HOME=str(user))
    ok(env, "db", "upgrade", cwd=one)
    ok(env, "account", "create", ACCT, "--prepaid", "--balance", "5", cwd=one)
    shown = ok(env, "account", "show", ACCT, "--json", cwd=two)
    assert json.loads(shown.stdout)["balance"] == "5.000000" and shown.stderr == ""
    assert (xdg / "callguard" / "callguard.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "xdg"]
    assert list(one.iterdir()) == list(two.iterdir()) == []
    # XDG_DATA_HOME unset (or relative: the spec says ignore it): ~/.local/share.
    for base in ({}, {"XDG_DATA_HOME": "relative"}):
        assert load_settings(env={"HOME": str(user), **base}).home == \
            user / ".local" / "share" / "callguard"
    # A home given as a relative path is made absolute once, when loaded.
    assert load_settings(env={"CALLGUARD_HOME": "here"}).home == Path("here").resolve()


def test_old_books_in_the_cwd_are_never_replaced_by_new_empty_ones(tmp_path, homes):
    """Books in ./.callguard (the old default) and none in the new one: refused, with what
    to do; nothing is created anywhere. Kept as it says: the old books, no word. Books in
    both: the new default, and a warning naming the old."""
    xdg, old = tmp_path / "xdg", tmp_path / "site" / ".callguard"
    new = xdg / "callguard"
    homes(new)
    homes(old)
    old.mkdir(parents=True, mode=0o700)
    (old / "callguard.db").write_bytes(b"")  # an install from before
    env = clean_env(XDG_DATA_HOME=str(xdg), HOME=str(tmp_path / "user"))
    refused = callguard(env, "db", "upgrade", cwd=old.parent)
    assert refused.returncode == 1 and refused.stderr.splitlines() == [
        f"callguard: ./.callguard ({old}) holds books of the old default state directory "
        f"and {new} holds none: set CALLGUARD_HOME=./.callguard to keep using it, or move "
        f"it to {new}"]
    assert not new.exists() and [p.name for p in old.iterdir()] == ["callguard.db"]
    kept = ok({**env, "CALLGUARD_HOME": "./.callguard"}, "db", "upgrade", cwd=old.parent)
    assert kept.stderr == "" and (old / "callguard.db").stat().st_size > 0
    new.mkdir(parents=True)
    (new / "callguard.db").write_bytes(b"")  # moved, and an old copy left behind
    both = ok(env, "db", "upgrade", cwd=old.parent)
    assert "ignoring ./.callguard" in both.stderr and (new / "callguard.db").stat().st_size



def test_the_state_directory_is_for_its_user_only(home):
    """Balances, addresses and payment tokens: the directory 0700, the books and the AOF
    0600, whatever the umask."""
    env = clean_env(CALLGUARD_HOME=str(home))
    old = os.umask(0o022)
    try:
        ok(env, "db", "upgrade")
        ok(env, "account", "create", ACCT, "--prepaid", "--balance", "5")
    finally:
        os.umask(old)
    assert home.stat().st_mode & 0o777 == 0o700
    for name in ("callguard.db", "appendonly.aof"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name


def test_a_serve_that_cannot_start_leaves_no_server_behind(home):
    """serve joins as a one-shot command would until it serves: its FastAGI port taken, it
    exits, and the server it had to start goes with it."""
    import socket as sockets

    env = clean_env(CALLGUARD_HOME=str(home))
    ok(env, "db", "upgrade")
    with sockets.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failed = subprocess.run(
            [sys.executable, "-m", "callguard", "serve", "asterisk"], capture_output=True,
            text=True, timeout=60, env={**env, "CALLGUARD_HTTP_BIND": "off",
                                        "CALLGUARD_AGI_BIND":
                                        f"127.0.0.1:{taken.getsockname()[1]}"})
    assert failed.returncode == 1 and "cannot listen for FastAGI" in failed.stderr
    assert started_pids(home) and live_servers(home) == [] and not answers(home)


@pytest.mark.parametrize("kind", ["foreign-owned", "world-writable"])
def test_a_state_directory_another_user_controls_is_refused(tmp_path, homes, kind):
    """Before anything there is opened or started: a Redis another user planted on the
    socket path gets no connection, no books are created. One line says what to do."""
    import socket as sockets

    home = tmp_path / kind
    homes(home)
    home.mkdir(mode=0o700)
    planted = sockets.socket(sockets.AF_UNIX)
    planted.bind(str(home / "redis.sock"))  # a fake Redis, listening
    planted.listen()
    planted.setblocking(False)
    if kind == "foreign-owned":
        os.chown(home, 65534, 65534)  # nobody's
        why = f"the state directory {home} belongs to nobody (uid 65534), not to this user"
    else:
        os.chmod(home, 0o1777)  # as /tmp is
        why = f"the state directory {home} is writable by other users (mode 1777)"
    env = clean_env(CALLGUARD_HOME=str(home))
    try:
        for args in (["db", "upgrade"], ["account", "show", ACCT], ["embedded", "status"],
                     ["embedded", "stop"]):
            refused = callguard(env, *args)
            assert refused.returncode == 1, args
            [line] = refused.stderr.splitlines()
            assert line.startswith(f"callguard: {why}"), (args, line)
            with pytest.raises(BlockingIOError):
                planted.accept()  # nobody called
        assert [p.name for p in home.iterdir()] == ["redis.sock"] and not started_pids(home)
    finally:
        planted.close()
        os.chown(home, os.geteuid(), os.getegid())
        os.chmod(home, 0o700)


def test_a_state_directory_reached_through_another_users_link_is_refused(tmp_path):
    """In a directory everyone may write in (/tmp without fs.protected_symlinks), another
    user plants the state directory's path as a link to a directory of ours (/etc, say):
    nothing is written there, nor is it made 0700."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = tmp_path / "etc"
    target.mkdir()
    os.chmod(target, 0o755)
    home = shared / "callguard"
    home.symlink_to(target)
    os.chown(home, 65534, 65534, follow_symlinks=False)  # nobody's link
    refused = callguard(clean_env(CALLGUARD_HOME=str(home)), "db", "upgrade")
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"callguard: the state directory {home} is reached through the symbolic link "
        f"{home}, which nobody (uid 65534) made: set CALLGUARD_HOME to a directory of this "
        "user's"]
    assert list(target.iterdir()) == [] and target.stat().st_mode & 0o777 == 0o755


def test_an_own_state_directory_others_may_read_is_made_private(tmp_path, homes):
    home = tmp_path / "state"
    homes(home)
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # whatever the umask
    done = ok(clean_env(CALLGUARD_HOME=str(home)), "db", "upgrade", cwd=tmp_path)
    assert home.stat().st_mode & 0o777 == 0o700
    assert f"the state directory {home} was readable by other users (mode 0755): made it " \
        "0700" in done.stderr


def test_a_state_directory_too_long_for_a_socket_path_keeps_the_socket(tmp_path, homes,
                                                                        procs):
    """AF_UNIX paths end at 108 bytes: the socket stays in the state directory, reached
    through an open descriptor of it, never in a shared directory such as /tmp."""
    home = tmp_path / ("long" * 25) / "state"
    homes(home)
    assert len(str(home / "redis.sock")) > 108
    in_tmp = set(Path("/tmp").glob("callguard-*.sock"))
    env = clean_env(CALLGUARD_HOME=str(home))
    command = holder(env, procs)
    assert (home / "redis.sock").is_socket() and answers(home)
    st = status(env)
    assert (st["running"], st["socket"], st["users"]) == (True, str(home / "redis.sock"), 1)
    assert set(Path("/tmp").glob("callguard-*.sock")) == in_tmp
    leave(command)
    assert live_servers(home) == [] and not (home / "redis.sock").exists()
