"""Logging for things that can happen once per call: a flood must not bury the log.
And one JSON object a line (`--log-format json`) for log shippers."""

from __future__ import annotations

import datetime
import json
import logging
import time

# httpx logs each request's full URL at INFO (`callguard -v`), credentials and all: a
# payment or webhook URL may carry them. callguard's own lines say what it sent, without.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Throttled:
    """Logs each message at most once per `interval` seconds; its next line says how many
    it held back. Redis down at 1,000 setups/s is then one warning a second, not a
    thousand. "Message" is the template (`msg`, before its arguments): different warnings
    sharing one Throttled are held back and counted each on its own.

    The templates are code constants, so there are few; still, at most `max_templates`
    are remembered (the least recently logged is forgotten first, with its count). `key`
    splits one template by what it is about (a peer address): each key is held back on
    its own."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING,
                 interval: float = 1.0, clock=time.monotonic, max_templates: int = 64) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self.max_templates = max_templates
        # template (or (template, key)) -> [when it was last logged, how many held back
        # since]; in the order they were last logged, oldest first
        self.templates: dict[str | tuple[str, str], list] = {}

    def __call__(self, msg: str, *args, key: str | None = None) -> None:
        now = self.clock()
        held = msg if key is None else (msg, key)
        seen = self.templates.get(held)
        if seen is not None:
            if now - seen[0] < self.interval:
                seen[1] += 1
                return
            del self.templates[held]  # re-inserted below: the most recently logged
        elif len(self.templates) >= self.max_templates:
            del self.templates[next(iter(self.templates))]
        self.templates[held] = [now, 0]
        if seen is not None and seen[1]:
            msg += f" (and {seen[1]} more like it since the last such line)"
        self.logger.log(self.level, msg, *args)


# What every LogRecord has; anything else on a record came with `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (ISO 8601 UTC, ms), `level`, `logger`, `msg` (the
    formatted message), `exc` (the traceback) when there is one, and the fields given
    with `extra=` that JSON can hold. Nothing else from the record: what a line carries
    is what the code chose to log."""

    CORE = ("ts", "level", "logger", "msg", "exc")

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key in self.CORE:
                continue
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                continue  # not JSON (an object, a NaN, a cycle): left out
            line[key] = value
        return json.dumps(line, allow_nan=False)


def tag_lines(node: str) -> None:
    """Every line of this process names `node`: the workers of `serve --workers` share one
    stderr (one journal stream). Text: `... INFO [NODE] callguard.control: ...`; JSON: a
    `node` field."""

    def tag(record: logging.LogRecord) -> bool:
        record.node = node
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
        if not isinstance(handler.formatter, JsonFormatter):
            # A node name has no % in it (config.NODE_NAME).
            handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace(
                "%(name)s", f"[{node}] %(name)s")))
