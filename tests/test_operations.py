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
    assert [a["action"] for a in json.loads(run("account", "actions", "4144", "--json")
                                            .stdout)] == ["create"]  # no kill to record
    result = run("calls", "kill", "4144/nosuchcall/1")
    assert result.exit_code == 1 and "no call in progress" in result.stderr
    assert run("calls", "kill", "not-a-session").exit_code == 1


def test_calls_list_shows_each_calls_state_and_what_is_left_of_its_grant(app, run):
    """Ringing (no grant running yet: `-`), talking, and ending on a last grant that the
    account's money could not extend; seconds left, never a bare `-s`."""
    setup_plan(app)
    prepaid(app, "4144")
    prepaid(app, "4145", balance=1_000_000)  # CHF 1 at CHF 3/min: a 20 s grant, the last
    eng = app.engine
    ringing = eng.authorize("4144", "41901234567", "outbound", "1795236355.1")
    talking = eng.authorize("4144", "41901234567", "outbound", "1795236355.2")
    eng.answer(talking.session)
    ending = eng.authorize("4145", "41901234567", "outbound", "1795236355.3")
    eng.answer(ending.session)
    assert ending.grant == 20 and eng.extend(ending.session, 20).final

    listed = {c["session"]: c for c in json.loads(run("calls", "list", "--json").stdout)}
    assert {s: c["state"] for s, c in listed.items()} == {
        ringing.session: "ringing", talking.session: "talking", ending.session: "ending"}
    assert listed[ringing.session]["left_seconds"] is None
    assert 55 <= listed[talking.session]["left_seconds"] <= 60
    assert 15 <= listed[ending.session]["left_seconds"] <= 20

    out = run("calls", "list").stdout
    assert "-s" not in out
    header, *lines = [_columns(line) for line in out.splitlines()]
    assert header == ["SESSION", "DESTINATION", "NODE", "STATE", "TALK", "LEFT", "COST"]
    text = {row[0]: row for row in lines}
    assert text[ringing.session][3:6] == ["ringing", "0s", "-"]
    assert text[talking.session][3] == "talking"
    assert text[ending.session][3] == "ending"
    for session in (talking.session, ending.session):
        left = text[session][5]
        assert left.endswith("s") and 0 < int(left[:-1]) <= 60, left


def _columns(line: str) -> list[str]:
    """`calls list` is a fixed-width table (an empty NODE is a column too)."""
    cells, at = [], 0
    for width in (40, 16, 12, 8, 6, 6):
        cells.append(line[at:at + width].strip())
        at += width + 1
    return [*cells, line[at:].strip()]


def test_an_applier_with_an_old_outbox_list_applies_nothing_twice_and_loses_nothing(app):
    """Two appliers (API threads, the CLI, the worker) read the outbox; one applies a row
    and deletes it, a new movement is booked, and on SQLite its row takes the deleted
    row's id. The other applier then claims "its" row by that id: it must neither credit
    the old entry again nor delete the new row unapplied. (Concurrent API top-ups left
    Redis CHF 0.67 to 3.07 off the books on SQLite before the claim checked the entry.)"""
    from callguard import service

    acct = "41441234567"
    prepaid(app, acct, balance=0)
    app.books.book(acct, "topup", 1_000_000, "T-1")
    stale = app.books.outbox(acct)  # what the slow applier read
    assert service.apply_outbox(app, acct) == 1  # the quick one applied it
    app.books.book(acct, "topup", 2_000_000, "T-2")
    fresh = app.books.outbox(acct)
    for row_id, account, entry, amount in stale:
        service._apply_one(app, row_id, account, entry, amount)
    # Whether or not the id came back, Redis has each entry once, and T-2 is still due.
    assert snapshot(app, acct)["balance"] == 1_000_000
    assert app.books.outbox(acct) == fresh
    assert service.apply_outbox(app, acct) == 1
    assert snapshot(app, acct)["balance"] == 3_000_000 == app.books.get_account(acct).balance
