"""Operating callguard from the CLI: the worker, reconcile, rebuild, calls list/kill."""

from __future__ import annotations

import json

from engine_helpers import T0, prepaid, setup_plan, snapshot


def test_worker_reconcile_rebuild_round_trip(app, run):
    setup_plan(app)
    prepaid(app, "4144")
    eng = app.engine
    for i in range(3):
        d = eng.authorize("4144", "41901234567", "outbound", f"c{i}", now_ms=T0)
        eng.answer(d.session, now_ms=T0)
        eng.commit(d.session, "16", now_ms=T0 + 20_000)
    assert run("reconcile").exit_code == 0  # charges waiting in the stream count as booked
    assert run("worker", "--once").exit_code == 0
    assert app.books.get_account("4144").balance == 47_000_000
    assert len(app.books.cdrs("4144")) == 3
    # Redis loses the account; reconcile says so; rebuild restores it from the books.
    app.redis.delete(app.keys.account("4144"))
    result = run("reconcile")
    assert result.exit_code == 1 and "4144: exists" in result.stdout
    assert run("rebuild", "--yes").exit_code == 0
    assert snapshot(app, "4144")["balance"] == 47_000_000
    assert run("reconcile").exit_code == 0


def test_calls_list_and_kill(app, run):
    setup_plan(app)
    prepaid(app, "4144")
    d = app.engine.authorize("4144", "41901234567", "outbound", "1795236355.1310")
    app.engine.answer(d.session)
    listed = json.loads(run("calls", "list", "--json").stdout)
    assert [c["session"] for c in listed] == [d.session] == ["4144/1795236355.1310/1"]
    assert listed[0]["destination"] == "41901234567"
    assert listed[0]["state"] == "talking" and listed[0]["granted_seconds"] == 60
    assert d.session in run("calls", "list").stdout
    # No serve process holds it here: the operator is told, nothing pretends.
    result = run("calls", "kill", d.session)
    assert result.exit_code == 1 and "no serve process" in result.stderr
    result = run("calls", "kill", "4144/nosuchcall/1")
    assert result.exit_code == 1 and "no call in progress" in result.stderr
    assert run("calls", "kill", "not-a-session").exit_code == 1
