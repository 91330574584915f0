#!/usr/bin/env python3
"""pread_dest.py: what a 256 KiB pread from the page cache costs by where it lands.

Why: per read, a tvixmount worker's pread into the segment arena cost ~10 us
more than the hop passthrough's pread into one buffer it reuses. The arena's
slot is the least recently used of its set, so its memory is cold; the
passthrough's buffer is always hot. Reads random 256 KiB regions of one of
tools/bench's big files (in the page cache) into: a reused buffer, a random
slot of a 64 MiB shared mapping (the arena's case), two alternating slots of
it, and a random slot of a private mapping.
"""

import glob
import mmap
import os
import random
import time

W = "/var/tmp/bench-final3"
R = 256 << 10
SPAN = 1 << 30

src = sorted(glob.glob(f"{W}/tree/**/blob-*.bin", recursive=True))[0]
fd = os.open(src, os.O_RDONLY)
size = min(os.fstat(fd).st_size, SPAN)
for off in range(0, size, 1 << 20):  # into the page cache
    os.pread(fd, 1 << 20, off)


def bench(name, dest_of, n=3000):
    rnd = random.Random(1)
    t = time.perf_counter()
    for i in range(n):
        os.preadv(fd, [dest_of(i)], rnd.randrange(size // R) * R)
    print(f"{name:30s} {(time.perf_counter() - t) / n * 1e6:6.1f} us")


hot = memoryview(bytearray(R))
shared = memoryview(mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED))
private = memoryview(mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE))
slots = (64 << 20) // R
for i in range(slots):  # every page touched once: no first-touch faults in the timing
    shared[i * R:(i + 1) * R] = hot
    private[i * R:(i + 1) * R] = hot
pick = random.Random(2)
print(src)
for _ in range(3):
    bench("reused buffer", lambda i: hot)
    bench("shared mapping, random slot", lambda i: shared[(k := pick.randrange(slots)) * R:(k + 1) * R])
    bench("shared mapping, 2 slots", lambda i: shared[(i % 2) * R:(i % 2 + 1) * R])
    bench("private mapping, random slot", lambda i: private[(k := pick.randrange(slots)) * R:(k + 1) * R])
