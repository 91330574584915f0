"""A cached sequential read on the hop passthrough and tvixmount: MB/s and CPU seconds per GiB.

    seq_cpu.py ROUNDS   (as root; tools/bench's data set in /var/tmp/bench-final3, run from a checkout)

Each round and target: the backing files read into the page cache, a fresh
mount, the big files read once in 1 MiB reads; the CPU of the mount's
process, of its children (workers) and of the reader (this process) from
/proc around the read.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from benchlib import workloads as wl  # noqa: E402
from benchlib.cpuuse import cpu_seconds, descendants, used  # noqa: E402
from benchlib.dataset import DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry  # noqa: E402
from benchlib.targets import HopPassthrough, Tvixmount  # noqa: E402

WORKDIR = Path("/var/tmp/bench-final3")


def main() -> None:
    spec = DatasetSpec(**json.loads((WORKDIR / "dataset.json").read_text())["spec"])
    ds = prepare(WORKDIR, spec, lambda text: None)
    registry = Registry()
    gib = sum(size for _, size in ds.big_files) / (1 << 30)
    try:
        for r in range(int(sys.argv[1])):
            for target in (HopPassthrough(ds, WORKDIR, registry, 8), Tvixmount(ds, WORKDIR, registry, 8)):
                target.close()
                target.warm_backing()
                target.prepare(cold=False)
                try:
                    pid = target.mount_pid()
                    assert pid is not None
                    kids = descendants(pid)
                    mount0, kids0, self0 = cpu_seconds([pid]), cpu_seconds(kids), os.times()
                    result = wl.seq_read(target.big_files())
                    mount1, kids1, self1 = cpu_seconds([pid]), cpu_seconds(descendants(pid)), os.times()
                    reader = (self1.user + self1.system) - (self0.user + self0.system)
                    print(f"round {r} {target.name:16s} {result['mb_s']:6.0f} MB/s  cpu/GiB: mount "
                          f"{used(mount0, mount1) / gib:.2f} workers {used(kids0, kids1) / gib:.2f} "
                          f"reader {reader / gib:.2f}", flush=True)
                finally:
                    target.close()
    finally:
        registry.close_all()


if __name__ == "__main__":
    main()
