"""tools/bench's command line: presets, options, and the checks that turn them into one run's plan.

Apart from bench.py so that the plan (what runs, how long, where) reads
in one place, and the runner in another.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tvixmount.units import parse_size, size_argument

FULL = {"files": 40000, "big": 8, "big_size": "128M", "repeat": 3, "readers": "1,2,4,8,16",
        "workers": "1,2,4,8", "random_reads": 2048, "latency_duration": 8.0, "direct_duration": 10.0}
QUICK = {"files": 500, "big": 2, "big_size": "4M", "repeat": 1, "readers": "8", "workers": "1,8",
         "random_reads": 64, "latency_duration": 1.0, "direct_duration": 1.0}
MAIN_READERS = 8
DEFAULT_WORKDIR = Path("/var/tmp/tvixmount-bench")
ALL_WORKLOADS = ("seq_read", "seq_cached", "find", "stat_walk", "tar", "random_read", "direct_read", "sweeps")
ALL_TARGETS = ("native", "squashfuse", "passthrough", "passthrough-verify", "passthrough-hop",
               "tvix-embedded", "tvix-grpc")


def parse_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers like 1,2,4,8")
    return values


def build_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench", description=doc.split("\n\n", 2)[2],
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
    p.add_argument("--direct-duration", type=float, metavar="SECONDS",
                   help="length of each O_DIRECT random read run (default "
                        f"{FULL['direct_duration']:g}, with --quick {QUICK['direct_duration']:g})")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated subset of targets (default all: {', '.join(ALL_TARGETS)})")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help="comma-separated subset of workloads, 'sweeps' being the --workers sweeps, the "
                        "plain gRPC client and the gRPC passthroughs (default all; to profile one of them)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy profiles (collapsed stacks) of tvixmount and its workers for "
                        "every cold tvix workload into DIR")
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only threads holding the GIL (CPU time, not waits)")
    p.add_argument("--json", type=Path, help="JSON results (default WORKDIR/bench.json)")
    p.add_argument("--markdown", type=Path, help="Markdown table (default WORKDIR/bench.md)")
    p.add_argument("--plot", type=Path, help="PNG plot (default WORKDIR/bench.png)")
    return p


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace | None:
    """The options with the presets filled in; None (after saying why on stderr) when they cannot run."""
    args = build_parser(doc).parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("files", "big", "repeat", "random_reads", "latency_duration", "direct_duration"):
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
    for kind, names, known in (("workloads", args.workload_names, ALL_WORKLOADS),
                               ("targets", args.target_names, ALL_TARGETS)):
        unknown = sorted(set(names) - set(known))
        if unknown or not names:
            print(f"tools/bench: unknown {kind} {unknown}; choose from {', '.join(known)}", file=sys.stderr)
            return None
    if args.repeat < 1 or args.files < 1 or args.big < 1:
        print("tools/bench: --repeat, --files and --big must be at least 1", file=sys.stderr)
        return None
    if os.geteuid() != 0:
        print("tools/bench: needs root (FUSE mounts with ro,nodev and drop_caches)", file=sys.stderr)
        return None
    if args.workdir is None:
        # apart, so a smoke run never replaces the full data set (minutes to rebuild)
        args.workdir = Path(f"{DEFAULT_WORKDIR}-quick") if args.quick else DEFAULT_WORKDIR
    args.workdir = args.workdir.resolve()
    return args
