#!/usr/bin/env python3
"""tools/grpc_seq_cpu.py: the gRPC cold sequential read beside its floors, with each process's CPU.

    tools/grpc_seq_cpu.py [--workdir DIR] [--rounds 3] [--workers 8]   (as root)

Why: tools/bench holds tvixmount's gRPC sequential read against a plain
client, which reads with no FUSE and verifies nothing. What a FUSE mount
in front of the same daemon can reach is measured by
tools/grpc_passthrough.py; this says where each one's time goes. Per
round, interleaved: the plain client, the bare gRPC passthrough, the
verifying one in worker processes, and tvixmount over gRPC, each on a
fresh daemon with the caches dropped, reading the data set's big files
once (1 MiB reads). Per run: MB/s, and the CPU seconds of the daemon, of
the mount's process, of its children (workers) and of the reader (this
process; for the plain client, the client). On two CPUs the sum of those
seconds, not one request's latency, bounds the read.

The data set is tools/bench's in --workdir (build it with tools/bench first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib import workloads as wl  # noqa: E402
from benchlib.cpuuse import cpu_seconds, descendants, used  # noqa: E402
from benchlib.dataset import BIG_PACKAGE, DatasetSpec, prepare  # noqa: E402
from benchlib.grpcplain import stream_blobs  # noqa: E402
from benchlib.options import DEFAULT_WORKDIR  # noqa: E402
from benchlib.procs import FuseMount, GrpcDaemon, Registry, drop_caches, tvixmount_cmd  # noqa: E402
from benchlib.runenv import in_turn  # noqa: E402
from benchlib.targets import GRPC_FLOORS, grpc_floor_cmd  # noqa: E402

SUBJECTS = ("plain", *GRPC_FLOORS, "tvix-grpc")
PARTS = ("daemon", "mount", "workers", "reader")


def one(ds, subject: str, workdir: Path, workers: int, registry: Registry) -> dict[str, float]:
    """One cold read of the big files by ``subject``; MB/s and the CPU seconds of every side."""
    drop_caches()
    daemon = GrpcDaemon(ds.store, workdir / "logs" / f"cpu-{subject}-daemon.log", registry).start()
    mount = None
    try:
        if subject != "plain":
            mountpoint = workdir / f"mnt-{subject}"
            cmd = (tvixmount_cmd(mountpoint, workers, daemon.urls()) if subject == "tvix-grpc"
                   else grpc_floor_cmd(ds, subject, daemon.listen, workers, mountpoint))
            name = "tvixmount (cpu)" if subject == "tvix-grpc" else subject
            log = workdir / "logs" / f"cpu-{subject}.log"
            mount = FuseMount(name, cmd, mountpoint, log, registry).start()
            package = ds.store_names[BIG_PACKAGE] if subject == "tvix-grpc" else BIG_PACKAGE
            files = [(mountpoint / package / rel, size) for rel, size in ds.big_files]
        sides = {"daemon": [daemon.proc.pid], "mount": [mount.pid] if mount else []}
        helpers = descendants(mount.pid) if mount else []
        before = {k: cpu_seconds(v) for k, v in sides.items()}
        workers_before, self_before = cpu_seconds(helpers), os.times()
        if mount is None:
            result = stream_blobs(daemon.listen, ds.big_digests, [s for _, s in ds.big_files])
        else:
            result = wl.seq_read(files)
        self_after = os.times()
        out = {"mb_s": result["mb_s"], "seconds": result["seconds"]}
        for k, pids in sides.items():
            out[k] = used(before[k], cpu_seconds(pids))
        out["workers"] = used(workers_before, cpu_seconds(descendants(mount.pid))) if mount else 0.0
        out["reader"] = (self_after.user + self_after.system) - (self_before.user + self_before.system)
        return out
    finally:
        if mount is not None:
            mount.stop()
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="tvixmount --workers and the hop's N")
    args = parser.parse_args()
    spec = DatasetSpec(**json.loads((args.workdir / "dataset.json").read_text())["spec"])
    ds = prepare(args.workdir, spec, lambda text: None)
    (args.workdir / "logs").mkdir(exist_ok=True)
    registry = Registry()
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SUBJECTS}
    try:
        for r in range(args.rounds):
            for subject in in_turn(SUBJECTS, r):
                run = one(ds, subject, args.workdir, args.workers, registry)
                runs[subject].append(run)
                print(f"round {r + 1} {subject}: {json.dumps({k: round(v, 3) for k, v in run.items()})}",
                      flush=True)
    finally:
        for problem in registry.close_all():
            print(f"cleanup: {problem}", file=sys.stderr)
    gib = sum(s for _, s in ds.big_files) / (1 << 30)
    print(f"\nmedians of {args.rounds}; CPU seconds per GiB read (load {os.getloadavg()[0]:.1f} at the end, "
          f"{time.strftime('%H:%M UTC', time.gmtime())})\n")
    print("| | MB/s | / plain | " + " | ".join(PARTS) + " | all |")
    print("|---|---:|---:|" + "---:|" * (len(PARTS) + 1))
    plain = statistics.median(r["mb_s"] for r in runs["plain"])
    for subject, rows in runs.items():
        mb_s = statistics.median(r["mb_s"] for r in rows)
        parts = [statistics.median(r[p] for r in rows) / gib for p in PARTS]
        print(f"| {subject} | {mb_s:.0f} | {mb_s / plain:.2f}x | " + " | ".join(f"{p:.2f}" for p in parts)
              + f" | {sum(parts):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
