"""Mount metrics: what the FUSE handlers record, for the stats xattr and /metrics.

Data flow::

    FUSE handler (llfuse lock held) ── fuse_timing.timed ──> FuseMetrics: op counts, errors,
        bytes read, cache hits, latency bucket counts (plain int increments)
                                           │
    getfattr -n user.tvixmount.stats ──────┤  TvixOperations.stats(): JSON, latency
                                           │  percentiles estimated from the buckets
    GET /metrics (metrics_export) ── MountCollector ── reads the same snapshot at
        scrape time, plus the pool's and the Vfs's own counters

Why this split: the handlers run under llfuse's global lock, so the hot
path may only bump counters it already owns: no allocation, no lock of its
own. That is also why the latency histogram is a list of bucket counts here
and not a prometheus_client.Histogram, whose observe takes a lock per
counter it bumps (measured: 1.2 us per observe, against 0.8 us for the whole
timed() wrapper); the scrape exports it as a histogram all the same.
Everything another module already counts (the worker pool's requests,
timeouts and restarts; the Vfs's table sizes) is read when someone asks,
never mirrored. The scrape runs in the exporter thread without llfuse's
lock: it only copies dicts and lists and reads ints, which the GIL keeps
consistent one object at a time (a scrape may see a read counted in
``read_bytes`` but not yet in its histogram; counters never go back).

This module imports neither llfuse nor prometheus_client; the command line
parses ``--metrics-listen`` with it before anything starts.
"""

from __future__ import annotations

import bisect
import errno
import math
from dataclasses import dataclass
from typing import Any

# FUSE op latencies: a cached lookup answers in tens of microseconds, a cold
# read from a remote store in up to the request deadline (default 30 s).
LATENCY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIMED_OPS = ("lookup", "readdir", "open", "read")
CACHES = ("listing", "root_name")
DEFAULT_HOST = "127.0.0.1"

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


# -- where the endpoint listens (parsed with the command line) ---------------------------


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
