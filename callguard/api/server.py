"""Serving the API: uvicorn on the same uvloop event loop `serve` uses, TLS when a
certificate is configured, bounded request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

from .. import sdnotify, service
from ..config import ConfigError, split_hostport
from .app import create
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
            if b"transfer-encoding" in headers and length is None:
                return await response(411, "send the body with a Content-Length")(
                    scope, receive, send)
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                return await response(413, f"the body is over {self.limit} bytes")(
                    scope, receive, send)
        return await self.app(scope, receive, send)


class Server(uvicorn.Server):
    def __init__(self, config, app: service.App, where: str):
        super().__init__(config)
        self.app, self.where = app, where

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit:
            self.app.serving()
            log.info("api serving on %s (console at /)", self.where)
            sdnotify.ready()

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
        self.handle_exit(sig, None)


def configure(app: service.App, bind: str, cert: str | None = None, key: str | None = None
              ) -> Server:
    if bool(cert) != bool(key):
        raise ConfigError("TLS needs both a certificate and its key (CALLGUARD_API_TLS_CERT, "
                          "CALLGUARD_API_TLS_KEY)")
    host, port = split_hostport(bind)
    config = uvicorn.Config(
        BodyLimit(create(app)), host=host, port=port, loop="uvloop", lifespan="on",
        log_config=None, access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=cert, ssl_keyfile=key, timeout_keep_alive=15,
        timeout_graceful_shutdown=5, limit_concurrency=512, backlog=512)
    try:
        config.load()  # reads the certificate now: a bad one is one line, not a traceback
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from None
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own lines say it
    return Server(config, app, f"{'https' if cert else 'http'}://{bind}/v1/")


def run(app: service.App, bind: str, cert: str | None, key: str | None) -> int:
    server = configure(app, bind, cert, key)
    server.run()
    log.info("stopped")
    return 0 if server.started else 1
