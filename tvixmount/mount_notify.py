"""The mount's side of systemd's notify protocol: readiness, status lines, the watchdog.

One thread (``SystemdLink``), started just before ``llfuse.main``, and only
when systemd listens (``NOTIFY_SOCKET`` or ``WATCHDOG_USEC``):

* **READY=1** once the mount answers through the kernel: a ``stat`` of the
  mountpoint that returns the root inode and a ``statvfs`` both went
  kernel -> FUSE -> our handlers. ``llfuse.init`` alone only means the kernel
  has a mount; a unit ordered after ours must find files, not a hang.
* **STATUS=** every ``status_interval`` seconds: workers ready and FUSE
  requests served (what ``systemctl status`` shows).
* **WATCHDOG=1** every half ``WATCHDOG_USEC``, only while the dispatcher is
  healthy, which means two things. The FUSE path answers: a ``statvfs`` of
  the mountpoint, which the kernel never caches, so it is served by an llfuse
  thread under llfuse's global lock (a handler stuck holding the lock, or
  every request thread stuck, blocks it). The probe is made from this very
  thread, synchronously: while it hangs no ping is sent, and systemd
  restarts the mount after ``WatchdogSec``. And the pool can serve: its fork
  server runs and a worker is ready (``WorkerPool.alive``), allowing half an
  interval for a worker being restarted. A store that is down is not
  unhealthy here: a restart would not bring it back.
* **STOPPING=1** from ``stopping()``, called when a stop signal arrives or
  llfuse.main returned after an outside unmount.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .metrics import MountStats
from .sdnotify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

ROOT_INODE = 1  # llfuse.ROOT_INODE, without importing llfuse here
STATUS_INTERVAL = 10.0
_POOL_POLL = 0.2


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from ``name`` (tests shorten the STATUS interval), else ``default``."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def status_line(stats: MountStats) -> str:
    """``4/4 workers ready, 1234 requests served``: what ``systemctl status`` shows."""
    served = sum(stats.fuse.ops.values())
    workers = getattr(stats.fetcher, "workers", None)
    if workers is None:  # the in-process fetcher (tests): no pool
        return f"{served} requests served"
    ready = sum(1 for w in workers.values() if w.ready)
    return f"{ready}/{len(workers)} workers ready, {served} requests served"


class SystemdLink:
    """Tells systemd when the mount is ready, how it is doing and that it is alive."""

    def __init__(self, mountpoint: Path, stats: Callable[[], MountStats], pool_alive: Callable[[], bool],
                 notifier: Notifier | None = None, watchdog: float | None = None,
                 status_interval: float = STATUS_INTERVAL) -> None:
        self.mountpoint = mountpoint
        self.stats = stats
        self.pool_alive = pool_alive
        self.notifier = notifier or Notifier.from_environment()
        self.watchdog = watchdog_interval() if watchdog is None else watchdog
        self.status_interval = _env_seconds("TVIXMOUNT_STATUS_INTERVAL", status_interval)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def wanted(self) -> bool:
        """Whether anybody listens: no thread, no probes outside systemd."""
        return self.notifier.enabled

    def start(self) -> None:
        if self.wanted:
            self._thread = threading.Thread(target=self._run, name="tvixmount-systemd", daemon=True)
            self._thread.start()

    def stopping(self) -> None:
        """Say STOPPING=1 (once) and end the thread's loop."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.notifier.stopping(f"unmounting {self.mountpoint}")

    def close(self) -> None:
        self.stopping()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.notifier.close()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self._answers(root=True):
                return
            if self._stop.is_set():
                return
            self.notifier.ready(f"mounted {self.mountpoint}; {self._status()}")
            self.ready.set()
            log.debug("told systemd READY=1 (%s answers)", self.mountpoint)
            self._loop()
        except Exception:  # never take the mount down for a status line
            log.exception("systemd notification thread failed; no more STATUS or WATCHDOG")

    def _loop(self) -> None:
        now = time.monotonic()
        next_status = now + self.status_interval
        next_ping = now
        while not self._stop.is_set():
            now = time.monotonic()
            if self.watchdog is not None and now >= next_ping:
                next_ping = now + self.watchdog
                if self._healthy():
                    self.notifier.watchdog()
            if now >= next_status:
                next_status = now + self.status_interval
                self.notifier.status(self._status())
            due = min(next_status, next_ping if self.watchdog is not None else next_status)
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _status(self) -> str:
        """The STATUS= text; a failure to build it must not stop the watchdog's pings."""
        try:
            return status_line(self.stats())
        except Exception as exc:
            log.debug("no status line: %s", exc, exc_info=True)
            return "serving"

    def _answers(self, root: bool = False) -> bool:
        """Whether the mount answers through the kernel (blocks while it does not)."""
        try:
            if root:
                st = os.stat(self.mountpoint)
                if st.st_ino != ROOT_INODE:
                    log.warning("%s is not our mount (inode %d); not telling systemd we are ready",
                                self.mountpoint, st.st_ino)
                    return False
            os.statvfs(self.mountpoint)
            return True
        except OSError as exc:
            if not self._stop.is_set():
                log.warning("%s does not answer: %s", self.mountpoint, exc.strerror or exc)
            return False

    def _healthy(self) -> bool:
        if not self._answers():
            return False
        deadline = time.monotonic() + (self.watchdog or 0) / 2
        while not self.pool_alive():
            if time.monotonic() >= deadline or self._stop.is_set():
                log.warning("no worker ready and none restarting in time; withholding the watchdog ping")
                return False
            time.sleep(_POOL_POLL)
        return True
