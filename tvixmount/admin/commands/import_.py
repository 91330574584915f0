"""``tvixstore import``: local trees (admin/ingest.py) or one NAR (admin/nar_import.py) as store paths."""

from __future__ import annotations

import argparse
import sys
import time

from ...castore import storepath
from ...castore.directory import SizeConvention
from ...errors import InvalidArgument, TvixError
from .. import progress
from ..command import EXIT_DATA, EXIT_OK, FileError, Subcommands, bars, log, open_from, report, stdout


def add_parsers(commands: Subcommands) -> None:
    p = commands.add(
        "import", "import directories, files, symlinks or a NAR as store paths",
        "Import each PATH (a directory, recursively; a regular file; or a symlink, kept\n"
        "verbatim) as the store path /nix/store/<hash>-<basename of PATH>, where <hash>\n"
        "comes from the sha256 of its NAR, as `nix-store --add` computes it. Prints one\n"
        "store path per PATH. A file is executable when its owner x bit is set.\n"
        "Fifos, sockets, devices and unreadable files are errors; the store path only\n"
        "becomes visible when everything below it is stored.",
        run,
        "examples:\n  tvixstore import ./result\n  tvixstore import --nar out.nar --name hello-2.12\n"
        "  nix-store --dump ./tree | tvixstore import --nar - --name tree",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="paths to import")
    p.add_argument("--nar", metavar="FILE", help="import one NAR file instead ('-' reads stdin)")
    p.add_argument("--name", help="store path name for --nar (required with it)")
    p.add_argument("--expected-sha256", metavar="HASH",
                   help="with --nar: refuse a NAR whose sha256 differs (hex, nixbase32, sha256:..., SRI)")
    p.add_argument("--dir-size-convention", choices=[c.value for c in SizeConvention],
                   default=SizeConvention.DOUBLED.value,
                   help="how DirectoryNode.size is counted: 'doubled' (default) is what a current "
                        "tvix-store computes and checks on upload (every entry twice); 'documented' is "
                        "the proto's descendant count, as seed-era stores hold")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="threads storing small files in parallel (default 8; 0 stores on the walking "
                        "thread)")


def run(args: argparse.Namespace) -> int:
    from ..ingest import Ingester, IngestError

    if args.nar is not None:
        if args.paths:
            raise InvalidArgument("import: give either PATHs or --nar FILE, not both")
        if not args.name:
            raise InvalidArgument("import --nar: --name NAME is required")
        return _import_nar(args)
    if args.name or args.expected_sha256:
        raise InvalidArgument("import: --name and --expected-sha256 only go with --nar")
    if not args.paths:
        raise InvalidArgument("import: nothing to import (give PATHs, or --nar FILE --name NAME)")
    jobs = 8 if args.jobs is None else args.jobs
    if jobs < 0:
        raise InvalidArgument(f"import: --jobs {jobs} must not be negative")
    convention = SizeConvention(args.dir_size_convention)
    want_bars = bars(args)
    failed = 0
    started = time.monotonic()
    files = total = 0
    with open_from(args, writable=True) as store:
        files_bar = progress.bar(want_bars, "files", unit="file", position=0)
        bytes_bar = progress.bar(want_bars, "data", unit="B", unit_scale=True, position=1)
        try:
            ingester = Ingester(store, convention, jobs, files_bar, bytes_bar)
            for path in args.paths:
                try:
                    result = ingester.import_path(path)
                except IngestError as exc:  # names the path itself
                    failed += 1
                    report(exc, args)
                    continue
                except TvixError as exc:
                    failed += 1
                    report(exc, args, prefix=f"import {path}: ")
                    continue
                files += result.stats.files
                total += result.stats.bytes
                stdout().write(result.store_path.absolute.encode() + b"\n")
                stdout().flush()
        finally:
            bytes_bar.close()
            files_bar.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("imported %d of %d paths: %d files, %.1f MB in %.2f s (%.0f files/s, %.1f MB/s)",
             len(args.paths) - failed, len(args.paths), files, total / 1e6, elapsed,
             files / elapsed, total / 1e6 / elapsed)
    return EXIT_DATA if failed else EXIT_OK


def _import_nar(args: argparse.Namespace) -> int:
    from ..nar_import import import_nar

    expected = parse_sha256(args.expected_sha256) if args.expected_sha256 else None
    convention = SizeConvention(args.dir_size_convention)
    problem = storepath.check_name(args.name)
    if problem:
        raise InvalidArgument(f"import --nar: --name {args.name!r} is not a valid store path name: {problem}")
    with open_from(args, writable=True) as store:
        bar = progress.bar(bars(args), "NAR", unit="B", unit_scale=True)
        try:
            if args.nar == "-":
                result = import_nar(store, sys.stdin.buffer, args.name, convention, expected, bar, "stdin")
            else:
                try:
                    stream = open(args.nar, "rb")  # noqa: SIM115 - closed below, after the import
                except OSError as exc:
                    raise FileError(args.nar, exc) from None
                with stream:
                    result = import_nar(store, stream, args.name, convention, expected, bar, args.nar)
        finally:
            bar.close()
    stdout().write(result.store_path.absolute.encode() + b"\n")
    return EXIT_OK


def parse_sha256(text: str) -> bytes:
    """hex (64), nixbase32 (52), ``sha256:`` + either, or SRI ``sha256-<base64>``."""
    from ..nixcopy import sha256_from_text

    digest = sha256_from_text(text)
    if digest is None:
        raise InvalidArgument(f"--expected-sha256 {text!r}: not a sha256 in hex, nixbase32 or SRI form")
    return digest
