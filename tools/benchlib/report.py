"""Summaries of the runs: medians and their spread, ratios, the issues' targets, Markdown, JSON, a plot.

Ratios are always ``value / reference`` of the metric itself: for MB/s
higher is better (a target says ">= x"), for seconds lower is better (a
target says "<= x"). Keeping one definition avoids the classic mistake of
inverting one row of a table and not the next. Every table shows
tvixmount against squashfuse (the usual way to ship a closure) and
against the passthrough (what any Python llfuse filesystem pays), and
against the verifying passthrough (what one that must hash every segment
it serves pays), and against the hop passthrough (what one that must also
leave every file read to worker processes, as tvixmount's shape does, pays).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import median

TARGET_ORDER = ("native", "squashfuse", "passthrough", "passthrough-verify", "passthrough-hop",
                "tvix-embedded", "tvix-grpc")
MODES = ("cold", "warm", "cached")  # cached: a fresh mount whose backing files are in the page cache
RATIOS = (("embedded / squashfuse", "tvix-embedded", "squashfuse"),
          ("embedded / passthrough", "tvix-embedded", "passthrough"),
          ("embedded / verifying passthrough", "tvix-embedded", "passthrough-verify"),
          ("embedded / hop passthrough", "tvix-embedded", "passthrough-hop"),
          ("embedded / native", "tvix-embedded", "native"),
          ("gRPC / squashfuse", "tvix-grpc", "squashfuse"))


@dataclass(frozen=True, slots=True)
class Metric:
    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = (
    Metric("seq_read", "mb_s", "sequential read, big files", "MB/s", True),
    Metric("seq_cached", "mb_s", "sequential read, fresh mount, backing in page cache", "MB/s", True),
    Metric("find", "seconds", "find over the tree", "s", False),
    Metric("stat_walk", "seconds", "stat walk (os.walk + lstat)", "s", False),
    Metric("tar", "seconds", "tar of the closure into a pipe", "s", False),
    Metric("random_read", "mb_s", "random 128 KiB reads, 8 readers", "MB/s", True),
    Metric("random_read", "p50_ms", "  p50 latency per read", "ms", False),
    Metric("random_read", "p99_ms", "  p99 latency per read", "ms", False),
    Metric("direct_read", "mb_s", "O_DIRECT random 128 KiB reads, 8 processes", "MB/s", True),
    Metric("direct_read", "p50_ms", "  p50 latency per read", "ms", False),
    Metric("direct_read", "p99_ms", "  p99 latency per read", "ms", False),
)


@dataclass(frozen=True, slots=True)
class Goal:
    """One target from an issue: ``subject``'s metric against ``reference``'s (a target of the run)."""

    issue: str
    name: str
    workload: str
    mode: str
    key: str
    threshold: float
    at_least: bool  # True: ratio >= threshold; False: ratio <= threshold
    subject: str = "tvix-embedded"
    reference: str = "squashfuse"


FARMS = "build farms"
FLOOR = "11 (Python floor)"
GOALS = (
    Goal(FARMS, "cold sequential read >= 1.0x squashfuse", "seq_read", "cold", "mb_s", 1.0, True),
    Goal(FARMS, "warm re-read >= 0.9x squashfuse", "seq_read", "warm", "mb_s", 0.9, True),
    Goal(FARMS, "cold find within 1.3x squashfuse's time", "find", "cold", "seconds", 1.3, False),
    Goal(FARMS, "cold stat walk within 1.3x squashfuse's time", "stat_walk", "cold", "seconds", 1.3, False),
    Goal(FARMS, "cold tar within 1.3x squashfuse's time", "tar", "cold", "seconds", 1.3, False),
    Goal(FARMS, "warm stat walk at least as fast as squashfuse's", "stat_walk", "warm", "seconds", 1.0,
         False),
    Goal(FARMS, "warm find at least as fast as squashfuse's", "find", "warm", "seconds", 1.0, False),
    Goal(FLOOR, "O_DIRECT random reads >= 1.0x squashfuse", "direct_read", "cold", "mb_s", 1.0, True),
    Goal(FLOOR, "O_DIRECT random reads: p50 within 1.0x squashfuse's", "direct_read", "cold", "p50_ms", 1.0,
         False),
    Goal(FLOOR, "sequential read, fresh mount, backing cached >= 0.8x squashfuse", "seq_cached", "cached",
         "mb_s", 0.8, True),
    Goal(FLOOR, "cold tar within 0.8x squashfuse's time", "tar", "cold", "seconds", 0.8, False),
    Goal(FLOOR, "cold tar within 1.3x the passthrough's time", "tar", "cold", "seconds", 1.3, False,
         reference="passthrough"),
    Goal(FLOOR, "cold find within 1.5x squashfuse's time", "find", "cold", "seconds", 1.5, False),
    Goal(FLOOR, "cold stat walk within 1.0x squashfuse's time", "stat_walk", "cold", "seconds", 1.0, False),
    Goal(FLOOR, "gRPC cold tar within 1.5x the embedded mount's time", "tar", "cold", "seconds", 1.5, False,
         subject="tvix-grpc", reference="tvix-embedded"),
)
GRPC_PLAIN_GOALS = ((FARMS, 0.7), (FLOOR, 0.8))
LATENCY_GOAL = 6.0


def summarise(samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> dict[str, Any]:
    """target -> workload -> mode -> {metric: median over runs}."""
    return _over_runs(samples, median)


def spread(samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> dict[str, Any]:
    """target -> workload -> mode -> {metric: [lowest, highest] over runs}: how far to trust a median."""
    return _over_runs(samples, lambda xs: [min(xs), max(xs)] if xs else [float("nan")] * 2)


def _over_runs(samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]], fn: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, workloads in samples.items():
        for workload, modes in workloads.items():
            for mode, runs in modes.items():
                # a warm run whose page cache another process dropped measured nothing warm
                clean = [run for run in runs if not run.get("external_drop")]
                runs = clean or runs
                keys = sorted({k for run in runs for k in run} - {"external_drop"})
                out.setdefault(target, {}).setdefault(workload, {})[mode] = {
                    k: fn([run[k] for run in runs if k in run and run[k] == run[k]]) for k in keys}
    return out


def value(summary: dict[str, Any], target: str, workload: str, mode: str, key: str) -> float:
    try:
        return float(summary[target][workload][mode][key])
    except KeyError:
        return float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def check(ratio_value: float, threshold: float, at_least: bool) -> bool | None:
    if ratio_value != ratio_value:
        return None
    return ratio_value >= threshold if at_least else ratio_value <= threshold


def evaluate(summary: dict[str, Any], grpc: dict[str, Any]) -> list[dict]:
    """Every target of the issues with its ratio, threshold and whether it is met (None: not measured)."""
    results = []
    for g in GOALS:
        r = ratio(value(summary, g.subject, g.workload, g.mode, g.key),
                  value(summary, g.reference, g.workload, g.mode, g.key))
        results.append({"issue": g.issue, "goal": g.name, "subject": g.subject, "reference": g.reference,
                        "workload": g.workload, "mode": g.mode, "metric": g.key, "ratio": r,
                        "threshold": g.threshold, "at_least": g.at_least,
                        "met": check(r, g.threshold, g.at_least)})
    plain = grpc.get("plain", {}).get("cold", {}).get("mb_s", float("nan"))
    r = ratio(value(summary, "tvix-grpc", "seq_read", "cold", "mb_s"), plain)
    for issue, threshold in GRPC_PLAIN_GOALS:
        results.append({"issue": issue,
                        "goal": f"gRPC cold sequential read >= {threshold}x a plain gRPC client",
                        "subject": "tvix-grpc", "reference": "plain gRPC client", "workload": "seq_read",
                        "mode": "cold", "metric": "mb_s", "ratio": r, "threshold": threshold,
                        "at_least": True, "met": check(r, threshold, True)})
    lat = grpc.get("latency", {})
    r = ratio(lat.get("8", {}).get("mb_s", float("nan")), lat.get("1", {}).get("mb_s", float("nan")))
    results.append({"issue": FARMS,
                    "goal": f"gRPC +20 ms: 8 readers, --workers 8 >= {LATENCY_GOAL:g}x --workers 1",
                    "subject": "tvix-grpc-20ms", "reference": "--workers 1", "workload": "random_read",
                    "mode": "cold", "metric": "mb_s", "ratio": r, "threshold": LATENCY_GOAL, "at_least": True,
                    "met": check(r, LATENCY_GOAL, True)})
    return sorted(results, key=lambda g: g["issue"] != FARMS)  # stable: each issue's goals together


def _num(x: float, unit: str = "") -> str:
    if x != x:
        return "n/a"
    if unit == "MB/s" or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3f}"


def _ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}x"


def _met(m: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[m]


def _cell(summary: dict[str, Any], spreads: dict[str, Any], target: str, workload: str, mode: str,
          key: str, unit: str) -> str:
    """The median, with the lowest and highest run in brackets when there was more than one run."""
    mid = value(summary, target, workload, mode, key)
    try:
        low, high = spreads[target][workload][mode][key]
    except (KeyError, TypeError, ValueError):
        return _num(mid, unit)
    if mid != mid or low == high:
        return _num(mid, unit)
    return f"{_num(mid, unit)} ({_num(low, unit)}-{_num(high, unit)})"


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    spreads = report.get("spread", {})
    targets = [t for t in TARGET_ORDER if t in summary]
    ratios = [(label, a, b) for label, a, b in RATIOS if a in summary and b in summary]
    lines = [f"Medians of {report['meta']['repeat']} run(s), lowest and highest run in brackets. Ratios "
             "are value / reference of the metric itself: for MB/s higher is better, for s and ms lower is "
             "better. Modes: cold (caches dropped, fresh mount), warm (again on the same mount), cached "
             "(a fresh mount whose backing files are in the page cache).", ""]
    head = ["workload", "mode", *targets, *(label for label, _, _ in ratios)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for m in METRICS:
        for mode in MODES:
            vals = {t: value(summary, t, m.workload, mode, m.key) for t in TARGET_ORDER}
            if all(v != v for v in vals.values()):
                continue
            row = [f"{m.label} ({m.unit})", mode,
                   *(_cell(summary, spreads, t, m.workload, mode, m.key, m.unit) for t in targets),
                   *(_ratio(ratio(vals[a], vals[b])) for _, a, b in ratios)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Targets from the issues (those this run measured):", "",
              "| issue | target | ratio | threshold | met |", "|---|---|---:|---:|---|"]
    for g in report["goals"]:
        if g["met"] is None:
            continue
        lines.append(f"| {g['issue']} | {g['goal']} | {_ratio(g['ratio'])} | {'≥' if g['at_least'] else '≤'} "
                     f"{g['threshold']:g}x | {_met(g['met'])} |")
    grpc = report["grpc"]
    plain = grpc.get("plain", {})
    if plain:
        lines += ["", "gRPC baseline (plain client streaming the big blobs from the same daemon, MB/s): "
                  f"cold {_num(plain.get('cold', {}).get('mb_s', float('nan')), 'MB/s')}, "
                  f"warm {_num(plain.get('warm', {}).get('mb_s', float('nan')), 'MB/s')}."]
    floors = grpc.get("floors", {})
    if floors:
        mount = value(summary, "tvix-grpc", "seq_read", "cold", "mb_s")
        shown = ", ".join(f"{name} {_num(row['mb_s'], 'MB/s')} "
                          f"(tvix-grpc / it: {_ratio(ratio(mount, row['mb_s']))})"
                          for name, row in floors.items())
        lines += ["", "gRPC floors (tools/grpc_passthrough.py on a fresh daemon: the plain client behind "
                  "llfuse, and verifying in worker processes; cold sequential read, MB/s): " + shown + "."]
    sweeps = report["sweeps"]
    if sweeps.get("readers"):
        counts = sorted({int(n) for t in sweeps["readers"].values() for n in t})
        lines += ["", "Random 128 KiB reads vs reader threads (cold, MB/s):", "",
                  "| target | " + " | ".join(str(n) for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]

        def cold(t: str, n: int) -> float:
            return float(sweeps["readers"].get(t, {}).get(str(n), {}).get("cold", float("nan")))

        for t in targets:
            lines.append(f"| {t} | " + " | ".join(_num(cold(t, n), "MB/s") for n in counts) + " |")
        for label, a, b in ratios[:2]:
            lines.append(f"| {label} | " + " | ".join(_ratio(ratio(cold(a, n), cold(b, n))) for n in counts)
                         + " |")
    if sweeps.get("workers"):
        counts = sorted({int(n) for t in sweeps["workers"].values() for n in t})
        lines += ["", "Random 128 KiB reads, 8 readers, vs --workers (MB/s; p99 ms in brackets; tvixmount "
                  "only, so no ratios):", "",
                  "| mount | " + " | ".join(str(n) for n in counts) + " |", "|---|" + "---:|" * len(counts)]
        for t, row in sweeps["workers"].items():
            cells = []
            for n in counts:
                cell = row.get(str(n))
                cells.append("n/a" if not cell else f"{_num(cell['mb_s'], 'MB/s')} ({_num(cell['p99_ms'])})")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path) -> str | None:
    """Throughput vs readers and vs workers as a PNG; the reason when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    sweeps = report["sweeps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for t in TARGET_ORDER:
        row = sweeps.get("readers", {}).get(t)
        if not row:
            continue
        xs = sorted(int(n) for n in row)
        line = left.plot(xs, [row[str(n)]["cold"] for n in xs], marker="o", label=f"{t} cold")[0]
        left.plot(xs, [row[str(n)]["warm"] for n in xs], marker="x", linestyle="--", color=line.get_color(),
                  label=f"{t} warm")
    left.set(xscale="log", yscale="log", xlabel="parallel readers", ylabel="MB/s",
             title="Random 128 KiB reads vs readers")
    left.set_xticks(sorted({int(n) for t in sweeps.get("readers", {}).values() for n in t}))
    left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    if left.get_lines():
        left.legend(fontsize=7, ncol=2)
    left.grid(True, which="both", alpha=0.3)
    for name, row in sweeps.get("workers", {}).items():
        xs = sorted(int(n) for n in row)
        right.plot(xs, [row[str(n)]["mb_s"] for n in xs], marker="o", label=name)
    right.set(xscale="log", yscale="log", xlabel="tvixmount --workers", ylabel="MB/s",
              title="Random 128 KiB reads, 8 readers, vs workers")
    right.set_xticks(sorted({int(n) for t in sweeps.get("workers", {}).values() for n in t}) or [1])
    right.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    if right.get_lines():
        right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    machine = report["meta"]["machine"]
    fig.suptitle(f"tvixmount benchmark ({machine['nproc']} CPUs, {machine['memory_gib']:.0f} GiB, "
                 f"{'quick' if report['meta']['quick'] else 'full'} data set)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return None
