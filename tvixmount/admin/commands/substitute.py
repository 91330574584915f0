"""``tvixstore substitute --from URL STOREPATH...``: a store filled from a binary cache."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ...castore.storepath import StorePath, parse_absolute, parse_basename
from ...errors import InvalidData
from ...store import substitution_lock_dir, urls
from ...storeflags import url_argument
from .. import progress
from ..command import EXIT_DATA, EXIT_OK, Subcommands, bars, log, open_from, report, stdout, store_urls

if TYPE_CHECKING:
    from ..substitute import Plan


def add_parsers(commands: Subcommands) -> None:
    p = commands.add(
        "substitute", "fetch store paths and their closures from a Nix binary cache into the store",
        "Fetch each STOREPATH and everything it refers to from a Nix binary cache, as a\n"
        "mount with --path-info-service-addr nix+http(s)://... does on first lookup: the\n"
        "narinfo's signature is checked (with trusted-public-keys in the URL) before the\n"
        "NAR is downloaded, the NAR's hash and size must match, and only then is the path\n"
        "stored. References go first; paths the store holds are not fetched again. With\n"
        "--dry-run, only narinfos are read and the paths that would be fetched are listed.\n"
        "Prints a summary line; exits 1 if any path failed (each failure is one line).",
        run,
        "examples:\n"
        "  tvixstore substitute --from 'nix+https://cache.example.org?trusted-public-keys=k:BASE64' \\\n"
        "      /nix/store/<hash>-hello-2.12\n"
        "  tvixstore substitute --dry-run --from nix+http://127.0.0.1:8080 <hash>-hello-2.12\n"
        "  tvixstore --store-dir /var/lib/tvix substitute --from URL $(cat paths.txt)",
    )
    p.add_argument("--from", dest="cache_url", required=True, type=_cache_url, metavar="URL",
                   help="the binary cache: nix+http(s)://HOST[:PORT][/PATH][?trusted-public-keys=NAME:KEY...]")
    p.add_argument("--dry-run", action="store_true",
                   help="read the narinfos and list what would be fetched; download no NAR, store nothing")
    p.add_argument("store_paths", nargs="+", type=_store_path, metavar="STOREPATH",
                   help="/nix/store/HASH-NAME or HASH-NAME")


def _cache_url(text: str) -> str:
    url_argument(text)
    if not urls.is_cache(text):
        raise argparse.ArgumentTypeError(f"{urls.redact(text)!r} is not a nix+http:// or nix+https:// URL")
    return text


def _store_path(text: str) -> StorePath:
    try:
        return parse_absolute(text) if text.startswith("/") else parse_basename(text)
    except InvalidData as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ...store import nixhttp
    from ..substitute import plan, substitute

    started = time.monotonic()
    with open_from(args, writable=True) as store:  # a dry run needs to know what it holds, if anything
        lock_dir = substitution_lock_dir(store_urls(args).directory)
        service = nixhttp.open_path_info_service(args.cache_url, store.blobs, store.directories,
                                                 store.path_infos, lock_dir)
        try:
            if urls.unsigned_cache(args.cache_url):
                log.warning("%s has no trusted-public-keys: narinfo signatures are NOT checked",
                            urls.redact(args.cache_url))
            planned = plan(service, args.store_paths)
            if args.dry_run:
                return _dry_run(args, planned)
            paths_bar = progress.bar(bars(args), "paths", unit="path", total=len(planned.fetch), position=0)
            nar_bar = progress.bar(bars(args), "NAR", unit="B", total=planned.nar_bytes, unit_scale=True,
                                   position=1)
            try:
                outcome = substitute(service, planned, paths_bar, nar_bar)
            finally:
                nar_bar.close()
                paths_bar.close()
        finally:
            service.client.close()  # the store closes its path-info service itself
    for path, reason in outcome.failed.items():
        report(Exception(reason), args, prefix=f"substitute {path}: ")
    summary = outcome.summary(time.monotonic() - started)
    log.info("%s", summary)
    if not args.quiet:
        stdout().write(summary.encode() + b"\n")
    return EXIT_DATA if outcome.failed else EXIT_OK


def _dry_run(args: argparse.Namespace, planned: Plan) -> int:
    out = stdout()
    for info in planned.fetch:
        size = "?" if info.file_size is None else f"{info.file_size / 1e6:.1f} MB"
        out.write(f"{info.store_path.absolute}\t{info.nar_size / 1e6:.1f} MB NAR\t{size} "
                  f"{info.compression}\n".encode())
    for path, reason in planned.failed.items():
        report(Exception(reason), args, prefix=f"substitute {path}: ")
    if not args.quiet:
        download = planned.download_bytes
        out.write(f"would fetch {len(planned.fetch)} paths ({planned.nar_bytes / 1e6:.1f} MB of NAR, "
                  f"{'?' if download is None else f'{download / 1e6:.1f} MB'} to download); "
                  f"{len(planned.present)} already present; {len(planned.failed)} failed\n".encode())
    return EXIT_DATA if planned.failed else EXIT_OK
