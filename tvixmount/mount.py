"""Mount lifecycle: pool first, then llfuse; one way down for every kind of stop.

Order matters. The worker pool (and its fork server) starts before
``llfuse.init`` so that no process is forked from the threaded dispatcher;
the metrics endpoint's thread starts after the pool, before ``llfuse.init``.
Stopping has a single path: SIGINT, SIGTERM and SIGHUP unmount the
filesystem from a watcher thread, and an unmount, ours or an operator's
``fusermount -u``, ends ``llfuse.main`` because the kernel closes the FUSE
channel. If the kernel keeps the channel open (a process still has a file
open on a lazily detached mount), the watcher aborts the connection through
fusectl after a grace period, so a stop signal always ends in exit 0.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llfuse

from .deadlines import HANG_FRACTION
from .errors import TvixError
from .fetcher import Fetcher, PoolFetcher
from .fuse_ops import MountOptions, TvixOperations
from .kernelra import KernelReadahead
from .metrics import FuseMetrics, ListenAddress
from .metrics_export import Exporter
from .mount_notify import SystemdLink
from .pool import WorkerPool
from .protocol import ops
from .segcache import DEFAULT_SIZE as DEFAULT_SEGMENT_CACHE
from .store import StoreUrls, describe, urls
from .substitution import DEFAULT_TIMEOUT as DEFAULT_SUBSTITUTE_TIMEOUT
from .substitution import SubstitutingFetcher, default_jobs
from .vfs import Vfs
from .zygote import WorkerMain

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FUSECTL = Path("/sys/fs/fuse/connections")
MNT_DETACH = 2


class MountpointError(Exception):
    """The mountpoint cannot be used (missing, not a directory, busy)."""


@dataclass(frozen=True)
class MountConfig:
    mountpoint: Path
    urls: StoreUrls
    workers: int
    threads: int
    list_root: bool = False
    show_xattr: bool = True
    allow_other: bool = False
    request_timeout: float = 30.0
    stop_grace: float = 5.0
    metrics_listen: ListenAddress | None = None
    readahead_files: int = 4
    small_batches: int = 0
    extra_options: tuple[str, ...] = field(default=())
    # A binary cache as the path-info service: the deadline of a lookup that substitutes,
    # and how many may run at once (None: substitution.default_jobs).
    substitute_timeout: float = DEFAULT_SUBSTITUTE_TIMEOUT
    substitute_jobs: int | None = None
    # Bytes of the shared arena of verified segments (0: none; the command line's default is
    # segcache.default_size(), scaled to memory), and the kernel's readahead for the mount in
    # KiB (0: the kernel's own).
    segment_cache: int = DEFAULT_SEGMENT_CACHE
    kernel_readahead_kb: int = 1024


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, not a directory, mounted or not empty."""
    try:
        mounted = os.path.ismount(path)
    except OSError as exc:
        raise MountpointError(f"{path}: {exc.strerror} (a stale mount? try: fusermount -u {path})") from None
    if not path.exists():
        raise MountpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise MountpointError(f"{path}: not a directory")
    if mounted or _is_mountpoint(Path(os.path.realpath(path))):
        raise MountpointError(f"{path}: already a mountpoint")
    if any(os.scandir(path)):
        raise MountpointError(f"{path}: directory is not empty")


def _is_mountpoint(path: Path) -> bool:
    """Whether mountinfo lists ``path``; never touches the path itself.

    ``path`` must already be absolute and resolved: resolving it here would
    stat the mount, which hangs while nobody serves it.
    """
    target = os.fspath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(mountinfo_path(line.split()[4]) == target for line in f)
    except OSError:
        return False


def mountinfo_path(field: str) -> str:
    """A mount point as /proc/self/mountinfo writes it, decoded: space, tab, newline and
    backslash appear there as octal escapes (``/mnt/a\\040b`` is ``/mnt/a b``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def fuse_options(config: MountConfig) -> set[str]:
    options = {"fsname=tvix-store", "subtype=tvixmount", "ro", "nosuid", "nodev", "noatime",
               "default_permissions"}
    if config.allow_other:
        options.add("allow_other")
    options.update(config.extra_options)
    return options


def ensure_fusectl() -> None:
    """Mount fusectl if it is missing (systemd does this on most machines).

    The stopper needs it to abort a connection that a lazily detached,
    still-busy mount keeps open; without it such a stop could wait forever.
    """
    if _is_mountpoint(FUSECTL) or os.geteuid() != 0 or not FUSECTL.is_dir():
        return
    result = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("cannot mount fusectl at %s (%s); a stop while files are open may hang",
                    FUSECTL, result.stderr.strip())


class _AnsweredTooLate(logging.Filter):
    """Demote llfuse's "fuse_reply_* failed with No such file or directory" to DEBUG.

    The kernel answers a reply with ENOENT when it no longer waits for it: the
    request was interrupted, or the mount is gone (a release racing an
    unmount). Nothing was lost, so it is not an ERROR for the operator.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        late = "fuse_reply_* failed with No such file or directory" in record.getMessage()
        if late and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("llfuse").isEnabledFor(logging.DEBUG)
        return True


def lane_count(config: MountConfig) -> int:
    """Lanes for the threads that send reads (lanes.py): every FUSE thread and file readahead
    thread, twice over, so each may give one up after a read that timed out and keep its own.
    128 KiB of shared memory each: 2.5 MiB with the default 4 threads and 4 readahead files."""
    return 2 * (config.threads + config.readahead_files) + 4


def run(config: MountConfig, worker_main: WorkerMain) -> int:
    """Mount, serve until stopped, tear down in order; return the exit status.

    ``config.mountpoint`` must be resolved (cli does it): once mounted,
    nothing may stat it from this process before llfuse.main serves it.
    ``worker_main`` is the life of one worker process (``workers.loop.serve``,
    handed down by cli.main: the core never imports the workers).
    """
    check_mountpoint(config.mountpoint)
    ensure_fusectl()
    logging.getLogger("llfuse").addFilter(_AnsweredTooLate())
    pool = WorkerPool(config.urls, config.workers, worker_main, request_timeout=config.request_timeout,
                      hang_fraction=HANG_FRACTION, segment_cache=config.segment_cache,
                      lanes=lane_count(config), fuse_threads=config.threads)
    pool.start()
    exporter: Exporter | None = None
    ops: TvixOperations | None = None
    try:
        fetcher: Fetcher = PoolFetcher(pool)
        if config.urls.substitutes:
            fetcher = substituting(fetcher, config)
        probe_store(pool, config)
        metrics = FuseMetrics()
        options = MountOptions(config.list_root, config.show_xattr, readahead_files=config.readahead_files,
                               small_batches=config.small_batches)
        kernel_readahead = (KernelReadahead(config.mountpoint, config.kernel_readahead_kb)
                            if config.kernel_readahead_kb else None)
        ops = TvixOperations(Vfs(), fetcher, options, metrics,
                             on_first_request=kernel_readahead.apply if kernel_readahead else None)
        if config.metrics_listen is not None:
            # Its thread starts after the pool's fork and before llfuse.init: a busy
            # port then fails the start with nothing mounted.
            exporter = Exporter(config.metrics_listen, metrics, ops.stats)
        llfuse.init(ops, str(config.mountpoint), list(fuse_options(config)))
        systemd = SystemdLink(config.mountpoint, ops.stats, pool.alive)
        stopper = _Stopper(config.mountpoint, config.stop_grace, on_stop=systemd.stopping)
        log.info("mounted %s on %s (%d workers, %d threads, list-root %s)",
                 describe(config.urls), config.mountpoint, config.workers, config.threads,
                 "on" if config.list_root else "off")
        try:
            with stopper:
                systemd.start()  # READY=1 once llfuse.main below answers through the kernel
                llfuse.main(workers=config.threads, handle_signals=False)
        finally:
            systemd.close()  # STOPPING=1, if an outside unmount ended llfuse.main
            llfuse.close(unmount=_is_mountpoint(config.mountpoint))
        if stopper.signal_number is not None:
            log.info("stopped by %s; unmounted %s", signal.Signals(stopper.signal_number).name,
                     config.mountpoint)
        else:
            log.info("%s was unmounted; exiting", config.mountpoint)
    finally:
        if exporter is not None:
            exporter.close()
        if ops is not None:
            ops.close()
        pool.close()
    return 0


PROBE_TIMEOUT = 10.0


def substituting(fetcher: Fetcher, config: MountConfig) -> SubstitutingFetcher:
    """Root lookups that substitute from the binary cache; says once if its signatures go unchecked."""
    jobs = config.substitute_jobs or default_jobs(config.workers)
    if jobs >= config.workers > 1:
        log.warning("--substitute-jobs %d would let substitutions take every worker; using %d",
                    jobs, config.workers - 1)
        jobs = config.workers - 1
    if urls.unsigned_cache(config.urls.path_info):
        log.warning("binary cache %s has no trusted-public-keys: narinfo signatures are NOT checked "
                    "(anyone who can alter the cache or the connection decides what is served)",
                    urls.redact(config.urls.path_info))
    log.info("substituting from %s: at most %d at once, %.0f s each", urls.redact(config.urls.path_info),
             jobs, config.substitute_timeout)
    return SubstitutingFetcher(fetcher, jobs, config.substitute_timeout)


def probe_store(pool: WorkerPool, config: MountConfig) -> None:
    """Ask the store for one path info, so an unreachable store is said at start.

    A remote store that is down is not fatal (it may come back, and the
    mount recovers by itself), but the operator should hear it now rather
    than from the first failed build.
    """
    try:
        pool.call(ops.PATH_INFO, bytes(20), timeout=min(PROBE_TIMEOUT, config.request_timeout))
    except TvixError as exc:
        log.warning("store %s is not answering: %s; mounting anyway, requests will fail with EIO "
                    "until it does", describe(config.urls), exc)
    else:
        log.debug("store %s answers", describe(config.urls))


class _Stopper:
    """Turns stop signals into an unmount, from a thread, while llfuse.main runs.

    llfuse.main keeps the main thread inside C code, so Python-level signal
    handlers cannot run there; ``signal.set_wakeup_fd`` still writes the
    signal number to a pipe from the C handler, and a watcher thread reads it.
    """

    def __init__(self, mountpoint: Path, grace: float, on_stop: Callable[[], None] = lambda: None) -> None:
        self.mountpoint = mountpoint
        self.on_stop = on_stop  # told before the unmount (systemd's STOPPING=1)
        self.grace = grace
        self.signal_number: int | None = None
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="tvixmount-stopper", daemon=True)
        self._previous: dict[int, object] = {}
        self._old_wakeup = -1
        self._connection = _fuse_connection(mountpoint)

    def __enter__(self) -> _Stopper:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)
        # llfuse.main interrupts its threads' reads with SIGUSR1 when it
        # stops; without handle_signals it installs no handler for it, and
        # the default action would kill the process.
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._ignore)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        os.set_blocking(self._read_fd, True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        os.close(self._write_fd)  # ends the watcher's read with EOF
        self._thread.join(timeout=2)
        os.close(self._read_fd)

    def _note(self, signum: int, frame: object) -> None:
        self.signal_number = signum

    @staticmethod
    def _ignore(signum: int, frame: object) -> None:
        pass

    def _watch(self) -> None:
        while True:
            data = os.read(self._read_fd, 1)
            if not data:
                return
            if data[0] in STOP_SIGNALS:
                break  # others (llfuse's SIGUSR1 to its threads) also pass the wakeup fd
        self.signal_number = data[0]
        log.info("received %s; unmounting %s", signal.Signals(data[0]).name, self.mountpoint)
        self.on_stop()
        unmount(self.mountpoint)
        # If main has not returned after the grace period, the kernel still
        # holds the channel open (a lazily detached mount in use): abort it.
        deadline = time.monotonic() + self.grace
        while (left := deadline - time.monotonic()) > 0:
            try:
                if _readable(self._read_fd, left) and os.read(self._read_fd, 1) == b"":
                    return  # main returned and __exit__ closed the pipe
            except OSError:
                return
        log.warning("llfuse did not stop within %.0f s; aborting the FUSE connection", self.grace)
        _abort_connection(self._connection)


def _readable(fd: int, timeout: float) -> bool:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def unmount(mountpoint: Path) -> None:
    """Unmount now if idle, else detach lazily; never raises."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        path = os.fsencode(mountpoint)
        if libc.umount2(path, 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        if libc.umount2(path, MNT_DETACH) == 0:
            log.info("%s is busy (%s); detached it lazily", mountpoint, os.strerror(err))
            return
        log.error("umount %s failed: %s", mountpoint, os.strerror(ctypes.get_errno()))
        return
    result = subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("fusermount -u %s failed: %s", mountpoint, result.stderr.strip())


def _fuse_connection(mountpoint: Path) -> Path | None:
    """The fusectl directory of this mount's connection (its device minor).

    Read from mountinfo, not stat(2): between llfuse.init and llfuse.main
    nobody answers requests on the mount, so a stat would hang.
    """
    target = os.fspath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if mountinfo_path(fields[4]) == target:
                    return FUSECTL / fields[2].split(":")[1]
    except (OSError, IndexError):
        pass
    return None


def _abort_connection(connection: Path | None) -> None:
    if connection is None or not (connection / "abort").exists():
        log.error("cannot abort the FUSE connection: fusectl is not mounted at %s", FUSECTL)
        return
    try:
        (connection / "abort").write_text("1")
    except OSError as exc:
        log.error("aborting FUSE connection %s failed: %s", connection, exc)
