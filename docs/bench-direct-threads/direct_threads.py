"""Warm O_DIRECT on tvixmount --threads N, beside squashfuse and the bare passthrough, interleaved.

    TREE=<checkout> direct_threads.py THREADS_LIST ROUNDS   (as root; tools/bench's data set in
                                                            /var/tmp/bench-final3)

Each target is mounted fresh, 8 O_DIRECT readers fill it for 4 s (tvixmount's
arena), then 8 readers are measured for 6 s: the arena-hit path against a
passthrough's pread from the page cache. "passthrough-t4" is tools/passthrough.py
with four llfuse threads, as many as tvixmount's default on two CPUs.
"""

import json
import os
import sys
from pathlib import Path

TREE = os.environ.get("TREE", "/work/main")
sys.path[:0] = [TREE + "/tools", TREE]

from benchlib import workloads as wl  # noqa: E402
from benchlib.dataset import DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry  # noqa: E402
from benchlib.targets import PASSTHROUGH, Passthrough, Squashfuse, Target, Tvixmount  # noqa: E402

WORKDIR = Path("/var/tmp/bench-final3")


def target(name: str, ds, registry: Registry) -> Target:
    if name == "squashfuse":
        return Squashfuse(ds, WORKDIR, registry)
    if name.startswith("passthrough"):
        t = Passthrough(ds, WORKDIR, registry)
        if name.endswith("-t4"):
            t.command = lambda: [sys.executable, str(PASSTHROUGH), "--threads", "4", str(ds.tree),
                                 str(t.mountpoint)]
        return t
    os.environ["THREADS"] = name.split("-t")[1]  # tvixmount's --threads, through its environment
    return Tvixmount(ds, WORKDIR, registry, 8)


def main() -> None:
    spec = DatasetSpec(**json.loads((WORKDIR / "dataset.json").read_text())["spec"])
    ds = prepare(WORKDIR, spec, lambda text: None)
    registry = Registry()
    threads, rounds = sys.argv[1].split(","), int(sys.argv[2])
    names = ["squashfuse", "passthrough", "passthrough-t4"] + [f"tvix-t{n}" for n in threads]
    try:
        for r in range(rounds):
            for name in names:
                t = target(name, ds, registry)
                t.prepare(cold=True)
                try:
                    wl.direct_random_read(t.big_files(), 8, 4.0, seed=r + 1)  # fill
                    res = wl.direct_random_read(t.big_files(), 8, 6.0, seed=r + 7)
                    print(f"round {r} {name:12s} {res['mb_s']:7.0f} MB/s p50 {res['p50_ms']:.2f} "
                          f"p99 {res['p99_ms']:.2f}", flush=True)
                finally:
                    t.close()
                    os.environ.pop("THREADS", None)
    finally:
        registry.close_all()


if __name__ == "__main__":
    main()
