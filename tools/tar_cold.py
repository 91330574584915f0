#!/usr/bin/env python3
"""tools/tar_cold.py: a cold ``tar`` of tools/bench's closure on tvixmount, with the mount's own counters.

    tools/tar_cold.py [--workdir DIR] [--rounds 3] [--targets grpc,embedded[,passthrough]]
                      [--workers 2[,8...]]
                      [--strace] [TREE ...]

Why: tools/bench says how long a cold ``tar`` takes; it does not say what
the mount did meanwhile, nor which files the time went to. This runs the
bench's ``tar`` workload (caches dropped, a fresh mount, for gRPC a fresh
daemon) on the data set in --workdir (built by tools/bench) and prints,
per run, the seconds and the counters of ``user.tvixmount.stats`` that
explain them: worker requests, arena hits and misses, the FUSE reads'
summed handler time, what the file readahead served and waited for.
And the CPU the run cost: user and system seconds of the mount's process,
of its helpers (the zygote and the workers) and of the gRPC daemon, how
long their threads were runnable but waited for a CPU, and ``tar``'s own.
On a machine with few CPUs a cold ``tar`` is bound by all of them
together, not by one request's latency; the target ``passthrough``
(tools/passthrough.py on the source tree) gives the same figures for the
floor.

Each TREE is a checkout of tvixmount (default: this one); with several,
rounds interleave them target by target, so an A/B of two commits sees
the same machine (this one slows down during long runs). Only ratios
within one run mean anything.

With --strace, ``tar`` runs under ``strace -T`` once per target instead,
and the time it spent in ``read`` is summed by the size of the file read
(tar's ``newfstatat`` gives the size before its ``openat``). strace slows
tar several times over, so compare the classes between targets, not with
the plain runs.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tools"))
from benchlib.options import DEFAULT_WORKDIR  # noqa: E402

CLASSES = ((4096, "<=4K"), (65536, "4K-64K"), (262144, "64K-256K"), (1 << 20, "256K-1M"))

# Runs in a child process with PYTHONPATH=TREE, so each tree's own tvixmount and benchlib are used.
_ONE_RUN = r'''
import json, os, sys
from pathlib import Path
tree, workdir, target, strace_log = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
workers = int(sys.argv[5])
sys.path[:0] = [tree + "/tools", tree]
from benchlib import workloads
from benchlib.dataset import DatasetSpec, prepare
from benchlib.procs import Registry
from benchlib.targets import Passthrough, Tvixmount
TICK = os.sysconf("SC_CLK_TCK")

def below(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return found + [grand for child in found for grand in below(child)]

def cpu(pids):
    # user and system CPU seconds (exited threads included), and the seconds the live threads were
    # runnable but waited for a CPU (schedstat), summed over pids
    user = system = wait = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]) / TICK, system + int(fields[12]) / TICK
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    wait += int(f.read().split()[1]) / 1e9
        except OSError:
            pass
    return [user, system, wait]

spec = DatasetSpec(**json.loads((workdir / "dataset.json").read_text())["spec"])
ds = prepare(workdir, spec, lambda text: None)
(workdir / "logs").mkdir(exist_ok=True)
if target == "passthrough":
    mount = Passthrough(ds, workdir, Registry())
else:
    mount = Tvixmount(ds, workdir, Registry(), workers, grpc=(target == "grpc"))
try:
    root = mount.prepare(cold=True)
    if strace_log:
        import subprocess
        cmd = ("set -o pipefail; strace -o " + strace_log + " -T -e trace=openat,read,newfstatat,getdents64 "
               "tar cf - -- " + " ".join(mount.small_packages()) + " | wc -c")
        subprocess.run(["bash", "-c", cmd], cwd=root, check=True, capture_output=True)
        print(json.dumps({}))
    else:
        main = mount.mount_pid()
        helpers = below(main)
        daemon = getattr(mount, "daemon", None)
        served = [daemon.proc.pid, *below(daemon.proc.pid)] if daemon is not None and daemon.proc else []
        before = cpu([main]), cpu(helpers), cpu(served), os.times()
        result = workloads.tar(root, mount.small_packages())
        after = cpu([main]), cpu(helpers), cpu(served), os.times()
        tar_cpu = (after[3].children_user + after[3].children_system
                   - before[3].children_user - before[3].children_system)
        used = {"mount": [b - a for a, b in zip(before[0], after[0])],
                "helpers": [b - a for a, b in zip(before[1], after[1])],
                "daemon": [b - a for a, b in zip(before[2], after[2])], "tar": tar_cpu}
        stats = json.loads(os.getxattr(root, "user.tvixmount.stats")) if target != "passthrough" else None
        print(json.dumps({"seconds": result["seconds"], "stats": stats, "cpu": used}))
finally:
    mount.close()
'''


def size_class(size: int) -> str:
    for limit, name in CLASSES:
        if size <= limit:
            return name
    return ">1M"


def read_time_by_class(log: Path) -> dict[str, float]:
    """Seconds tar spent in read(2) per size class of the file read, and in getdents64; and how
    many reads of files it saw."""
    line_re = re.compile(r'(\w+)\((.*)\) += (-?\d+).*<([\d.]+)>')
    stat_re = re.compile(r'\w+, "(.+?)", \{st_mode=S_IFREG.*?st_size=(\d+)')
    sizes: dict[str, int] = {}
    fd_size: dict[int, int] = {}
    spent: collections.Counter[str] = collections.Counter()
    calls = 0
    for line in log.read_text(errors="replace").splitlines():
        m = line_re.match(line)
        if not m:
            continue
        call, args, ret, took = m.group(1), m.group(2), int(m.group(3)), float(m.group(4))
        if call == "newfstatat":
            if found := stat_re.match(args):
                sizes[found.group(1)] = int(found.group(2))
        elif call == "openat" and ret >= 0:
            name = re.search(r'"(.*?)"', args)
            if name and name.group(1) in sizes:
                fd_size[ret] = sizes[name.group(1)]
            else:
                fd_size.pop(ret, None)
        elif call == "read":
            fd = int(args.split(",")[0])
            if fd in fd_size:
                spent[size_class(fd_size[fd])] += took
                calls += 1
        elif call == "getdents64":
            spent["getdents64"] += took
    seconds = {name: round(spent[name], 3) for _, name in (*CLASSES, (0, ">1M"), (0, "getdents64"))}
    return {**seconds, "file_reads": calls}


def cpu_summary(used: dict) -> dict:
    """The CPU seconds of one run: the mount's process, its helpers (tvixmount's zygote and
    workers), the gRPC daemon (0 for the other targets), ``tar`` with ``wc``; and how long the
    threads of each but ``tar`` waited for a CPU."""
    figures = {"tar_cpu_s": used["tar"]}
    for group, name in (("mount", "mount"), ("helpers", "workers"), ("daemon", "daemon")):
        user, system, wait = used[group]
        figures.update({f"{name}_user_s": user, f"{name}_sys_s": system, f"{name}_runq_s": wait})
    return {name: round(value, 2) for name, value in figures.items()}


def summary(stats: dict | None) -> dict:
    if stats is None:  # the passthrough has no counters
        return {}
    ahead, arena = stats["readahead"], stats["segment_cache"]
    return {"workers": len(stats["fetcher"]["workers"]), "requests": stats["fetcher"]["requests"],
            "arena_hits": arena["hits"], "arena_misses": arena["misses"],
            "read_handler_s": round(stats["latency"]["read"]["sum_s"], 2),
            "readahead_hits": ahead.get("hits"), "readahead_waited": ahead.get("waited")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", type=Path, default=[HERE],
                   help="tvixmount checkouts (default: this one)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="tools/bench's work directory, with its data set (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", default="grpc,embedded",
                   help="comma-separated: grpc, embedded, passthrough (tools/passthrough.py on the "
                        "source tree: the floor of a Python FUSE filesystem, run once per round)")
    p.add_argument("--workers", default="2",
                   help="comma-separated tvixmount --workers values, interleaved like the trees (default 2)")
    p.add_argument("--strace", action="store_true",
                   help="one run per target under strace -T: read time by file size")
    args = p.parse_args()
    if not (args.workdir / "dataset.json").exists():
        p.error(f"no data set in {args.workdir}: run tools/bench --workdir {args.workdir} first")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if bad := [t for t in targets if t not in ("grpc", "embedded", "passthrough")]:
        p.error(f"unknown targets {bad}: grpc, embedded, passthrough")
    try:
        counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers!r}: comma-separated numbers, like 2,8")
    if any(w < 1 for w in counts):
        p.error(f"--workers {args.workers!r}: each at least 1")
    rounds = 1 if args.strace else args.rounds
    failed = 0
    for round_ in range(1, rounds + 1):
        runs = [(tree, target, workers)
                for tree, target, workers in itertools.product(args.trees, targets, counts)
                if target != "passthrough" or (tree, workers) == (args.trees[0], counts[0])]
        for tree, target, workers in runs:
            name = "passthrough" if target == "passthrough" else f"{tree} {target} --workers {workers}"
            with tempfile.TemporaryDirectory(prefix="tar-cold-") as scratch:
                log = Path(scratch) / "strace.txt" if args.strace else None
                argv = [sys.executable, "-c", _ONE_RUN, str(tree.resolve()), str(args.workdir), target,
                        str(log or ""), str(workers)]
                run = subprocess.run(argv, capture_output=True, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(tree.resolve())))
                if run.returncode != 0:
                    failed += 1
                    print(f"round {round_} {name}: failed\n{run.stderr[-1500:]}", flush=True)
                    continue
                out = json.loads(run.stdout.strip().splitlines()[-1])
                what = read_time_by_class(log) if log else {
                    "seconds": round(out["seconds"], 2), **summary(out["stats"]), **cpu_summary(out["cpu"])}
            print(f"round {round_} {name}: {json.dumps(what)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
