"""Settings: built-in defaults < TOML file < environment < command-line options."""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
POLICIES = ("fail_closed", "fail_open")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: default_home(os.environ))  # always absolute
    redis_url: str | None = None  # None: the embedded Redis under home
    database_url: str | None = None  # None: SQLite under home
    ami_url: str | None = None
    esl_url: str | None = None
    agi_bind: str = "127.0.0.1:4573"
    esl_bind: str = "127.0.0.1:8084"
    quota_seconds: int = 60
    failure_policy: str = "fail_closed"
    smtp_url: str | None = None
    mail_from: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    payment_url: str | None = None
    http_bind: str | None = None  # None: per process (health.DEFAULT_BIND); "off": none
    api_bind: str = "127.0.0.1:8080"  # `callguard api`
    api_tls_cert: str | None = None  # PEM files: the API speaks HTTPS with both
    api_tls_key: str | None = None
    # Not in CONTRACT.md, named the same way:
    node: str | None = None  # None: derived per process (nodes.default_node)
    key_prefix: str = "cg"  # separates installations (or test runs) sharing one Redis
    grace_seconds: int = 2  # added to the PBX's own timeout beyond a grant's end
    ring_seconds: int = 120  # how long a call may ring before its first grant starts
    stale_grace_seconds: int = 30  # sweeper: a session silent this long past its grant is closed
    agi_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    esl_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # who may open outbound ESL
    agi_budget_ms: int = 300  # every FastAGI request is answered within this
    fail_open_grant: int = 60  # seconds granted under fail_open when Redis is down
    # Ghost sessions (README, "Ghost sessions"): a setup for a channel the PBX has not
    # reported is checked against its channel list this long after; 0 turns the check and
    # the limits below off.
    ghost_seconds: int = 3
    unconfirmed_per_account: int = 10  # such setups an account may hold at once
    unconfirmed_rate_per_peer: int = 1000  # such setups a second from one address
    unconfirmed_burst_per_peer: int = 2000

    @property
    def sql_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'callguard.db').resolve()}"

    def validate(self) -> Settings:
        if self.failure_policy not in POLICIES:
            raise ConfigError(f"failure policy must be one of {', '.join(POLICIES)}")
        if not 1 <= self.quota_seconds <= 3600:
            raise ConfigError("quota seconds must be between 1 and 3600")
        for name, low, high in (("ring_seconds", 1, 3600), ("grace_seconds", 0, 60),
                                ("stale_grace_seconds", 0, 3600), ("agi_budget_ms", 1, 60000),
                                ("fail_open_grant", 1, 3600), ("ghost_seconds", 0, 60),
                                ("unconfirmed_per_account", 0, 100000),
                                ("unconfirmed_rate_per_peer", 1, 1000000),
                                ("unconfirmed_burst_per_peer", 1, 1000000)):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{name.replace('_', ' ')} must be between {low} and {high}")
        if self.node is not None and not NODE_NAME.fullmatch(self.node):
            raise ConfigError(f"node name {self.node!r}: 1-64 letters, digits and . _ : @ -")
        for name in ("agi_bind", "esl_bind", "http_bind", "api_bind"):
            if getattr(self, name) not in (None, "off"):
                split_hostport(getattr(self, name))
        for name in ("webhook_url", "payment_url"):
            if getattr(self, name):
                check_http_url(f"CALLGUARD_{name.upper()}", getattr(self, name))
        if self.smtp_url:
            from .notify import parse_smtp_url  # the worker's: only when mail is configured

            try:
                parse_smtp_url(self.smtp_url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self


_ENV = {f.name: "CALLGUARD_" + f.name.upper() for f in fields(Settings)}
_ENV["home"] = "CALLGUARD_HOME"
_INTS = {
    "quota_seconds", "grace_seconds", "ring_seconds", "stale_grace_seconds", "agi_budget_ms",
    "fail_open_grant", "ghost_seconds", "unconfirmed_per_account", "unconfirmed_rate_per_peer",
    "unconfirmed_burst_per_peer",
}


def default_home(env) -> Path:
    """$XDG_DATA_HOME/callguard (~/.local/share/callguard): the same wherever a command
    runs. Data, not $XDG_STATE_HOME or $XDG_CACHE_HOME, which may be wiped or left out of
    backups: the books (SQLite) and the embedded Redis' append-only file are money that
    must not be lost. A service sets CALLGUARD_HOME=/var/lib/callguard."""
    base = env.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the spec says ignore it
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return Path(base, "callguard").resolve()


def _check_legacy_home(home: Path) -> None:
    """An install from before the XDG default kept its books in ./.callguard. Books there
    and none in the new default: refuse, rather than start on new, empty books (every call
    denied, the books split in two). Books in both: say which ones are used."""
    old = Path(".callguard")
    if not old.is_dir() or old.resolve() == home:
        return
    keep = (f"set CALLGUARD_HOME=./.callguard to keep using it, or move it to {home}")
    if not (home / "callguard.db").exists() and any(
            (old / name).exists() for name in ("callguard.db", "appendonly.aof")):
        raise ConfigError(f"./.callguard ({old.resolve()}) holds books of the old default "
                          f"state directory and {home} holds none: {keep}")
    logging.getLogger(__name__).warning(
        "ignoring ./.callguard (%s), the old default state directory; using %s (%s)",
        old.resolve(), home, keep)


def _coerce(name: str, value):
    if name == "home":
        return Path(value).expanduser().resolve()  # once: a later chdir changes nothing
    if name in _INTS:
        if isinstance(value, bool | float):  # TOML 1.5 or true: int() would quietly give 1
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if name in ("agi_allow", "esl_allow"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value)
    return str(value) if value is not None else None


def load_settings(config_file: str | None = None, env=None, **overrides) -> Settings:
    env = os.environ if env is None else env
    values: dict = {}
    path = config_file or env.get("CALLGUARD_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = data.get("callguard", data)
        unknown = set(data) - set(_ENV)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(data)
    for name, var in _ENV.items():
        if env.get(var):
            values[name] = env[var]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "home" not in values:
        values["home"] = default_home(env)
        _check_legacy_home(values["home"])
    settings = replace(Settings(), **{k: _coerce(k, v) for k, v in values.items()})
    return settings.validate()


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_http_url(name: str, url: str) -> None:
    """An http(s) URL a client can use; the message never repeats it (it may carry a
    password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a bad port
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        if ok:
            parts.hostname.encode("idna")
    except (ValueError, UnicodeError):
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be an http:// or https:// URL with a valid host "
                          "and port")
