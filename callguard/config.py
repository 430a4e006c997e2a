"""Settings: built-in defaults < TOML file < environment < command-line options."""

from __future__ import annotations

import logging
import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
POLICIES = ("fail_closed", "fail_open")
# The settings that carry a secret (a password in a URL, a key). Each can also be read from
# a file, CALLGUARD_<NAME>_FILE, or a systemd credential named <name> (LoadCredential=).
SECRETS = ("redis_url", "database_url", "ami_url", "esl_url", "smtp_url", "webhook_url",
           "webhook_secret", "payment_url", "api_token_pepper")
SECRET_FILE_MAX = 65536  # bytes: a secret, not a data file
PEPPER_MIN = 32  # characters: `openssl rand -base64 32` gives 44


class ConfigError(ValueError):
    pass


def _secret(default=None):
    return field(default=default, repr=False)  # a repr() in a log or traceback shows none


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: default_home(os.environ))  # always absolute
    redis_url: str | None = _secret()  # None: the embedded Redis under home
    # PEM files for a rediss:// URL: the CA the server's certificate must chain to (as well
    # as the system's), and this client's certificate and key (for a server that asks).
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    database_url: str | None = _secret()  # None: SQLite under home
    ami_url: str | None = _secret()  # ami:// plain text, amis:// TLS
    ami_tls_ca: str | None = None  # PEM: the CAs amis:// trusts instead of the system's
    esl_url: str | None = _secret()
    agi_bind: str = "127.0.0.1:4573"
    esl_bind: str = "127.0.0.1:8084"
    # SO_REUSEPORT on the FastAGI / outbound ESL listener: several serve processes share
    # the port (each with its own node). Off by default: a second copy of callguard started
    # by mistake (another prefix or Redis, which no node lease sees) would take calls.
    reuse_port: bool = False
    quota_seconds: int = 60
    failure_policy: str = "fail_closed"
    smtp_url: str | None = _secret()
    mail_from: str | None = None
    webhook_url: str | None = _secret()
    webhook_secret: str | None = _secret()
    payment_url: str | None = _secret()
    api_token_pepper: str | None = _secret()  # API token digests: HMAC-SHA256 with it
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
        self._validate_redis_tls()
        for name in ("webhook_url", "payment_url"):
            if getattr(self, name):
                check_http_url(f"CALLGUARD_{name.upper()}", getattr(self, name))
        for name in ("redis_url", "ami_url", "esl_url"):
            if getattr(self, name):
                check_url(f"CALLGUARD_{name.upper()}", getattr(self, name))
        if self.smtp_url:
            from .notify import parse_smtp_url  # the worker's: only when mail is configured

            try:
                parse_smtp_url(self.smtp_url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.api_token_pepper is not None and len(self.api_token_pepper) < PEPPER_MIN:
            raise ConfigError(f"the API token pepper must be at least {PEPPER_MIN} characters "
                              "(openssl rand -base64 32)")
        return self

    def _validate_redis_tls(self) -> None:
        given = [n for n in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")
                 if getattr(self, n)]
        if given and not (self.redis_url or "").startswith(("rediss://", "rediss+cluster://")):
            raise ConfigError(f"{_ENV[given[0]]} is set but the Redis URL is not rediss:// "
                              "(or rediss+cluster://): the connection would not use TLS")
        # redis-py takes ?ssl_cert_reqs=none or ?ssl_check_hostname=false from the URL over
        # the arguments callguard gives it: the server's certificate would go unchecked.
        try:
            query = parse_qs(urlsplit(self.redis_url or "").query)
        except ValueError:
            query = {}
        if any(name.startswith("ssl") for name in query):
            raise ConfigError("CALLGUARD_REDIS_URL has TLS options in its query: callguard "
                              "always verifies the server; give its files in "
                              "CALLGUARD_REDIS_TLS_CA, _CERT and _KEY")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ConfigError("CALLGUARD_REDIS_TLS_CERT and CALLGUARD_REDIS_TLS_KEY go "
                              "together: a client certificate and its key")


_ENV = {f.name: "CALLGUARD_" + f.name.upper() for f in fields(Settings)}
_ENV["home"] = "CALLGUARD_HOME"
_INTS = {
    "quota_seconds", "grace_seconds", "ring_seconds", "stale_grace_seconds", "agi_budget_ms",
    "fail_open_grant", "ghost_seconds", "unconfirmed_per_account", "unconfirmed_rate_per_peer",
    "unconfirmed_burst_per_peer",
}
_BOOLS = {"reuse_port"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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


def no_foreign_links(path: Path) -> Path:
    """A symbolic link on the way to the state directory that another user made (in /tmp,
    say, without fs.protected_symlinks) would send our books, our socket and the chmod
    statedir.py makes to a directory of their choosing, such as /etc: refused. Checked
    where the path is resolved (once: the settings keep it resolved)."""
    me = os.geteuid()
    for part in (path, *path.parents):
        try:
            st = part.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (me, 0):
            raise ConfigError(f"the state directory {path} is reached through the symbolic "
                              f"link {part}, which {user_name(st.st_uid)} made: set "
                              "CALLGUARD_HOME to a directory of this user's")
    return path


def user_name(uid: int) -> str:
    """A user as a message names one."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _coerce(name: str, value):
    if name == "home":  # resolved once: a later chdir changes nothing
        return no_foreign_links(Path(value).expanduser().absolute()).resolve()
    if name in _INTS:
        if isinstance(value, bool | float):  # TOML 1.5 or true: int() would quietly give 1
            raise ConfigError(f"{name} must be a whole number, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if name in _BOOLS:
        text = str(value).lower()  # TOML true/false too
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"{name} must be 1 or 0 (true or false), not {value!r}")
        return text in _TRUE
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
                mode = os.fstat(fh.fileno())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = data.get("callguard", data)
        unknown = set(data) - set(_ENV)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        if set(data) & set(SECRETS):
            _warn_if_exposed(f"config file {path}", path, mode)
        values.update(data)
    for name, var in _ENV.items():
        if env.get(var):
            values[name] = env[var]
    for name in SECRETS:
        found = _secret_sources(name, env)
        if len(found) > 1:
            raise ConfigError(f"{' and '.join(found)} both set {name}: keep one")
        for source, path in found.items():
            values[name] = env[_ENV[name]] if path is None else read_secret(source, path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "home" not in values:
        values["home"] = default_home(env)
        _check_legacy_home(values["home"])
    settings = replace(Settings(), **{k: _coerce(k, v) for k, v in values.items()})
    return settings.validate()


def _secret_sources(name: str, env) -> dict[str, str | None]:
    """Where the environment gives secret setting `name`: the source's name for the
    operator -> the file that holds it (None: the variable itself)."""
    var = _ENV[name]
    found: dict[str, str | None] = {}
    if env.get(var):
        found[var] = None
    if env.get(var + "_FILE"):
        found[var + "_FILE"] = env[var + "_FILE"]
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.lexists(os.path.join(credentials, name)):
        found[f"the systemd credential {name}"] = os.path.join(credentials, name)
    return found


_WARNED: set[str] = set()  # files already warned about, once per process


def read_secret(source: str, path: str) -> str:
    """The secret in a file, without one trailing newline; a ConfigError that names the
    file, never its content. A file that others may read is used, with a warning (once)."""
    what = f"{source} ({path})"
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno())
            data = fh.read(SECRET_FILE_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > SECRET_FILE_MAX:
        raise ConfigError(f"{what} is larger than {SECRET_FILE_MAX} bytes: not a secret")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{what} is empty")
    if "\n" in text:
        raise ConfigError(f"{what} holds more than one line")
    _warn_if_exposed(what, path, mode)
    return text


def _warn_if_exposed(what: str, path: str, st: os.stat_result) -> None:
    """libpq's rule for its key files: 0600, or 0640 when root owns it (a group, e.g.
    callguard, may read what root keeps). Once a file per process."""
    if st.st_mode & (0o037 if st.st_uid == 0 else 0o077) and path not in _WARNED:
        _WARNED.add(path)
        logging.getLogger(__name__).warning(
            "%s holds a secret and other users can read it (mode %04o): chmod 0600 it, or "
            "0640 owned by root", what, st.st_mode & 0o7777)


def carries_password(url: str | None) -> bool:
    """A URL with a password in it (user:PASSWORD@ or ?password=)."""
    try:
        parts = urlsplit(url or "")
        return bool(parts.password or parse_qs(parts.query).get("password"))
    except ValueError:
        return bool(url)  # not even a URL: take it for one that may hold a secret


def without_secrets(env) -> dict:
    """The environment for a process callguard starts (the embedded redis-server): without
    the secrets' variables, which it has no use for. /proc/PID/environ of callguard itself
    still shows what it was started with: use the _FILE variables or credentials."""
    secret = {_ENV[name] for name in SECRETS}
    return {k: v for k, v in env.items() if k not in secret}


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_url(name: str, url: str) -> None:
    """A URL that splits into its parts. Checked here because its client's own error would
    quote a part of it: a password with a / in it is taken for the host, the rest for the
    port ("Port could not be cast to integer value as 'pass'")."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a bad port
        ok = bool(parts.scheme)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{name} is not a valid URL (in a password, write / # ? @ % as "
                          "%2F %23 %3F %40 %25)")


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
