"""Serving the API: uvicorn on the same uvloop event loop `serve` uses, TLS when a
certificate is configured, bounded request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

import uvicorn
from prometheus_client import Counter, Histogram
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import sdnotify, service
from ..config import ConfigError, split_hostport
from ..health import DEFAULT_BIND, Health, store_checks
from ..metrics import new_registry
from .app import SQL_POOL, create
from .problems import response

log = logging.getLogger("callguard.api")

MAX_BODY = 64 * 1024  # the largest request the API takes (an account change is < 2 KiB)


class BodyLimit:
    """ASGI middleware: a body must say its length, and be at most MAX_BODY. uvicorn and
    FastAPI read a body whole into memory, however large: a client must not choose how
    much."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            # Any Transfer-Encoding, with a Content-Length or not: h11 goes by the former,
            # so a "Content-Length: 10" would not bound a chunked body of gigabytes.
            if b"transfer-encoding" in headers:
                return await response(411, "send the body with a Content-Length and no "
                                           "Transfer-Encoding")(scope, receive, send)
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                return await response(413, f"the body is over {self.limit} bytes")(
                    scope, receive, send)
        return await self.app(scope, receive, send)


class Measured:
    """ASGI middleware: each answer counted by route and status, and timed. The route is
    its template (`/v1/accounts/{account}`), so the labels stay few whatever is asked."""

    def __init__(self, app, registry):
        self.app = app
        self.requests = Counter("callguard_api_requests_total", "HTTP API answers",
                                ["route", "status"], registry=registry)
        self.seconds = Histogram("callguard_api_request_duration_seconds",
                                 "HTTP API answer time (a console stream: until it ends)",
                                 ["route"], registry=registry, buckets=API_BUCKETS)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.requests.labels(route, str(status)).inc()
            self.seconds.labels(route).observe(time.perf_counter() - start)


API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


HEADER_SECONDS = 10.0  # a connection's request must be in by then, and an idle one goes


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol times a connection out only between requests: one that
    sends nothing, or its headers a byte at a time, holds a slot of `limit_concurrency`
    for ever, and 512 of them shut the API out. Each request's headers get
    HEADER_SECONDS from the connection's start or the last answer."""

    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._await_request()

    def on_response_complete(self):
        super().on_response_complete()
        self._await_request()

    def handle_events(self):
        super().handle_events()
        if self.header_timer is not None and self._busy():
            self.header_timer.cancel()
            self.header_timer = None

    def connection_lost(self, exc):
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_request(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(HEADER_SECONDS, self._too_slow)

    def _too_slow(self) -> None:
        self.header_timer = None
        if not self._busy() and not self.transport.is_closing():
            self.transport.close()


class Server(uvicorn.Server):
    def __init__(self, config, app: service.App, web, where: str):
        super().__init__(config)
        self.app, self.web, self.where = app, web, where

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit:
            self.app.serving()
            log.info("api serving on %s (console at /)", self.where)
            sdnotify.ready()
            self.pinging = asyncio.ensure_future(sdnotify.watchdog_loop())

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own raises the signal again once stopped: a SIGTERM'd API would end
        # as killed, not as a clean exit 0.
        if threading.current_thread() is not threading.main_thread():
            yield  # a server in a thread (the tests) is stopped by its owner
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop(self, sig) -> None:
        if not self.should_exit:
            log.info("stopping (%s)", signal.Signals(sig).name)
            sdnotify.stopping()
            # The console's streams never end by themselves: end them (the browsers
            # reconnect), or the stop waits out the graceful timeout for them.
            console = getattr(self.web.state, "console", None)
            if console is not None:
                console.close()
        self.handle_exit(sig, None)


def configure(app: service.App, bind: str, cert: str | None = None, key: str | None = None
              ) -> Server:
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both a certificate and its key (CALLGUARD_API_TLS_CERT, "
                          "CALLGUARD_API_TLS_KEY)")
    host, port = split_hostport(bind)
    registry = new_registry()
    if "books" not in app.__dict__:
        app.sql_pool = SQL_POOL
    web = create(app)
    config = uvicorn.Config(
        BodyLimit(Measured(web, registry)), host=host, port=port, loop="uvloop",
        lifespan="on", log_config=None, access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=cert, ssl_keyfile=key, http=GuardedH11, timeout_keep_alive=10,
        timeout_graceful_shutdown=5, limit_concurrency=512, backlog=512)
    try:
        config.load()  # reads the certificate now: a bad one is one line, not a traceback
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from None
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own lines say it
    server = Server(config, app, web, f"{'https' if cert else 'http'}://{bind}/v1/")
    server.health = Health("api", registry, store_checks(app))
    return server


def run(app: service.App, bind: str, cert: str | None, key: str | None) -> int:
    server = configure(app, bind, cert, key)
    server.health.start(app.settings.http_bind or DEFAULT_BIND["api"])
    try:
        server.run()
    finally:
        server.health.stop()
    log.info("stopped")
    return 0 if server.started else 1
