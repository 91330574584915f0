"""Warm O_DIRECT (arena full) on tvixmount --threads N, beside squashfuse and the bare passthrough, interleaved."""
import json, os, sys
from pathlib import Path
TREE = os.environ.get("TREE", "/work/main")
sys.path[:0] = [TREE + "/tools", TREE]
from benchlib import workloads as wl
from benchlib.dataset import DatasetSpec, prepare
from benchlib.procs import Registry
from benchlib.targets import Passthrough, Squashfuse, Tvixmount

workdir = Path("/var/tmp/bench-final3")
ds = prepare(workdir, DatasetSpec(**json.loads((workdir / "dataset.json").read_text())["spec"]), lambda t: None)
reg = Registry()
threads = [int(t) for t in sys.argv[1].split(",")]
rounds = int(sys.argv[2])
try:
    for r in range(rounds):
        for name in ["squashfuse", "passthrough", "passthrough-t4"] + [f"tvix-t{t}" for t in threads]:
            if name == "squashfuse":
                t = Squashfuse(ds, workdir, reg)
            elif name.startswith("passthrough"):
                t = Passthrough(ds, workdir, reg)
                if name.endswith("t4"):
                    t.command = lambda t=t: [sys.executable, "/work/main/tools/passthrough.py", "--threads", "4", str(ds.tree), str(t.mountpoint)]
            else:
                n = int(name.split("-t")[1])
                import os
                os.environ["THREADS"] = str(n)
                t = Tvixmount(ds, workdir, reg, 8)
            t.prepare(cold=True)
            try:
                wl.direct_random_read(t.big_files(), 8, 4.0, seed=r + 1)  # fill
                res = wl.direct_random_read(t.big_files(), 8, 6.0, seed=r + 7)
                print(f"round {r} {name:12s} {res['mb_s']:7.0f} MB/s p50 {res['p50_ms']:.2f} p99 {res['p99_ms']:.2f}", flush=True)
            finally:
                t.close()
                os.environ.pop("THREADS", None)
finally:
    reg.close_all()
