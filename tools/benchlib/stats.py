"""Percentiles and medians for latency samples and repeated runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no samples.

    Interpolated rather than nearest-rank so that p99 of a few hundred
    samples moves smoothly between runs instead of jumping to one outlier.
    """
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def median(values: Sequence[float]) -> float:
    """Median of repeated measurements; NaN when there are none."""
    clean = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(clean)) if clean else float("nan")


def fmt_bytes(n: float) -> str:
    """Human size with decimal units (MB/s figures are decimal too)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
