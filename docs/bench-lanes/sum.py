#!/usr/bin/env python3
"""sum.py DIR: one line per readpath_profile JSON in DIR: MB/s, p50, CPU per read by thread group."""

import glob
import json
import os
import sys


def main(directory: str) -> None:
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            report = json.load(f)
        if "per_read" not in report:
            continue
        per_read = report["per_read"]
        fuse = per_read["dispatcher: fuse threads"]["cpu_us"]
        # a passthrough has no collector
        collector = per_read.get("dispatcher: collector threads", {}).get("cpu_us", 0.0)
        workers = sum(v["cpu_us"] for k, v in per_read.items() if k.startswith("worker"))
        result = report["result"]
        p50 = result.get("p50_ms", 0)  # the sequential load has none
        print(f"{os.path.basename(path):28s} {result['mb_s']:7.0f} MB/s  p50 {p50:.2f} ms  "
              f"cpu/read {report['cpu_us_total']:6.1f} us: fuse {fuse:6.1f}  collector {collector:5.1f}  "
              f"workers {workers:6.1f}  (load {report['loadavg'][0]:.1f})")


if __name__ == "__main__":
    main(sys.argv[1])
