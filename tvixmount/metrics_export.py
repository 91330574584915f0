"""The Prometheus endpoint: /metrics built at scrape time from a mount's stats.

Data flow::

    GET /metrics (prometheus_client's server thread, without llfuse's lock)
        └── MountCollector.collect: FuseMetrics' latency histograms, then one
            MountStats snapshot (TvixOperations.stats, the xattr's source too)

Every family is a view of that snapshot: the FUSE op, errno and cache maps
become labelled families here; every other family is a stats field
declared with metrics.counter/gauge/untyped, named ``tvixmount_<section
prefix><field>`` unless the field names its family itself. The help text
comes from that declaration.

The registry is a ``CollectorRegistry`` of its own, never
prometheus_client's global one (a second registration of our names, a test
making two exporters in one process, would fail there); it also carries
``tvixmount_build_info`` and the process families (metrics_common).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector as PrometheusCollector
from prometheus_client.utils import floatToGoString

from .metrics import FuseMetrics, ListenAddress, MountStats, exported
from .metrics_common import MetricsServer, registry_for
from .poolstate import PoolStats

log = logging.getLogger(__name__)

_FAMILY = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "untyped": UnknownMetricFamily}


class MountCollector(PrometheusCollector):
    """Prometheus families built at scrape time from a mount's stats snapshot.

    ``snapshot`` is TvixOperations.stats, so /metrics and the stats xattr
    read the same values; the latency histograms come from ``metrics``
    itself (the snapshot holds only their percentiles).
    """

    def __init__(self, metrics: FuseMetrics, snapshot: Callable[[], MountStats]) -> None:
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
        fuse = stats.fuse
        ops = CounterMetricFamily("tvixmount_fuse_ops", "FUSE requests answered, by op", labels=["op"])
        for op, n in fuse.ops.items():
            ops.add_metric([op], n)
        yield ops
        errors = CounterMetricFamily("tvixmount_fuse_errors", "FUSE requests answered with an error",
                                     labels=["op", "errno"])
        for op, by_errno in fuse.errors.items():
            for name, n in by_errno.items():
                errors.add_metric([op, name], n)
        yield errors
        yield from families(fuse, "")
        hits = CounterMetricFamily("tvixmount_cache_hits", "look-ups answered from a cache", labels=["cache"])
        misses = CounterMetricFamily("tvixmount_cache_misses", "look-ups that had to ask a worker",
                                     labels=["cache"])
        for cache, counts in fuse.cache.items():
            hits.add_metric([cache], counts.hits)
            misses.add_metric([cache], counts.misses)
        yield hits
        yield misses
        yield from families(stats, "")
        yield from families(stats.vfs, "vfs_")
        yield from families(stats.fetcher, "pool_")
        if isinstance(stats.fetcher, PoolStats):
            yield from _worker_families(stats.fetcher)
        yield from families(stats.readahead, "readahead_")
        yield from families(stats.tree_ahead, "tree_ahead_")
        yield from families(stats.small_blobs, "small_blobs_")
        yield from families(stats.segment_cache, "segment_cache_")


def families(stats: Any, prefix: str) -> Iterator[Metric]:
    """One family per exported field of the stats dataclass ``stats``, in field order."""
    for f in fields(stats):
        spec = exported(f)
        if spec is not None:
            name = f"tvixmount_{spec.name or prefix + f.name}"
            yield _FAMILY[spec.kind](name, spec.help, value=getattr(stats, f.name))


def _worker_families(pool: PoolStats) -> Iterator[Metric]:
    workers = pool.workers.values()
    yield GaugeMetricFamily("tvixmount_pool_workers_ready", "workers ready for requests",
                            value=sum(1 for w in workers if w.ready))
    yield GaugeMetricFamily("tvixmount_pool_inflight", "store requests a worker is working on",
                            value=sum(w.inflight for w in workers))


class Exporter:
    """The mount's /metrics endpoint: its families, build info and process metrics.

    Start it only after the worker pool forked its zygote: no thread may
    exist in the dispatcher before that fork.
    """

    def __init__(self, address: ListenAddress, metrics: FuseMetrics,
                 snapshot: Callable[[], MountStats]) -> None:
        registry = registry_for("tvixmount")
        registry.register(MountCollector(metrics, snapshot))
        self._server = MetricsServer(address, registry, "mount")
        self.address = self._server.address

    def close(self) -> None:
        self._server.close()
