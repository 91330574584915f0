"""Round-trip latency of the worker pool: ping and blob_read, against a raw pipe baseline.

    .venv/bin/python tools/bench_pool.py [--workers 2] [--calls 3000] [--size 131072]

Prints min / median / p90 per call in microseconds, single caller and with
several threads. The store is memory://, filled before the pool forks, so
the numbers are the pool's cost plus one in-memory copy of the blob.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tvixmount.fetcher import PoolFetcher
from tvixmount.pool import WorkerPool
from tvixmount.protocol import ops
from tvixmount.store import StoreUrls, open_store
from workers.loop import serve


def _summary(name: str, samples: list[float]) -> None:
    samples.sort()
    us = [s * 1e6 for s in samples]
    p90 = us[int(len(us) * 0.9)]
    print(f"{name:<34} min {us[0]:7.1f}  median {statistics.median(us):7.1f}  p90 {p90:7.1f} us")


def _timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def raw_pipe(calls: int) -> list[float]:
    """Two processes echoing 40 bytes over a pipe pair: the floor for any request."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(req_w)
        os.close(rep_r)
        while data := os.read(req_r, 65536):
            os.write(rep_w, data)
        os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    try:
        return _timed(lambda: (os.write(req_w, b"x" * 40), os.read(rep_r, 65536)), calls)
    finally:
        os.close(req_w)
        os.waitpid(pid, 0)
        os.close(rep_r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128 * 1024)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    urls = StoreUrls.single("memory://")
    with open_store(urls) as store:
        digest = store.blobs.put(os.urandom(args.size * 4))
    _summary("raw pipe echo (40 B)", raw_pipe(args.calls))
    with WorkerPool(urls, args.workers, serve) as pool:
        fetcher = PoolFetcher(pool)
        _summary("ping", _timed(lambda: pool.call(ops.PING), args.calls))
        _summary(f"blob_read {args.size} B (affinity)",
                 _timed(lambda: fetcher.blob_read(digest, 0, args.size, affinity=1), args.calls))
        per_thread: list[list[float]] = [[] for _ in range(args.threads)]

        def run(i: int) -> None:
            per_thread[i] = _timed(lambda: fetcher.blob_read(digest, 0, args.size, affinity=i),
                                   args.calls // 2)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.threads)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        total = sum(len(s) for s in per_thread)
        _summary(f"blob_read, {args.threads} threads", [s for p in per_thread for s in p])
        print(f"{args.threads} threads: {total / elapsed:.0f} reads/s, "
              f"{total * args.size / elapsed / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
