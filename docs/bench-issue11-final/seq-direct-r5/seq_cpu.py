"""Cached sequential read (fresh mount, backing in page cache): MB/s and CPU s per GiB, hop passthrough vs tvixmount."""
import json, os, sys, time
from pathlib import Path
sys.path[:0] = ["/work/main/tools", "/work/main"]
from benchlib import workloads as wl
from benchlib.cpuuse import cpu_seconds, descendants, used
from benchlib.dataset import DatasetSpec, prepare
from benchlib.procs import Registry
from benchlib.targets import HopPassthrough, Tvixmount

W = Path("/var/tmp/bench-final3")
ds = prepare(W, DatasetSpec(**json.loads((W / "dataset.json").read_text())["spec"]), lambda t: None)
reg = Registry()
gib = sum(s for _, s in ds.big_files) / (1 << 30)
try:
    for r in range(int(sys.argv[1])):
        for t in (HopPassthrough(ds, W, reg, 8), Tvixmount(ds, W, reg, 8)):
            t.close(); t.warm_backing(); t.prepare(cold=False)
            try:
                pid = t.mount_pid(); kids = descendants(pid)
                b0, k0, s0 = cpu_seconds([pid]), cpu_seconds(kids), os.times()
                res = wl.seq_read(t.big_files())
                b1, k1, s1 = cpu_seconds([pid]), cpu_seconds(descendants(pid)), os.times()
                print(f"round {r} {t.name:16s} {res['mb_s']:6.0f} MB/s  cpu/GiB: mount {used(b0, b1)/gib:.2f} "
                      f"workers {used(k0, k1)/gib:.2f} reader {((s1.user+s1.system)-(s0.user+s0.system))/gib:.2f}", flush=True)
            finally:
                t.close()
finally:
    reg.close_all()
