"""The sd-listen relay hands on everything the server wrote before it stopped, over real sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from tvixmount.server.relay import Relay

ANSWER = os.urandom(8 << 20)  # several times what the sockets on the way buffer


def _server(path: Path, accepted: threading.Event) -> socket.socket:
    """A one-connection stand-in for grpc: sends ANSWER, then closes its end."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        accepted.set()
        with conn, contextlib.suppress(OSError):  # a relay that gave up on its client resets us
            conn.sendall(ANSWER)

    threading.Thread(target=answer, daemon=True).start()
    return listener


def _relayed(tmp_path: Path) -> tuple[Relay, socket.socket, socket.socket]:
    """(relay, the stand-in server's listener, a client the relay has connected to that server)."""
    accepted = threading.Event()
    listener = _server(tmp_path / "grpc.sock", accepted)
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # as systemd would pass it
    front.bind(str(tmp_path / "front.sock"))
    front.listen(1)
    relay = Relay(os.dup(front.fileno()), str(tmp_path / "grpc.sock"))
    front.close()
    relay.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "front.sock"))
    assert accepted.wait(10)
    return relay, listener, client


def test_close_right_after_the_server_stopped_loses_no_byte(tmp_path: Path) -> None:
    """grpc's stop returns once its last reply is in its own socket; ``close`` must not cut that off."""
    relay, listener, client = _relayed(tmp_path)
    got = hashlib.sha256()
    received = [0]

    def read_all() -> None:
        while chunk := client.recv(64 << 10):
            got.update(chunk)
            received[0] += len(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while received[0] == 0:  # the answer is on its way through the relay
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # The server thread's sendall returns while most of ANSWER still sits in
    # the relay's sockets; stopping now is the race a SIGTERM under load hits.
    listener.close()
    relay.close()
    reader.join(10)
    client.close()
    assert received[0] == len(ANSWER)
    assert got.digest() == hashlib.sha256(ANSWER).digest()


def test_close_drops_a_client_that_stopped_reading_after_the_drain(tmp_path: Path) -> None:
    """A client that takes nothing holds ``close`` for ``drain`` seconds, not forever."""
    relay, listener, client = _relayed(tmp_path)
    done = threading.Event()
    closer = threading.Thread(target=lambda: (relay.close(drain=0.5), done.set()), daemon=True)
    closer.start()
    assert not done.wait(0.2)  # still handing on
    assert done.wait(10)  # then gave up on the client
    client.close()
    listener.close()
