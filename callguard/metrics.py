"""What each long-running process tells Prometheus, with prometheus_client.

The call path only bumps counters and observes histograms, through children bound
once at start (a label lookup per call would cost more than the count). Whatever
is a state rather than an event (live calls, money held, the link, the stream's
lag, notices waiting) is read when Prometheus scrapes, by `Readings`, from the
objects that own it: nothing on the call path keeps a second copy.

Names follow Prometheus conventions: `callguard_..._total` for counters, base
units (`_seconds`), money in the account currency's units (a float: metrics are
for graphs, the books hold the micro-units).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .decisions import Reason

log = logging.getLogger(__name__)
disable_created_metrics()  # the `_created` twin of every counter doubles a scrape for nothing

# A setup answered from memory takes well under a millisecond; one that waited for a
# slow Redis up to the AGI budget (300 ms by default).
SETUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3)
SCRIPTS = ("authorize", "answer", "extend", "commit")  # the call steps' round trips
CUTOFF_REASONS = ("no_credit", "lost", "operator")


def new_registry() -> CollectorRegistry:
    """A registry per process (per adapter in the tests), with the process's own
    CPU, memory and file descriptors, and the build."""
    from importlib.metadata import PackageNotFoundError, version

    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    try:
        release = version("callguard")
    except PackageNotFoundError:
        release = "unknown"
    Gauge("callguard_build_info", "The callguard release this process runs", ["version"],
          registry=registry).labels(release).set(1)
    return registry


class Readings(Collector):
    """Gauges and counters read at scrape time from callables. A reading that fails
    (Redis or the books away) is left out of that scrape and logged at debug: the
    scrape itself must still answer, `callguard_ready` says what is wrong."""

    def __init__(self, registry: CollectorRegistry):
        self._readings: list[tuple[type, str, str, tuple, Callable]] = []
        registry.register(self)

    def gauge(self, name: str, doc: str, read: Callable, labels: tuple = ()) -> None:
        """`read()` gives a number, or with `labels` an iterable of (label values, number)."""
        self._readings.append((GaugeMetricFamily, name, doc, labels, read))

    def counter(self, name: str, doc: str, read: Callable, labels: tuple = ()) -> None:
        self._readings.append((CounterMetricFamily, name, doc, labels, read))

    def describe(self) -> Iterable:
        return []  # read only when scraped: describing must not call Redis

    def collect(self) -> Iterable:
        for family, name, doc, labels, read in self._readings:
            try:
                value = read()
            except Exception as exc:  # noqa: BLE001 - one failed reading, not the scrape
                log.debug("metric %s: %s", name, exc)
                continue
            metric = family(name, doc, labels=list(labels))
            for values, number in (value if labels else [((), value)]):
                metric.add_metric(list(values), number)
            yield metric


def cached(read: Callable, ttl: float = 1.0) -> Callable:
    """`read` at most once per `ttl`: several metrics of one scrape share one query."""
    last: list = [float("-inf"), None]
    lock = threading.Lock()

    def reading():
        with lock:
            if time.monotonic() - last[0] >= ttl:
                last[1], last[0] = read(), time.monotonic()
            return last[1]

    return reading


class ServeMetrics:
    """The call path's counters of one `serve` process; `pbx` is its one label value."""

    def __init__(self, pbx: str, registry: CollectorRegistry | None = None):
        self.pbx = pbx
        self.registry = registry or new_registry()
        r = self.registry
        setups = Counter("callguard_call_setups", "Call setups answered, by result and reason",
                         ["pbx", "result", "reason"], registry=r)
        # Bound once: every reason shows (as 0) before it first happens, so rate() works.
        self.denied = {reason: setups.labels(pbx, "deny", reason.value) for reason in Reason
                       if reason is not Reason.OK}
        self.allowed = {Reason.OK: setups.labels(pbx, "allow", Reason.OK.value),
                        Reason.UNAVAILABLE: setups.labels(pbx, "allow", "UNAVAILABLE")}
        self.setup_seconds = Histogram(
            "callguard_call_setup_duration_seconds",
            "Time from a call setup's request to callguard's answer", ["pbx"],
            buckets=SETUP_BUCKETS, registry=r).labels(pbx)
        round_trip = Histogram("callguard_redis_round_trip_seconds",
                               "Round trip of one call step's script to Redis", ["op"],
                               buckets=REDIS_BUCKETS, registry=r)
        self.redis_round_trip = {op: round_trip.labels(op) for op in SCRIPTS}
        extends = Counter("callguard_extends", "Extends of a running call's credit, by result",
                          ["pbx", "result"], registry=r)
        self.extend_ok, self.extend_failed = extends.labels(pbx, "ok"), extends.labels(
            pbx, "failed")
        cutoffs = Counter("callguard_cutoffs",
                          "Calls callguard hung up: no_credit (the grant ran out), lost "
                          "(Redis no longer holds the session), operator (a kill)",
                          ["pbx", "reason"], registry=r)
        self.cutoffs = {reason: cutoffs.labels(pbx, reason) for reason in CUTOFF_REASONS}
        pushes = Counter("callguard_deadline_pushes",
                         "Dead man's timer pushes to the PBX, by result", ["pbx", "result"],
                         registry=r)
        self.push_ok, self.push_failed = pushes.labels(pbx, "ok"), pushes.labels(pbx, "failed")
        self.fail_open = Counter("callguard_fail_open",
                                 "Calls allowed without credit control (fail_open)", ["pbx"],
                                 registry=r).labels(pbx)
        self.refused = Counter("callguard_setup_connections_refused",
                               "Call-setup connections from addresses not allowed", ["pbx"],
                               registry=r).labels(pbx)
        self.bad_requests = Counter("callguard_setup_bad_requests",
                                    "Call-setup requests that broke the protocol", ["pbx"],
                                    registry=r).labels(pbx)
        self.ghosts = Counter("callguard_ghost_sessions",
                              "Sessions released because the PBX never reported their "
                              "channel (no event, not in its channel list)", ["pbx"],
                              registry=r).labels(pbx)
        self.readings = Readings(r)

    def setup(self, allow: bool, reason: Reason, seconds: float) -> None:
        (self.allowed if allow else self.denied)[reason].inc()
        self.setup_seconds.observe(seconds)
