"""systemd's notify protocol: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

A unit with ``Type=notify`` is "started" only when the service says
``READY=1``, so units ordered after it (builders after the mount) wait for
the real thing; ``STOPPING=1`` says a stop has begun, ``STATUS=`` is what
``systemctl status`` shows, and ``WATCHDOG=1`` must arrive at least every
``WATCHDOG_USEC`` microseconds or systemd restarts the service.

Facts of the protocol (sd_notify(3), sd_watchdog_enabled(3)):

* ``NOTIFY_SOCKET`` is an ``AF_UNIX`` datagram socket path; a leading ``@``
  names one in the abstract namespace (the ``@`` becomes a NUL byte).
* ``WATCHDOG_USEC`` is in microseconds; when ``WATCHDOG_PID`` is set, the
  watchdog is meant for that process only (a child must not ping for it).
* With no ``NOTIFY_SOCKET`` there is nobody to tell: every call is a no-op,
  so callers never need to ask whether they run under systemd.

Written here rather than depending on a binding: it is one ``sendto``, and
a C binding would need libsystemd at build time. This module imports
nothing of the project (a leaf helper any process may use).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(path: str) -> str | bytes:
    """The socket address for ``NOTIFY_SOCKET``'s text: ``@name`` is abstract."""
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])
    return path


class Notifier:
    """Sends notify datagrams to one socket; a no-op when there is none.

    Thread-safe (one lock around the socket). A failed send is logged once
    at WARNING and then at DEBUG: losing a STATUS line must never stop the
    service, and a journal full of the same complaint helps nobody.
    """

    def __init__(self, socket_path: str | None) -> None:
        self.socket_path = socket_path or None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``NOTIFY_SOCKET`` names (a no-op one when unset or empty)."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (each ``KEY=VALUE``) as one datagram; whether it was sent."""
        if self.socket_path is None or not lines:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a notify line: {line!r}")
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, _address(self.socket_path))
                return True
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "cannot notify systemd at %s: %s", self.socket_path, exc.strerror or exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between two pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises).

    None when there is no watchdog for this process: unset, zero or bad
    ``WATCHDOG_USEC``, or a ``WATCHDOG_PID`` that is another process.
    """
    env = os.environ if environ is None else environ
    text = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2e6
