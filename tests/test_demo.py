"""`callguard demo` as a newcomer runs it, and the embedded Redis it relies on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest
from click.testing import CliRunner

from callguard.cli import cli
from callguard.engine.connect import ensure_embedded, stop_embedded


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
def test_demo_holds_the_bound_and_leaves_nothing_behind(redis_url, tmp_path, pbx):
    """Credit alone bounds the loss (the fraud controls off). At 5x, not 10x: the bound is
    in PBX seconds, and a loaded CI machine's lag in the simulated PBX is multiplied by
    the speed (15 ms late per cut-off at 10x is CHF 0.13 over 17 calls)."""
    env = {"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_REDIS_URL": redis_url}
    result = CliRunner().invoke(cli, ["demo", "--speed", "5", "--pbx", pbx,
                                      "--no-fraud-controls"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output  # exit 1 above CHF 0.10 of loss
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    protected, unprotected = re.findall(r"CHF (\d+\.\d\d)", lines["loss beyond the CHF balance"])
    assert Decimal(protected) <= Decimal("0.10") and unprotected == "850.00"
    assert "17 / 13 (13 NO_FUNDS)" in lines["calls allowed / denied"]
    assert "yes" in lines["books agree with Redis"]
    assert not (tmp_path / "home").exists()  # its books and keys were temporary
    assert "exhausted" in lines["notices"]


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
def test_demo_trips_the_fraud_controls_and_hangs_the_calls_up(redis_url, tmp_path, pbx):
    """The spend-per-hour limit counts what live calls hold: 6 calls at CHF 3.00 a slice,
    the seventh is refused, the account blocked and the 6 hung up, charged their ring-free
    seconds only."""
    env = {"CALLGUARD_HOME": str(tmp_path / "home"), "CALLGUARD_REDIS_URL": redis_url}
    result = CliRunner().invoke(cli, ["demo", "--speed", "10", "--pbx", pbx], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "6 / 24 (23 BLOCKED, 1 VELOCITY_LIMIT)" in lines["calls allowed / denied"]
    assert "1 fraud_suspected" in lines["notices"] and "1 blocked" in lines["notices"]
    charged = re.findall(r"CHF (\d+\.\d\d)", lines["charged"])[0]
    assert Decimal(charged) < Decimal("18.00")  # hung up long before their first slice ended
    assert "yes" in lines["books agree with Redis"]


def test_embedded_redis_is_shared_by_processes_and_keeps_its_data(tmp_path):
    """With no CALLGUARD_REDIS_URL, every callguard process joins one server under the
    state directory; its append-only file keeps balances over a restart."""
    home = tmp_path / "state"
    env = {**os.environ, "CALLGUARD_HOME": str(home)}
    env.pop("CALLGUARD_REDIS_URL", None)
    env.pop("CALLGUARD_DATABASE_URL", None)

    def callguard(*args):
        return subprocess.run([sys.executable, "-m", "callguard", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    try:
        assert callguard("db", "upgrade").returncode == 0
        assert callguard("account", "create", "4144", "--prepaid", "--balance", "5").returncode == 0
        shown = callguard("account", "show", "4144", "--json")  # another process, same data
        assert '"available": "5.000000"' in shown.stdout
        assert (home / "appendonly.aof").exists() and (home / "callguard.db").exists()
        stop_embedded(home)
        url = ensure_embedded(home)  # restarted from its data
        import redis

        from callguard.engine.core import Keys

        acct = Keys("cg").account("4144")
        assert redis.Redis.from_url(url).hget(acct, "balance") == b"5000000"
    finally:
        stop_embedded(home)
