"""Errors as RFC 9457 problem details (`application/problem+json`), with the same one line
the CLI prints as `detail`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..books.ledger import AccountExists, UnknownAccount
from ..refusals import EXPECTED, explain

log = logging.getLogger("callguard.api")

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra


def response(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    # type about:blank: the status says it all, its phrase is the title (RFC 9457 4.2.1).
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
            "detail": detail, **extra}
    return JSONResponse(body, status, headers=headers, media_type=MEDIA_TYPE)


def _where(loc) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, parts = parts[0], parts[1:]
        return ".".join(parts) + (f" ({where})" if where != "body" else "") if parts else where
    return ".".join(parts)


def _message(error: dict) -> str:
    msg = error.get("msg", "invalid")
    return msg.removeprefix("Value error, ")


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem):
        return response(exc.status, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = [{"where": _where(e.get("loc", ())), "message": _message(e)}
                  for e in exc.errors()][:20]
        detail = "; ".join(f"{e['where']}: {e['message']}" for e in errors[:3])
        return response(422, detail or "invalid request", errors=errors)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return response(exc.status_code, detail, getattr(exc, "headers", None))

    async def _refused(request: Request, exc: Exception):
        known = explain(exc)
        if known is None:  # a ProgrammingError that is a bug
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            return response(500, "internal error (the server's log has the details)")
        unavailable, line = known
        if unavailable:
            return response(503, line, {"Retry-After": "5"})
        status = 404 if isinstance(exc, UnknownAccount) else \
            409 if isinstance(exc, AccountExists) else 422
        return response(status, line)

    # Each class on its own: a handler for Exception itself runs outside the app, after
    # the server has logged a traceback for what is only a refusal.
    for cls in EXPECTED:
        app.add_exception_handler(cls, _refused)
