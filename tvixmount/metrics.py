"""Mount metrics: what the FUSE handlers record, and the stats values every part hands over.

Data flow::

    FUSE handler (llfuse lock held) ── fuse_timing.timed ──> FuseMetrics: op counts,
        errors, bytes read, cache hits, latency bucket counts (plain int increments)

    TvixOperations.stats() ──> MountStats: FuseMetrics.snapshot() and each part's
        own stats() (Vfs, pool, readahead, tree-ahead), frozen dataclasses
          │
          ├── getfattr -n user.tvixmount.stats: MountStats.as_json(), the field names
          └── GET /metrics (metrics_export): the fields declared with counter()/gauge()

Why this split: the handlers run under llfuse's global lock, so the hot
path may only bump counters it already owns: no allocation, no lock of its
own. That is also why the latency histogram is a list of bucket counts here
and not a prometheus_client.Histogram, whose observe takes a lock per
counter it bumps (measured: 1.2 us per observe, against 0.8 us for the whole
timed() wrapper); the scrape exports it as a histogram all the same.
Everything another module already counts (the worker pool's requests,
timeouts and restarts; the Vfs's table sizes) is read when someone asks,
never mirrored.

Each part declares its stats once, as a frozen dataclass whose fields are
the JSON keys; a field that /metrics exports says so with ``counter()``,
``gauge()`` or ``untyped()``, which carry its help text (and a family name
when it is not ``<section>_<field>``). Neither view spells a name again, so
the two cannot disagree about what a counter means.

This module imports neither llfuse nor prometheus_client: the parts that
declare stats, and the command line parsing ``--metrics-listen``, load it
in processes and tools that need neither.
"""

from __future__ import annotations

import bisect
import errno
import math
from dataclasses import Field, asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fetcher import FetcherStats
    from .readahead import ReadaheadStats, TreeAheadStats
    from .segcache import SegmentCacheStats
    from .smallblobs import SmallBlobStats
    from .vfs import VfsStats

# FUSE op latencies: a cached lookup answers in tens of microseconds, a cold
# read from a remote store in up to the request deadline (default 30 s).
LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIMED_OPS = ("lookup", "readdir", "open", "read")
CACHES = ("listing", "root_name")
DEFAULT_HOST = "127.0.0.1"

# -- declaring a stats field as exported ----------------------------------------------------

_EXPORTED = "tvixmount.exported"  # the dataclass field metadata key


@dataclass(frozen=True, slots=True)
class Exported:
    """How one stats field appears on /metrics.

    ``kind`` is the family type (counter, gauge or untyped); ``name`` the
    family name after ``tvixmount_`` when it is not the section's prefix
    and the field's name.
    """

    kind: str
    help: str
    name: str | None = None


def counter(help_text: str, *, name: str | None = None) -> int:
    """A stats field that only grows; /metrics exports it as a counter (``tvixmount_..._total``)."""
    return field(default=0, metadata={_EXPORTED: Exported("counter", help_text, name)})


def gauge(help_text: str, *, name: str | None = None) -> int:
    """A stats field that is a level (a table size, handles open); /metrics exports it as a gauge."""
    return field(default=0, metadata={_EXPORTED: Exported("gauge", help_text, name)})


def untyped(help_text: str, *, name: str | None = None) -> int:
    """A stats field /metrics exports without a type."""
    return field(default=0, metadata={_EXPORTED: Exported("untyped", help_text, name)})


def exported(f: Field[Any]) -> Exported | None:
    """What ``counter``/``gauge``/``untyped`` declared for a field; None for a JSON-only field."""
    return f.metadata.get(_EXPORTED)


# -- the FUSE handlers' own counters ---------------------------------------------------------


class FuseMetrics:
    """Per-op counts, errors and latencies, bytes read and cache hits of one mount.

    Every recording method runs under llfuse's global lock (the handler's),
    so the dicts need no lock of their own. A snapshot runs without it: it
    only copies dicts and lists and reads ints, which the GIL keeps
    consistent one object at a time (it may see a read counted in
    ``read_bytes`` but not yet in its histogram; counters never go back).
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

    def snapshot(self) -> FuseStats:
        errors: dict[str, dict[str, int]] = {}
        for (op, name), n in list(self.errors.items()):
            errors.setdefault(op, {})[name] = n
        return FuseStats(
            ops=dict(self.counts),
            errors=errors,
            cache={c: CacheCounts(self.hits[c], self.misses[c]) for c in CACHES},
            latency=self.latencies(),
            read_bytes=self.read_bytes,
        )

    def summary(self) -> dict[str, Any]:
        """The xattr's share: counts, errors by errno, bytes read, cache hits, latency percentiles."""
        return asdict(self.snapshot())

    def latencies(self) -> dict[str, LatencySummary]:
        """Each op's count, total seconds and p50/p99, estimated from the histogram's buckets."""
        out = {}
        for op, histogram in self.latency.items():
            seconds = histogram.seconds
            cumulative = histogram.cumulative()
            out[op] = LatencySummary(cumulative[-1][1], round(seconds, 6), _micro(quantile(0.5, cumulative)),
                                     _micro(quantile(0.99, cumulative)))
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
    """One op's latency for a reader: seconds rounded to the microsecond, None before the first call."""

    count: int
    sum_s: float
    p50_s: float | None
    p99_s: float | None


@dataclass(frozen=True, slots=True)
class CacheCounts:
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class FuseStats:
    """What the FUSE handlers counted; /metrics exports the per-op and per-cache maps with labels."""

    ops: dict[str, int]
    errors: dict[str, dict[str, int]]  # op -> errno name -> count
    cache: dict[str, CacheCounts]
    latency: dict[str, LatencySummary]
    read_bytes: int = counter("bytes returned by FUSE reads")


def _micro(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


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


# -- one mount's stats at one moment ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountStats:
    """Everything ``user.tvixmount.stats`` shows and /metrics exports, taken at one moment."""

    fuse: FuseStats
    vfs: VfsStats
    fetcher: FetcherStats
    readahead: ReadaheadStats
    tree_ahead: TreeAheadStats
    small_blobs: SmallBlobStats
    segment_cache: SegmentCacheStats
    open_files: int = gauge("FUSE file handles now open")
    open_dirs: int = gauge("FUSE directory handles now open")

    def as_json(self) -> dict[str, Any]:
        """The xattr's JSON object: the FUSE counters at the top, each part under its field's name."""
        out = asdict(self)
        out.update(out.pop("fuse"))
        return out


# -- where the endpoint listens (parsed with the command line, before anything starts) ------


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
