"""A stand-in for systemd's side of sd_notify: a datagram socket a test binds and reads.

``NotifySocket()`` binds an ``AF_UNIX`` datagram socket (in the abstract
namespace with ``abstract=True``, as systemd itself uses), and ``env`` is
what to give the service (``NOTIFY_SOCKET``). ``wait_for("READY=1")``
collects datagrams until one carries that line; every datagram read is
kept in ``messages``, each a dict of its ``KEY=VALUE`` lines, in order.
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
import time
from pathlib import Path


class NotifySocket:
    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"tvixmount-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.path = "@" + name
            self._dir: str | None = None
        else:
            self._dir = tempfile.mkdtemp(prefix="tvn-", dir="/tmp")
            self.path = str(Path(self._dir) / "notify")
            self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def read(self, timeout: float) -> dict[str, str] | None:
        """The next datagram's lines, or None after ``timeout`` seconds."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data = self.sock.recv(65536).decode()
        message = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(message)
        return message

    def wait_for(self, line: str, timeout: float = 20.0) -> dict[str, str]:
        """Read until a datagram has ``line`` (``KEY=VALUE``); AssertionError after ``timeout``."""
        key, _, value = line.partition("=")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.read(left)
            if message is not None and message.get(key) == value:
                return message
        raise AssertionError(f"no {line} within {timeout} s; got {self.messages}")

    def count(self, line: str) -> int:
        key, _, value = line.partition("=")
        return sum(1 for m in self.messages if m.get(key) == value)

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            os.unlink(self.path)
            os.rmdir(self._dir)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
