"""``tvixmount``: flags and logging set-up; everything else is mount.run.

``run`` is also where the two halves of the program meet: it is the one
place in this package that imports the ``workers`` package, and it hands
the worker entry point (``workers.loop.serve``) to mount.run, which gives it
to the pool and its fork server. Everything else in ``tvixmount`` is
imported by the workers, never the other way round.

For the same reason the ``tvixstore`` program is composed here
(``tvixstore``): admin.cli's commands plus ``mount``, which is this command
under tvixstore's name, as tvix-store has it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, flags, logsetup
from .segcache import default_size as default_segment_cache

if TYPE_CHECKING:
    from .store import StoreUrls

log = logging.getLogger("tvixmount")

KERNEL_READAHEAD_LOCAL = 1 << 20


def default_kernel_readahead(store_urls: StoreUrls) -> int:
    """1 MiB where the workers read blobs from local disk, else the kernel's own (0).

    Why: with local segments a wider readahead lets the worker fill the
    segment arena ahead of a sequential reader (embedded cold sequential
    read 509-612 -> 734-745 MB/s), but a gRPC blob service without
    --cache-dir has no arena to fill, and 1 MiB of reads in flight per file
    made its cold sequential read 2.7x slower (95-111 against 249-310 MB/s;
    docs/bench-issue11-all/readahead/).
    """
    from .store import urls

    local = urls.parse(store_urls.blob).scheme == urls.LOCAL or store_urls.blob_cache is not None
    return KERNEL_READAHEAD_LOCAL if local else 0


def default_threads(workers: int, store_urls: StoreUrls, cpus: int | None = None) -> int:
    """FUSE request threads: one per worker request that can make progress at once, plus two.

    Why not more: llfuse runs every handler under one lock and the GIL, so
    a thread beyond those waiting for a worker only adds hand-offs between
    threads: the kernel hands each request to the thread idle longest, whose
    caches are cold, and it queues for the lock behind the others. The two
    spare threads serve arena hits and metadata while every worker is busy.

    Which requests make progress at once depends on the store. From a local
    store (the embedded one, ``memory://``) a worker's request is CPU work,
    so no more of them run at once than there are CPUs: 8 workers on 2
    CPUs with 10 threads read one file at a time 5-14 % slower than with 4,
    and 8 O_DIRECT readers served from the arena 30-40 % slower
    (docs/performance.md, "Issue 11: run 11" and "The arena sized to
    memory"). A remote store's request mostly waits on the network, so
    every worker can have one in flight: a thread each.

    Two threads instead of four (2 CPUs, local store) read one file 13-20 %
    faster and serve eight cold random readers 15 % slower: a read waiting
    for a worker holds one of only two threads ("Two FUSE threads or four,
    again"). A build farm's mount is read by many jobs at once, so the two
    spare threads stay.
    """
    if _all_local(store_urls):
        workers = min(workers, cpus or os.cpu_count() or 1)
    return max(4, workers + 2)


def _all_local(store_urls: StoreUrls) -> bool:
    """Whether every service answers from this machine (no network wait in any request)."""
    from .store import urls

    services = (store_urls.blob, store_urls.directory, store_urls.path_info)
    return all(urls.parse(url).scheme in (urls.LOCAL, urls.MEMORY) for url in services)


EPILOG = """\
The store: with no --*-service-addr flag (and none of their variables), tvixmount
serves the embedded on-disk store in --store-dir (fill it with `tvixstore import`).
Give a tvix-store daemon's URL (grpc+http://HOST:PORT, grpc+https://HOST:PORT,
grpc+unix:///PATH) to any of --blob-service-addr, --directory-service-addr,
--path-info-service-addr: a service not given then uses tvix-store's default,
grpc+http://[::1]:8000. A grpc+http URL without a port means port 80. A Nix
binary cache (nix+http(s)://HOST/PATH?trusted-public-keys=NAME:KEY) can be the
path-info service: a lookup downloads, verifies and ingests a path into the
blob and directory services (the embedded store when not given). The log
says at start which address each service uses.

Every flag marked [env NAME] is read from that variable when it is not on the
command line (the variables tvix-store reads, and TVIXMOUNT_* for tvixmount's
own flags); an empty variable counts as unset. `tvixstore mount` is this same
command, so a `tvix-store mount ...` line works with one word changed.

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
  BLOB_SERVICE_ADDR=grpc+unix:///run/tvix.sock tvixmount /mnt/store
  tvixmount /mnt/store --path-info-service-addr \
      'nix+https://cache.nixos.org?trusted-public-keys=cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY='
                                          # a binary cache, substituted into the embedded store

exit status: 0 unmounted after a stop signal or `fusermount -u`; 1 the mount
could not start or stopped on an error (workers cannot start, FUSE refuses,
the metrics port is taken); 2 usage error (a bad flag, variable, URL or
mountpoint), reported in one line before anything starts.
"""

# -o options that would undo the read-only, nosuid, nodev promise.
_REFUSED_O = {"rw", "suid", "dev"}
# The options libfuse 2's mount and low-level layers (what llfuse uses) accept, and the
# generic mount flags that keep the promise: anything else fails fuse_lowlevel_new
# after the workers started, so it is refused as a usage error first.
_FUSE_O = {
    "ro", "nosuid", "nodev", "noexec", "exec", "noatime", "atime", "relatime", "nodiratime", "sync",
    "async", "dirsync", "allow_root", "auto_unmount", "default_permissions", "fsname", "subtype",
    "max_read", "blkdev", "blksize", "nonempty", "large_read", "debug", "max_write", "max_readahead",
    "max_background", "congestion_threshold", "async_read", "sync_read", "atomic_o_trunc",
    "no_remote_lock", "no_remote_flock", "no_remote_posix_lock", "big_writes", "splice_write",
    "no_splice_write", "splice_move", "no_splice_move", "splice_read", "no_splice_read",
    "auto_inval_data", "no_auto_inval_data", "readdirplus", "async_dio", "no_async_dio",
    "writeback_cache", "no_writeback_cache", "time_gran",
}


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="tvixmount",
        description="Mount a tvix store read-only: store paths at the root, "
                    "directories, files and symlinks below them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every tvixmount flag, on ``p`` (its own parser, or ``tvixstore mount``'s).

    Flags that tvixstore also has before its command (the store flags,
    ``--log-level``) are added with flags.add, which leaves an absent one
    unset until flags.resolve: a value given before ``mount`` then counts.
    """
    from . import storeflags

    cpus = os.cpu_count() or 4
    p.add_argument("mountpoint", type=Path, help="an existing, empty directory")
    storeflags.MOUNT.add_to(p.add_argument_group("store"))
    fs = p.add_argument_group("filesystem")
    fs.add_argument("-l", "--list-root", action="store_true",
                    help="allow listing the mount root (lists every store path)")
    fs.add_argument("--show-xattr", action=argparse.BooleanOptionalAction, default=True,
                    help="expose user.tvix.castore.{blob,directory}.digest xattrs (default: on)")
    flags.add(fs, "--allow-other", action="store_true", env="ALLOW_OTHER",
              help="let other users access the mount (needs user_allow_other unless root; the "
                   "variable takes true/false, 1/0, yes/no, on/off)")
    fs.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                    help="mount options: allow_other, list_root, noshow_xattr, or FUSE options")
    fs.add_argument("-f", "--foreground", action="store_true", default=True,
                    help="stay in the foreground (always; accepted for compatibility)")
    storeflags.add_cache_flags(p.add_argument_group("blob cache (remote stores)"))
    perf = p.add_argument_group("processes")
    flags.add(perf, "--workers", type=flags.positive, default=cpus, metavar="N", env="TVIXMOUNT_WORKERS",
              help=f"worker processes doing store I/O (default: CPU count, {cpus})")
    flags.add(perf, "--threads", type=flags.positive, metavar="N", env="THREADS",
              help="FUSE request threads (default: at least 4; workers + 2 for a remote store, whose "
                   "requests wait on the network; for a local one, whose requests are CPU work, the "
                   "workers that can run at once (at most the CPUs) + 2). Fewer threads serve reads "
                   "from memory faster, more serve many cold readers at once: 2 instead of 4 reads one "
                   "file 13-20 %% faster and 8 cold readers 15 %% slower on 2 CPUs")
    flags.add(perf, "--readahead-files", type=flags.natural, metavar="N", env="TVIXMOUNT_READAHEAD_FILES",
              help="after a small file (<= 1 MiB) is opened, fetch up to N of the small files "
                   "after it in its directory in the background, so a reader going through a "
                   "directory finds them ready; 0 turns it off (default: max(4, workers))")
    flags.add(perf, "--small-batches", type=flags.natural, metavar="N", env="TVIXMOUNT_SMALL_BATCHES",
              help="after a small file (<= 64 KiB) is opened, fetch the small files of its directory "
                   "and the directories below it in batches (one worker request per 64 files), N "
                   "batches at once, so a walk like tar finds them ready; 0 turns it off (default: workers)")
    segment_cache = default_segment_cache()
    flags.add(perf, "--segment-cache", type=_size_or_zero, default=segment_cache, metavar="SIZE",
              env="TVIXMOUNT_SEGMENT_CACHE",
              help="shared memory for 256 KiB segments the workers verified, from which the mount "
                   "serves reads without asking a worker again (e.g. 64M, 1G); 0 turns it off. "
                   "Files read in order use 16M of it per worker, at most half. "
                   "Held only as segments are read, and kept until unmount "
                   f"(default: a sixteenth of RAM or of the cgroup's memory limit, 64M to 2G; "
                   f"here {segment_cache >> 20}M)")
    flags.add(perf, "--kernel-readahead", type=_size_or_zero, metavar="SIZE",
              env="TVIXMOUNT_KERNEL_READAHEAD",
              help="the kernel's readahead for this mount (its read_ahead_kb), so a sequential "
                   "reader has several reads in flight; 0 leaves the kernel's (default 1M where "
                   "blobs are on local disk: the embedded store, or --cache-dir; else 0)")
    flags.add(perf, "--request-timeout", type=flags.positive_seconds, default=30.0, metavar="SECONDS",
              env="TVIXMOUNT_REQUEST_TIMEOUT",
              help="deadline of one store request, retries included (default 30)")
    subst = p.add_argument_group("binary cache (a nix+http(s):// path-info service)")
    flags.add(subst, "--substitute-timeout", type=flags.positive_seconds, default=300.0, metavar="SECONDS",
              env="TVIXMOUNT_SUBSTITUTE_TIMEOUT",
              help="deadline of a lookup that downloads and ingests a path from the cache, instead "
                   "of --request-timeout (default 300)")
    flags.add(subst, "--substitute-jobs", type=flags.positive, metavar="N", env="TVIXMOUNT_SUBSTITUTE_JOBS",
              help="substitutions at once at most, so that reads of other files go on meanwhile "
                   "(default: half the workers; never all of them)")
    flags.add(p, "--metrics-listen", type=_listen, metavar="[HOST]:PORT", env="TVIXMOUNT_METRICS_LISTEN",
              help="serve Prometheus metrics at http://HOST:PORT/metrics; HOST defaults to "
                   "127.0.0.1, [::1]:PORT for IPv6, port 0 picks a free port (logged). "
                   "Default: off (the counters are always in the user.tvixmount.stats "
                   "xattr of the mount root)")
    flags.add(p, "--log-level", type=logsetup.level_name, env="TVIXMOUNT_LOG_LEVEL", metavar="LEVEL",
              help="trace, debug, info, warn or error, any case (default: RUST_LOG's level for "
                   "tvixmount, else info); under systemd each line carries its journal priority")
    p.add_argument("--version", action="version", version=f"tvixmount {__version__}")


def _size_or_zero(text: str) -> int:
    """A size (``64M``), or 0 for off."""
    from .errors import InvalidArgument
    from .units import parse_size

    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str):  # -> metrics.ListenAddress
    from .metrics import parse_listen

    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setup_logging(level: str) -> None:
    """Configure stderr logging (journald's format under systemd), and forward workers' records to it."""
    import multiprocessing_logging

    logging.basicConfig(level=level, handlers=[logsetup.stream_handler(sys.stderr)])
    multiprocessing_logging.install_mp_handler()


def main(argv: list[str] | None = None) -> int:
    """``tvixmount``: parse (a usage error exits 2 here), then mount until stopped."""
    parser = build_parser()
    return run(parser, flags.parse(parser, argv))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Mount what the parsed, resolved ``args`` say; the exit status.

    Every usage problem is found before anything starts (``parser.error``:
    one line, exit 2); ``tvixstore mount`` comes here with its own parser.
    """
    # The dispatcher never loads grpc before forking its workers, but if it
    # ever did, grpc's fork handlers could hang the fork server's forks.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
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
            elif opt.split("=", 1)[0] not in _FUSE_O:
                parser.error(f"-o {opt}: not a FUSE mount option (libfuse 2's, see mount.fuse(8)) nor "
                             "allow_other, list_root, noshow_xattr")
            elif opt != "ro":
                extra.append(opt)
    from .storeflags import MOUNT, log_choice, missing_embedded

    store = MOUNT.choice_or_exit(parser, args)  # before anything starts: a bad flag mounts nothing
    threads = args.threads or default_threads(args.workers, store.urls)

    from workers.loop import serve as worker_main

    from .errors import TvixError
    from .metrics import ListenError
    from .mount import MountConfig, MountpointError, check_mountpoint
    from .mount import run as run_mount

    mountpoint = Path(os.path.realpath(args.mountpoint))
    try:
        check_mountpoint(mountpoint)  # again in mount.run; here it is still a usage error, one line
    except MountpointError as exc:
        parser.error(f"mountpoint {exc}")
    missing = missing_embedded(store, flags.origin(args, "store_dir") or "--store-dir (default)")
    if missing:
        parser.error(missing)
    setup_logging(logsetup.choose_level(args.log_level))
    log_choice(log, store)
    config = MountConfig(
        mountpoint=mountpoint,
        urls=store.urls,
        workers=args.workers,
        threads=threads,
        list_root=args.list_root,
        show_xattr=args.show_xattr,
        allow_other=args.allow_other,
        request_timeout=args.request_timeout,
        extra_options=tuple(extra),
        metrics_listen=args.metrics_listen,
        readahead_files=max(4, args.workers) if args.readahead_files is None else args.readahead_files,
        small_batches=args.workers if args.small_batches is None else args.small_batches,
        substitute_timeout=args.substitute_timeout,
        substitute_jobs=args.substitute_jobs,
        segment_cache=args.segment_cache,
        kernel_readahead_kb=(default_kernel_readahead(store.urls) if args.kernel_readahead is None
                             else args.kernel_readahead) // 1024,
    )
    try:
        return run_mount(config, worker_main)
    except MountpointError as exc:
        print(f"tvixmount: error: mountpoint {exc}", file=sys.stderr)
        return 2
    except (TvixError, ListenError) as exc:
        print(f"tvixmount: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # llfuse.init failures
        print(f"tvixmount: error: cannot mount {config.mountpoint}: {exc}", file=sys.stderr)
        return 1


# -- tvixstore, with mount --------------------------------------------------------------


class MountCommand:
    """``tvixstore mount``: tvixmount under tvixstore's name, as ``tvix-store mount`` is.

    It lives here, not in admin/commands/, because mounting is this module's
    to compose (admin never imports the mount); ``tvixstore`` below hands it
    to admin.cli like any other command module.
    """

    @staticmethod
    def add_parsers(commands: Any) -> None:  # commands: admin.command.Subcommands
        parser: argparse.ArgumentParser = commands.add(
            "mount", "mount the store (tvixmount; the same flags)",
            "Mount the store read-only: exactly `tvixmount`, with the same flags (see\n"
            "`tvixmount --help`), so a `tvix-store mount ...` command line works here.",
            lambda args: run(parser, args), EPILOG, common=False)
        add_arguments(parser)
        parser.set_defaults(own_logging=True)


def tvixstore(argv: list[str] | None = None) -> int:
    """The ``tvixstore`` program: admin.cli's commands and ``mount``."""
    from .admin import cli as admin_cli

    return admin_cli.main(argv, extra=(MountCommand,))


if __name__ == "__main__":
    sys.exit(main())
