#!/usr/bin/env python3
"""tools/readpath_cpu.py: CPU per 128 KiB read of a fresh tvixmount, split dispatcher / workers.

    tools/readpath_cpu.py [--workdir DIR] [--source TREE] [--load seq|dseq|direct] [--files 4]
                          [-- MOUNT ARGS...]

Why: on a shared 2-CPU machine MB/s move by 2x between runs; the CPU a mount
spends per read moves much less, and it is what caps throughput. This mounts
the embedded store of tools/bench's data set in --workdir (run tools/bench
once first), reads the big files one by one with their blobs in the page
cache (page cache of the mount dropped before each file), and sums every
thread's CPU time (/proc/*/task/*/schedstat, ns) of the mount's processes:
the dispatcher (FUSE threads, collector) and the workers.

Loads: ``seq`` 1 MiB reads through the page cache (the kernel's readahead
sends 128 KiB requests); ``dseq`` O_DIRECT 128 KiB reads in order; ``direct``
O_DIRECT 128 KiB reads of every block in a shuffled order, twice.
``--source TREE`` runs the tvixmount of another checkout (PYTHONPATH), for
an A/B against a commit with this checkout's virtualenv.
"""

from __future__ import annotations

import argparse
import glob
import json
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchlib.cpuuse import descendants  # tools/ is this script's sys.path[0]

BLOCK = 128 << 10


def _cpu(root: int) -> dict[str, int]:
    """CPU ns of the mount's processes: the dispatcher's threads and the workers' together."""
    out = {"dispatcher": 0, "workers": 0}
    for pid in [root, *descendants(root)]:
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                ns = int(Path(task, "schedstat").read_text().split()[0])
                name = Path(task, "comm").read_text().strip()
            except OSError:
                continue
            key = "workers" if name.startswith("tvix-worker") else "dispatcher" if pid == root else ""
            if key:
                out[key] += ns
    return out


def _read(path: str, load: str) -> int:
    done = 0
    if load == "seq":
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                done += len(chunk)
        return done
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCK) as buf:
            blocks = list(range(0, os.fstat(fd).st_size, BLOCK))
            if load == "direct":
                random.Random(1).shuffle(blocks)
                blocks += blocks
            for offset in blocks:
                done += os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return done


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/readpath_cpu.py", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/tvixmount-bench"))
    p.add_argument("--source", type=Path, help="the checkout whose tvixmount to run (default: this one)")
    p.add_argument("--load", default="dseq", choices=("seq", "dseq", "direct"))
    p.add_argument("--files", type=int, default=4)
    p.add_argument("mount_args", nargs="*")
    args = p.parse_args()
    mnt = args.workdir / "mnt-readpath-cpu"
    mnt.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(args.source)) if args.source else None
    log = open(args.workdir / "readpath-cpu.log", "w")  # noqa: SIM115 - closed at exit
    proc = subprocess.Popen([sys.executable, "-m", "tvixmount.cli", str(mnt), "--store-dir",
                             str(args.workdir / "store"), "--list-root", "--log-level", "WARNING",
                             *args.mount_args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"tvixmount did not mount: see {log.name}")
            time.sleep(0.05)
        files = sorted(glob.glob(f"{mnt}/*bigdata*/**/*.bin", recursive=True))[: args.files]
        blobs = glob.glob(str(args.workdir / "store" / "blobs" / "*" / "*"))
        before, done, seconds = _cpu(proc.pid), 0, 0.0
        for path in files:
            subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
            for blob in blobs:  # the store's files in the page cache: only the FUSE path is measured
                with open(blob, "rb") as f:
                    while f.read(1 << 20):
                        pass
            start = time.monotonic()
            done += _read(path, args.load)
            seconds += time.monotonic() - start
        after = _cpu(proc.pid)
        reads = done / BLOCK
        shown = json.loads(os.getxattr(mnt, "user.tvixmount.stats"))
        print(json.dumps({
            "load": args.load, "mount_args": args.mount_args, "source": str(args.source or "."),
            "mb_s": round(done / seconds / 1e6), "reads": int(reads),
            "cpu_us_per_read": {k: round((after[k] - before[k]) / 1e3 / reads, 1) for k in after},
            "worker_requests": shown["fetcher"]["requests"], "segment_cache": shown.get("segment_cache"),
            "loadavg": os.getloadavg()[0],
        }))
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)
        proc.wait(10)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
