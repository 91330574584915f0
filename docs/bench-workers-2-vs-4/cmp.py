#!/usr/bin/env python3
"""cmp.py RUN...: the rows of several tools/bench runs side by side (RUN is a JSON file name without .json).

Run from this directory; prints one Markdown table, one row per target,
workload, mode and metric, one column per run.
"""

import json
import sys

ROWS = (("seq_read", "cold", "mb_s"), ("seq_read", "warm", "mb_s"), ("seq_cached", "cached", "mb_s"),
        ("find", "cold", "seconds"), ("find", "warm", "seconds"), ("stat_walk", "cold", "seconds"),
        ("stat_walk", "warm", "seconds"), ("tar", "cold", "seconds"), ("tar", "warm", "seconds"),
        ("random_read", "cold", "mb_s"), ("random_read", "cold", "p50_ms"), ("random_read", "cold", "p99_ms"),
        ("direct_read", "cold", "mb_s"), ("direct_read", "warm", "mb_s"), ("direct_read", "cold", "p50_ms"),
        ("direct_read", "cold", "p99_ms"))


def cell(summary: dict, target: str, workload: str, mode: str, key: str) -> str:
    try:
        value = summary[target][workload][mode][key]
    except KeyError:
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def main(runs: list[str]) -> None:
    summaries = {}
    for run in runs:
        with open(f"{run}.json") as f:
            summaries[run] = json.load(f)["summary"]
    print("| workload | mode | metric | target | " + " | ".join(runs) + " |")
    print("|---|---|---|---|" + "---:|" * len(runs))
    for target in ("squashfuse", "tvix-embedded", "tvix-grpc"):
        for workload, mode, key in ROWS:
            cells = [cell(summaries[run], target, workload, mode, key) for run in runs]
            if any(cells):
                print(f"| {workload} | {mode} | {key} | {target} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
