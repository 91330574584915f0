"""``tvixstore sync``: store paths and their closure into another store (admin/sync.py).

The target store is named by its own flags (storeflags.SYNC_TARGET:
``--to-store-dir`` and ``--to-*-service-addr``), read by the same rule as
the source's. (This was ``copy`` before ``copy`` took tvix-store's meaning.)
"""

from __future__ import annotations

import argparse
import time

from ... import flags
from ...errors import InvalidArgument
from ...store import describe, open_store
from ...storeflags import SYNC_TARGET
from .. import progress
from ..command import EXIT_OK, Subcommands, bars, open_from, stdout


def add_parsers(commands: Subcommands) -> None:
    p = commands.add(
        "sync", "copy store paths and their closure into another store",
        "Copy each STOREPATH, and every path it references (recursively, as its PathInfo\n"
        "lists them), from this store (the usual store flags) into a target store. For\n"
        "each path: blobs first (those the target has are skipped), then directories,\n"
        "then the PathInfo, so the target never shows a path it cannot read; paths the\n"
        "target already holds are skipped whole. The target is --to-store-dir (an\n"
        "embedded store, created if needed) and/or the three --to-*-service-addr URLs;\n"
        "a service not given there is the --to-store-dir one. Prints a summary line.",
        run,
        "examples:\n  tvixstore sync <hash>-hello --to-store-dir /srv/store\n"
        "  tvixstore sync --all --to-blob-service-addr grpc+unix:///run/tvix.sock \\\n"
        "      --to-directory-service-addr grpc+unix:///run/tvix.sock \\\n"
        "      --to-path-info-service-addr grpc+unix:///run/tvix.sock",
    )
    p.add_argument("paths", nargs="*", metavar="STOREPATH", help="<hash>-<name> or /nix/store/<hash>-<name>")
    p.add_argument("--all", action="store_true", help="copy every store path the source holds")
    SYNC_TARGET.add_to(p)
    p.add_argument("-j", "--jobs", type=flags.positive, default=None, metavar="N",
                   help="blobs copied at once (default 8)")


def run(args: argparse.Namespace) -> int:
    from ..browse import parse_target
    from ..sync import DEFAULT_JOBS, Closure, Copier

    if args.all and args.paths:
        raise InvalidArgument("sync: give STOREPATHs or --all, not both")
    if not args.all and not args.paths:
        raise InvalidArgument("sync: nothing to copy (give STOREPATHs, or --all)")
    roots = []
    for arg in args.paths:
        parsed = parse_target(arg)
        if parsed.components:
            raise InvalidArgument(f"sync: {arg}: give the store path itself, without a sub path")
        roots.append(parsed.store_path)
    jobs = DEFAULT_JOBS if args.jobs is None else args.jobs
    target_urls = SYNC_TARGET.urls(args, create=True)
    want_bars = bars(args)
    started = time.monotonic()
    with open_from(args) as source:
        closure = Closure(source)
        infos = closure.resolve(closure.every_path() if args.all else roots)
        with open_store(target_urls) as target:
            copier = Copier(source, target, jobs)
            copier.check_target(describe(target_urls))
            copier.paths_bar = progress.bar(want_bars, "paths", unit="path", total=len(infos), position=0)
            copier.bytes_bar = progress.bar(want_bars, "data", unit="B", unit_scale=True, position=1)
            try:
                stats = copier.copy(infos)
            finally:
                copier.bytes_bar.close()
                copier.paths_bar.close()
    if not args.quiet:
        stdout().write(stats.summary(time.monotonic() - started).encode() + b"\n")
    return EXIT_OK
