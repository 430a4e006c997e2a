"""Notices delivered per second by one worker (`callguard.notify.deliver_due` passes), with
an SMTP server (aiosmtpd) and a webhook receiver (checking every signature) on loopback in
a process of their own, so they do not share the worker's GIL.

Fills N notices into throwaway books (SQLite under a temp dir, or a fresh schema of
--database-url), then times deliver_due passes until every notice is sent, and checks
that the servers got each notice exactly once.

    python bench/notify_rate.py [--notices 1000] [--runs 3] [--channels mail,webhook]
        [--tls] [--fresh-connections] [--database-url postgresql+psycopg://...]

--fresh-connections opens a new SMTP session and HTTP connection for every notice (what
deliver_due did before it kept one of each for a pass); --tls runs STARTTLS with AUTH.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import add_results_args, emit_json, keep_results, print_machine, print_table, spread

from callguard import notify
from callguard.books.database import make_engine, upgrade
from callguard.books.models import Account
from callguard.books.notices import add_notice
from callguard.config import load_settings
from callguard.service import App

SECRET = "bench-secret"
USER, PASSWORD = "bench", "bench-password"


# -- the servers' process -----------------------------------------------------------------

def serve(tls: bool) -> None:
    """Run the SMTP server and the webhook receiver; print their ports; stop on EOF."""
    import logging

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # a deprecation note each login

    seen = {"mails": set(), "mail_dupes": 0, "hooks": set(), "hook_dupes": 0, "bad": 0}
    lock = threading.Lock()

    class Mailbox:
        async def handle_DATA(self, server, session, envelope):
            mid = next((line.split(b":", 1)[1].strip() for line in envelope.content.split(
                b"\r\n") if line.lower().startswith(b"message-id:")), b"")
            with lock:
                seen["mail_dupes"] += mid in seen["mails"]
                seen["mails"].add(mid)
            return "250 OK"

    class Hook(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver would

        def do_GET(self):
            with lock:
                body = json.dumps({k: len(v) if isinstance(v, set) else v
                                   for k, v in seen.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            stamp = self.headers.get("X-Callguard-Timestamp", "")
            want = "sha256=" + hmac.new(SECRET.encode(), f"{stamp}.".encode() + body,
                                        hashlib.sha256).hexdigest()
            notice_id = json.loads(body)["id"]
            with lock:
                seen["bad"] += not hmac.compare_digest(
                    self.headers.get("X-Callguard-Signature", ""), want)
                seen["hook_dupes"] += notice_id in seen["hooks"]
                seen["hooks"].add(notice_id)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    options = {}
    if tls:
        import ssl

        base = Path(tempfile.mkdtemp())
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-keyout", str(base / "k"), "-out", str(base / "c")],
                       check=True, capture_output=True)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(base / "c"), str(base / "k"))
        options = dict(tls_context=context, require_starttls=True, auth_required=True,
                       authenticator=lambda *a: AuthResult(success=(
                           a[4].login, a[4].password) == (USER.encode(), PASSWORD.encode())))
    from callguard.simulator.faults import free_port

    smtp = Controller(Mailbox(), hostname="127.0.0.1", port=free_port(),
                      server_hostname="localhost", **options)
    smtp.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(json.dumps({"smtp": smtp.port, "http": http.server_address[1]}), flush=True)
    sys.stdin.read()
    http.shutdown()
    smtp.stop()
    asyncio.set_event_loop(None)


# -- the worker's side ---------------------------------------------------------------------

def fresh_connections() -> None:
    """Make every notice open its own SMTP session and HTTP connection."""
    mail, hook = notify.Couriers.mail, notify.Couriers.webhook

    def fresh_mail(self, *args):
        try:
            mail(self, *args)
        finally:
            self._drop_smtp(quit=True)

    def fresh_hook(self, *args):
        try:
            hook(self, *args)
        finally:
            if self._http is not None:
                self._http.close()
                self._http = None

    notify.Couriers.mail, notify.Couriers.webhook = fresh_mail, fresh_hook


def one_run(args, ports: dict, run: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url, schema = args.database_url or f"sqlite:///{tmp}/books.db", None
        if args.database_url:
            schema = "bench_" + uuid.uuid4().hex[:10]
            with make_engine(args.database_url).begin() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            url += ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"
        settings = load_settings(env={}, home=tmp, database_url=url)
        wanted = args.channels.split(",")
        auth = f"{USER}:{PASSWORD}@" if args.tls else ""
        smtp_url = f"smtp://{auth}127.0.0.1:{ports['smtp']}" + (
            "?starttls=1&verify=0" if args.tls else "")
        app = App(replace(settings, mail_from="bench@callguard.example",
                          smtp_url=smtp_url if "mail" in wanted else None,
                          webhook_url=f"http://127.0.0.1:{ports['http']}/hook"
                          if "webhook" in wanted else None, webhook_secret=SECRET))
        try:
            upgrade(app.books.engine)
            accounts = [f"4144{run:02d}{i:05d}" for i in range(10)]
            for account in accounts:
                app.books.create_account(account, 50_000_000, kind="prepaid",
                                         email=f"{account}@example.net")
            with app.books.session.begin() as db:
                rows = [db.get(Account, a) for a in accounts]
                for i in range(args.notices):
                    add_notice(db, f"low_balance:{rows[i % 10].id}:{run}-{i}", rows[i % 10],
                               "low_balance", balance=9_500_000, available=9_500_000,
                               limit=10_000_000)
            start = time.perf_counter()
            passes = delivered = 0
            while True:
                done = notify.deliver_due(app, limit=args.limit)
                passes += 1
                delivered += done
                if not done:
                    break
            elapsed = time.perf_counter() - start
        finally:
            app.close()
            if schema:
                with make_engine(args.database_url).begin() as conn:
                    conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    return {"run": run, "delivered": delivered, "passes": passes, "seconds": elapsed,
            "per_s": delivered / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=100, help="deliver_due's limit a pass")
    parser.add_argument("--channels", default="mail,webhook", help="mail, webhook or both")
    parser.add_argument("--tls", action="store_true", help="STARTTLS and AUTH on the SMTP")
    parser.add_argument("--fresh-connections", action="store_true",
                        help="a new SMTP session and HTTP connection for every notice")
    parser.add_argument("--database-url", help="a PostgreSQL to use (a schema of its own)")
    parser.add_argument("--json-out", metavar="FILE")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    add_results_args(parser)
    args = parser.parse_args()
    if args.serve:
        return serve(args.tls)
    keep_results(args)
    info = print_machine()
    if args.fresh_connections:
        fresh_connections()
    servers = subprocess.Popen([sys.executable, __file__, "--serve"] + (
        ["--tls"] if args.tls else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        ports = json.loads(servers.stdout.readline())
        results = [one_run(args, ports, run) for run in range(args.runs)]
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/stats") as reply:
            seen = json.loads(reply.read())
    finally:
        servers.stdin.close()
        servers.wait(30)
    print_table(results, ["run", "delivered", "passes", "seconds", "per_s"],
                title=f"{args.notices} notices, channels {args.channels}"
                      f"{', STARTTLS+AUTH' if args.tls else ''}"
                      f"{', fresh connections' if args.fresh_connections else ', kept'}")
    total = args.notices * args.runs
    print(f"servers saw: {seen}")
    ok = (all(r["delivered"] == args.notices for r in results) and seen["bad"] == 0
          and seen["mail_dupes"] == seen["hook_dupes"] == 0
          and seen["mails"] == (total if "mail" in args.channels else 0)
          and seen["hooks"] == (total if "webhook" in args.channels else 0))
    print("every notice exactly once, every signature good" if ok else "MISMATCH")
    emit_json({"bench": "notify_rate", "notices": args.notices, "channels": args.channels,
               "tls": args.tls, "fresh_connections": args.fresh_connections,
               "database": "postgresql" if args.database_url else "sqlite",
               "per_s": spread([r["per_s"] for r in results]), "ok": ok, "machine": info},
              args.json_out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
