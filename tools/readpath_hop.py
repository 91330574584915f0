#!/usr/bin/env python3
"""tools/readpath_hop.py: what a worker round trip costs the dispatcher, against its floor.

    PYTHONPATH=TREE tools/readpath_hop.py [--workdir DIR]

Why: a read the segment arena misses is one ``blob_read`` round trip, and on a
shared 2-CPU machine its cost hides in the noise of any mount benchmark. This
times it alone, one thread and one worker over the embedded store of tools/bench's
data set in --workdir (run tools/bench once first), the worker's segment cached
(no verification after the first read), as the minimum over batches:

* ``pool.call``: a 128 KiB ``blob_read`` through a real WorkerPool (arena off),
  wall time and the dispatcher's CPU (every thread of this process: the
  collector's too) per call;
* the floor: the same request written to a worker this process forked itself,
  whose reply pipe the calling thread reads (no collector at all);
* the wire's codec alone, in-process: request encode + decode and ring reply
  encode + decode, as msgpack and (where the tree has it) as readwire's structs.

``PYTHONPATH=TREE`` picks the checkout whose pool and wire are timed (an A/B
against main with one virtualenv).
"""

from __future__ import annotations

import argparse
import glob
import os
import select
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from tvixmount import shmring
from tvixmount.pool import WorkerPool
from tvixmount.protocol import framing, messages, ops
from tvixmount.protocol.framing import FrameReader, RingRef
from tvixmount.store import StoreUrls
from workers.loop import serve

READ = 128 << 10


def best(fn: Callable[[], object], calls: int = 500, batches: int = 9) -> tuple[float, float]:
    """(wall, CPU of this process) in us per call: the minimum over batches."""
    fn()
    wall = cpu = float("inf")
    for _ in range(batches):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall = min(wall, (time.perf_counter() - w0) / calls * 1e6)
        cpu = min(cpu, (time.process_time() - c0) / calls * 1e6)
    return wall, cpu


def codec(digest: bytes) -> dict[str, float]:
    def msgpack_way() -> None:
        frame = messages.encode_request(12345, "blob_read", (digest, 1 << 20, READ, 64 << 20), 1e9)
        req_id, name, args, _ = messages.decode_request(framing.unpack(memoryview(frame)[4:]))
        ops.OPS[name].check_args(args)
        body = b"".join(messages.encode_reply_parts(req_id, RingRef(4096, READ)))
        messages.decode_reply(framing.unpack(memoryview(body)))

    ways = {"msgpack": msgpack_way}
    try:
        from tvixmount.protocol import readwire
    except ImportError:  # a tree without the lean wire
        readwire = None
    if readwire is not None:
        def fixed_way() -> None:
            frame = readwire.encode_request(12345, 1e9, digest, 1 << 20, READ, 64 << 20)
            request = readwire.decode_request(memoryview(frame)[4:])
            body = readwire.encode_ring_reply(request.req_id, RingRef(4096, READ))
            messages.decode_reply(readwire.decode_reply(memoryview(body)))

        ways["fixed structs"] = fixed_way
    return {name: min(timeit.repeat(fn, number=20000, repeat=7)) / 20000 * 1e6 for name, fn in ways.items()}


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/readpath_hop.py", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/tvixmount-bench"))
    args = p.parse_args()
    store = args.workdir / "store"
    blobs = glob.glob(f"{store}/blobs/*/*")
    if not blobs:
        raise SystemExit(f"no blobs in {store}: run tools/bench --workdir {args.workdir} first")
    blob = max(blobs, key=os.path.getsize)
    digest, size = bytes.fromhex(os.path.basename(blob)), os.path.getsize(blob)
    urls = StoreUrls.embedded(str(store))

    # The floor's worker, forked before any thread exists (as the zygote would).
    arena = shmring.Arena(1)
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(req_w)
        os.close(rep_r)
        os._exit(serve(0, urls, req_r, rep_w, arena.writer(0)))
    os.close(req_r)
    os.close(rep_w)
    ring = arena.reader(0)
    request = messages.encode_request(1, "blob_read", (digest, 0, READ, size), 1e18)
    reader = FrameReader(rep_r)
    poller = select.poll()
    poller.register(rep_r, select.POLLIN)
    poller.poll(30000)
    reader.read()  # its hello

    def floor() -> bytes:
        os.write(req_w, request)
        while True:
            poller.poll(10000)
            for message in reader.read() or ():
                ref = message[2]
                return ring.take(ref.start, ref.length)

    pool = WorkerPool(urls, 1, serve, segment_cache=0)
    pool.start()
    try:
        via_pool = lambda: pool.call(ops.BLOB_READ, digest, 0, READ, size, affinity=0)  # noqa: E731
        assert floor() == via_pool()
        for name, fn in (("pool.call", via_pool), ("floor: the caller reads a worker's pipe", floor)):
            wall, cpu = best(fn)
            print(f"{name}: {wall:.1f} us wall, {cpu:.1f} us of dispatcher CPU per 128 KiB blob_read")
        for name, us in codec(digest).items():
            print(f"codec, {name}: {us:.2f} us per read (request and ring reply, encoded and decoded)")
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        pool.close()
        os.close(req_w)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
