"""Serve a listening socket systemd passed by relaying its connections to grpc's own socket.

grpc python binds only sockets it opens itself (``add_insecure_port``);
it cannot adopt a descriptor. So for ``--listen-address sd-listen`` the
daemon binds grpc to a unix socket in a fresh 0700 directory (``private_socket``:
nobody else can reach it, unlike an abstract socket) and ``Relay`` accepts
on the inherited socket, connecting each client to that private socket and
copying bytes both ways until either side closes. The client sees the
socket systemd made (its address, its permissions, its queue of early
connections); the cost is one copy per byte, in two threads per
connection, which gRPC's few long-lived connections make cheap.

Stopping: ``stop_accepting`` first (new connections are refused, as
grpc's own stop does), then, once grpc has finished its calls and closed
its ends, ``close`` lets the relay hand on what grpc wrote last and drops
whatever connection is left. grpc's stop returns once its last reply is in
its socket, not in the client's: a relay that dropped its connections at
that moment would cut the end off an answer that grpc counted as served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
DRAIN_S = 5.0  # how long ``close`` waits for grpc's last bytes to reach slow clients


def private_socket() -> tuple[str, str]:
    """(directory, socket path) for grpc's relayed socket: a new 0700 directory of its own.

    In ``$RUNTIME_DIRECTORY`` when systemd gives one, else the temporary directory.
    """
    parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    directory = tempfile.mkdtemp(prefix="tvixstore-daemon-", dir=parent)
    return directory, os.path.join(directory, "grpc.sock")


class Relay:
    """Accepts on ``listener`` (a listening socket's fd, taken over) and relays to ``target_path``."""

    def __init__(self, listener_fd: int, target_path: str) -> None:
        os.set_inheritable(listener_fd, False)
        self._listener = socket.socket(fileno=listener_fd)
        self._listener.setblocking(True)
        self._target = target_path
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._to_clients = 0  # pumps still copying grpc's bytes to a client
        self._drained = threading.Condition(self._lock)
        self._accepting = True
        self.connections = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-fd{listener_fd}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stop_accepting shut the socket down
            with self._lock:
                if not self._accepting:
                    client.close()
                    return
                self.connections += 1
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self._target)
            except OSError as exc:
                log.warning("relay: cannot reach the daemon's own socket %s: %s", self._target, exc)
                client.close()
                continue
            self._pair(client, upstream)

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self._open.update((client, upstream))
            self._to_clients += 1
        remaining = [2]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            try:
                while n := src.recv_into(buf):
                    dst.sendall(view[:n])
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # the other side sees EOF, as with a direct connection
            with self._lock:
                if src is upstream:
                    self._to_clients -= 1
                    self._drained.notify_all()
                remaining[0] -= 1
                last = remaining[0] == 0
                if last:
                    self._open.discard(client)
                    self._open.discard(upstream)
            if last:
                client.close()
                upstream.close()

        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(src, dst), name="relay-pump", daemon=True).start()

    def stop_accepting(self) -> None:
        """Refuse new connections (the listener is closed); relayed ones go on. Idempotent."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._thread.join(5)

    def close(self, drain: float = DRAIN_S) -> None:
        """Hand on grpc's last bytes (up to ``drain`` s), then drop every relayed connection left.

        Called after grpc closed its ends: each pump towards a client then
        reads grpc's last bytes and its EOF, and ends once the client has
        taken them. A client that stopped reading is dropped after ``drain``.
        """
        self.stop_accepting()
        with self._lock:
            if not self._drained.wait_for(lambda: self._to_clients == 0, timeout=drain):
                log.warning("relay: %d connection(s) still had bytes for their client after %g s; dropped",
                            self._to_clients, drain)
            left = list(self._open)
            self._open.clear()
        for sock in left:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
