"""`/metrics`, `/healthz` and `/readyz` of a long-running process on CALLGUARD_HTTP_BIND.

They are served by a thread of their own (the stdlib's WSGI server, prometheus_client's
exposition): a scrape never waits for the event loop, and the loop never for a scrape.
Each process needs a port of its own: `serve` defaults to 127.0.0.1:9464, `worker` to
127.0.0.1:9465, `off` serves nothing. A port that is taken is logged and the process
goes on: credit control matters more than its metrics.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .config import split_hostport
from .logs import Throttled
from .metrics import Readings, cached

log = logging.getLogger(__name__)

DEFAULT_BIND = {"serve": "127.0.0.1:9464", "worker": "127.0.0.1:9465",
                "api": "127.0.0.1:9467"}
CHECK_TIMEOUT = 2.0  # a check that hangs (a black-holed database) answers "no answer"
READY_TTL = 1.0

# A check returns None when all is well, or what is wrong in a few words; it may raise.
Check = Callable[[], "str | None"]


CONNECTIONS = 32  # served at once; more are closed at once (a scraper needs one)
_warn_http = Throttled(log, interval=60.0)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that opens a connection and sends nothing lets go of its thread

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass  # a scrape every few seconds is not news


class _Server(ThreadingWSGIServer):
    """At most CONNECTIONS threads, whatever a port scanner or a slow client does; a
    client that times out or goes away is not an error worth a traceback."""

    request_queue_size = 64

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError | ConnectionError):
            return
        _warn_http("HTTP request from %s failed: %s", client_address[0], exc)
        log.debug("HTTP request failed", exc_info=True)


class Health:
    """The endpoints of one process: `checks` decide readiness, by name."""

    def __init__(self, process: str, registry, checks: dict[str, Check]):
        self.process, self.checks, self.registry = process, checks, registry
        self._pool = ThreadPoolExecutor(max_workers=len(checks) or 1,
                                        thread_name_prefix="readyz")
        self._metrics = make_wsgi_app(registry)
        self.server = None
        # At most READY_TTL old: scrapes and probes hammering the port cost Redis and the
        # books one round of checks a second, not one per request.
        self.readiness = cached(self._check, READY_TTL)
        Readings(registry).gauge("callguard_ready", "1 while /readyz says ready",
                                 lambda: int(self.readiness()[0]))

    def _check(self) -> tuple[bool, dict[str, dict]]:
        running = {name: self._pool.submit(check) for name, check in self.checks.items()}
        results = {}
        for name, future in running.items():
            try:
                problem = future.result(timeout=CHECK_TIMEOUT)
            except FutureTimeout:
                problem = f"no answer within {CHECK_TIMEOUT:g} s"
            except Exception as exc:  # noqa: BLE001 - what is wrong is the answer
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            results[name] = {"ok": True} if problem is None else {"ok": False,
                                                                  "error": problem}
        return all(r["ok"] for r in results.values()), results

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            status, body = "200 OK", {"status": "ok", "process": self.process}
        elif path == "/readyz":
            ready, checks = self.readiness()
            status = "200 OK" if ready else "503 Service Unavailable"
            body = {"status": "ready" if ready else "not ready", "process": self.process,
                    "checks": checks}
        else:
            status, body = "404 Not Found", {"error": "not found", "paths": [
                "/metrics", "/healthz", "/readyz"]}
        data = json.dumps(body).encode() + b"\n"
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]

    def start(self, bind: str) -> int | None:
        """Serve on `bind` in a daemon thread; the port, or None when off or taken."""
        if bind == "off":
            return None
        host, port = split_hostport(bind)

        class Server(_Server):
            address_family = _family(host)

        try:
            self.server = make_server(host, port, self, Server, handler_class=_QuietHandler)
        except OSError as exc:
            log.error("metrics and health not served: cannot listen on %s: %s (give each "
                      "process its own CALLGUARD_HTTP_BIND, or `off`)", bind,
                      exc.strerror or exc)
            return None
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        port = self.server.server_port
        log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)",
                 host, port)
        return port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def store_checks(app) -> dict[str, Check]:
    """Redis and the books answer (the worker's and the API's readiness)."""
    from sqlalchemy import text

    def books():
        with app.books.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return {"redis": lambda: app.redis.ping() and None, "books": books}


def _family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
