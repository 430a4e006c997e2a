"""Settings: built-in defaults < TOML file < environment < command-line options."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from callguard.cli import cli
from callguard.config import ConfigError, Settings, load_settings, split_hostport


def toml(tmp_path, text: str, name: str = "callguard.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults(tmp_path):
    s = load_settings(env={"HOME": str(tmp_path)})
    assert s.home == tmp_path / ".local" / "share" / "callguard"  # XDG_DATA_HOME's default
    assert (s.redis_url, s.database_url, s.ami_url, s.esl_url) == (None, None, None, None)
    assert (s.agi_bind, s.esl_bind, s.http_bind) == ("127.0.0.1:4573", "127.0.0.1:8084", None)
    assert (s.quota_seconds, s.failure_policy) == (60, "fail_closed")
    assert (s.smtp_url, s.mail_from, s.webhook_url, s.webhook_secret, s.payment_url) == \
        (None, None, None, None, None)
    assert s.key_prefix == "cg"
    assert s.sql_url == f"sqlite:///{s.home / 'callguard.db'}"


def test_sql_url_follows_home_unless_given(tmp_path):
    assert load_settings(env={"CALLGUARD_HOME": str(tmp_path)}).sql_url == \
        f"sqlite:///{tmp_path / 'callguard.db'}"
    assert load_settings(env={"CALLGUARD_HOME": str(tmp_path),
                              "CALLGUARD_DATABASE_URL": "postgresql://db/x"}).sql_url == \
        "postgresql://db/x"


def test_each_layer_beats_the_one_below(tmp_path):
    path = toml(tmp_path, 'quota_seconds = 30\nfailure_policy = "fail_open"\n'
                          'agi_bind = "0.0.0.0:4000"\nredis_url = "redis://toml:6379"\n'
                          'home = "/srv/toml"\n')
    # TOML over defaults
    s = load_settings(path, env={})
    assert (s.quota_seconds, s.failure_policy, s.agi_bind, s.redis_url, s.home) == \
        (30, "fail_open", "0.0.0.0:4000", "redis://toml:6379", Path("/srv/toml"))
    assert s.esl_bind == "127.0.0.1:8084"  # not in the file: still the default
    # environment over TOML
    env = {"CALLGUARD_QUOTA_SECONDS": "20", "CALLGUARD_REDIS_URL": "redis://env:6379",
           "CALLGUARD_HOME": "/srv/env"}
    s = load_settings(path, env=env)
    assert (s.quota_seconds, s.failure_policy, s.redis_url, s.home) == \
        (20, "fail_open", "redis://env:6379", Path("/srv/env"))
    # command-line options over the environment
    s = load_settings(path, env=env, quota_seconds=10, redis_url="redis://cli:6379",
                      home="/srv/cli", database_url=None)
    assert (s.quota_seconds, s.failure_policy, s.redis_url, s.home, s.agi_bind) == \
        (10, "fail_open", "redis://cli:6379", Path("/srv/cli"), "0.0.0.0:4000")
    assert s.database_url is None  # an option not given does not erase anything


def test_every_contract_variable_is_read_from_the_environment():
    env = {
        "CALLGUARD_REDIS_URL": "rediss://r:6380", "CALLGUARD_DATABASE_URL": "sqlite:///x.db",
        "CALLGUARD_HOME": "/var/lib/callguard", "CALLGUARD_AMI_URL": "ami://u:p@pbx:5038",
        "CALLGUARD_ESL_URL": "esl://:pw@fs:8021", "CALLGUARD_AGI_BIND": "0.0.0.0:4573",
        "CALLGUARD_ESL_BIND": "0.0.0.0:8084", "CALLGUARD_QUOTA_SECONDS": "120",
        "CALLGUARD_FAILURE_POLICY": "fail_open", "CALLGUARD_SMTP_URL": "smtps://m:465",
        "CALLGUARD_MAIL_FROM": "cg@example.com", "CALLGUARD_WEBHOOK_URL": "https://h/cg",
        "CALLGUARD_WEBHOOK_SECRET": "s3cret", "CALLGUARD_PAYMENT_URL": "https://pay/charge",
        "CALLGUARD_HTTP_BIND": "0.0.0.0:9000",
    }
    s = load_settings(env=env)
    assert (s.redis_url, s.database_url, s.home, s.ami_url, s.esl_url) == (
        "rediss://r:6380", "sqlite:///x.db", Path("/var/lib/callguard"), "ami://u:p@pbx:5038",
        "esl://:pw@fs:8021")
    assert (s.agi_bind, s.esl_bind, s.quota_seconds, s.failure_policy, s.http_bind) == (
        "0.0.0.0:4573", "0.0.0.0:8084", 120, "fail_open", "0.0.0.0:9000")
    assert (s.smtp_url, s.mail_from, s.webhook_url, s.webhook_secret, s.payment_url) == (
        "smtps://m:465", "cg@example.com", "https://h/cg", "s3cret", "https://pay/charge")


def test_empty_environment_variables_are_ignored(tmp_path):
    path = toml(tmp_path, "quota_seconds = 30\n")
    s = load_settings(path, env={"CALLGUARD_QUOTA_SECONDS": "", "CALLGUARD_REDIS_URL": ""})
    assert (s.quota_seconds, s.redis_url) == (30, None)


def test_config_file_from_the_environment_and_option_wins(tmp_path):
    from_env = toml(tmp_path, "quota_seconds = 45\n", "env.toml")
    from_option = toml(tmp_path, "quota_seconds = 15\n", "option.toml")
    assert load_settings(env={"CALLGUARD_CONFIG": from_env}).quota_seconds == 45
    assert load_settings(from_option, env={"CALLGUARD_CONFIG": from_env}).quota_seconds == 15


def test_callguard_table_and_lists(tmp_path):
    path = toml(tmp_path, '[callguard]\nquota_seconds = 90\nagi_allow = ["10.0.0.0/8"]\n')
    s = load_settings(path, env={})
    assert (s.quota_seconds, s.agi_allow) == (90, ("10.0.0.0/8",))
    s = load_settings(path, env={"CALLGUARD_AGI_ALLOW": "192.0.2.0/24, ::1/128"})
    assert s.agi_allow == ("192.0.2.0/24", "::1/128")


@pytest.mark.parametrize("text,words", [
    ("quota_secs = 30\n", ["unknown setting", "quota_secs"]),
    ('redis = "redis://x"\nbogus = 1\n', ["unknown setting", "bogus", "redis"]),
    ('[callguard]\nfailure = "fail_open"\n', ["unknown setting", "failure"]),
    ('failure_policy = "fail_sometimes"\n', ["failure policy", "fail_closed", "fail_open"]),
    ('failure_policy = "FAIL_OPEN"\n', ["failure policy"]),
    ("quota_seconds = 0\n", ["quota seconds"]),
    ("quota_seconds = 3601\n", ["quota seconds"]),
    ('quota_seconds = "sixty"\n', ["whole number"]),
    ("quota_seconds = 1.5\n", ["whole number"]),
    ("quota_seconds = true\n", ["whole number"]),
    ('agi_bind = "4573"\n', ["HOST:PORT"]),
    ('http_bind = "127.0.0.1:99999"\n', ["HOST:PORT"]),
    ("quota_seconds = \n", ["not valid TOML"]),
    ("this is not toml", ["not valid TOML"]),
])
def test_bad_files_are_refused(tmp_path, text, words):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    for word in words:
        assert word in str(info.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(env={"CALLGUARD_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize("env,overrides,word", [
    ({"CALLGUARD_FAILURE_POLICY": "fail_maybe"}, {}, "failure policy"),
    ({}, {"failure_policy": "deny"}, "failure policy"),
    ({"CALLGUARD_QUOTA_SECONDS": "1e2"}, {}, "whole number"),
    ({"CALLGUARD_QUOTA_SECONDS": "0"}, {}, "quota seconds"),
    ({"CALLGUARD_ESL_BIND": "localhost"}, {}, "HOST:PORT"),
])
def test_bad_values_from_any_layer_are_refused(env, overrides, word):
    with pytest.raises(ConfigError, match=word):
        load_settings(env=env, **overrides)


def test_a_higher_layer_can_repair_a_lower_one(tmp_path):
    path = toml(tmp_path, 'failure_policy = "bogus"\n')
    s = load_settings(path, env={"CALLGUARD_FAILURE_POLICY": "fail_open"})
    assert s.failure_policy == "fail_open"


def test_split_hostport():
    assert split_hostport("127.0.0.1:4573") == ("127.0.0.1", 4573)
    assert split_hostport(":4573") == ("127.0.0.1", 4573)
    assert split_hostport("[::1]:8084") == ("::1", 8084)
    for bad in ("4573", "host:", "host:port", "host:70000"):
        with pytest.raises(ConfigError):
            split_hostport(bad)


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().quota_seconds = 5


# -- through the CLI ----------------------------------------------------------------

def test_cli_refuses_a_bad_config_file_in_one_line(tmp_path):
    path = toml(tmp_path, "colour = 'blue'\n")
    for args, env in ((["--config", path], {}), ([], {"CALLGUARD_CONFIG": path})):
        result = CliRunner().invoke(cli, [*args, "account", "list"], env=env,
                                    catch_exceptions=False)
        assert result.exit_code == 1
        assert result.stderr.splitlines() == \
            [f"callguard: unknown setting(s) in {path}: colour"]
        assert result.stdout == ""


def test_cli_options_beat_environment_and_file(tmp_path):
    """`db upgrade` creates the database it was pointed at: the option's, not the others'."""
    file_db, env_db, option_db = (tmp_path / f"{n}.db" for n in ("file", "env", "option"))
    path = toml(tmp_path, f'database_url = "sqlite:///{file_db}"\nhome = "{tmp_path}/h"\n')
    runner = CliRunner()
    env = {"CALLGUARD_CONFIG": path, "CALLGUARD_DATABASE_URL": f"sqlite:///{env_db}",
           "CALLGUARD_HOME": ""}
    result = runner.invoke(cli, ["--database-url", f"sqlite:///{option_db}", "db", "upgrade"],
                           env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert (file_db.exists(), env_db.exists(), option_db.exists()) == (False, False, True)
    result = runner.invoke(cli, ["db", "upgrade"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert (file_db.exists(), env_db.exists()) == (False, True)
    del env["CALLGUARD_DATABASE_URL"]
    result = runner.invoke(cli, ["db", "upgrade"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert file_db.exists()


@pytest.mark.parametrize("name,value", [
    ("grace_seconds", "-100"), ("stale_grace_seconds", "-1"), ("agi_budget_ms", "0"),
    ("fail_open_grant", "0"), ("ring_seconds", "0"), ("node", "bad node"),
])
def test_settings_out_of_range_are_refused(name, value):
    with pytest.raises(ConfigError):
        load_settings(env={"CALLGUARD_" + name.upper(): value})
