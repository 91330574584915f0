#!/usr/bin/env python3
"""drand.py SECONDS FILE...: 8 processes of O_DIRECT random 128 KiB reads; prints each one's count.

The load under which bench-hop/pyspy-gil-*.txt were sampled (tools/bench's
direct_read, without the bench around it, so a profiler can attach to a
mount started by hand).
"""

import mmap
import os
import random
import sys
import time
from multiprocessing import Process

BLOCK = 128 << 10
READERS = 8


def read_at_random(files: list[str], seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    buf = mmap.mmap(-1, BLOCK)  # O_DIRECT wants an aligned buffer
    fds = [(os.open(f, os.O_RDONLY | os.O_DIRECT), os.path.getsize(f)) for f in files]
    start, reads = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        fd, size = rng.choice(fds)
        os.preadv(fd, [buf], rng.randrange(size // BLOCK) * BLOCK)
        reads += 1
    print(reads, file=sys.stderr)


if __name__ == "__main__":
    seconds, files = float(sys.argv[1]), sys.argv[2:]
    readers = [Process(target=read_at_random, args=(files, seconds, i)) for i in range(READERS)]
    for p in readers:
        p.start()
    for p in readers:
        p.join()
