#!/usr/bin/env python3
"""tools/readpath_trace.py: one 128 KiB FUSE read of tvixmount, stage by stage, in microseconds.

    tools/readpath_trace.py [--workdir DIR] [--target tvix-embedded|passthrough] [--workers 2]
                            [--load direct|seq] [--readers 1] [--duration 8] [--json OUT]
                            [--segment-cache 0]

Why: a profiler says which functions a process runs; the issue "The read
path at the Python floor" asks where the ~200 us of one read go, from the
FUSE thread to the worker and back. This runs tvixmount in this process
(the embedded store of tools/bench's data set in --workdir, the backing
files already in the page cache) with timestamps around the steps of a
read, and a load against it from another process. Workers are forked from
this process (through the zygote), so the timestamps in the worker's
request loop come along; they write them to a file each. With one reader
(the default) a read has the mount to itself, so each step's time is its
own cost, not a queue.

Stages, the median and the mean of each over all reads (medians: one
read's typical cost; means add up):

  FUSE thread  handler in (readahead check, lock release, single-flight,
               fetcher); pool.call up to routing (Call(), request encoding,
               state lock); picking a worker; the os.write that wakes it
  worker       wake-up until the request is decoded; checks and deadline
               scope; the blob_read handler (segment pread + blake3, ring
               copy); reply encoding; reply write
  reader       whoever reads the reply: the calling thread itself on its
               lane (tvixmount/lanes.py), else the collector or a caller
               leading the worker's pipe. Wake-up; read and unpack of the
               frames; taking the answer (on a lane: the pid check and the
               view handed to llfuse, or a copy; else the ring take);
               complete (state lock, latch release); a collector's work after
               that until it sleeps again (holding the GIL)
  FUSE thread  wake-up until pool.call returns; handler out (decode, lock
               re-acquired)
  outside      the reader's p50 minus the handler's: kernel, llfuse's C
               code, the reply write, the reader's wake-up

With --target passthrough, tools/passthrough.py runs here instead, its
read handler timed, for the same "outside" on the floor.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import selectors
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib.dataset import BIG_PACKAGE, DatasetSpec, prepare  # noqa: E402
from benchlib.procs import Registry, is_mounted  # noqa: E402
from benchlib.targets import Tvixmount  # noqa: E402

ARENA_HIT = "handler total, served from the segment arena"
T = time.perf_counter_ns  # CLOCK_MONOTONIC: the same clock in every process of the machine
# req id, request start, end, segment ns, blake3 ns, handler start, handler end, reply written
WORKER_RECORD = struct.Struct("<Qqqqqqqq")

LOAD = """
import json, sys
sys.path[:0] = {paths!r}
from pathlib import Path
from benchlib import workloads as wl
files = [(Path(p), s) for p, s in {files!r}]
if {load!r} == "direct":
    r = wl.direct_random_read(files, {readers}, {duration})
else:
    r = wl.seq_read(files)
print(json.dumps(r))
"""


class Trace:
    """Timestamps of the dispatcher's side, by request id; the workers' come from their files."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.local = threading.local()
        self.handlers: list[list[int]] = []  # [entry, call in, call out, exit, request id]
        self.sent: dict[int, int] = {}
        self.took: dict[int, tuple[int, int, int]] = {}  # collector woke, take start, take end
        self.completed: dict[int, int] = {}
        self.routed: dict[int, int] = {}
        self.writes: list[tuple[int, int]] = []  # request pipe writes: start, end
        self.select_enter: list[int] = []  # the collector going back to sleep
        self.on_lane: set[int] = set()  # requests answered on their caller's lane (no collector)

    def install(self) -> None:
        """Wrap the steps of a read; must run before the pool forks its zygote."""
        import blake3

        import workers.loop as loop
        from tvixmount import collector, fuse_ops, lanes, poolstate
        from tvixmount import pool as pool_mod
        from tvixmount.store import segments

        trace = self
        read, send = fuse_ops.TvixOperations.read, poolstate.PoolState._send
        call, read_view = pool_mod.WorkerPool.call, pool_mod.WorkerPool.read_view
        take, complete = collector._take_ring_bytes, poolstate.PoolState.complete

        def traced_read(ops: Any, fh: int, off: int, size: int) -> bytes:
            trace.local.rec = rec = [T(), 0, 0, 0, 0]
            try:
                return read(ops, fh, off, size)
            finally:
                rec[3] = T()
                trace.local.rec = None
                trace.handlers.append(rec)

        def stamped(pool_call: Callable[..., Any], is_read: Callable[[tuple[Any, ...]], bool]) -> Any:
            """``pool_call`` (call, read_view), its entry and return stamped for a FUSE read's blob_read."""
            def traced(pool: Any, *args: Any, **kw: Any) -> Any:
                rec = getattr(trace.local, "rec", None)
                if rec is None or not is_read(args):
                    return pool_call(pool, *args, **kw)
                rec[1] = T()
                try:
                    return pool_call(pool, *args, **kw)
                finally:
                    rec[2] = T()
            return traced

        traced_call = stamped(call, lambda args: getattr(args[0], "name", args[0]) == "blob_read")
        traced_read_view = stamped(read_view, lambda args: True)  # only ever a blob_read

        def traced_send(state: Any, worker: Any, c: Any) -> bool:
            ok = send(state, worker, c)
            if ok and c.op == "blob_read":
                trace.sent.setdefault(c.id, T())
                rec = getattr(trace.local, "rec", None)
                if rec is not None:
                    rec[4] = c.id
            return ok

        def traced_take(worker: Any, messages: list[Any]) -> tuple[int, int]:
            start = T()
            result = take(worker, messages)
            end = T()
            woke = getattr(trace.local, "woke", 0)
            for message in messages:
                if type(message) is list and message:
                    trace.took[message[0]] = (woke, start, end)
            return result

        def traced_complete(state: Any, c: Any, ok: bool, value: Any) -> None:
            trace.completed.setdefault(c.id, T())
            complete(state, c, ok, value)

        route = poolstate.PoolState.route

        def traced_route(state: Any, c: Any, exclude: Any = None) -> None:
            if c.op == "blob_read":
                trace.routed.setdefault(c.id, T())
            route(state, c, exclude)

        class TimedOs:
            """poolstate calls ``os.write(fd, frame)``: time the system call (it wakes the worker)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def write(self, fd: int, data: bytes) -> int:
                start = T()
                try:
                    return os.write(fd, data)
                finally:
                    trace.writes.append((start, T()))

        epoll_select = selectors.EpollSelector.select

        def traced_select(sel: Any, timeout: float | None = None) -> Any:
            trace.select_enter.append(T())
            events = epoll_select(sel, timeout)
            trace.local.woke = T()
            return events

        poolstate.PoolState.route = traced_route
        poolstate.os = TimedOs()
        selectors.EpollSelector.select = traced_select
        fuse_ops.TvixOperations.read = traced_read
        pool_mod.WorkerPool.call = traced_call
        pool_mod.WorkerPool.read_view = traced_read_view
        poolstate.PoolState._send = traced_send
        collector._take_ring_bytes = traced_take
        poolstate.PoolState.complete = traced_complete
        deliver = collector.Collector.deliver

        def traced_deliver(owner: Any, worker: Any) -> bool:
            trace.local.woke = T()  # the reader (the collector, or a caller reading its own reply) woke
            return deliver(owner, worker)

        collector.Collector.deliver = traced_deliver

        # a read on its caller's lane: the caller wakes, reads the lane, takes the answer (a view)
        next_reply = lanes.Lane.next_reply
        take_lane = pool_mod.WorkerPool._take_lane_reply

        def traced_next_reply(lane: Any) -> Any:
            trace.local.woke = T()
            return next_reply(lane)

        def traced_take_lane(pool: Any, c: Any, lane: Any, reply: Any, view: bool) -> bool:
            start = T()
            taken = take_lane(pool, c, lane, reply, view)
            if taken:
                # the take ends where complete() begins (inside it, under the state lock)
                trace.took[c.id] = (trace.local.woke, start, trace.completed.get(c.id, T()))
                trace.on_lane.add(c.id)
            return taken

        lanes.Lane.next_reply = traced_next_reply
        pool_mod.WorkerPool._take_lane_reply = traced_take_lane

        # the worker's side: its request loop, the segment read and blake3
        handle, segment = loop.handle, segments.SegmentFile.segment
        (blob_op, blob_read), try_write = loop.HANDLERS._by_name["blob_read"], loop._try_write
        spent = [0, 0, 0, 0]  # segment ns, blake3 ns, handler start, handler end of the current request
        buffered: list[bytes] = []
        real_blake3 = blake3.blake3

        class TimedBlake3:
            """segments calls ``blake3.blake3(data).digest()``: time the hashing."""

            def blake3(self, *args: Any, **kw: Any) -> Any:
                start = T()
                hasher = real_blake3(*args, **kw)
                spent[1] += T() - start
                return hasher

        def traced_segment(reader: Any, index: int) -> bytes:
            start = T()
            try:
                return segment(reader, index)
            finally:
                spent[0] += T() - start

        def traced_blob_read(*args: Any) -> Any:
            spent[2] = T()
            try:
                return blob_read(*args)
            finally:
                spent[3] = T()

        pending: list[Any] = []  # the current read: request id, start, then (when replied) the rest
        reading: list[Any] = []

        def traced_handle(ctx: Any, message: Any, *rest: Any) -> tuple[bytes, ...]:
            spent[0] = spent[1] = 0
            start = T()
            pending.clear()
            is_read = (type(message) is list and message and message[1] == "blob_read") \
                or type(message).__name__ == "ReadRequest"  # the lean wire's fixed request
            reading[:] = [message[0], start] if is_read else []
            parts = handle(ctx, message, *rest)
            if reading and parts:  # answered on the reply pipe, written once handle returned
                pending[:] = [*reading, T(), *spent]
            reading.clear()
            return parts

        def written() -> None:
            """The reply of the pending read is out."""
            if pending:
                buffered.append(WORKER_RECORD.pack(*pending, T()))
                pending.clear()
                if len(buffered) >= 32:
                    with open(trace.out_dir / f"worker-{os.getpid()}.bin", "ab") as f:
                        f.write(b"".join(buffered))
                    buffered.clear()

        def traced_try_write(fd: int, *parts: bytes) -> bool:
            ok = try_write(fd, *parts)
            written()
            return ok

        lane_send = lanes.LaneWriter.send

        def traced_lane_send(writer: Any, lane: int, body: bytes) -> bool:
            if reading:  # answered on its lane, from inside handle
                pending[:] = [*reading, T(), *spent]
            ok = lane_send(writer, lane, body)
            written()
            return ok

        loop.handle = traced_handle
        loop._try_write = traced_try_write
        lanes.LaneWriter.send = traced_lane_send
        loop.HANDLERS._by_name["blob_read"] = (blob_op, traced_blob_read)
        segments.SegmentFile.segment = traced_segment
        segments.blake3 = TimedBlake3()

    def workers(self) -> dict[int, tuple[int, ...]]:
        out = {}
        for path in self.out_dir.glob("worker-*.bin"):
            data = path.read_bytes()
            for i in range(0, len(data) - len(data) % WORKER_RECORD.size, WORKER_RECORD.size):
                req, *rest = WORKER_RECORD.unpack_from(data, i)
                out[req] = tuple(rest)
        return out

    def stages(self) -> dict[str, dict[str, float | int]]:
        """Microseconds of each stage (median, mean) over the reads whose every timestamp was seen."""
        worker = self.workers()
        rows: dict[str, list[float]] = {}
        if self.handlers and not self.sent:  # the passthrough: only its handler is timed
            totals = [(leave - entry) / 1e3 for entry, _, _, leave, _ in self.handlers]
            return {"handler total": {"median": statistics.median(totals), "mean": statistics.fmean(totals),
                                      "reads": len(totals)}}
        writes = sorted(self.writes)
        write_starts = [w[0] for w in writes]
        sleeps = sorted(self.select_enter)
        for entry, call_in, call_out, leave, req in self.handlers:
            if not req and not call_in:  # no worker request: served from the segment arena
                rows.setdefault(ARENA_HIT, []).append((leave - entry) / 1e3)
                continue
            if not call_in or not req or req not in worker or req not in self.took \
                    or req not in self.completed:
                continue
            w_start, w_end, seg, b3, h_start, h_end, w_written = worker[req]
            woke, took_start, took_end = self.took[req]
            sent, routed = self.sent[req], self.routed[req]
            # this request's pipe write: the last one that started before _send returned
            write_start, write_end = writes[bisect.bisect_right(write_starts, sent) - 1]
            # the collector's next sleep after it completed this call (it holds the GIL till then)
            done = self.completed[req]
            at = bisect.bisect_left(sleeps, done)
            on_lane = req in self.on_lane  # read by its caller: no collector to go back to sleep
            slept = sleeps[at] if at < len(sleeps) and not on_lane else done
            steps = {
                "handler in": call_in - entry,
                "pool.call to route (Call(), request encoding, state lock)": routed - call_in,
                "route: pick a worker": write_start - routed,
                "route: os.write of the request (wakes the worker)": write_end - write_start,
                "route: after the write": sent - write_end,
                "worker wake (write -> request loop has decoded it)": w_start - sent,
                "worker: before the handler (checks, deadline scope)": h_start - w_start,
                "worker: blob_read handler": h_end - h_start,
                "  of which segment (pread + blake3)": seg, "  of which blake3": b3,
                "worker: reply encoding": w_end - h_end,
                "worker: reply write": w_written - w_end,
                "reader wake (reply written -> the collector or the caller reads)": woke - w_written,
                "reader: read + unpack frames": took_start - woke,
                "reader: take the answer (lane: pid check and view; or the ring)": took_end - took_start,
                "reader: complete (state lock, latch release)": done - took_end,
                "collector: after complete until it sleeps again": slept - done,
                "caller wake (latch released -> pool.call returns)": call_out - done,
                "handler out (decode, lock re-acquired)": leave - call_out,
                "handler total": leave - entry,
            }
            for name, ns in steps.items():
                rows.setdefault(name, []).append(ns / 1e3)
        # medians for one read's typical cost; means, because they add up (a sequential reader's
        # reads are bimodal: every other one finds its segment verified in the worker)
        return {name: {"median": statistics.median(v), "mean": statistics.fmean(v), "reads": len(v)}
                for name, v in rows.items()}


def run_passthrough(source: Path, mountpoint: Path, trace: Trace) -> int:
    """tools/passthrough.py in this process, its read handler timed into ``trace.handlers``."""
    import llfuse
    from passthrough import Passthrough

    class Timed(Passthrough):
        def read(self, fh: int, off: int, size: int) -> bytes:
            start = T()
            try:
                return super().read(fh, off, size)
            finally:
                end = T()
                trace.handlers.append([start, start, end, end, 0])

    llfuse.init(Timed(os.fsencode(source)), str(mountpoint), ["fsname=passthrough", "ro"])
    try:
        llfuse.main(workers=1)
    finally:
        llfuse.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="tools/readpath_trace.py", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/tvixmount-bench"))
    p.add_argument("--target", default="tvix-embedded", choices=("tvix-embedded", "passthrough"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--load", default="direct", choices=("direct", "seq"))
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--segment-cache", default="0", metavar="SIZE",
                   help="tvixmount's --segment-cache (default 0: every read takes the worker path, whose "
                        "steps this times; with an arena, the reads it serves are counted apart)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    stamp = json.loads((args.workdir / "dataset.json").read_text())
    ds = prepare(args.workdir, DatasetSpec(**stamp["spec"]), lambda text: None)
    out_dir = args.workdir / "trace"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("worker-*.bin"):
        old.unlink()
    mountpoint = args.workdir / "mnt-trace"
    mountpoint.mkdir(exist_ok=True)
    target = Tvixmount(ds, args.workdir, Registry(), args.workers)  # for its paths: never started
    target.mountpoint = mountpoint
    target.warm_backing()
    if args.target == "passthrough":
        target.mountpoint = mountpoint
        files = [(str(mountpoint / BIG_PACKAGE / rel), size) for rel, size in ds.big_files]
        for path in [ds.tree / BIG_PACKAGE / rel for rel, _ in ds.big_files]:
            path.read_bytes()  # its backing files in the page cache
    else:
        files = [(str(p), s) for p, s in target.big_files()]
    trace = Trace(out_dir)
    if args.target != "passthrough":
        trace.install()
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            code = LOAD.format(paths=[str(HERE), str(HERE.parent)], files=files, load=args.load,
                               readers=args.readers, duration=args.duration)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
            result.update(json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]})
        finally:
            if args.target == "passthrough":
                subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], check=False)
            else:
                os.kill(os.getpid(), signal.SIGTERM)  # tvixmount unmounts and returns from its main

    threading.Thread(target=drive, daemon=True).start()
    load = os.getloadavg()
    if args.target == "passthrough":
        code = run_passthrough(ds.tree, mountpoint, trace)
    else:
        from tvixmount.cli import main as tvixmount_main

        code = tvixmount_main([str(mountpoint), "--store-dir", str(ds.store), "--workers", str(args.workers),
                               "--list-root", "--log-level", "WARNING",
                               "--segment-cache", args.segment_cache,
                               # files fetched ahead whole (up to 1 MiB) are read without a worker
                               # request to trace; the bench's big files are bigger, a test's are not
                               "--readahead-files", "0"])
    # each worker's last (at most 31) records were never written: the medians do not need them
    stages = trace.stages()
    if "p50_ms" in result and "handler total" in stages:
        stages["outside (reader p50 - handler total)"] = {
            "median": result["p50_ms"] * 1e3 - stages["handler total"]["median"]}
    report = {"load": args.load, "readers": args.readers, "workers": args.workers, "result": result,
              "stages_us": stages, "loadavg": [load, os.getloadavg()], "exit": code}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
