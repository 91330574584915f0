"""Serve any store over tvix's gRPC protocol, so a build farm can mount one store.

``serve(store_urls, listen, ...)`` opens the store, starts a grpc server
with the three tvix services (servicers.py), the standard health
service and reflection (health.py) on ``listen``, and returns it running. ``daemon.py``
wraps it for ``tvixstore daemon`` (flags, signals, periodic stats).

Listen addresses (``parse_listen``): ``host:port``, ``[v6]:port``,
``unix:///abs/path``, or a path starting with ``/`` or ``.`` (a unix
socket, as tvix-store's tokio-listener syntax). Port 0 picks a free port;
``StoreServer.url`` is then the client URL with the real port.

Nothing is authenticated: the daemon is meant for a trusted network. The
default address is loopback; the daemon warns when told to bind elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from ..castore.directory import SizeConvention
from ..errors import InvalidArgument, Unavailable
from ..store import Store, StoreUrls, open_store
from ..store.grpc.wire import MAX_MESSAGE
from .health import Health
from .servicers import SERVICES, Options, handlers
from .stats import Stats

__all__ = ["DEFAULT_LISTEN", "DEFAULT_WORKERS", "ListenAddress", "StoreServer", "parse_listen", "serve"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8000"
# One thread per concurrent call (a streaming Read holds its thread until done).
DEFAULT_WORKERS = 32

_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # Refuse a port another daemon already holds (grpc sets SO_REUSEPORT by default).
    ("grpc.so_reuseport", 0),
    # Our clients ping every 30 s during long calls; allow that, and probe idle peers.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    @property
    def target(self) -> str:
        """The address as grpc binds it."""
        if self.unix_path is not None:
            return "unix:" + self.unix_path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def is_loopback(self) -> bool:
        """True for unix sockets and loopback hosts: nothing reachable from the network."""
        if self.unix_path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: may resolve to anything
            return False

    def url(self, port: int | None = None) -> str:
        """The store URL a client opens to reach this address."""
        if self.unix_path is not None:
            return "grpc+unix://" + self.unix_path
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"grpc+http://{host}:{self.port if port is None else port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse a ``--listen-address``; InvalidArgument naming the problem."""
    if not text:
        raise InvalidArgument("listen address is empty; use host:port, [v6]:port or a unix socket path")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise InvalidArgument(f"listen address {text!r}: a unix socket needs an absolute path (unix:///a/b)")
        return ListenAddress(unix_path=path)
    if text.startswith(("/", ".")):
        return ListenAddress(unix_path=os.path.abspath(text))
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise InvalidArgument(f"listen address {text!r}: write IPv6 as [addr]:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise InvalidArgument(f"listen address {text!r}: expected host:port, like 127.0.0.1:8000")
        if ":" in host:
            raise InvalidArgument(f"listen address {text!r}: write IPv6 addresses in brackets, [addr]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidArgument(f"listen address {text!r}: port {port_text!r} is not a number in 0..65535")
    return ListenAddress(host=host, port=int(port_text))


class StoreServer(grpc.Server):
    """A running grpc.Server that also owns its store, and knows its real address.

    ``stop(grace)`` marks the health service NOT_SERVING, lets calls in
    flight finish for up to ``grace`` seconds, then closes the store; the
    returned event is set when all of that is done.
    """

    def __init__(self, server: grpc.Server, store: Store, address: ListenAddress, port: int,
                 stats: Stats, health: Health) -> None:
        self._server = server
        self.store = store
        self.address = address
        self.port = port
        self.stats = stats
        self.health = health
        self.url = address.url(port)
        self._stopping = threading.Lock()
        self._done: threading.Event | None = None

    def shown(self) -> str:
        """The bound address for log lines (with the real port)."""
        if self.address.unix_path is not None:
            return f"unix socket {self.address.unix_path}"
        return ListenAddress(self.address.host, self.port).target

    # grpc.Server ----------------------------------------------------------------------------

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: Any, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        with self._stopping:
            if self._done is not None:
                return self._done
            done = self._done = threading.Event()
        self.health.shutdown()
        stopped = self._server.stop(grace)

        def finish() -> None:
            stopped.wait()
            try:
                self.store.close()
            except Exception as exc:  # the server is down either way; say what did not close
                log.warning("closing the store failed: %s", exc)
            done.set()

        threading.Thread(target=finish, name="grpc-server-stop", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def serve(
    store_urls: StoreUrls,
    listen: str = DEFAULT_LISTEN,
    read_only: bool = False,
    added_latency: float = 0.0,
    max_workers: int = DEFAULT_WORKERS,
    check_dir_sizes: SizeConvention | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> StoreServer:
    """Open the store and serve it on ``listen``; returns the started server.

    ``read_only`` answers every Put with PERMISSION_DENIED;
    ``added_latency`` sleeps that many seconds at the start of each call
    (to emulate a network hop in tests); ``check_dir_sizes`` makes
    Directory Put check DirectoryNode.size in that convention (default:
    sizes are not checked, docs/protocol.md, 'Directory size');
    ``interceptors`` see every call (the daemon's metrics, server/metrics.py).
    """
    address = parse_listen(listen)
    if added_latency < 0:
        raise InvalidArgument(f"added latency {added_latency} must not be negative")
    if max_workers < 1:
        raise InvalidArgument(f"max workers {max_workers} must be at least 1")
    store = open_store(store_urls)
    try:
        stats = Stats()
        health = Health(SERVICES)
        options = Options(read_only=read_only, added_latency=added_latency, check_dir_sizes=check_dir_sizes)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-server"),
            options=_SERVER_OPTIONS, interceptors=list(interceptors),
        )
        server.add_generic_rpc_handlers(handlers(store, options, stats))
        health.add_to(server)
        try:
            port = server.add_insecure_port(address.target)
        except RuntimeError as exc:
            raise Unavailable(f"cannot listen on {address.target}: {exc}") from None
        if port == 0 and address.unix_path is None:
            raise Unavailable(f"cannot listen on {address.target} (in use, or not an address of this host?)")
        server.start()
    except BaseException:
        store.close()
        raise
    return StoreServer(server, store, address, port if address.unix_path is None else 0, stats, health)
