#!/usr/bin/env python3
"""CPU per small blob on each end of the gRPC client's ``read_many``, batch service on and off.

Why: a cold ``tar`` over gRPC is bound by per-blob CPU in Python gRPC on
both ends (docs/performance.md, "gRPC: small blobs in one stream"), which
wall-clock figures on a shared machine hide. This starts a real daemon
(``python -m tvixmount.server``, an embedded store on /dev/shm, a unix
socket) with and without ``--no-blob-batch``, reads the same small blobs
with ``GrpcBlobService.read_many`` in batches of 64 (what a mount worker's
``blob_batch`` does), and prints the client's and the daemon's CPU time per
blob (process CPU, all threads), alternating the two modes.

Usage: tools/grpc_batch_cpu.py [--blobs 2048] [--rounds 3] [--max-size 16384]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tvixmount.store import StoreUrls, open_store
from tvixmount.store.urls import parse as parse_url

BATCH = 64


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _daemon(root: Path, store: Path, batch: bool) -> tuple[subprocess.Popen, str]:
    sock = root / f"d{int(batch)}.sock"
    urls = StoreUrls.embedded(store)
    cmd = [sys.executable, "-m", "tvixmount.server", "--log-level", "warn", "--stats-interval", "0",
           "--listen-address", str(sock), "--blob-service-addr", urls.blob,
           "--directory-service-addr", urls.directory, "--path-info-service-addr", urls.path_info]
    if not batch:
        cmd.append("--no-blob-batch")
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the daemon did not start")
        time.sleep(0.05)
    return proc, f"grpc+unix://{sock}?wait-connect=1"


def _round(store: Path, root: Path, wanted: list[tuple[bytes, int]],
           batch: bool) -> tuple[float, float, float]:
    from tvixmount.store.grpc.blobs import GrpcBlobService
    from tvixmount.store.grpc.channel import Endpoint

    proc, url = _daemon(root, store, batch)
    try:
        service = GrpcBlobService(Endpoint(parse_url(url)))
        service.read_many(wanted[:2])  # connect and learn whether the server batches
        daemon0, own0, wall0 = _cpu_of(proc.pid), _own_cpu(), time.monotonic()
        for start in range(0, len(wanted), BATCH):
            for got in service.read_many(wanted[start:start + BATCH]):
                if not isinstance(got, bytes):
                    raise SystemExit(f"read failed: {got}")
        wall, own, daemon = time.monotonic() - wall0, _own_cpu() - own0, _cpu_of(proc.pid) - daemon0
        service.close()
    finally:
        proc.terminate()
        proc.wait()
    n = len(wanted)
    return own / n * 1e6, daemon / n * 1e6, wall / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blobs", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=16384)
    args = parser.parse_args()
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="gbcpu-", dir=parent))
    try:
        store_dir = root / "store"
        rng = random.Random(1)
        store = open_store(StoreUrls.embedded(store_dir, create=True))
        wanted = []
        for _ in range(args.blobs):
            data = rng.randbytes(rng.randint(1, args.max_size))
            wanted.append((store.blobs.put(data), len(data)))
        store.close()
        results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for batch in (False, True):
                results[batch].append(_round(store_dir, root, wanted, batch))
        print(f"{args.blobs} blobs of 1-{args.max_size} bytes, batches of {BATCH}, {args.rounds} rounds; "
              f"load {os.getloadavg()[0]:.1f}")
        print("mode          client CPU µs/blob   daemon CPU µs/blob   wall µs/blob   (median, min-max)")
        for batch in (False, True):
            cols = []
            for i in range(3):
                xs = [r[i] for r in results[batch]]
                cols.append(f"{statistics.median(xs):6.0f} ({min(xs):.0f}-{max(xs):.0f})")
            print(f"{'batch' if batch else 'one Read each':14}" + "   ".join(f"{c:>19}" for c in cols))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
