"""Per-call warnings are throttled: a flood is one line a second that counts the rest."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from callguard.logs import JsonFormatter, Throttled


def test_throttled_logs_once_per_interval_and_counts_what_it_held(caplog):
    now = [100.0]
    warn = Throttled(logging.getLogger("t"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(1000):  # a thousand failed setups within the same second
            warn("authorize %s failed", "A")
        now[0] += 1.0
        warn("authorize %s failed", "B")
        now[0] += 5.0
        warn("authorize %s failed", "C")
    assert [r.getMessage() for r in caplog.records] == [
        "authorize A failed",
        "authorize B failed (and 999 more like it since the last such line)",
        "authorize C failed",
    ]


def test_different_warnings_sharing_one_throttled_are_held_and_counted_each_on_its_own(caplog):
    now = [100.0]
    warn = Throttled(logging.getLogger("t"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        warn("authorize %s failed", "A")
        warn("no AMI link to %s", "pbx1")  # another warning: not held back by the first
        for _ in range(3):
            warn("authorize %s failed", "A")
        warn("no AMI link to %s", "pbx1")
        now[0] += 1.0
        warn("no AMI link to %s", "pbx1")
        warn("authorize %s failed", "B")
        now[0] += 1.0
        warn("authorize %s failed", "C")
    assert [r.getMessage() for r in caplog.records] == [
        "authorize A failed",
        "no AMI link to pbx1",
        "no AMI link to pbx1 (and 1 more like it since the last such line)",
        "authorize B failed (and 3 more like it since the last such line)",
        "authorize C failed",
    ]


def test_a_key_holds_one_template_back_per_key(caplog):
    now = [100.0]
    warn = Throttled(logging.getLogger("t"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for peer in ("10.0.0.1", "10.0.0.2", "10.0.0.1"):
            warn("ghost from %s", peer, key=peer)
        now[0] += 1.0
        warn("ghost from %s", "10.0.0.1", key="10.0.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "ghost from 10.0.0.1", "ghost from 10.0.0.2",
        "ghost from 10.0.0.1 (and 1 more like it since the last such line)"]


def test_throttled_remembers_a_bounded_number_of_templates(caplog):
    now = [100.0]
    warn = Throttled(logging.getLogger("t"), interval=1.0, clock=lambda: now[0], max_templates=2)
    with caplog.at_level(logging.WARNING, logger="t"):
        for n in range(1000):  # more templates than it keeps: the oldest is forgotten
            warn(f"template {n}")
            warn(f"template {n}")  # held back: it is remembered while it is among the last 2
            assert len(warn.templates) <= 2
        warn("template 0")  # forgotten long ago: logged, with no count to tell
        warn("template 999")  # still remembered, within the interval: held
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"template {n}" for n in range(1000)] + ["template 0"]


# -- --log-format json ---------------------------------------------------------------

def _record(**extra) -> logging.LogRecord:
    record = logging.getLogger("callguard.t").makeRecord(
        "callguard.t", logging.WARNING, __file__, 1, "login as %s failed", ("cg",), None,
        extra=extra)
    record.created = 1795236355.1234  # 2026-11-21T04:45:55.123Z
    return record


def test_a_json_line_has_the_listed_fields_and_what_came_with_extra():
    line = json.loads(JsonFormatter().format(_record(account="4144", grant=60, ok=True,
                                                     channels=[1, 2], level="x")))
    assert line == {"ts": "2026-11-21T04:45:55.123Z", "level": "WARNING",
                    "logger": "callguard.t", "msg": "login as cg failed",
                    "account": "4144", "grant": 60, "ok": True, "channels": [1, 2]}


def test_a_json_line_leaves_out_the_rest_of_the_record():
    """The record also holds the arguments, the path, the process...: none of it goes out
    but through `msg`; extra values JSON cannot hold are left out, not turned into text."""

    class Secretive:
        def __repr__(self):
            return "password=hunter2"

    record = _record(conn=Secretive(), ratio=float("nan"))
    record.args = ("cg",)
    text = JsonFormatter().format(record)
    assert set(json.loads(text)) == {"ts", "level", "logger", "msg"}
    assert "hunter2" not in text and "pathname" not in text and "args" not in text


def test_a_json_line_carries_the_traceback_on_one_line():
    try:
        raise RuntimeError("redis went away")
    except RuntimeError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1,
                                                   "authorize failed", (), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["msg"] == "authorize failed"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("RuntimeError: redis went away")


def _callguard(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALLGUARD_")}
    environ.update(CALLGUARD_HOME=str(tmp_path / "home"), **env)
    return subprocess.run([sys.executable, "-m", "callguard", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_cli_logs_one_json_object_a_line(tmp_path, how):
    if how == "option":
        result = _callguard(tmp_path, "--log-format", "json", "-v", "db", "upgrade")
    else:
        result = _callguard(tmp_path, "-v", "db", "upgrade", CALLGUARD_LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "database schema is up to date\n"
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and {line["level"] for line in lines} == {"INFO"}
    assert any(line["logger"] == "alembic.runtime.migration"
               and line["msg"].startswith("Running upgrade") for line in lines)
    for line in lines:
        assert set(line) == {"ts", "level", "logger", "msg"}, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


def test_the_cli_json_log_carries_a_traceback_and_text_stays_the_default(tmp_path):
    down = "redis://127.0.0.1:1/0"  # nothing listens: the refusal logs its traceback (-vv)
    result = _callguard(tmp_path, "--log-format", "json", "-vv", "--redis-url", down,
                        "calls", "list")
    assert result.returncode == 1
    *logged, refusal = result.stderr.splitlines()
    assert refusal.startswith("callguard: Redis unavailable")  # the CLI's own line, as ever
    lines = [json.loads(line) for line in logged]
    failure = next(line for line in lines if line["msg"] == "redis failure")
    assert failure["level"] == "DEBUG" and "ConnectionError" in failure["exc"]
    text = _callguard(tmp_path, "-v", "db", "upgrade")
    assert text.returncode == 0 and " INFO alembic.runtime.migration: " in text.stderr
    assert not text.stderr.startswith("{")
    assert _callguard(tmp_path, "--log-format", "xml", "db", "upgrade").returncode == 2
