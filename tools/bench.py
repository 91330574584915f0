#!/usr/bin/env python3
"""tools/bench: tvixmount against native disk and squashfuse, cold and warm, one command.

    tools/bench [--workdir DIR] [--quick] [--repeat N] [--files N] [--big N --big-size S]
                [--workers LIST] [--json OUT] [--markdown OUT] [--plot OUT.png]

Why this exists: the issue "Performance for build farms" sets targets as
ratios against squashfuse (the usual way to ship a read-only closure) and
against a plain gRPC client, and the issue "The read path at the Python
floor" against a bare llfuse passthrough (what any Python FUSE filesystem
pays); ratios only mean something when every side reads the same bytes on
the same machine in the same state. So this command builds one
deterministic data set (tools/gen_tree.py), imports it into an embedded
store, packs the same tree with mksquashfs, and measures:

  targets    native disk, squashfuse, tools/passthrough.py on the tree
             (and with --verify: the same plus blake3 of every segment it
             serves, the floor for a filesystem that must verify; and with
             --verify --hop: that work in worker processes, the floor of
             tvixmount's own shape),
             tvixmount on the embedded store, tvixmount over gRPC (daemon
             on loopback)
  workloads  sequential read of the big files (MB/s), the same on a fresh
             mount whose backing files are already in the page cache (the
             pure FUSE path), find, stat walk, tar cf - | wc -c over the
             closure (s), random 128 KiB reads by 8 reader threads and
             O_DIRECT random 128 KiB reads by 8 reader processes for a
             fixed time (MB/s, p50/p99 latency)
  states     cold (sync, drop_caches, a fresh mount and daemon) and warm
             (the same workload again on the same mount)
  extras     random reads vs readers (plot), vs --workers on the embedded
             store and over gRPC with 20 ms of added latency per call, and
             what the gRPC sequential read is held against: a plain gRPC
             client streaming the same blobs, and tools/grpc_passthrough.py
             (that client behind a bare llfuse mount; and verifying in
             worker processes, the floor of tvixmount's shape over gRPC)

Targets are interleaved: each workload runs on every target before the
next workload starts (the first target rotating from one repeat to the
next), because this kind of machine throttles long runs of reads and a
target measured last would pay for everyone before it.
Medians of --repeat runs go to a table (stdout and --markdown), --json and
a PNG plot. Every mount and daemon is stopped at the end, also on errors
and Ctrl-C. Needs root (FUSE mounts, drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib import report as rep  # noqa: E402
from benchlib import workloads as wl  # noqa: E402
from benchlib.dataset import BIG_PACKAGE, Dataset, DatasetSpec, prepare  # noqa: E402
from benchlib.grpcplain import stream_blobs  # noqa: E402
from benchlib.options import MAIN_READERS, parse_args  # noqa: E402
from benchlib.procs import FuseMount, GrpcDaemon, Registry, drop_caches  # noqa: E402
from benchlib.runenv import CacheWatch, PySpy, git_commit, in_turn, machine  # noqa: E402
from benchlib.targets import (  # noqa: E402
    GRPC_FLOORS,
    HopPassthrough,
    Native,
    Passthrough,
    Squashfuse,
    Target,
    Tvixmount,
    VerifyingPassthrough,
    grpc_floor_cmd,
)

WALKS = ("seq_read", "find", "stat_walk", "tar")
# Set by SIGINT/SIGTERM before the handler raises KeyboardInterrupt. A KeyboardInterrupt raised
# while the main thread runs a finaliser or a library's callback is printed and dropped, not
# propagated, and a run that missed one would go on to the end and exit 0; every workload
# checks this first, so a stop request ends the run at the next workload at the latest.
STOP = threading.Event()


def _stop_requested() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt
# one workload on one target: (cold, warm), or (the one sample, None) for a single-mode workload
Measure = Callable[[Target], tuple[dict[str, float], dict[str, float] | None]]
STATS_XATTR = "user.tvixmount.stats"


class Bench:
    def __init__(self, args: argparse.Namespace, registry: Registry) -> None:
        self.args = args
        self.registry = registry
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
        self.readers_sweep: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.workers_sweep: dict[str, dict[str, list[dict[str, float]]]] = {}
        self.grpc_plain: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
        self.grpc_floors: dict[str, list[dict[str, float]]] = {}  # tools/grpc_passthrough.py, cold seq_read
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.mount_stats: dict[str, dict[str, Any]] = {}
        self.caches_dropped = True
        self.load_start = (0.0, 0.0, 0.0)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # -- one measurement -----------------------------------------------------------------

    def workload(self, target: Target, name: str, root: Path) -> dict[str, float]:
        ds = target.ds
        if name == "seq_read":
            return wl.seq_read(target.big_files())
        if name == "find":
            result = wl.find(root)
        elif name == "stat_walk":
            result = wl.stat_walk(root)
        elif name == "tar":
            return wl.tar(root, target.small_packages())
        else:
            raise ValueError(name)
        if result["entries"] != ds.entries:
            self.warnings.append(f"{target.name} {name}: saw {result['entries']:.0f} entries, "
                                 f"the tree has {ds.entries}")
        return result

    def record(self, target: str, workload: str, mode: str, result: dict[str, float]) -> None:
        self.samples.setdefault(target, {}).setdefault(workload, {}).setdefault(mode, []).append(result)

    def cold_warm(self, target: Target, label: str, fn) -> tuple[dict[str, float], dict[str, float]]:
        """Run ``fn(root)`` cold (fresh everything) and then warm (same mount, right after)."""
        root = target.prepare(cold=True)
        with self.profiler(target, label):
            cold = fn(root)
        with CacheWatch() as watch:
            warm = fn(target.prepare(cold=False))
        if watch.dropped:
            # Someone else dropped the caches (another benchmark, a test): this
            # warm sample measured a cold cache and is left out of the medians.
            warm["external_drop"] = 1.0
            self.warnings.append(f"{target.name} {label} warm: the page cache fell from {watch.peak >> 20} "
                                 f"to {watch.low >> 20} MiB during the run (dropped by another process); "
                                 "sample left out")
            self.say(f"WARNING: page cache dropped by another process during {target.name} {label} warm")
        if isinstance(target, Tvixmount):
            try:
                stats = json.loads(os.getxattr(root, STATS_XATTR))
                self.mount_stats.setdefault(target.name, {})[label] = stats
            except (OSError, ValueError) as exc:
                self.warnings.append(f"{target.name}: no {STATS_XATTR} after {label}: {exc}")
        return cold, warm

    def profiler(self, target: Target, label: str):
        import contextlib

        pid = target.mount_pid()
        if not self.args.profile or pid is None or not isinstance(target, Tvixmount):
            return contextlib.nullcontext()
        return PySpy(pid, self.args.profile / f"{target.name}-{label}.txt", self.say, self.args.profile_gil)

    # -- phases ----------------------------------------------------------------------------

    def main_targets(self, targets: list[Target], rep_index: int) -> None:
        """One repeat of every main workload, each on every target in turn (interleaved)."""
        a = self.args
        order = in_turn(targets, rep_index)
        for name in [w for w in a.workload_names if w in WALKS]:
            def walk(t: Target, n: str = name) -> tuple[dict[str, float], dict[str, float]]:
                return self.cold_warm(t, n, lambda root: self.workload(t, n, root))

            self.each_target(order, name, rep_index, walk)
        if "seq_cached" in a.workload_names:
            self.each_target([t for t in order if t.has_backing], "seq_cached", rep_index,
                             lambda t: (self.cached_seq(t), None))
        for readers in a.readers if "random_read" in a.workload_names else []:
            label = f"random_read-{readers}"

            def threads(t: Target, n: int = readers) -> tuple[dict[str, float], dict[str, float]]:
                return self.cold_warm(t, f"random_read-{n}", lambda root: wl.random_read(
                    t.big_files(), n, reads=a.random_reads, seed=rep_index + 1))

            for target in order:
                result = self.each_target([target], label, rep_index, threads, record=False)
                if result is None or result[1] is None:
                    continue
                cold, warm = result
                sweep = self.readers_sweep.setdefault(target.name, {}).setdefault(str(readers), {})
                sweep.setdefault("cold", []).append(cold["mb_s"])
                sweep.setdefault("warm", []).append(warm["mb_s"])
                if readers == MAIN_READERS:
                    self.record(target.name, "random_read", "cold", cold)
                    self.record(target.name, "random_read", "warm", warm)
        if "direct_read" in a.workload_names:
            self.each_target(order, "direct_read", rep_index, lambda t: self.cold_warm(
                t, "direct_read", lambda root: wl.direct_random_read(
                    t.big_files(), MAIN_READERS, a.direct_duration, seed=rep_index + 1)))

    def each_target(self, targets: list[Target], label: str, rep_index: int, fn: Measure,
                    record: bool = True) -> tuple[dict[str, float], dict[str, float] | None] | None:
        """``fn(target)`` -> (cold, warm or None) on each target; errors are noted, mounts stopped.

        Returns the last result (for callers measuring one target at a time).
        """
        result = None
        for target in targets:
            _stop_requested()
            try:
                result = cold, warm = fn(target)
                mode = "cold" if warm is not None else "cached"
                if record:
                    self.record(target.name, label, mode, cold)
                    if warm is not None:
                        self.record(target.name, label, "warm", warm)
                text = f"{mode} {_show(cold)}" + (f"   warm {_show(warm)}" if warm is not None else "")
                self.say(f"run {rep_index + 1}/{self.args.repeat} {target.name:<13} {label:<15} {text}")
            except Exception as exc:
                _stop_requested()  # a stop that surfaced as this workload's error
                result = None
                self.errors.append(f"{target.name} {label}: {type(exc).__name__}: {exc}")
                self.say(f"ERROR {target.name} {label}: {exc}")
            finally:
                target.close()
                self.caches_dropped = self.caches_dropped and target.caches_dropped
        return result

    def cached_seq(self, target: Target) -> dict[str, float]:
        """Sequential read on a fresh mount whose backing files are in the page cache: the FUSE path alone.

        The backing files (image, blob files, source tree) are read once,
        then the target is mounted afresh (a new mount starts with none of
        its own pages) and read through: no disk, only the filesystem.
        """
        target.close()
        target.warm_backing()
        target.prepare(cold=False)
        return wl.seq_read(target.big_files())

    def grpc_baselines(self, ds: Dataset, rep_index: int) -> None:
        """What the gRPC sequential read is measured against, each on a fresh daemon, caches dropped.

        The plain client (the wire and the daemon alone), and the floors of a
        FUSE mount in front of it (tools/grpc_passthrough.py: the same client
        behind llfuse; and verifying in worker processes, tvixmount's shape).
        """
        steps = [("plain", self.grpc_plain_client)] + [
            (name, lambda ds, daemon, n=name: self.grpc_floor(ds, n, daemon)) for name in GRPC_FLOORS]
        for name, step in in_turn(steps, rep_index):
            _stop_requested()
            daemon = None
            try:
                self.caches_dropped = drop_caches() and self.caches_dropped
                daemon = GrpcDaemon(ds.store, self.args.workdir / "logs" / f"{name}-daemon.log",
                                    self.registry).start()
                step(ds, daemon)
            except Exception as exc:
                _stop_requested()
                self.errors.append(f"gRPC baseline {name}: {type(exc).__name__}: {exc}")
                self.say(f"ERROR gRPC baseline {name}: {exc}")
            finally:
                if daemon is not None:
                    daemon.stop()

    def grpc_plain_client(self, ds: Dataset, daemon: GrpcDaemon) -> None:
        sizes = [s for _, s in ds.big_files]
        cold = stream_blobs(daemon.listen, ds.big_digests, sizes)
        warm = stream_blobs(daemon.listen, ds.big_digests, sizes)
        self.grpc_plain["cold"].append(cold)
        self.grpc_plain["warm"].append(warm)
        self.say(f"run {len(self.grpc_plain['cold'])}/{self.args.repeat} plain gRPC client  "
                 f"cold {_show(cold)}   warm {_show(warm)}")

    def grpc_floor(self, ds: Dataset, name: str, daemon: GrpcDaemon) -> None:
        mountpoint = self.args.workdir / f"mnt-{name}"
        cmd = grpc_floor_cmd(ds, name, daemon.listen, self.args.mount_workers, mountpoint)
        mount = FuseMount(name, cmd, mountpoint, self.args.workdir / "logs" / f"{name}.log",
                          self.registry).start()
        try:
            result = wl.seq_read([(mountpoint / BIG_PACKAGE / rel, size) for rel, size in ds.big_files])
        finally:
            mount.stop()
        runs = self.grpc_floors.setdefault(name, [])
        runs.append(result)
        self.say(f"run {len(runs)}/{self.args.repeat} {name:<13} gRPC floor      cold {_show(result)}")

    def workers_sweeps(self, ds: Dataset, rep_index: int) -> None:
        a = self.args
        runs = [("tvix-embedded", False, 0.0, dict(reads=a.random_reads)),
                (f"tvix-grpc +{a.added_latency * 1e3:g} ms", True, a.added_latency,
                 dict(duration=a.latency_duration))]
        for name, grpc, latency, how in runs:
            if ("tvix-grpc" if grpc else "tvix-embedded") not in a.target_names:
                continue
            daemon = None
            if grpc:
                # One daemon for the sweep: the 20 ms per call dominates, not its caches.
                try:
                    daemon = GrpcDaemon(ds.store, a.workdir / "logs" / "latency-daemon.log", self.registry,
                                        latency).start()
                except Exception as exc:
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
            for workers in a.workers:
                _stop_requested()
                target = Tvixmount(ds, a.workdir, self.registry, workers, grpc=grpc, added_latency=latency,
                                   name=f"sweep-{'grpc' if grpc else 'embedded'}", daemon=daemon)
                try:
                    target.prepare(cold=True)
                    with self.profiler(target, f"workers-{workers}{'-latency' if grpc else ''}"):
                        result = wl.random_read(target.big_files(), MAIN_READERS, seed=rep_index + 1, **how)
                    self.workers_sweep.setdefault(name, {}).setdefault(str(workers), []).append(result)
                    self.say(f"run {rep_index + 1}/{a.repeat} {name} --workers {workers:<2} {_show(result)}")
                except Exception as exc:
                    _stop_requested()
                    self.errors.append(f"{name} --workers {workers}: {type(exc).__name__}: {exc}")
                    self.say(f"ERROR {name} --workers {workers}: {exc}")
                finally:
                    target.close()
            if daemon is not None:
                daemon.stop()

    # -- all of it ---------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        spec = DatasetSpec(a.files, a.big, a.big_size, a.seed)
        ds = prepare(a.workdir, spec, self.say)
        self.load_start = os.getloadavg()
        busy = self.load_start[0] / (os.cpu_count() or 1)
        if busy > 0.5:
            self.warnings.append(f"the machine was busy when the run started (load average "
                                 f"{self.load_start[0]:.1f} on {os.cpu_count()} CPUs): numbers are noisy")
            self.say(f"WARNING: load average {self.load_start[0]:.1f} on {os.cpu_count()} CPUs: "
                     "other processes compete with the measurements")
        (a.workdir / "logs").mkdir(exist_ok=True)
        self.say(f"data set: {ds.entries} entries, {ds.tree_bytes / 1e6:.0f} MB, "
                 f"{len(ds.packages)} packages, "
                 f"{len(ds.big_files)} big files; squashfs -comp {ds.compression}")
        all_targets: list[Target] = [
            Native(ds),
            Squashfuse(ds, a.workdir, self.registry),
            Passthrough(ds, a.workdir, self.registry),
            VerifyingPassthrough(ds, a.workdir, self.registry),
            HopPassthrough(ds, a.workdir, self.registry, a.mount_workers),
            Tvixmount(ds, a.workdir, self.registry, a.mount_workers),
            Tvixmount(ds, a.workdir, self.registry, a.mount_workers, grpc=True),
        ]
        targets = [t for t in all_targets if t.name in a.target_names]
        for i in range(a.repeat):
            self.main_targets(targets, i)
            if "sweeps" in a.workload_names:
                if "tvix-grpc" in a.target_names:
                    self.grpc_baselines(ds, i)
                self.workers_sweeps(ds, i)
        _stop_requested()
        report = self.report(ds, targets)
        print()
        print(rep.markdown(report), end="")
        self.write_outputs(report)
        if self.warnings:
            self.say("warnings:\n  " + "\n  ".join(self.warnings))
        if self.errors:
            self.say("errors:\n  " + "\n  ".join(self.errors))
            return 1
        return 0

    def report(self, ds: Dataset, targets: list[Target]) -> dict[str, Any]:
        summary = rep.summarise(self.samples)
        plain = {mode: {k: rep.median([r[k] for r in runs]) for k in ("mb_s", "seconds")}
                 for mode, runs in self.grpc_plain.items() if runs}
        keys = ("mb_s", "p50_ms", "p99_ms", "reads")
        workers = {name: {w: {k: rep.median([r[k] for r in runs]) for k in keys} for w, runs in row.items()}
                   for name, row in self.workers_sweep.items()}
        latency_name = next((n for n in workers if n.startswith("tvix-grpc")), None)
        floors = {name: {k: rep.median([r[k] for r in runs]) for k in ("mb_s", "seconds")}
                  for name, runs in self.grpc_floors.items()}
        grpc = {"plain": plain, "floors": floors,
                "latency": workers.get(latency_name, {}) if latency_name else {}}
        readers = {t: {n: {m: rep.median(v) for m, v in modes.items()} for n, modes in row.items()}
                   for t, row in self.readers_sweep.items()}
        report: dict[str, Any] = {
            "meta": self.meta(ds, targets),
            "summary": summary,
            "spread": rep.spread(self.samples),
            "samples": self.samples,
            "grpc": grpc,
            "sweeps": {"readers": readers, "workers": workers},
            "mount_stats": self.mount_stats,
            "errors": self.errors,
            "warnings": self.warnings,
        }
        report["goals"] = rep.evaluate(summary, grpc)
        return report

    def meta(self, ds: Dataset, targets: list[Target]) -> dict[str, Any]:
        a = self.args
        return {
            "command": " ".join(["tools/bench", *sys.argv[1:]]),
            "quick": a.quick,
            "repeat": a.repeat,
            "started": self.started,
            "elapsed_s": time.monotonic() - self.t0,
            "caches_dropped": self.caches_dropped,
            "loadavg_start": list(self.load_start),
            "loadavg_end": list(os.getloadavg()),
            "machine": machine(),
            "git_commit": git_commit(),
            "dataset": {"files": ds.spec.files, "big": ds.spec.big, "big_size": ds.spec.big_size,
                        "seed": ds.spec.seed, "entries": ds.entries, "bytes": ds.tree_bytes,
                        "packages": len(ds.packages), "squashfs_compression": ds.compression},
            "targets": {t.name: t.description for t in targets},
            "random_reads": a.random_reads, "readers": a.readers, "workers": a.workers,
            "mount_workers": a.mount_workers, "added_latency": a.added_latency,
            "latency_duration": a.latency_duration, "direct_duration": a.direct_duration,
        }

    def write_outputs(self, report: dict[str, Any]) -> None:
        a = self.args
        json_out = a.json or a.workdir / "bench.json"
        md_out = a.markdown or a.workdir / "bench.md"
        png_out = a.plot or a.workdir / "bench.png"
        json_out.write_text(json.dumps(report, indent=1, sort_keys=True, default=_jsonable) + "\n")
        md_out.write_text(rep.markdown(report))
        why = rep.plot(report, png_out)
        if why:
            self.warnings.append(f"no plot: {why}")
            self.say(f"wrote {json_out} and {md_out}; no plot: {why}")
        else:
            self.say(f"wrote {json_out}, {md_out} and {png_out}")


def _show(result: dict[str, float]) -> str:
    if "p99_ms" in result:
        return f"{result['mb_s']:8.1f} MB/s (p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms)"
    if "mb_s" in result and "entries" not in result and "reads" not in result and result.get("bytes"):
        return f"{result['mb_s']:8.1f} MB/s in {result['seconds']:.2f} s"
    return f"{result['seconds']:8.3f} s"


def _jsonable(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(type(obj).__name__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", argv)
    if args is None:
        return 2
    registry = Registry()

    def on_stop(signum: int, frame: object) -> None:
        STOP.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    bench = Bench(args, registry)
    try:
        return bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted: stopping mounts and daemons")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for problem in registry.close_all():
            print(f"tools/bench: cleanup: {problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
