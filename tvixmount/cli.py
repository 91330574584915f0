"""``tvixmount``: flags and logging set-up; everything else is mount.run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("tvixmount")

EPILOG = """\
The store: with no --*-service-addr flag, tvixmount serves the embedded on-disk
store in --store-dir (fill it with `tvixstore import`). Give
--blob-service-addr/--directory-service-addr/--path-info-service-addr
grpc+http://HOST:PORT or grpc+unix:///PATH to mount a tvix-store daemon instead.

tvixmount stays in the foreground (run it under systemd or `&`), logs to
stderr, and unmounts and exits 0 on SIGINT, SIGTERM, SIGHUP or an external
`fusermount -u MOUNTPOINT`. The mount is read-only, nosuid and nodev.

examples:
  tvixstore import ./result-tree          # fill the embedded store
  tvixmount /mnt/store -l                 # mount it, root listing allowed
  ls /mnt/store; getfattr -d /mnt/store/<hash>-<name>/file
  tvixmount /mnt/store --blob-service-addr grpc+http://store:8000 \\
      --directory-service-addr grpc+http://store:8000 \\
      --path-info-service-addr grpc+http://store:8000 --workers 8
"""

# -o options that would undo the read-only, nosuid, nodev promise.
_REFUSED_O = {"rw", "suid", "dev"}


def build_parser() -> argparse.ArgumentParser:
    from .store.location import default_store_dir

    cpus = os.cpu_count() or 4
    p = argparse.ArgumentParser(
        prog="tvixmount",
        description="Mount a tvix store read-only: store paths at the root, "
                    "directories, files and symlinks below them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint", type=Path, help="an existing, empty directory")
    store = p.add_argument_group("store")
    store.add_argument("--store-dir", type=Path, default=None, metavar="DIR",
                       help="embedded store directory (env TVIXMOUNT_STORE_DIR; default "
                            f"{default_store_dir()})")
    for service, env in (("blob", "BLOB_SERVICE_ADDR"), ("directory", "DIRECTORY_SERVICE_ADDR"),
                         ("path-info", "PATH_INFO_SERVICE_ADDR")):
        store.add_argument(f"--{service}-service-addr", metavar="URL", default=os.environ.get(env),
                           help=f"{service} service URL (env {env}; default: the embedded store)")
    fs = p.add_argument_group("filesystem")
    fs.add_argument("-l", "--list-root", action="store_true",
                    help="allow listing the mount root (lists every store path)")
    fs.add_argument("--show-xattr", action=argparse.BooleanOptionalAction, default=True,
                    help="expose user.tvix.castore.{blob,directory}.digest xattrs (default: on)")
    fs.add_argument("--allow-other", action="store_true",
                    help="let other users access the mount (needs user_allow_other unless root)")
    fs.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                    help="mount options: allow_other, list_root, noshow_xattr, or FUSE options")
    fs.add_argument("-f", "--foreground", action="store_true", default=True,
                    help="stay in the foreground (always; accepted for compatibility)")
    from .store.cache.config import add_cache_arguments

    add_cache_arguments(p.add_argument_group("blob cache (remote stores)"))
    perf = p.add_argument_group("processes")
    perf.add_argument("--workers", type=_positive, default=cpus,
                      help=f"worker processes doing store I/O (default: CPU count, {cpus})")
    perf.add_argument("--threads", type=_positive, default=None,
                      help="FUSE request threads (env THREADS; default: max(8, 2 x workers))")
    perf.add_argument("--readahead-files", type=_natural, default=None, metavar="N",
                      help="after a small file (<= 256 KiB) is opened, fetch up to N of the small files "
                           "after it in its directory in the background, so a reader going through a "
                           "directory finds them ready; 0 turns it off (default: max(4, workers))")
    perf.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="deadline of one store request, retries included (default 30)")
    p.add_argument("--metrics-listen", type=_listen, default=None, metavar="[HOST]:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics; HOST defaults to "
                        "127.0.0.1, [::1]:PORT for IPv6, port 0 picks a free port (logged). "
                        "Default: off (the counters are always in the user.tvixmount.stats "
                        "xattr of the mount root)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    p.add_argument("--version", action="version", version=f"tvixmount {__version__}")
    return p


def _listen(text: str):  # -> metrics.ListenAddress
    from .metrics import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def _positive(text: str) -> int:
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def setup_logging(level: str) -> None:
    """Configure stderr logging, and forward worker processes' records to it."""
    import multiprocessing_logging

    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    multiprocessing_logging.install_mp_handler()


def store_urls(args: argparse.Namespace):  # -> StoreUrls
    from .store import StoreUrls
    from .store.location import default_store_dir

    addrs = (args.blob_service_addr, args.directory_service_addr, args.path_info_service_addr)
    if not any(addrs):
        urls = StoreUrls.embedded(args.store_dir or default_store_dir())
    elif not all(addrs):
        raise SystemExit("tvixmount: error: give all three --*-service-addr flags, or none "
                         "for the embedded store")
    else:
        urls = StoreUrls(*addrs)
    return _with_cache(urls, args)


def _with_cache(urls, args: argparse.Namespace):  # StoreUrls -> StoreUrls
    """The blob cache settings travel inside the StoreUrls, to the workers that open the store."""
    import dataclasses

    from .errors import InvalidArgument
    from .store.cache.config import cache_config_from

    try:
        return dataclasses.replace(urls, blob_cache=cache_config_from(args))
    except InvalidArgument as exc:  # --cache-size alone, or a cache for the embedded store
        raise SystemExit(f"tvixmount: error: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    # The dispatcher never loads grpc before forking its workers, but if it
    # ever did, grpc's fork handlers could hang the fork server's forks.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    extra: list[str] = []
    for group in args.options:
        for opt in filter(None, group.split(",")):
            if opt == "allow_other":
                args.allow_other = True
            elif opt == "list_root":
                args.list_root = True
            elif opt == "noshow_xattr":
                args.show_xattr = False
            elif opt.split("=", 1)[0] in _REFUSED_O:
                parser.error(f"-o {opt}: tvixmount mounts are always ro,nosuid,nodev")
            elif opt != "ro":
                extra.append(opt)
    threads = args.threads or int(os.environ.get("THREADS", 0)) or max(8, 2 * args.workers)

    from .errors import TvixError
    from .metrics import ListenError
    from .mount import MountConfig, MountpointError, run

    setup_logging(args.log_level)
    config = MountConfig(
        mountpoint=Path(os.path.realpath(args.mountpoint)),
        urls=store_urls(args),
        workers=args.workers,
        threads=threads,
        list_root=args.list_root,
        show_xattr=args.show_xattr,
        allow_other=args.allow_other,
        request_timeout=args.request_timeout,
        extra_options=tuple(extra),
        metrics_listen=args.metrics_listen,
        readahead_files=max(4, args.workers) if args.readahead_files is None else args.readahead_files,
    )
    try:
        return run(config)
    except MountpointError as exc:
        print(f"tvixmount: error: mountpoint {exc}", file=sys.stderr)
        return 2
    except (TvixError, ListenError) as exc:
        print(f"tvixmount: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # llfuse.init failures
        print(f"tvixmount: error: cannot mount {config.mountpoint}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
