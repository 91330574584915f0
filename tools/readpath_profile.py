#!/usr/bin/env python3
"""tools/readpath_profile.py: where the time of a 128 KiB FUSE read goes, per process and thread.

    tools/readpath_profile.py [--workdir DIR]
                              [--target tvix-embedded|passthrough|passthrough-verify|
                                        passthrough-hop|squashfuse]
                              [--workers 8] [--load direct|seq] [--readers 8] [--duration 10]
                              [--py-spy DIR] [--perf DIR] [--micro]

Why: the issue "The read path at the Python floor" compares tvixmount's
daemon time per read with a bare llfuse passthrough's. A profiler's
percentages say where a process spends its time, not how much time a read
costs, nor which thread pays it. This mounts a target of tools/bench's data
set (the one in --workdir, built by tools/bench) on a fresh mount over
backing files already in the page cache (no disk), runs a read load, and
reads every thread's CPU time, run-queue wait and context switches from
/proc before and after: per read, what the FUSE threads, the collector
thread and each worker cost. Threads are told apart by where they sleep
when idle (a FUSE thread in the FUSE device's read, the collector in
epoll). With --py-spy, py-spy records the dispatcher and the first worker
(--native --idle) during the load. With --micro, the pieces of a read are
timed in isolation: blake3 of a segment, the pread, the ring copies, a
pipe round trip between processes, a lock hand-off between threads, and a
pool call to a real worker on the store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib import perf_summary  # noqa: E402
from benchlib import workloads as wl  # noqa: E402
from benchlib.cpuuse import descendants  # noqa: E402
from benchlib.dataset import DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry  # noqa: E402
from benchlib.targets import (  # noqa: E402
    HopPassthrough,
    Passthrough,
    Squashfuse,
    Target,
    Tvixmount,
    VerifyingPassthrough,
)

FUSE_READ = 128 * 1024  # llfuse (libfuse 2): at most 128 KiB per FUSE read request


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it, parents first."""
    return [root, *descendants(root)]


def thread_counters(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """tid -> (ns on a CPU, ns waiting for one, voluntary and involuntary context switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait, _ = (int(x) for x in f.read().split())
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            out[int(tid)] = (run, wait, int(fields["voluntary_ctxt_switches"]),
                             int(fields["nonvoluntary_ctxt_switches"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


def classify_threads(pid: int, samples: int = 20) -> dict[int, str]:
    """Each idle thread of ``pid`` by where it sleeps: fuse (FUSE device read), collector (epoll), other."""
    kinds: dict[int, str] = {}
    for _ in range(samples):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                    wchan = f.read()
            except OSError:
                continue
            kind = "fuse" if "fuse" in wchan else "collector" if "epoll" in wchan else None
            if kind:
                kinds[int(tid)] = kind
            else:
                kinds.setdefault(int(tid), "other")
        time.sleep(0.005)
    main = pid
    if kinds.get(main) == "other":
        kinds[main] = "main"
    return kinds


def account(target: Target, run: Callable[[], dict[str, float]], reads_of: Callable[[dict[str, float]], int],
            spy_dir: Path | None, perf_dir: Path | None = None) -> dict[str, object]:
    """Run the load once and charge every thread's CPU, run-queue wait and switches to a read."""
    dispatcher = target.mount_pid()
    assert dispatcher is not None
    pids = tree_pids(dispatcher)
    kinds = classify_threads(dispatcher)
    names = {dispatcher: "dispatcher"}
    if target.name.startswith("tvix") and len(pids) > 2:  # tvixmount: the zygote, then its workers
        names[pids[1]] = "zygote"
        names.update({p: f"worker {i}" for i, p in enumerate(pids[2:])})
    else:  # the hop passthrough: its workers are its children
        names.update({p: f"worker {i}" for i, p in enumerate(pids[1:])})
    spies = []
    if spy_dir is not None:
        spy_dir.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        for pid in [dispatcher, *pids[2:3]]:
            out = spy_dir / f"{target.name}-{names[pid].replace(' ', '')}.txt"
            cmd = [str(spy), "record", "--pid", str(pid), "--native", "--idle", "--rate", "400",
                   "--format", "raw", "-o", str(out)]
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if perf_dir is not None:
        perf_dir.mkdir(parents=True, exist_ok=True)
        data = perf_dir / f"{target.name}.perf.data"
        spies.append(subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(data), "-p",
                                       ",".join(str(p) for p in pids)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if spies:
        time.sleep(1.5)  # attached before the load starts
    before = {pid: thread_counters(pid) for pid in pids}
    result = run()
    after = {pid: thread_counters(pid) for pid in pids}
    for spy_proc in spies:
        spy_proc.send_signal(2)
        spy_proc.wait(60)
    reads = reads_of(result)
    groups: dict[str, list[int]] = {}
    group_of: dict[int, str] = {}
    for pid in pids:
        for tid, end in after[pid].items():
            start = before[pid].get(tid, (0, 0, 0, 0))
            group = f"{names.get(pid, pid)}: {kinds.get(tid, 'new')} threads" if pid == dispatcher \
                else str(names.get(pid, pid))
            group_of[tid] = group
            total = groups.setdefault(group, [0, 0, 0, 0, 0])
            for i in range(4):
                total[i] += end[i] - start[i]
            total[4] += 1
    per_read = {g: {"cpu_us": v[0] / reads / 1e3, "runq_wait_us": v[1] / reads / 1e3,
                    "voluntary_switches": v[2] / reads, "involuntary_switches": v[3] / reads, "threads": v[4]}
                for g, v in sorted(groups.items()) if v[0] or v[2]}
    report: dict[str, object] = {"result": result, "reads": reads, "per_read": per_read,
                                 "cpu_us_total": sum(g["cpu_us"] for g in per_read.values())}
    if perf_dir is not None:
        report["perf_us_per_read"] = perf_summary.summarise(
            perf_dir / f"{target.name}.perf.data", group_of, {g: v["cpu_us"] for g, v in per_read.items()})
    return report


def micro(store: Path, blob: str, digest: bytes, size: int) -> dict[str, float]:
    """Microseconds per piece of a read, each timed alone in this process (or with one worker)."""
    import mmap
    import threading

    import blake3

    from tvixmount import protocol
    from tvixmount.pool import WorkerPool
    from tvixmount.store import StoreUrls

    def per_call(fn: Callable[[], object], n: int, batches: int = 5) -> float:
        """The fastest of ``batches`` batches: on a shared machine the others measured the neighbours."""
        fn()
        best = float("inf")
        for _ in range(batches):
            start = time.perf_counter()
            for _ in range(max(1, n // batches)):
                fn()
            best = min(best, (time.perf_counter() - start) / max(1, n // batches))
        return best * 1e6

    fd = os.open(blob, os.O_RDONLY)
    segment = os.pread(fd, 256 * 1024, 0)
    ring = mmap.mmap(-1, 4 << 20)
    half = memoryview(segment)[: FUSE_READ]
    out: dict[str, float] = {
        "blake3 of a 256 KiB segment": per_call(lambda: blake3.blake3(segment).digest(), 2000),
        "blake3 of 128 KiB": per_call(lambda: blake3.blake3(half).digest(), 2000),
        "pread of 256 KiB (page cache)": per_call(lambda: os.pread(fd, 256 * 1024, 0), 2000),
        "128 KiB into the ring (memoryview copy)": per_call(
            lambda: ring.__setitem__(slice(0, FUSE_READ), half), 5000),
        "128 KiB out of the ring (bytes copy)": per_call(lambda: ring[0:FUSE_READ], 5000),
        "encode + decode a blob_read request": per_call(lambda: protocol.decode_request(protocol.unpack(
            protocol.encode_request(1, "blob_read", [digest, 0, FUSE_READ, size], 1e9)[4:])), 20000),
    }
    os.close(fd)
    # one wake-up of another process: half a round trip of one byte over two pipes
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(a_w)  # so that the parent's close is our EOF
        os.close(b_r)
        while os.read(a_r, 1):
            os.write(b_w, b"x")
        os._exit(0)
    out["process wake-up (half a pipe round trip)"] = per_call(
        lambda: (os.write(a_w, b"x"), os.read(b_r, 1)), 5000) / 2
    os.close(a_w)
    os.waitpid(pid, 0)
    for fd in (a_r, b_r, b_w):
        os.close(fd)
    # one wake-up of another thread of this process through a plain lock (pool.call's latch)
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()
    stop = False

    def echo() -> None:
        while True:
            ping.acquire()
            if stop:
                return
            pong.release()

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    out["thread wake-up (half a lock round trip)"] = per_call(
        lambda: (ping.release(), pong.acquire()), 5000) / 2
    stop = True
    ping.release()
    thread.join()
    # the worker's handler in this process: segment cached, and a new segment each time (pread + blake3)
    from tvixmount.store import open_store
    from workers.handlers import Context, blob_read

    local = open_store(StoreUrls.embedded(store))
    ctx = Context(-1, local)
    try:
        out["blob_read handler in-process: 128 KiB, segment cached"] = per_call(
            lambda: blob_read(ctx, digest, 0, FUSE_READ, size), 5000)
        steps = iter(range(0, size - FUSE_READ, 256 * 1024))
        out["blob_read handler in-process: 128 KiB of a new segment"] = per_call(
            lambda: blob_read(ctx, digest, next(steps), FUSE_READ, size), min(250, size // (256 << 10) - 2))
    finally:
        ctx.close()  # and the store
    pool = WorkerPool(StoreUrls.embedded(store), 1)
    pool.start()
    try:
        out["pool.call round trip: ping"] = per_call(lambda: pool.call("ping"), 3000)
        out["pool.call round trip: blob_read 128 KiB, segment cached in the worker"] = per_call(
            lambda: pool.call("blob_read", digest, 0, FUSE_READ, size), 3000)
        offsets = iter(range(0, size - FUSE_READ, 256 * 1024))
        out["pool.call round trip: blob_read 128 KiB of a new segment (pread + blake3)"] = per_call(
            lambda: pool.call("blob_read", digest, next(offsets), FUSE_READ, size),
            min(250, size // (256 << 10) - 2))
    finally:
        pool.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/readpath_profile.py", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/tvixmount-bench"))
    p.add_argument("--target", default="tvix-embedded",
                   choices=("tvix-embedded", "passthrough", "passthrough-verify", "passthrough-hop",
                            "squashfuse"))
    p.add_argument("--workers", type=int, default=8,
                   help="tvixmount --workers, and the hop passthrough's (default 8, the card's command line; "
                        "the runs recorded before stop 23 used 2)")
    p.add_argument("--load", default="direct", choices=("direct", "seq"),
                   help="direct: O_DIRECT random 128 KiB reads by --readers processes for --duration s; "
                        "seq: one reader reads the big files in 1 MiB reads (default direct)")
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="record py-spy profiles into DIR during the load")
    p.add_argument("--perf", type=Path, metavar="DIR",
                   help="record perf (-g, 999 Hz) of every process of the mount into DIR/TARGET.perf.data")
    p.add_argument("--micro", action="store_true", help="also time the pieces of a read in isolation")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args()
    stamp = json.loads((args.workdir / "dataset.json").read_text())
    ds = prepare(args.workdir, DatasetSpec(**stamp["spec"]), lambda text: None)
    registry = Registry()
    (args.workdir / "logs").mkdir(exist_ok=True)
    target: Target
    if args.target == "tvix-embedded":
        target = Tvixmount(ds, args.workdir, registry, args.workers)
    elif args.target == "passthrough":
        target = Passthrough(ds, args.workdir, registry)
    elif args.target == "passthrough-verify":
        target = VerifyingPassthrough(ds, args.workdir, registry)
    elif args.target == "passthrough-hop":
        target = HopPassthrough(ds, args.workdir, registry, args.workers)
    else:
        target = Squashfuse(ds, args.workdir, registry)
    report: dict[str, object] = {"target": args.target, "load": args.load, "loadavg": os.getloadavg()}
    try:
        target.warm_backing()
        root = target.prepare(cold=False)
        if args.load == "direct":
            def run() -> dict[str, float]:
                return wl.direct_random_read(target.big_files(), args.readers, args.duration)

            report.update(account(target, run, lambda r: int(r["reads"]), args.py_spy, args.perf))
        else:
            report.update(account(target, lambda: wl.seq_read(target.big_files()),
                                  lambda r: int(r["bytes"]) // FUSE_READ, args.py_spy, args.perf))
        if isinstance(target, Tvixmount):  # what the mount did: arena hits and misses, worker requests
            stats = json.loads(os.getxattr(root, "user.tvixmount.stats"))
            report["mount"] = {"segment_cache": stats["segment_cache"],
                               "requests": stats["fetcher"]["requests"]}
    finally:
        target.close()
        registry.close_all()
    if args.micro:
        digest = ds.big_digests[0]
        blob = str(ds.store / "blobs" / digest.hex()[:2] / digest.hex())
        report["micro_us"] = micro(ds.store, blob, digest, ds.big_files[0][1])
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
