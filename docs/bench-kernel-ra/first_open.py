"""The experiment behind docs/performance.md, "The kernel's readahead before the first open" (ab.txt).

    PYTHONPATH=TREE python docs/bench-kernel-ra/first_open.py TREE [PAUSE]

Drops the caches, mounts TREE's tvixmount on tools/bench's embedded store in
/var/tmp/bench-final3, waits PAUSE seconds (default 0), reads the mount's
read_ahead_kb (before any open), then reads the big files in order with 1
MiB reads at once, and prints the knob and each file's MB/s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TREE = sys.argv[1]
PAUSE = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
sys.path[:0] = [TREE + "/tools", TREE]

from benchlib.dataset import DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry  # noqa: E402
from benchlib.targets import Tvixmount  # noqa: E402

from tvixmount.kernelra import mount_device  # noqa: E402

WORKDIR = Path("/var/tmp/bench-final3")
spec = DatasetSpec(**json.loads((WORKDIR / "dataset.json").read_text())["spec"])
ds = prepare(WORKDIR, spec, lambda text: None)
mount = Tvixmount(ds, WORKDIR, Registry(), 2)
try:
    mount.prepare(cold=True)
    time.sleep(PAUSE)
    knob = Path(f"/sys/class/bdi/{mount_device(mount.mountpoint)}/read_ahead_kb").read_text().strip()
    speeds = []
    buf = bytearray(1 << 20)
    for path, size in mount.big_files():
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        speeds.append(round(size / (time.perf_counter() - start) / 1e6))
    print(TREE, "pause", PAUSE, "ra_kb at first open", knob, "MB/s per file", speeds, flush=True)
finally:
    mount.close()
