"""The daemon's side of systemd's notify protocol (sdnotify.py has the protocol).

``READY=1`` once the gRPC server is started and bound (a unit ordered after
``tvixstore-daemon.service`` then finds it answering), ``STATUS=`` with the
calls served, ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from the daemon's
main loop, and ``STOPPING=1`` when a stop begins. The main loop wakes every
half second anyway (daemon._serve_until) and calls ``tick``; the pings thus
prove that the loop which handles stop signals and logs the statistics is
alive. gRPC's own threads are grpc's to keep alive.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..sdnotify import Notifier, watchdog_interval

STATUS_INTERVAL = 10.0


class DaemonLink:
    def __init__(self, where: str, calls: Callable[[], str], notifier: Notifier | None = None,
                 watchdog: float | None = None, status_interval: float = STATUS_INTERVAL) -> None:
        self.where = where
        self.calls = calls
        self.notifier = notifier or Notifier.from_environment()
        self.watchdog = watchdog_interval() if watchdog is None else watchdog
        self.status_interval = status_interval
        self._next_ping = 0.0
        self._next_status = 0.0

    def ready(self) -> None:
        self.notifier.ready(f"serving on {self.where}")
        now = time.monotonic()
        self._next_status = now + self.status_interval
        self.tick(now)

    def tick(self, now: float | None = None) -> None:
        """Ping the watchdog and refresh STATUS when due; called by the main loop."""
        if not self.notifier.enabled:
            return
        now = time.monotonic() if now is None else now
        if self.watchdog is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog
            self.notifier.watchdog()
        if now >= self._next_status:
            self._next_status = now + self.status_interval
            self.notifier.status(f"serving on {self.where}; {self.calls()}")

    def stopping(self) -> None:
        self.notifier.stopping(f"stopping; served {self.calls()}")
        self.notifier.close()
