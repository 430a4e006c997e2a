"""Secrets from files and systemd credentials: every secret setting can be read from
CALLGUARD_<NAME>_FILE or $CREDENTIALS_DIRECTORY/<name>; a secret on the command line is
warned about; none shows in `serve`'s argv, environment, log, --help, metrics or errors
(a real `serve asterisk` process on a Redis that wants a password and the AMI double)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from callguard import config
from callguard.api import tokens
from callguard.api.server import configure
from callguard.books.database import make_engine, upgrade
from callguard.cli import cli
from callguard.config import SECRETS, ConfigError, load_settings
from callguard.service import App
from callguard.simulator.asterisk import SimulatedAsterisk

from asterisk_rig import run, until
from servers import RedisServer, free_port


def example(secret: str) -> dict[str, str]:
    """A valid value of every secret setting, each holding `secret`."""
    return {
        "redis_url": f"redis://:{secret}@127.0.0.1:6390/0",
        "database_url": f"postgresql+psycopg://callguard:{secret}@127.0.0.1/callguard",
        "ami_url": f"ami://callguard:{secret}@127.0.0.1:5038",
        "esl_url": f"esl://:{secret}@127.0.0.1:8021",
        "smtp_url": f"smtps://callguard:{secret}@mail.example.net:465",
        "webhook_url": f"https://hooks.example.net/callguard/{secret}",
        "webhook_secret": secret,
        "payment_url": f"https://callguard:{secret}@pay.example.net/charge",
        "api_token_pepper": f"pepper-{secret}-0123456789abcdef0123456789",
    }


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(config, "_WARNED", set())


# -- where a secret comes from ----------------------------------------------------------


def test_every_secret_setting_reads_a_file_or_a_systemd_credential(tmp_path):
    values = example("s3cret")
    assert set(values) == set(SECRETS)
    files = {f"CALLGUARD_{name.upper()}_FILE": write(tmp_path / name, value + "\n")
             for name, value in values.items()}
    from_files = load_settings(env={"HOME": str(tmp_path), **files})
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, value in values.items():
        write(credentials / name, value, 0o400)  # as systemd leaves them: no newline
    from_credentials = load_settings(env={"HOME": str(tmp_path),
                                          "CREDENTIALS_DIRECTORY": str(credentials)})
    for name, value in values.items():
        assert getattr(from_files, name) == getattr(from_credentials, name) == value, name
    assert "s3cret" not in repr(from_files)  # a log line or a traceback shows none
    # The option still beats them all (defaults < TOML < environment < options).
    assert load_settings(env=files, redis_url="redis://cli:6379").redis_url == \
        "redis://cli:6379"


def test_one_trailing_newline_goes_and_nothing_else(tmp_path):
    def pepper(text: str) -> str:
        path = write(tmp_path / "pepper", text)
        return load_settings(env={"CALLGUARD_API_TOKEN_PEPPER_FILE": path}).api_token_pepper

    key = "k" * 40
    assert pepper(key + "\n") == pepper(key + "\r\n") == pepper(key) == key
    assert pepper(f" {key} \n") == f" {key} "  # spaces may belong to a secret


@pytest.mark.parametrize("sources", [("env", "file"), ("file", "credential"),
                                     ("env", "credential")])
def test_a_secret_given_twice_is_refused_naming_both_sources_never_the_value(
        tmp_path, sources):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    given = {
        "env": {"CALLGUARD_AMI_URL": "ami://cg:from-env-secret@pbx:5038"},
        "file": {"CALLGUARD_AMI_URL_FILE": write(tmp_path / "ami",
                                                 "ami://cg:from-file-secret@pbx:5038")},
        "credential": {"CREDENTIALS_DIRECTORY": str(credentials)},
    }
    write(credentials / "ami_url", "ami://cg:from-credential-secret@pbx:5038")
    env = {k: v for source in sources for k, v in given[source].items()}
    with pytest.raises(ConfigError) as refused:
        load_settings(env=env)
    names = {"env": "CALLGUARD_AMI_URL", "file": "CALLGUARD_AMI_URL_FILE",
             "credential": "the systemd credential ami_url"}
    assert str(refused.value) == \
        f"{names[sources[0]]} and {names[sources[1]]} both set ami_url: keep one"


def test_a_secret_file_that_cannot_be_used_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "missing"
    empty = write(tmp_path / "empty", "\n")
    two = write(tmp_path / "two", "redis://:first-line-secret@a/0\nredis://b/0\n")
    for path, why in ((missing, "cannot read CALLGUARD_REDIS_URL_FILE ({}): No such file "
                                "or directory"),
                      (tmp_path, "cannot read CALLGUARD_REDIS_URL_FILE ({}): Is a directory"),
                      (empty, "CALLGUARD_REDIS_URL_FILE ({}) is empty"),
                      (two, "CALLGUARD_REDIS_URL_FILE ({}) holds more than one line")):
        with pytest.raises(ConfigError) as refused:
            load_settings(env={"CALLGUARD_REDIS_URL_FILE": str(path)})
        assert str(refused.value) == why.format(path)
    # The CLI: that line, exit 1, no traceback, not the content.
    out = CliRunner().invoke(cli, ["embedded", "status"],
                             env={"CALLGUARD_REDIS_URL_FILE": two})
    assert (out.exit_code, out.output) == (
        1, f"callguard: CALLGUARD_REDIS_URL_FILE ({two}) holds more than one line\n")


@pytest.mark.parametrize("name,url", [
    ("redis_url", "redis://:half/secret@127.0.0.1:6379/0"),
    ("ami_url", "ami://callguard:half#secret@127.0.0.1:5038"),
    ("esl_url", "esl://:half?secret@127.0.0.1:8021"),
])
def test_a_url_whose_password_breaks_it_is_refused_without_quoting_it(name, url):
    """Its client would say "Port could not be cast to integer value as 'half'"."""
    var = f"CALLGUARD_{name.upper()}"
    out = CliRunner().invoke(cli, ["embedded", "status"], env={var: url})
    assert (out.exit_code, out.output) == (1, (
        f"callguard: {var} is not a valid URL (in a password, write / # ? @ % as "
        "%2F %23 %3F %40 %25)\n"))


def test_a_secret_file_others_can_read_is_used_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="callguard")

    def load(mode: int, owner: int = 0) -> list[str]:
        path = write(tmp_path / f"webhook-{mode:o}-{owner}", "whsec-abc", mode)
        os.chown(path, owner, -1)
        caplog.clear()
        for _ in range(2):  # each CLI command loads its settings once; twice: one warning
            assert load_settings(env={"CALLGUARD_WEBHOOK_SECRET_FILE": path}
                                 ).webhook_secret == "whsec-abc"
        return [r.getMessage() for r in caplog.records]

    if os.geteuid() != 0:
        pytest.skip("needs root: files of another owner")
    exposed = load(0o644)
    assert exposed == [f"CALLGUARD_WEBHOOK_SECRET_FILE ({tmp_path}/webhook-644-0) holds a "
                       "secret and other users can read it (mode 0644): chmod 0600 it, or "
                       "0640 owned by root"]
    assert load(0o600) == load(0o400) == []
    assert load(0o640) == []  # root's, for the group (e.g. callguard) to read
    assert len(load(0o640, owner=65534)) == 1  # another user's: the group is not ours


def test_a_config_file_with_a_secret_that_others_can_read_is_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="callguard")
    plain = write(tmp_path / "plain.toml", "quota_seconds = 30\n", 0o644)
    secret = write(tmp_path / "secret.toml", 'webhook_secret = "whsec-abc"\n', 0o644)
    load_settings(plain, env={})
    assert caplog.records == []
    load_settings(secret, env={})
    assert [r.getMessage() for r in caplog.records] == [
        f"config file {secret} holds a secret and other users can read it "
        "(mode 0644): chmod 0600 it, or 0640 owned by root"]


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize("args,warned", [
    (["--redis-url", "redis://:pw-on-the-cli@127.0.0.1:1/0"], "--redis-url"),
    (["--redis-url", "unix:///run/redis.sock?password=pw-on-the-cli"], "--redis-url"),
    (["--database-url", "postgresql://cg:pw-on-the-cli@db/cg", "--redis-url",
      "redis://127.0.0.1:1/0"], "--database-url"),
    (["--redis-url", "redis://127.0.0.1:1/0", "--database-url", "sqlite:////tmp/x.db"], None),
])
def test_a_secret_on_the_command_line_is_warned_about(tmp_path, caplog, args, warned):
    caplog.set_level(logging.WARNING, logger="callguard")
    out = CliRunner().invoke(cli, [*args, "embedded", "status"],
                             env={"CALLGUARD_HOME": str(tmp_path)}, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = [r.getMessage() for r in caplog.records]
    if warned is None:
        assert lines == []
    else:
        name = "CALLGUARD_" + warned[2:].replace("-", "_").upper()
        assert lines == [f"{warned} is visible to other users in ps; use {name}_FILE or a "
                         "systemd credential"]
    assert "pw-on-the-cli" not in out.output + "".join(lines)


def test_the_embedded_redis_is_started_without_the_secrets(tmp_path, monkeypatch):
    """The real redis-server, started through a wrapper that writes down the environment
    it was given (redis-server itself overwrites its /proc/PID/environ for its title)."""
    from callguard.engine import connect

    real = connect.redis_binary()
    seen = tmp_path / "environment"
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(f"#!/bin/sh\nenv > {seen}\nexec {real} \"$@\"\n")
    wrapper.chmod(0o700)
    monkeypatch.setattr(connect, "redis_binary", lambda: str(wrapper))
    for name, value in example("inherited").items():
        monkeypatch.setenv(f"CALLGUARD_{name.upper()}", value)
    monkeypatch.setenv("CALLGUARD_REDIS_URL_FILE", "/run/credentials/redis_url")
    home = tmp_path / "home"
    connect.ensure_embedded(home)
    connect.stop_embedded(home)
    given = seen.read_text()
    assert "inherited" not in given
    assert "CALLGUARD_REDIS_URL_FILE=/run/credentials/redis_url" in given  # only secrets go


# -- the API token pepper ---------------------------------------------------------------


def test_the_pepper_keys_token_digests_and_old_tokens_must_be_made_again(app, caplog):
    caplog.set_level(logging.WARNING, logger="callguard")
    pepper = example("x")["api_token_pepper"]
    _, plain = tokens.create(app.books, "old", "read")
    _, peppered = tokens.create(app.books, "new", "read", pepper=pepper)
    assert tokens.digest(peppered, pepper) != tokens.digest(peppered)
    with_pepper = tokens.Verifier(app.books, pepper=pepper)
    assert with_pepper(peppered).name == "new"
    assert tokens.Verifier(app.books)(peppered) is None  # the pepper is needed
    assert tokens.Verifier(app.books, pepper=pepper[::-1])(peppered) is None
    # Made before the pepper: refused (a plain digest written into the table would
    # otherwise open the API without the pepper), and the log says what to do, once.
    assert with_pepper(plain) is None and with_pepper(plain) is None
    assert [r.getMessage() for r in caplog.records] == [
        "API token old was made without the API token pepper: refused; revoke it and make "
        "it again"]
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_settings(env={"CALLGUARD_API_TOKEN_PEPPER": "short"})


def test_a_token_the_cli_makes_with_the_pepper_opens_the_api_that_has_it(app, tmp_path):
    pepper_file = write(tmp_path / "pepper", example("y")["api_token_pepper"] + "\n")
    env = {"CALLGUARD_HOME": str(app.settings.home), "CALLGUARD_REDIS_URL":
           app.settings.redis_url, "CALLGUARD_DATABASE_URL": app.settings.database_url,
           "CALLGUARD_KEY_PREFIX": app.settings.key_prefix,
           "CALLGUARD_API_TOKEN_PEPPER_FILE": pepper_file}
    made = CliRunner().invoke(cli, ["api", "token", "create", "--scope", "read", "--name",
                                    "ops"], env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    with_pepper = App(load_settings(env=env))
    without = App(load_settings(env={**env, "CALLGUARD_API_TOKEN_PEPPER_FILE": ""}))
    assert [_get_accounts(a, token) for a in (with_pepper, without)] == [200, 401]


def _get_accounts(app: App, token: str) -> int:
    server = configure(app, f"127.0.0.1:{free_port()}")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.02)
        return httpx.get(f"http://127.0.0.1:{server.config.port}/v1/accounts",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code
    finally:
        server.should_exit = True
        thread.join(10)


# -- a real `serve asterisk` ------------------------------------------------------------


class Secrets:
    """This test's secrets, each a random string that cannot turn up by chance, in every
    setting that takes one; the Redis password and AMI secret are the servers'."""

    def __init__(self, database_url: str):
        self.redis, self.ami = _random("redis"), _random("ami")
        self.other = _random("other")
        self.values = example(self.other)  # the Redis and AMI URLs: the servers' own
        del self.values["redis_url"], self.values["ami_url"]
        url = make_url(database_url)
        self.database = None
        if url.get_backend_name() != "sqlite":  # PostgreSQL here trusts, whatever password
            self.database = _random("db")
            database_url = url.set(password=self.database).render_as_string(
                hide_password=False)
        self.values["database_url"] = database_url

    def all(self) -> list[str]:
        return [s for s in (self.redis, self.ami, self.other, self.database) if s]


def _random(what: str) -> str:
    return f"{what}-{secrets.token_hex(8)}"


class Serve:
    """`callguard -vv serve asterisk` with its settings in files (or credentials), its
    stderr in a file."""

    def __init__(self, tmp: Path, values: dict[str, str], credentials: bool):
        self.tmp, self.agi, self.http = tmp, free_port(), free_port()
        secret_dir = tmp / "secrets"
        secret_dir.mkdir(mode=0o700, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("CALLGUARD_") and k != "CREDENTIALS_DIRECTORY"}
        self.env.update(CALLGUARD_HOME=str(tmp / "home"), CALLGUARD_NODE="node-s",
                        CALLGUARD_AGI_BIND=f"127.0.0.1:{self.agi}",
                        CALLGUARD_HTTP_BIND=f"127.0.0.1:{self.http}")
        for name, value in values.items():
            path = write(secret_dir / name, value + "\n", 0o400)
            if not credentials:
                self.env[f"CALLGUARD_{name.upper()}_FILE"] = path
        if credentials:
            self.env["CREDENTIALS_DIRECTORY"] = str(secret_dir)
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "callguard", "-vv", "serve",
                                          "asterisk"], env=self.env, stderr=err,
                                         stdout=subprocess.DEVNULL)
        return self

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def proc_file(self, name: str) -> str:
        return Path(f"/proc/{self.proc.pid}/{name}").read_bytes().decode(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        reply = httpx.get(f"http://127.0.0.1:{self.http}{path}", timeout=10)
        return reply.status_code, reply.text

    def answers(self, path: str, status: int) -> bool:
        try:
            return self.get(path)[0] == status
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def help(self) -> str:
        """--help in this process (a process of its own would cost seconds for the same
        text) with the same environment."""
        out = [CliRunner().invoke(cli, [*args, "--help"], env=self.env)
               for args in ([], ["serve"], ["serve", "asterisk"])]
        assert all(o.exit_code == 0 for o in out)
        return "".join(o.output for o in out)


def _shown(secret_list: list[str], **places: str) -> list[str]:
    return [f"{s} in {where}" for s in secret_list for where, text in places.items()
            if s in text]


@pytest.fixture
def books(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    return database_url


@pytest.mark.parametrize("credentials", [False, True], ids=["files", "credentials"])
def test_serve_shows_no_secret_it_reads_from_files(books, tmp_path, credentials):
    s = Secrets(books)
    redis = RedisServer(tmp_path / "redis", password=s.redis).start()

    async def scenario():
        sim = SimulatedAsterisk(agi_port=0, secret=s.ami)
        await sim.start()
        values = {**s.values, "redis_url": redis.url, "ami_url": sim.ami_url}
        serve = Serve(tmp_path, values, credentials).start()
        try:
            await until(lambda: serve.answers("/readyz", 200), "serve ready: Redis (with "
                        "its password) and AMI (with its secret)", timeout=30,
                        diagnose=serve.logged)
            seen = {"argv": serve.proc_file("cmdline"), "environ": serve.proc_file("environ"),
                    "/metrics": serve.get("/metrics")[1], "/readyz": serve.get("/readyz")[1],
                    "--help": serve.help()}
        finally:
            status = serve.stop()
            await sim.stop()
        seen["log"] = serve.logged()
        return status, seen, [a for a in sim.actions if a["Action"] == "Login"]

    try:
        status, seen, logins = run(scenario())
    finally:
        redis.kill()
    assert status == 0, seen["log"]
    assert logins and all(a["Secret"] == s.ami for a in logins)
    assert "callguard_pbx_link_up" in seen["/metrics"] and "stopped;" in seen["log"]
    assert _shown(s.all(), **seen) == []


def test_a_wrong_secret_is_reported_without_showing_it(books, tmp_path):
    s = Secrets(books)
    redis = RedisServer(tmp_path / "redis", password=s.redis).start()
    wrong_redis, wrong_ami = _random("wrong-redis"), _random("wrong-ami")

    async def scenario():
        sim = SimulatedAsterisk(agi_port=0, secret=s.ami)
        await sim.start()
        values = {**s.values, "redis_url": redis.url.replace(s.redis, wrong_redis),
                  "ami_url": sim.ami_url.replace(s.ami, wrong_ami)}
        serve = Serve(tmp_path, values, credentials=False).start()
        try:
            await until(lambda: "login refused" in serve.logged() and serve.answers(
                "/readyz", 503), "serve refused by Redis and by AMI", timeout=30,
                diagnose=serve.logged)
            seen = {"/readyz": serve.get("/readyz")[1], "/metrics": serve.get("/metrics")[1]}
        finally:
            serve.stop()
            await sim.stop()
        seen["log"] = serve.logged()
        return seen

    try:
        seen = run(scenario())
    finally:
        redis.kill()
    log = seen["log"]
    # Both refusals are there for the operator, with where (host:port), not what.
    assert "Redis not reachable at start (invalid username-password pair" in log, log
    assert "AMI 127.0.0.1:" in log and "login refused: Authentication failed" in log
    assert "invalid username-password pair" in seen["/readyz"]
    assert _shown([*s.all(), wrong_redis, wrong_ami], **seen) == []
    assert "Traceback" not in log
