"""Summaries of the runs: medians, ratios, the issue's targets, Markdown, JSON and a plot.

Ratios are always ``value / reference`` of the metric itself: for MB/s
higher is better (a target says ">= x"), for seconds lower is better (a
target says "<= x"). Keeping one definition avoids the classic mistake of
inverting one row of a table and not the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import median

TARGET_ORDER = ("native", "squashfuse", "tvix-embedded", "tvix-grpc")
MODES = ("cold", "warm")


@dataclass(frozen=True, slots=True)
class Metric:
    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = (
    Metric("seq_read", "mb_s", "sequential read, big files", "MB/s", True),
    Metric("find", "seconds", "find over the tree", "s", False),
    Metric("stat_walk", "seconds", "stat walk (os.walk + lstat)", "s", False),
    Metric("tar", "seconds", "tar of the closure into a pipe", "s", False),
    Metric("random_read", "mb_s", "random 128 KiB reads, 8 readers", "MB/s", True),
    Metric("random_read", "p50_ms", "  p50 latency per read", "ms", False),
    Metric("random_read", "p99_ms", "  p99 latency per read", "ms", False),
)
WORKLOADS = ("seq_read", "find", "stat_walk", "tar", "random_read")


@dataclass(frozen=True, slots=True)
class Goal:
    """One target from the issue: ``subject`` measured against ``reference``."""

    name: str
    workload: str
    mode: str
    key: str
    threshold: float
    at_least: bool  # True: ratio >= threshold; False: ratio <= threshold


GOALS = (
    Goal("cold sequential read >= 1.0x squashfuse", "seq_read", "cold", "mb_s", 1.0, True),
    Goal("warm re-read >= 0.9x squashfuse", "seq_read", "warm", "mb_s", 0.9, True),
    Goal("cold find within 1.3x squashfuse's time", "find", "cold", "seconds", 1.3, False),
    Goal("cold stat walk within 1.3x squashfuse's time", "stat_walk", "cold", "seconds", 1.3, False),
    Goal("cold tar within 1.3x squashfuse's time", "tar", "cold", "seconds", 1.3, False),
    Goal("warm stat walk at least as fast as squashfuse's", "stat_walk", "warm", "seconds", 1.0, False),
    Goal("warm find at least as fast as squashfuse's", "find", "warm", "seconds", 1.0, False),
)
GRPC_PLAIN_GOAL = 0.7
LATENCY_GOAL = 6.0


def summarise(samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]]) -> dict[str, Any]:
    """target -> workload -> mode -> {metric: median over runs}."""
    out: dict[str, Any] = {}
    for target, workloads in samples.items():
        for workload, modes in workloads.items():
            for mode, runs in modes.items():
                # a warm run whose page cache another process dropped measured nothing warm
                clean = [run for run in runs if not run.get("external_drop")]
                runs = clean or runs
                keys = sorted({k for run in runs for k in run} - {"external_drop"})
                out.setdefault(target, {}).setdefault(workload, {})[mode] = {
                    k: median([run[k] for run in runs if k in run]) for k in keys}
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


def evaluate(summary: dict[str, Any], grpc: dict[str, Any], subject: str = "tvix-embedded") -> list[dict]:
    """Every target of the issue with its ratio, threshold and whether it is met."""
    results = []
    for g in GOALS:
        r = ratio(value(summary, subject, g.workload, g.mode, g.key),
                  value(summary, "squashfuse", g.workload, g.mode, g.key))
        results.append({"goal": g.name, "subject": subject, "reference": "squashfuse", "workload": g.workload,
                        "mode": g.mode, "metric": g.key, "ratio": r, "threshold": g.threshold,
                        "at_least": g.at_least, "met": check(r, g.threshold, g.at_least)})
    plain = grpc.get("plain", {}).get("cold", {}).get("mb_s", float("nan"))
    r = ratio(value(summary, "tvix-grpc", "seq_read", "cold", "mb_s"), plain)
    results.append({"goal": f"gRPC cold sequential read >= {GRPC_PLAIN_GOAL}x a plain gRPC client",
                    "subject": "tvix-grpc", "reference": "plain gRPC client", "workload": "seq_read",
                    "mode": "cold", "metric": "mb_s", "ratio": r, "threshold": GRPC_PLAIN_GOAL,
                    "at_least": True, "met": check(r, GRPC_PLAIN_GOAL, True)})
    lat = grpc.get("latency", {})
    r = ratio(lat.get("8", {}).get("mb_s", float("nan")), lat.get("1", {}).get("mb_s", float("nan")))
    results.append({"goal": f"gRPC +20 ms: 8 readers, --workers 8 >= {LATENCY_GOAL:g}x --workers 1",
                    "subject": "tvix-grpc-20ms", "reference": "--workers 1", "workload": "random_read",
                    "mode": "cold", "metric": "mb_s", "ratio": r, "threshold": LATENCY_GOAL, "at_least": True,
                    "met": check(r, LATENCY_GOAL, True)})
    return results


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


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    targets = [t for t in TARGET_ORDER if t in summary]
    goal_by_key = {(g["workload"], g["mode"], g["metric"]): g for g in report["goals"]
                   if g["reference"] == "squashfuse"}
    lines = [f"Medians of {report['meta']['repeat']} run(s). Ratios are value / reference of the metric "
             "itself: for MB/s higher is better, for s and ms lower is better.", ""]
    head = ["workload", "mode", *targets, "embedded / squashfuse", "embedded / native", "gRPC / squashfuse",
            "target", "met"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for m in METRICS:
        for mode in MODES:
            vals = {t: value(summary, t, m.workload, mode, m.key) for t in TARGET_ORDER}
            goal = goal_by_key.get((m.workload, mode, m.key))
            target_text = (("≥ " if goal["at_least"] else "≤ ") + f"{goal['threshold']:g}x") if goal else ""
            row = [f"{m.label} ({m.unit})", mode, *(_num(vals[t], m.unit) for t in targets),
                   _ratio(ratio(vals["tvix-embedded"], vals["squashfuse"])),
                   _ratio(ratio(vals["tvix-embedded"], vals["native"])),
                   _ratio(ratio(vals["tvix-grpc"], vals["squashfuse"])),
                   target_text, _met(goal["met"]) if goal else ""]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Targets from the issue:", "", "| target | ratio | threshold | met |",
              "|---|---:|---:|---|"]
    for g in report["goals"]:
        lines.append(f"| {g['goal']} | {_ratio(g['ratio'])} | {'≥' if g['at_least'] else '≤'} "
                     f"{g['threshold']:g}x | {_met(g['met'])} |")
    grpc = report["grpc"]
    plain = grpc.get("plain", {})
    lines += ["", "gRPC baseline (plain client streaming the big blobs from the same daemon, MB/s): "
              f"cold {_num(plain.get('cold', {}).get('mb_s', float('nan')), 'MB/s')}, "
              f"warm {_num(plain.get('warm', {}).get('mb_s', float('nan')), 'MB/s')}."]
    sweeps = report["sweeps"]
    if sweeps.get("readers"):
        counts = sorted({int(n) for t in sweeps["readers"].values() for n in t})
        lines += ["", "Random 128 KiB reads vs readers (cold, MB/s):", "",
                  "| target | " + " | ".join(str(n) for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for t in targets:
            row = sweeps["readers"].get(t, {})
            lines.append(f"| {t} | " + " | ".join(_num(row.get(str(n), {}).get("cold", float("nan")), "MB/s")
                                                   for n in counts) + " |")
    if sweeps.get("workers"):
        counts = sorted({int(n) for t in sweeps["workers"].values() for n in t})
        lines += ["", "Random 128 KiB reads, 8 readers, vs --workers (MB/s; p99 ms in brackets):", "",
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
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    machine = report["meta"]["machine"]
    fig.suptitle(f"tvixmount benchmark ({machine['nproc']} CPUs, {machine['memory_gib']:.0f} GiB, "
                 f"{'quick' if report['meta']['quick'] else 'full'} data set)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return None
