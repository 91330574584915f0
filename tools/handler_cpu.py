#!/usr/bin/env python3
"""tools/handler_cpu.py: the Python CPU of one call of each FUSE handler, in-process, no kernel.

    tools/handler_cpu.py [--dirs 50] [--files 40] [--rounds 7] [--profile]

Why: a cold ``tar`` of the bench's closure is ~200,000 FUSE requests
(lookup, open, read, release, opendir, readdir, releasedir per file or
directory), and on two CPUs it is bound by the CPU of every process
together (tools/tar_cold.py): each microsecond of Python in a handler is
a fifth of a second of that ``tar``. Timed inside a mount, a handler's
time includes waits for the GIL and for a CPU, which move with the
machine's load; timed here, alone, it is the handler's own cost, stable
enough to compare two versions of it.

What runs: TvixOperations over ``memory://`` holding one store path of
``--dirs`` directories of ``--files`` small files each, its handlers
called the way llfuse calls them (this thread holds llfuse's lock), with
the mount's defaults for the background fetches except that none is
sent: the listings are fetched once before timing, and reads are served
from the small-file batch cache, filled before each round, as a cold
``tar`` finds most of them. Each figure is the best of ``--rounds``
rounds, in microseconds per call. ``--profile`` adds cProfile's top
functions of one round of lookups, opens and reads.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import os
import pstats
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3
import llfuse

from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.storepath import StorePath
from tvixmount.fetcher import LocalFetcher
from tvixmount.fuse_ops import MountOptions, TvixOperations
from tvixmount.store import StoreUrls, memory, open_store
from tvixmount.vfs import Vfs
from workers.handlers import HANDLERS, Context

CTX = llfuse.RequestContext()
MEMORY = StoreUrls.single("memory://")


def fill(dirs: int, files: int) -> bytes:
    """One store path of ``dirs`` directories of ``files`` small files; its name."""
    memory.reset()
    path = StorePath(hashlib.sha256(b"handler-cpu").digest()[:20], "handler-cpu")
    with open_store(MEMORY) as store:
        subdirs = []
        for d in range(dirs):
            nodes = []
            for f in range(files):
                data = b"directory %d, file %d\n" % (d, f) * 50
                digest = blake3.blake3(data).digest()
                store.blobs.put(data)
                nodes.append(FileNode(b"file%04d.c" % f, digest, len(data)))
            directory = Directory(files=tuple(nodes))
            store.directories.put(directory)
            subdirs.append(DirectoryNode(b"dir%04d" % d, directory.digest(), files))
        top = Directory(directories=tuple(subdirs))
        store.directories.put(top)
        root = DirectoryNode(path.basename.encode(), top.digest(), dirs)
        store.path_infos.put(PathInfo(node=root, narinfo=NarInfo(nar_size=0, nar_sha256=bytes(32))))
    return path.basename.encode()


def best(rounds: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(rounds))


@contextlib.contextmanager
def mounted() -> Iterator[TvixOperations]:
    """TvixOperations over memory:// with the mount's defaults, llfuse's lock held by this thread."""
    options = MountOptions(readahead_files=8, small_batches=8, tree_ahead=0)
    fetcher = LocalFetcher(HANDLERS, Context(-1, open_store(MEMORY)), wire=True, owns_store=True)
    ops = TvixOperations(Vfs(), fetcher, options)
    llfuse.lock.acquire()
    try:
        yield ops
    finally:
        ops.close()
        llfuse.lock.release()
        fetcher.close()


def walk(ops: TvixOperations, name: bytes, dirs: int, files: int) -> tuple[list[int], list[int]]:
    """Look up and list every directory, look up every file: the inodes of both."""
    top = ops.lookup(llfuse.ROOT_INODE, name, CTX).st_ino
    directories = [ops.lookup(top, b"dir%04d" % d, CTX).st_ino for d in range(dirs)]
    for ino in directories:
        fh = ops.opendir(ino, CTX)
        list(ops.readdir(fh, 0))
        ops.releasedir(fh)
    files_ = [ops.lookup(d, b"file%04d.c" % f, CTX).st_ino for d in directories for f in range(files)]
    return directories, files_


def batched_reads(name: bytes, dirs: int, files: int) -> float:
    """Seconds for one read of each file, all of them fetched by the batches their opens sent."""
    with mounted() as ops:
        _, inodes = walk(ops, name, dirs, files)
        handles = [ops.open(ino, os.O_RDONLY, CTX) for ino in inodes]  # each directory's first queues it
        deadline = time.monotonic() + 60
        while ops.small.stats().fetched < len(inodes):
            if time.monotonic() > deadline:
                raise SystemExit(f"the batches fetched {ops.small.stats().fetched} of {len(inodes)} files")
            with llfuse.lock_released:
                time.sleep(0.002)
        start = time.perf_counter()
        for fh in handles:
            ops.read(fh, 0, 128 * 1024)
        took = time.perf_counter() - start
        if ops.small.stats().hits != len(inodes):
            raise SystemExit(f"only {ops.small.stats().hits} of {len(inodes)} reads came from a batch")
        for fh in handles:
            ops.release(fh)
    return took


def measure(name: bytes, dirs: int, files: int, rounds: int, profile: bool) -> dict[str, float]:
    with mounted() as ops:
        directories, inodes = walk(ops, name, dirs, files)
        names = [b"file%04d.c" % f for f in range(files)]

        def lookups() -> float:
            start = time.perf_counter()
            for ino in directories:
                for n in names:
                    ops.lookup(ino, n, CTX)
            return time.perf_counter() - start

        def opens() -> float:
            start = time.perf_counter()
            for ino in inodes:
                ops.release(ops.open(ino, os.O_RDONLY, CTX))
            return time.perf_counter() - start

        def listings() -> float:
            start = time.perf_counter()
            for ino in directories:
                fh = ops.opendir(ino, CTX)
                for _ in ops.readdir(fh, 0):
                    pass
                ops.releasedir(fh)
            return time.perf_counter() - start

        def getattrs() -> float:
            start = time.perf_counter()
            for ino in inodes:
                ops.getattr(ino, CTX)
            return time.perf_counter() - start

        count = len(inodes)
        figures = {
            "lookup": best(rounds, lookups) / count,
            "open + release": best(rounds, opens) / count,
            "readdir, per entry (with opendir, releasedir)": best(rounds, listings) / count,
            "getattr": best(rounds, getattrs) / count,
        }
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: (lookups(), opens()))
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    figures["read (a file a batch brought)"] = best(rounds, lambda: batched_reads(name, dirs, files)) / count
    return {what: seconds * 1e6 for what, seconds in figures.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dirs", type=int, default=50, help="directories (default %(default)s)")
    p.add_argument("--files", type=int, default=40, help="small files per directory (default %(default)s)")
    p.add_argument("--rounds", type=int, default=7, help="rounds; the best counts (default %(default)s)")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions of one round")
    args = p.parse_args()
    if min(args.dirs, args.files, args.rounds) < 1:
        p.error("--dirs, --files and --rounds: each at least 1")
    name = fill(args.dirs, args.files)
    figures = measure(name, args.dirs, args.files, args.rounds, args.profile)
    for what, micros in figures.items():
        print(f"{what:48s} {micros:6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
