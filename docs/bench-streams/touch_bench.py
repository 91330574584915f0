"""What a 256 KiB slot's first write costs, through a shared mapping and through pwrite to a memfd.

Why: a sequential reader's profile put the workers' page faults first (a
region's first write allocates and zeroes 64 shared pages). Writing the
slot with pwrite into a memfd allocates the pages without a fault each;
this times both ways, for the first write and for a rewrite, beside a
pread into one reused buffer. Run as root with the bench data set in
/var/tmp/bench-final3 (its largest file, read once first so it is cached):

    .venv/bin/python docs/bench-streams/touch_bench.py
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

REGION = 256 << 10
SLOTS = 2048  # 512 MiB
TREE = Path("/var/tmp/bench-final3/tree")


def _biggest() -> Path:
    files = (p for p in TREE.rglob("*") if p.is_file() and not p.is_symlink())
    return max(files, key=lambda p: p.stat().st_size)


def _pass(fd: int, size: int, write_slot) -> float:
    start = time.perf_counter()
    for i in range(SLOTS):
        write_slot(i, (i * REGION) % size)
    return (time.perf_counter() - start) / SLOTS * 1e6


def through_mapping(fd: int, size: int) -> tuple[float, float]:
    m = mmap.mmap(-1, SLOTS * REGION, flags=mmap.MAP_SHARED)
    view = memoryview(m)

    def write_slot(i: int, at: int) -> None:
        os.preadv(fd, [view[i * REGION: (i + 1) * REGION]], at)

    first, again = _pass(fd, size, write_slot), _pass(fd, size, write_slot)
    view.release()
    m.close()
    return first, again


def through_memfd(fd: int, size: int, buf: bytearray) -> tuple[float, float]:
    mfd = os.memfd_create("slots")
    os.ftruncate(mfd, SLOTS * REGION)

    def write_slot(i: int, at: int) -> None:
        os.preadv(fd, [buf], at)
        os.pwrite(mfd, buf, i * REGION)

    first, again = _pass(fd, size, write_slot), _pass(fd, size, write_slot)
    os.close(mfd)
    return first, again


def main() -> None:
    fd = os.open(_biggest(), os.O_RDONLY)
    size = os.fstat(fd).st_size
    buf = bytearray(REGION)
    for at in range(0, size, REGION):
        os.preadv(fd, [buf], at)  # into the page cache
    for _ in range(3):
        mapped, memfd = through_mapping(fd, size), through_memfd(fd, size, buf)
        reused = _pass(fd, size, lambda i, at: os.preadv(fd, [buf], at))
        print(f"pread into the mapping: first {mapped[0]:.0f} again {mapped[1]:.0f} | "
              f"pread + pwrite to a memfd: first {memfd[0]:.0f} again {memfd[1]:.0f} | "
              f"pread into one buffer {reused:.0f} (us per slot)")


if __name__ == "__main__":
    main()
