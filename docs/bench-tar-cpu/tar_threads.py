#!/usr/bin/env python3
"""A cold tar of tools/bench's closure on one mount, with the CPU of each kind of thread of the mount.

    .venv/bin/python docs/bench-tar-cpu/tar_threads.py WORKDIR embedded|passthrough [--cached] [--perf FILE]

The measurement behind docs/performance.md, "Where a cold tar's CPU goes":
tools/tar_cold.py gives the CPU per process; this splits the mount's own
process by thread name (from ``py-spy dump``, which must be installed in
the virtualenv: ``pip install py-spy``), with each kind's CPU, run-queue
wait and context switches from /proc schedstat, and with ``--perf`` what
``perf record -g`` saw each kind do (tools/benchlib/perf_summary.py's
kinds of work, in per cent of the kind's samples). ``--cached`` leaves the
backing files in the page cache (a fresh mount all the same).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from benchlib import perf_summary, workloads  # noqa: E402
from benchlib.dataset import DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry  # noqa: E402
from benchlib.targets import Passthrough, Tvixmount  # noqa: E402
from readpath_profile import thread_counters, tree_pids  # noqa: E402


def counters(pids: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """tid -> (ns on a CPU, ns waiting for one, voluntary, involuntary switches), for every process."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for pid in pids:
        out.update(thread_counters(pid))
    return out


def thread_kinds(dispatcher: int, pids: list[int]) -> dict[int, str]:
    """tid -> kind: the Python thread name without its number, or "worker" for the worker processes."""
    dump = subprocess.run([str(ROOT / ".venv" / "bin" / "py-spy"), "dump", "--pid", str(dispatcher)],
                          capture_output=True, text=True, check=True).stdout
    named = re.finditer(r'Thread (\d+) \(\w+\): "([^"]+)"', dump)
    kinds = {int(m[1]): re.sub(r"[_-]?\d+$", "", m[2]) for m in named}
    for pid in pids[1:]:
        for tid in thread_counters(pid):
            kinds[tid] = "worker"
    return kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("workdir", type=Path)
    p.add_argument("target", choices=("embedded", "passthrough"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--cached", action="store_true")
    p.add_argument("--perf", type=Path)
    args = p.parse_args()
    spec = DatasetSpec(**json.loads((args.workdir / "dataset.json").read_text())["spec"])
    ds = prepare(args.workdir, spec, lambda text: None)
    mount = (Passthrough(ds, args.workdir, Registry()) if args.target == "passthrough"
             else Tvixmount(ds, args.workdir, Registry(), args.workers))
    try:
        root = mount.prepare(cold=not args.cached)
        dispatcher = mount.mount_pid()
        assert dispatcher is not None
        pids = tree_pids(dispatcher)
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(args.perf), "-p",
                                     str(dispatcher)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        before = counters(pids)
        seconds = workloads.tar(root, mount.small_packages())["seconds"]
        after = counters(pids)
        if perf is not None:
            perf.send_signal(2)
            perf.wait(60)
        kinds = thread_kinds(dispatcher, pids)
    finally:
        mount.close()
    print(f"{args.target}: tar {seconds:.2f} s")
    totals: dict[str, list[int]] = {}
    for tid, end in after.items():
        start = before.get(tid, (0, 0, 0, 0))
        total = totals.setdefault(kinds.get(tid, "other"), [0, 0, 0, 0, 0])
        for i in range(4):
            total[i] += end[i] - start[i]
        total[4] += 1
    for kind, (run, wait, vol, invol, n) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"  {kind:26s} x{n:2d}  CPU {run / 1e9:5.2f} s  run-queue wait {wait / 1e9:5.2f} s  "
              f"switches {vol} voluntary, {invol} involuntary")
    if args.perf:
        by_kind: dict[str, collections.Counter[str]] = {}
        for tid, chain in perf_summary.samples(args.perf):
            kind = kinds.get(tid, "other")
            by_kind.setdefault(kind, collections.Counter())[perf_summary.kind_of(chain)] += 1
        for kind, work in sorted(by_kind.items(), key=lambda item: -sum(item[1].values())):
            total = sum(work.values())
            shares = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in work.most_common(7))
            print(f"  perf {kind} ({total} samples): {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
