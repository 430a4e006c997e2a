"""The live console at `/` (placeholder until the feed lands)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def mount(web: FastAPI, app, read) -> None:
    @web.get("/", include_in_schema=False, response_class=HTMLResponse)
    def console():
        return "<!doctype html><title>callguard</title><p>console"
