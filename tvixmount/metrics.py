"""Mount metrics: what the FUSE handlers record, and the two ways an operator reads it.

Data flow::

    FUSE handler (llfuse lock held) ── fuse_timing.timed ──> FuseMetrics: op counts, errors,
        bytes read, cache hits, latency bucket counts (plain int increments)
                                           │
    getfattr -n user.tvixmount.stats ──────┤  TvixOperations.stats(): JSON, latency
                                           │  percentiles estimated from the buckets
    GET /metrics (exporter thread) ── MountCollector ── reads the same snapshot at
        scrape time, plus the pool's and the Vfs's own counters

Why this split: the handlers run under llfuse's global lock, so the hot
path may only bump counters it already owns: no allocation, no lock of its
own. That is also why the latency histogram is a list of bucket counts here
and not a prometheus_client.Histogram, whose observe takes a lock per
counter it bumps (measured: 1.2 us per observe, against 0.8 us for the whole
timed() wrapper here); the scrape exports it as a histogram all the same.
Everything another module already counts (the worker pool's requests,
timeouts and restarts; the Vfs's table sizes) is read when someone asks,
never mirrored. The scrape runs in the exporter thread without llfuse's
lock: it only copies dicts and lists and reads ints, which the GIL keeps
consistent one object at a time (a scrape may see a read counted in
``read_bytes`` but not yet in its histogram; counters never go back).

The exporter's registry is a ``CollectorRegistry`` of its own, never
prometheus_client's global one: that one also carries process and platform
metrics we do not promise, and a second registration of our names (a test
making two exporters in one process) would fail there.
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector as PrometheusCollector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# FUSE op latencies: a cached lookup answers in tens of microseconds, a cold
# read from a remote store in up to the request deadline (default 30 s).
LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIMED_OPS = ("lookup", "readdir", "open", "read")
CACHES = ("listing", "root_name")
DEFAULT_HOST = "127.0.0.1"

# Pool counters exported as <name>_total; worker restarts get their own name.
_POOL_COUNTERS = {
    "requests": "store requests sent to a worker",
    "errors": "store requests answered with an error",
    "timeouts": "store requests that ran past their deadline",
    "lost": "store requests lost with their worker and not re-sent",
    "resent": "store requests re-sent after their worker died",
    "killed": "workers killed as hung",
    "ring_replies": "read replies whose bytes came through the shared-memory ring",
    "ring_bytes": "bytes that came through the shared-memory ring",
}
_READAHEAD_COUNTERS = {
    "scheduled": "small files queued to be fetched ahead of their reader",
    "fetched": "small files fetched ahead and kept",
    "failed": "fetches ahead that failed (the reader's own read reports why)",
    "hits": "FUSE reads answered from the files fetched ahead",
    "evicted": "files fetched ahead and dropped unread (cache full)",
}
_POOL_OTHER = {"restarts", "backlog", "failures"}  # failures = errors + timeouts + lost


class FuseMetrics:
    """Per-op counts, errors and latencies, bytes read and cache hits of one mount.

    Every recording method runs under llfuse's global lock (the handler's),
    so the dicts need no lock of their own.
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(TIMED_OPS, 0)
        self.errors: dict[tuple[str, str], int] = {}
        self.read_bytes = 0
        self.hits = dict.fromkeys(CACHES, 0)
        self.misses = dict.fromkeys(CACHES, 0)
        self.latency = {op: LatencyHistogram() for op in TIMED_OPS}

    def done(self, op: str, seconds: float) -> None:
        self.counts[op] += 1
        histogram = self.latency[op]
        histogram.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.seconds += seconds

    def failed(self, op: str, number: int) -> None:
        key = (op, errno.errorcode.get(number, str(number)))
        self.errors[key] = self.errors.get(key, 0) + 1

    def cache(self, name: str, hit: bool) -> None:
        if hit:
            self.hits[name] += 1
        else:
            self.misses[name] += 1

    def summary(self) -> dict[str, Any]:
        """The xattr's share: counts, errors by errno, bytes read, cache hits, latency percentiles."""
        errors: dict[str, dict[str, int]] = {}
        for (op, name), n in list(self.errors.items()):
            errors.setdefault(op, {})[name] = n
        return {
            "ops": dict(self.counts),
            "errors": errors,
            "read_bytes": self.read_bytes,
            "cache": {c: {"hits": self.hits[c], "misses": self.misses[c]} for c in CACHES},
            "latency": {op: summary.as_dict() for op, summary in self.latencies().items()},
        }

    def latencies(self) -> dict[str, LatencySummary]:
        """Each op's count, total seconds and p50/p99, estimated from the histogram's buckets."""
        out = {}
        for op, histogram in self.latency.items():
            seconds = histogram.seconds
            cumulative = histogram.cumulative()
            out[op] = LatencySummary(cumulative[-1][1], seconds, quantile(0.5, cumulative),
                                     quantile(0.99, cumulative))
        return out


class LatencyHistogram:
    """One op's latencies: a count per bucket of LATENCY_BUCKETS (and +Inf), and their sum.

    ``buckets[i]`` counts the values in (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]];
    FuseMetrics.done writes them under llfuse's lock.
    """

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, values at or below it), ascending, ending with +Inf: Prometheus's form."""
        out, below = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), list(self.buckets), strict=True):
            below += n
            out.append((bound, below))
        return out


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    seconds: float
    p50: float | None
    p99: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum_s": round(self.seconds, 6),
                "p50_s": None if self.p50 is None else round(self.p50, 6),
                "p99_s": None if self.p99 is None else round(self.p99, 6)}


def quantile(q: float, cumulative: list[tuple[float, int]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count), ascending.

    Interpolates linearly inside the bucket the rank falls in, as
    Prometheus's histogram_quantile does; a rank in the +Inf bucket gives the
    largest finite bound (all that is known is "more than that"). None when empty.
    """
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class MountCollector(PrometheusCollector):
    """Prometheus families built at scrape time from a mount's stats snapshot.

    ``snapshot`` is TvixOperations.stats (the xattr's JSON as a dict), so the
    two views cannot disagree about what a counter means; the latency
    histograms come from ``metrics`` itself. Keys another module does not
    report (a LocalFetcher has no pool) are left out.
    """

    def __init__(self, metrics: FuseMetrics, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        latency = HistogramMetricFamily("tvixmount_fuse_op_seconds", "time to answer one FUSE request",
                                        labels=["op"])
        for op, histogram in self.metrics.latency.items():
            seconds = histogram.seconds
            latency.add_metric([op], [(floatToGoString(b), n) for b, n in histogram.cumulative()], seconds)
        yield latency
        stats = self.snapshot()
        ops = CounterMetricFamily("tvixmount_fuse_ops", "FUSE requests answered, by op", labels=["op"])
        for op, n in stats["ops"].items():
            ops.add_metric([op], n)
        yield ops
        errors = CounterMetricFamily("tvixmount_fuse_errors", "FUSE requests answered with an error",
                                     labels=["op", "errno"])
        for op, by_errno in stats["errors"].items():
            for name, n in by_errno.items():
                errors.add_metric([op, name], n)
        yield errors
        yield CounterMetricFamily("tvixmount_read_bytes", "bytes returned by FUSE reads",
                                  value=stats["read_bytes"])
        hits = CounterMetricFamily("tvixmount_cache_hits", "look-ups answered from a cache", labels=["cache"])
        misses = CounterMetricFamily("tvixmount_cache_misses", "look-ups that had to ask a worker",
                                     labels=["cache"])
        for cache, counts in stats["cache"].items():
            hits.add_metric([cache], counts["hits"])
            misses.add_metric([cache], counts["misses"])
        yield hits
        yield misses
        for key in ("open_files", "open_dirs"):
            yield GaugeMetricFamily(f"tvixmount_{key}", f"FUSE handles now open ({key})", value=stats[key])
        for key, value in stats.get("vfs", {}).items():
            if isinstance(value, int):
                yield GaugeMetricFamily(f"tvixmount_vfs_{key}", f"Vfs table size: {key}", value=value)
        yield from _pool_families(stats.get("fetcher", {}))
        yield from _readahead_families(stats)


def _readahead_families(stats: dict[str, Any]) -> Iterator[Metric]:
    files = stats.get("readahead", {})
    for key, help_text in _READAHEAD_COUNTERS.items():
        if isinstance(files.get(key), int):
            yield CounterMetricFamily(f"tvixmount_readahead_{key}", help_text, value=files[key])
    if isinstance(files.get("cached_bytes"), int):
        yield GaugeMetricFamily("tvixmount_readahead_cached_bytes", "bytes fetched ahead, not yet read",
                                value=files["cached_bytes"])
    trees = stats.get("tree_ahead", {})
    if isinstance(trees.get("fetched"), int):
        yield CounterMetricFamily("tvixmount_tree_ahead_fetched", "store path trees fetched ahead of a walk",
                                  value=trees["fetched"])


def _pool_families(pool: dict[str, Any]) -> Iterator[Metric]:
    for key, help_text in _POOL_COUNTERS.items():
        if isinstance(pool.get(key), int):
            yield CounterMetricFamily(f"tvixmount_pool_{key}", help_text, value=pool[key])
    for key, value in pool.items():
        # Counters added to the pool after this module was written still show, untyped.
        if key not in _POOL_COUNTERS and key not in _POOL_OTHER and isinstance(value, int):
            yield UnknownMetricFamily(f"tvixmount_pool_{key}", f"worker pool stats: {key}", value=value)
    if isinstance(pool.get("restarts"), int):
        yield CounterMetricFamily("tvixmount_worker_restarts", "worker processes restarted after dying",
                                  value=pool["restarts"])
    if isinstance(pool.get("backlog"), int):
        yield GaugeMetricFamily("tvixmount_pool_backlog", "store requests waiting for a ready worker",
                                value=pool["backlog"])
    workers = pool.get("workers")
    if isinstance(workers, dict):
        ready = sum(1 for w in workers.values() if w.get("ready"))
        inflight = sum(int(w.get("inflight", 0)) for w in workers.values())
        yield GaugeMetricFamily("tvixmount_pool_workers_ready", "workers ready for requests", value=ready)
        yield GaugeMetricFamily("tvixmount_pool_inflight", "store requests a worker is working on",
                                value=inflight)


# -- the exporter -----------------------------------------------------------------------


class ListenError(Exception):
    """The metrics endpoint cannot listen where it was told to."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT``; no host means 127.0.0.1.

    Port 0 takes any free port (the log says which). Raises ValueError
    naming what is wrong; the host is resolved only when binding.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"{text!r}: empty IPv6 address in brackets")
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:9100")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535, not {port_text!r}")
    return ListenAddress(host or DEFAULT_HOST, int(port_text))


class Exporter:
    """The /metrics HTTP endpoint: prometheus_client's server in a daemon thread.

    Start it only after the worker pool forked its zygote: no thread may
    exist in the dispatcher before that fork.
    """

    def __init__(self, address: ListenAddress, metrics: FuseMetrics,
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        registry.register(MountCollector(metrics, snapshot))
        try:
            self._server, self._thread = start_http_server(address.port, address.host, registry=registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ListenError(f"--metrics-listen {address}: cannot listen: {reason}") from None
        self.address = ListenAddress(address.host, self._server.server_port)
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        """Stop serving and free the port; bounded (the serve loop polls every 0.5 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
