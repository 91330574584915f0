"""The measured workloads: what a build farm does to a store mount.

Each function takes the directory a target shows the tree at and returns
a flat dict of numbers (``seconds`` always; MB/s and latencies where they
mean something). They check what they read (sizes, entry counts) so a
target that silently serves less cannot look fast.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import random
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .stats import percentile

SEQ_BLOCK = 1 << 20
RANDOM_BLOCK = 128 * 1024


class WorkloadError(RuntimeError):
    """A workload saw a wrong size, a failed command or an I/O error."""


def seq_read(paths: Sequence[tuple[Path, int]]) -> dict[str, float]:
    """Read each file start to end with 1 MiB reads, one after another, one reader."""
    buf = bytearray(SEQ_BLOCK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path, size in paths:
        got = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                got += n
        if got != size:
            raise WorkloadError(f"{path}: read {got} bytes, expected {size}")
        total += got
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "bytes": total, "mb_s": total / elapsed / 1e6}


def find(root: Path) -> dict[str, float]:
    """``find .`` from the root: readdir and the lookups find needs to descend."""
    start = time.perf_counter()
    out = subprocess.run(["find", "."], cwd=root, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise WorkloadError(f"find in {root} exited {out.returncode}: {out.stderr[-500:]!r}")
    return {"seconds": elapsed, "entries": out.stdout.count(b"\n") - 1}


def stat_walk(root: Path) -> dict[str, float]:
    """os.walk + lstat of every entry, like a build tool checking what changed."""
    entries = 0
    start = time.perf_counter()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dirpath, name))
        entries += len(dirs) + len(files)
    return {"seconds": time.perf_counter() - start, "entries": entries}


def tar(root: Path, packages: Sequence[str]) -> dict[str, float]:
    """``tar cf - PKG... | wc -c``: every small file opened and read in full.

    The archive goes through a pipe on purpose: GNU tar writing to
    /dev/null notices and skips reading file contents altogether.
    """
    cmd = "set -o pipefail; tar cf - -- " + " ".join(_shell_quote(p) for p in packages) + " | wc -c"
    start = time.perf_counter()
    out = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise WorkloadError(f"tar in {root} exited {out.returncode}: {out.stderr[-500:]}")
    archive = int(out.stdout.strip())
    return {"seconds": elapsed, "bytes": archive, "mb_s": archive / elapsed / 1e6}


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def random_read(paths: Sequence[tuple[Path, int]], readers: int, reads: int = 0, duration: float = 0.0,
                seed: int = 1, block: int = RANDOM_BLOCK) -> dict[str, float]:
    """``readers`` threads doing ``block``-byte preads of distinct random blocks.

    The blocks (``block``-aligned, over all files) are shuffled with
    ``seed`` and dealt out to the readers, so within a run no block is read
    twice: a cold run measures fetches, not the page cache it just filled,
    and a second run with the same seed re-reads exactly those blocks (the
    warm case). Either ``reads`` blocks in total (dealt again from the start
    when there are fewer blocks than that) or until ``duration`` seconds
    have passed or every block was read once (the latency runs, where one
    worker manages only a few dozen reads a second). Python threads are
    fine: pread releases the GIL, and the mount under test is the
    bottleneck.
    """
    if not paths or readers < 1 or (reads <= 0 and duration <= 0):
        raise ValueError("random_read needs files, readers and reads or a duration")
    readable = [(p, s) for p, s in paths if s >= block]
    if not readable:
        raise WorkloadError(f"no file of at least {block} bytes to read from")
    blocks = [(i, off) for i, (_, size) in enumerate(readable) for off in range(0, size - block + 1, block)]
    random.Random(seed).shuffle(blocks)
    if reads:
        blocks = (blocks * (reads // len(blocks) + 1))[:reads]
    plans = [blocks[i::readers] for i in range(readers)]
    latencies: list[list[float]] = [[] for _ in range(readers)]
    errors: list[str] = []
    go = threading.Event()

    def run(index: int) -> None:
        fds = [os.open(p, os.O_RDONLY) for p, _ in readable]
        mine = latencies[index]
        try:
            go.wait()
            deadline = time.perf_counter() + duration if duration else 0.0
            for which, offset in plans[index]:
                if deadline and time.perf_counter() >= deadline:
                    break
                t = time.perf_counter()
                data = os.pread(fds[which], block, offset)
                mine.append(time.perf_counter() - t)
                if len(data) != block:
                    errors.append(f"{readable[which][0]}: {len(data)} bytes at {offset}, expected {block}")
                    return
        except OSError as exc:
            errors.append(f"reader {index}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise WorkloadError("; ".join(errors[:3]))
    flat = [x for lst in latencies for x in lst]
    total = len(flat) * block
    return {"seconds": elapsed, "reads": len(flat), "bytes": total, "mb_s": total / elapsed / 1e6,
            "p50_ms": percentile(flat, 50) * 1e3, "p99_ms": percentile(flat, 99) * 1e3}


def direct_random_read(paths: Sequence[tuple[Path, int]], readers: int, duration: float, seed: int = 1,
                       block: int = RANDOM_BLOCK) -> dict[str, float]:
    """``readers`` processes doing O_DIRECT ``block``-byte reads at random aligned offsets for ``duration`` s.

    What a FUSE filesystem costs per request, and nothing else: O_DIRECT
    sends every read to the filesystem (no page cache, no readahead), the
    offsets repeat (after the first pass the backing data is cached, so
    the disk drops out), and each reader is a process of its own, so no
    reader waits for another's GIL. Each reader draws (file, block) pairs
    from its own seeded generator and reads into a page-aligned buffer
    (an anonymous mmap), as O_DIRECT requires.
    """
    readable = [(p, s) for p, s in paths if s >= block]
    if not readable or readers < 1 or duration <= 0:
        raise WorkloadError(f"O_DIRECT reads need files of at least {block} bytes, readers and a duration")
    go_r, go_w = os.pipe()
    children: list[tuple[int, int]] = []
    try:
        for index in range(readers):
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the reader: never returns into the caller's code
                code = 1
                try:
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    os.close(go_w)
                    os.close(out_r)
                    rng = random.Random(seed * 1000 + index)
                    report = _direct_reader(readable, block, duration, rng, go_r)
                    with open(out_w, "wb") as f:
                        f.write(report)
                    code = 0
                finally:
                    os._exit(code)
            os.close(out_w)
            children.append((pid, out_r))
        os.close(go_r)
        os.close(go_w)  # EOF on the go pipe: every reader starts now
        go_r = go_w = -1
        reports = []
        while children:
            reports.append(_collect(*children[0]))
            children.pop(0)
    finally:
        for fd in (go_r, go_w):
            if fd >= 0:
                os.close(fd)
        for pid, out_r in children:  # interrupted: stop the readers we started
            with contextlib.suppress(OSError):
                os.close(out_r)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    errors = [r for r in reports if isinstance(r, str)]
    if errors:
        raise WorkloadError("; ".join(errors[:3]))
    runs = [r for r in reports if not isinstance(r, str)]
    flat = [x for _, lat in runs for x in lat]
    elapsed = max(t for t, _ in runs)
    total = len(flat) * block
    return {"seconds": elapsed, "reads": len(flat), "bytes": total, "mb_s": total / elapsed / 1e6,
            "p50_ms": percentile(flat, 50) * 1e3, "p99_ms": percentile(flat, 99) * 1e3}


def _direct_reader(files: Sequence[tuple[Path, int]], block: int, duration: float, rng: random.Random,
                   go: int) -> bytes:
    """One reader process's loop; its report: b"E" + why, or b"O" + elapsed + latencies (doubles)."""
    try:
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p, _ in files]
    except OSError as exc:
        return b"E" + f"O_DIRECT open: {exc}".encode()
    buf = mmap.mmap(-1, block)
    blocks = [s // block for _, s in files]
    latencies = array.array("d")
    os.read(go, 1)  # blocks until the parent closes its end
    start = now = time.perf_counter()
    end = start + duration
    while now < end:
        which = rng.randrange(len(fds))
        offset = rng.randrange(blocks[which]) * block
        before = time.perf_counter()
        try:
            got = os.preadv(fds[which], [buf], offset)
        except OSError as exc:
            return b"E" + f"{files[which][0]} at {offset}: {exc}".encode()
        now = time.perf_counter()
        latencies.append(now - before)
        if got != block:
            return b"E" + f"{files[which][0]}: {got} bytes at {offset}, expected {block}".encode()
    return b"O" + struct.pack("d", now - start) + latencies.tobytes()


def _collect(pid: int, out_r: int) -> str | tuple[float, array.array]:
    with open(out_r, "rb") as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    if report[:1] == b"E":
        return f"reader pid {pid}: {report[1:].decode(errors='replace')}"
    if report[:1] != b"O" or status != 0:
        return f"reader pid {pid} exited with status {status} and a {len(report)}-byte report"
    latencies = array.array("d")
    latencies.frombytes(report[9:])
    return struct.unpack("d", report[1:9])[0], latencies
