"""The Prometheus endpoint: /metrics built at scrape time from a mount's stats.

The registry is a ``CollectorRegistry`` of its own, never
prometheus_client's global one: that one also carries process and platform
metrics we do not promise, and a second registration of our names (a test
making two exporters in one process) would fail there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector as PrometheusCollector
from prometheus_client.utils import floatToGoString

from .metrics import FuseMetrics, ListenAddress, ListenError

log = logging.getLogger(__name__)

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




class Exporter:
    """The /metrics HTTP endpoint: prometheus_client's server in a daemon thread.

    Start it only after the worker pool forked its zygote: no thread may
    exist in the dispatcher before that fork.
    """

    def __init__(self, address: ListenAddress, metrics: FuseMetrics,
                 snapshot: Callable[[], dict[str, Any]]) -> None:
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
