#!/usr/bin/env python3
"""tools/bench: tvixmount against native disk and squashfuse, cold and warm, one command.

    tools/bench [--workdir DIR] [--quick] [--repeat N] [--files N] [--big N --big-size S]
                [--workers LIST] [--json OUT] [--markdown OUT] [--plot OUT.png]

Why this exists: the issue "Performance for build farms" sets targets as
ratios against squashfuse (the usual way to ship a read-only closure) and
against a plain gRPC client; ratios only mean something when every side
reads the same bytes on the same machine in the same state. So this
command builds one deterministic data set (tools/gen_tree.py), imports it
into an embedded store, packs the same tree with mksquashfs, and measures:

  targets    native disk, squashfuse, tvixmount on the embedded store,
             tvixmount over gRPC (daemon on loopback)
  workloads  sequential read of the big files (MB/s), find, stat walk,
             tar cf - | wc -c over the closure (s), random 128 KiB reads by
             8 readers (MB/s, p50/p99 latency)
  states     cold (sync, drop_caches, a fresh mount and daemon) and warm
             (the same workload again on the same mount)
  extras     random reads vs readers (plot), vs --workers on the embedded
             store and over gRPC with 20 ms of added latency per call, and
             a plain gRPC client streaming the same blobs

Medians of --repeat runs go to a table (stdout and --markdown), --json and
a PNG plot. Every mount and daemon is stopped at the end, also on errors
and Ctrl-C. Needs root (FUSE mounts, drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchlib import report as rep  # noqa: E402
from benchlib import workloads as wl  # noqa: E402
from benchlib.dataset import Dataset, DatasetSpec, prepare  # noqa: E402
from benchlib.grpcplain import stream_blobs  # noqa: E402
from benchlib.procs import GrpcDaemon, Registry, drop_caches  # noqa: E402
from benchlib.targets import Native, Squashfuse, Target, Tvixmount  # noqa: E402

from tvixmount.units import parse_size, size_argument  # noqa: E402

FULL = {"files": 40000, "big": 8, "big_size": "128M", "repeat": 3, "readers": "1,2,4,8,16",
        "workers": "1,2,4,8", "random_reads": 2048, "latency_duration": 8.0}
QUICK = {"files": 500, "big": 2, "big_size": "4M", "repeat": 1, "readers": "8", "workers": "1,8",
         "random_reads": 64, "latency_duration": 1.0}
MAIN_READERS = 8
DEFAULT_WORKDIR = Path("/var/tmp/tvixmount-bench")
ALL_WORKLOADS = ("seq_read", "find", "stat_walk", "tar", "random_read", "sweeps")
STATS_XATTR = "user.tvixmount.stats"


def parse_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers like 1,2,4,8")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: tools/bench --quick --workdir /tmp/bench")
    p.add_argument("--workdir", type=Path, default=None,
                   help="data set, store, image, mounts, logs and default outputs (reused while the "
                        f"data set parameters match; default {DEFAULT_WORKDIR}, with --quick "
                        f"{DEFAULT_WORKDIR}-quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['files']} files + {QUICK['big']} x {QUICK['big_size']}, "
                        "1 repeat, short sweeps (well under a minute)")
    p.add_argument("--repeat", type=int,
                   help=f"runs per measurement, medians reported (default {FULL['repeat']})")
    p.add_argument("--files", type=int, help=f"closure files (default {FULL['files']})")
    p.add_argument("--big", type=int, help=f"big files (default {FULL['big']})")
    p.add_argument("--big-size", type=size_argument,
                   help=f"size of each big file (default {FULL['big_size']})")
    p.add_argument("--seed", type=int, default=1, help="data set seed (default 1)")
    p.add_argument("--workers", type=parse_list, default=None, metavar="LIST",
                   help=f"--workers values for the workers sweeps (default {FULL['workers']}; "
                        "1 and 8 are always run)")
    p.add_argument("--mount-workers", type=int, default=os.cpu_count() or 2, metavar="N",
                   help="tvixmount --workers for the main comparison (default: CPU count, as tvixmount)")
    p.add_argument("--readers", type=parse_list, default=None, metavar="LIST",
                   help=f"parallel readers for the readers sweep (default {FULL['readers']}; 8 always run)")
    p.add_argument("--random-reads", type=int,
                   help=f"128 KiB reads per random run (default {FULL['random_reads']})")
    p.add_argument("--latency-duration", type=float, metavar="SECONDS",
                   help=f"length of each +20 ms latency run (default {FULL['latency_duration']:g})")
    p.add_argument("--added-latency", type=float, default=0.02, metavar="SECONDS",
                   help="daemon --added-latency for the latency sweep (default 0.02)")
    p.add_argument("--targets", default="native,squashfuse,tvix-embedded,tvix-grpc",
                   help="comma-separated subset of targets to measure (default all)")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help="comma-separated subset of workloads, 'sweeps' being the --workers sweeps and the "
                        "plain gRPC client (default all; for profiling one of them)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy profiles (collapsed stacks) of tvixmount and its workers for "
                        "every cold tvix workload into DIR")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only threads holding the GIL (CPU time, not waits)")
    p.add_argument("--json", type=Path, help="JSON results (default WORKDIR/bench.json)")
    p.add_argument("--markdown", type=Path, help="Markdown table (default WORKDIR/bench.md)")
    p.add_argument("--plot", type=Path, help="PNG plot (default WORKDIR/bench.png)")
    return p


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
        return _PySpy(pid, self.args.profile / f"{target.name}-{label}.txt", self.say, self.args.profile_gil)

    # -- phases ----------------------------------------------------------------------------

    def main_targets(self, targets: list[Target], rep_index: int) -> None:
        a = self.args
        for target in targets:
            try:
                for name in [w for w in ("seq_read", "find", "stat_walk", "tar") if w in a.workload_names]:
                    cold, warm = self.cold_warm(target, name,
                                                lambda root, n=name, t=target: self.workload(t, n, root))
                    self.record(target.name, name, "cold", cold)
                    self.record(target.name, name, "warm", warm)
                    self.say(f"run {rep_index + 1}/{a.repeat} {target.name:<13} {name:<10} "
                             f"cold {_show(cold)}   warm {_show(warm)}")
                for readers in a.readers if "random_read" in a.workload_names else []:
                    label = f"random_read-{readers}"

                    def fn(root: Path, n: int = readers, t: Target = target) -> dict[str, float]:
                        return wl.random_read(t.big_files(), n, reads=a.random_reads, seed=rep_index + 1)

                    cold, warm = self.cold_warm(target, label, fn)
                    sweep = self.readers_sweep.setdefault(target.name, {}).setdefault(str(readers), {})
                    sweep.setdefault("cold", []).append(cold["mb_s"])
                    sweep.setdefault("warm", []).append(warm["mb_s"])
                    if readers == MAIN_READERS:
                        self.record(target.name, "random_read", "cold", cold)
                        self.record(target.name, "random_read", "warm", warm)
                    self.say(f"run {rep_index + 1}/{a.repeat} {target.name:<13} random x{readers:<3}  "
                             f"cold {_show(cold)}   warm {_show(warm)}")
            except Exception as exc:
                self.errors.append(f"{target.name}: {type(exc).__name__}: {exc}")
                self.say(f"ERROR {target.name}: {exc}")
            finally:
                target.close()
                self.caches_dropped = self.caches_dropped and target.caches_dropped

    def grpc_baseline(self, ds: Dataset, rep_index: int) -> None:
        daemon = None
        try:
            self.caches_dropped = drop_caches() and self.caches_dropped
            log = self.args.workdir / "logs" / "plain-daemon.log"
            daemon = GrpcDaemon(ds.store, log, self.registry).start()
            sizes = [s for _, s in ds.big_files]
            cold = stream_blobs(daemon.listen, ds.big_digests, sizes)
            warm = stream_blobs(daemon.listen, ds.big_digests, sizes)
            self.grpc_plain["cold"].append(cold)
            self.grpc_plain["warm"].append(warm)
            self.say(f"run {rep_index + 1}/{self.args.repeat} plain gRPC client  "
                     f"cold {_show(cold)}   warm {_show(warm)}")
        except Exception as exc:
            self.errors.append(f"plain gRPC client: {type(exc).__name__}: {exc}")
            self.say(f"ERROR plain gRPC client: {exc}")
        finally:
            if daemon is not None:
                daemon.stop()

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
                target = Tvixmount(ds, a.workdir, self.registry, workers, grpc=grpc, added_latency=latency,
                                   name=f"sweep-{'grpc' if grpc else 'embedded'}", daemon=daemon)
                try:
                    target.prepare(cold=True)
                    with self.profiler(target, f"workers-{workers}{'-latency' if grpc else ''}"):
                        result = wl.random_read(target.big_files(), MAIN_READERS, seed=rep_index + 1, **how)
                    self.workers_sweep.setdefault(name, {}).setdefault(str(workers), []).append(result)
                    self.say(f"run {rep_index + 1}/{a.repeat} {name} --workers {workers:<2} {_show(result)}")
                except Exception as exc:
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
            Tvixmount(ds, a.workdir, self.registry, a.mount_workers),
            Tvixmount(ds, a.workdir, self.registry, a.mount_workers, grpc=True),
        ]
        targets = [t for t in all_targets if t.name in a.target_names]
        for i in range(a.repeat):
            self.main_targets(targets, i)
            if "sweeps" in a.workload_names:
                if "tvix-grpc" in a.target_names:
                    self.grpc_baseline(ds, i)
                self.workers_sweeps(ds, i)
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
        grpc = {"plain": plain, "latency": workers.get(latency_name, {}) if latency_name else {}}
        readers = {t: {n: {m: rep.median(v) for m, v in modes.items()} for n, modes in row.items()}
                   for t, row in self.readers_sweep.items()}
        report: dict[str, Any] = {
            "meta": self.meta(ds, targets),
            "summary": summary,
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
            "git_commit": _git_commit(),
            "dataset": {"files": ds.spec.files, "big": ds.spec.big, "big_size": ds.spec.big_size,
                        "seed": ds.spec.seed, "entries": ds.entries, "bytes": ds.tree_bytes,
                        "packages": len(ds.packages), "squashfs_compression": ds.compression},
            "targets": {t.name: t.description for t in targets},
            "random_reads": a.random_reads, "readers": a.readers, "workers": a.workers,
            "mount_workers": a.mount_workers, "added_latency": a.added_latency,
            "latency_duration": a.latency_duration,
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


class _PySpy:
    """py-spy record --subprocesses on the mount for the duration of one workload.

    Collapsed stacks (``--format raw``): summarise them with
    ``tools/benchlib/profile_summary.py``, or load them into a flame graph viewer.
    """

    def __init__(self, pid: int, out: Path, say, gil: bool = False) -> None:
        self.pid, self.out, self.say, self.gil = pid, out, say, gil
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> _PySpy:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        cmd = [str(spy), "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking", "--rate", "250",
               "--format", "raw", "-o", str(self.out), *(["--gil"] if self.gil else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach before the workload starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.say(f"profile: {self.out}")


class CacheWatch:
    """Notices, while a warm run goes on, that another process dropped the page cache.

    ``echo 3 > drop_caches`` empties the cache at once; a warm run that
    re-reads its data refills it, so comparing before and after misses
    it. Sampling every 20 ms sees the cliff.
    """

    def __init__(self) -> None:
        self.peak = self.low = page_cache_bytes()
        self.dropped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = page_cache_bytes()
            if self.peak > 64 << 20 and now < self.peak // 2:
                self.dropped = True
                self.low = min(self.low, now)
            self.peak = max(self.peak, now)

    def __enter__(self) -> CacheWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def page_cache_bytes() -> int:
    """The kernel's page cache size ("Cached" in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "memory_gib": mem / (1 << 30), "kernel": platform.release(),
            "python": platform.python_version(), "cpu": cpu}


def _git_commit() -> str:
    """HEAD, with "+dirty" when the mount's own code (tvixmount/, workers/) has uncommitted changes."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tvixmount", "workers"], cwd=HERE.parent,
                           capture_output=True, text=True, check=False)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


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
    args = build_parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("files", "big", "repeat", "random_reads", "latency_duration"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.big_size is None:
        args.big_size = parse_size(preset["big_size"])
    if args.readers is None:
        args.readers = parse_list(preset["readers"])
    if args.workers is None:
        args.workers = parse_list(preset["workers"])
    args.readers = sorted({*args.readers, MAIN_READERS})
    args.workers = sorted({*args.workers, 1, 8})
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(args.workload_names) - set(ALL_WORKLOADS))
    if unknown:
        print(f"tools/bench: unknown workloads {unknown}; choose from {', '.join(ALL_WORKLOADS)}",
              file=sys.stderr)
        return 2
    if args.repeat < 1 or args.files < 1 or args.big < 1:
        print("tools/bench: --repeat, --files and --big must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("tools/bench: needs root (FUSE mounts with ro,nodev and drop_caches)", file=sys.stderr)
        return 2
    if args.workdir is None:
        # apart, so a smoke run never replaces the full data set (minutes to rebuild)
        args.workdir = Path(f"{DEFAULT_WORKDIR}-quick") if args.quick else DEFAULT_WORKDIR
    args.workdir = args.workdir.resolve()

    registry = Registry()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
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
