"""Issue 10 end to end: calls cross an account's limits in the engine, a real `callguard
worker` process books the notices and the auto top-up request, charges a real payment
provider, and delivers the notices to a real SMTP server and a real webhook receiver;
killed with SIGKILL half way, a restarted worker finishes the job without repeating it."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

from callguard import service
from callguard.books.models import AutoTopup, Notification

from engine_helpers import T0, prepaid, setup_plan, snapshot
from test_notify import SECRET, receiver, smtp_server  # noqa: F401 - fixtures
from test_topup import provider  # noqa: F401 - fixtures

ACCT, PREMIUM = "41441234567", "41901234567"


def worker(app, **settings) -> subprocess.Popen:
    s = dataclasses.replace(app.settings, **settings)
    env = {"CALLGUARD_HOME": str(s.home), "CALLGUARD_REDIS_URL": s.redis_url,
           "CALLGUARD_DATABASE_URL": s.database_url, "CALLGUARD_KEY_PREFIX": s.key_prefix,
           "CALLGUARD_NODE": "worker-e2e", "CALLGUARD_SMTP_URL": s.smtp_url,
           "CALLGUARD_MAIL_FROM": "noc@callguard.example",
           "CALLGUARD_WEBHOOK_URL": s.webhook_url, "CALLGUARD_WEBHOOK_SECRET": SECRET,
           "CALLGUARD_PAYMENT_URL": s.payment_url, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([sys.executable, "-m", "callguard", "-v", "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def rows(app, model):
    with app.books.session() as db:
        return list(db.query(model).order_by(model.id))


def test_limits_reach_the_customer_by_mail_webhook_and_card_once_through_a_sigkill(
        app, provider, smtp_server, receiver):  # noqa: F811 - fixtures
    card = provider("hold", hold=30)  # charges, then holds its reply: the worker dies waiting
    mailbox, port = smtp_server()
    setup_plan(app)
    paying = service.App(dataclasses.replace(app.settings, payment_url=card.url))
    prepaid(paying, ACCT, balance=12_000_000, email="anna@example.net",
            payment_method="tok_visa", auto_topup_below=8_000_000, auto_topup_amount=20_000_000)
    urls = {"smtp_url": f"smtp://127.0.0.1:{port}", "webhook_url": receiver.url,
            "payment_url": card.url}
    engine = app.engine
    d = engine.authorize(ACCT, PREMIUM, "outbound", "c1", now_ms=T0)  # 9.00 left: warned
    engine.answer(d.session, now_ms=T0)
    engine.extend(d.session, d.grant, now_ms=T0 + 50_000)  # 6.00 left: below 8.00, top up

    first = worker(app, **urls)
    try:
        wait_for(card.got.is_set, "the charge")
        first.send_signal(signal.SIGKILL)  # charged, the reply not read yet
        first.wait(10)
        assert len(card.charges) == 1 and snapshot(app, ACCT)["balance"] == 12_000_000
        card.release.set()  # a retry with the same key gets the stored success
        with app.books.session.begin() as db:  # its lease would keep the retry 2 min away
            db.query(AutoTopup).update({"next_attempt_at": None})
        second = worker(app, **urls)
        try:
            wait_for(lambda: snapshot(app, ACCT)["balance"] == 32_000_000, "the top-up")
            wait_for(lambda: all(n.sent_at for n in rows(app, Notification))
                     and len(rows(app, Notification)) == 2, "the notices delivered")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0, second.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert len(card.charges) == 1  # one charge, whatever was killed
    assert [t.state for t in rows(app, AutoTopup)] == ["succeeded"]
    assert app.books.get_account(ACCT).balance == 32_000_000
    types = sorted(n.type for n in rows(app, Notification))
    assert types == ["low_balance", "topup_succeeded"]
    assert sorted(m["Message-ID"] for m in mailbox.messages) == sorted(
        {m["Message-ID"] for m in mailbox.messages})  # none twice
    assert len(mailbox.messages) == 2 and all("41441234567" in m.get_content()
                                              for m in mailbox.messages)
    hooks = [json.loads(r["body"]) for r in receiver.requests]
    assert all(r["valid"] for r in receiver.requests)
    assert sorted(h["type"] for h in hooks) == types and len({h["id"] for h in hooks}) == 2
    # The call in progress now gets full slices from the new money.
    grant = engine.extend(d.session, 120, now_ms=T0 + 110_000)
    assert grant.live and not grant.final
    paying.close()
