"""Serve any store over tvix's gRPC protocol, so a build farm can mount one store.

``serve(store_urls, listen, ...)`` opens the store, starts a grpc server
with the three tvix services (servicers.py), the standard health
service and reflection (health.py) on ``listen``, and returns it running. ``daemon.py``
wraps it for ``tvixstore daemon`` (flags, signals, periodic stats).

Listen addresses are tvix-store's (listen.py): ``host:port``, ``[v6]:port``,
a unix socket path, ``@abstract``, ``sd-listen`` (systemd's sockets, relayed:
relay.py). Port 0 picks a free port; ``StoreServer.url`` is then the client
URL with the real port.

Nothing is authenticated: the daemon is meant for a trusted network. The
default is loopback of both families; the daemon warns when told to bind
elsewhere.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..castore.directory import SizeConvention
from ..errors import InvalidArgument, Unavailable
from ..store import Store, StoreUrls, open_store
from ..store.grpc.wire import MAX_MESSAGE
from .batch import BLOB_BATCH_SERVICE, BlobBatchServicer
from .health import Health
from .listen import DEFAULT_LISTEN_TEXT, ListenAddress, listen_addresses, parse_listen, usable
from .relay import Relay, private_socket
from .servicers import SERVICES, Options, handlers
from .stats import Stats

__all__ = ["DEFAULT_LISTEN_TEXT", "DEFAULT_WORKERS", "ListenAddress", "StoreServer", "parse_listen", "serve"]

log = logging.getLogger(__name__)

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


class StoreServer(grpc.Server):
    """A running grpc.Server that also owns its store, and knows its real address.

    ``stop(grace)`` marks the health service NOT_SERVING, lets calls in
    flight finish for up to ``grace`` seconds, then closes the store; the
    returned event is set when all of that is done.
    """

    def __init__(self, server: grpc.Server, store: Store, endpoints: Sequence[tuple[ListenAddress, int]],
                 stats: Stats, health: Health, relays: Sequence[Relay] = (),
                 private_dir: str | None = None) -> None:
        self._server = server
        self.store = store
        self.endpoints = tuple(endpoints)  # (address, bound port; 0 for sockets without one)
        self.address, self.port = self.endpoints[0]
        self.stats = stats
        self.health = health
        self.url = self.address.url(self.port)
        self._relays = tuple(relays)
        self._private_dir = private_dir
        self._stopping = threading.Lock()
        self._done: threading.Event | None = None

    def shown(self) -> str:
        """The bound addresses for log lines (with the real ports)."""
        return " and ".join(address.shown(port) for address, port in self.endpoints)

    def urls(self) -> list[str]:
        """The client URL of each address."""
        return [address.url(port) for address, port in self.endpoints]

    def is_loopback(self) -> bool:
        """True when every address is reachable from this host only."""
        return all(address.is_loopback() for address, _ in self.endpoints)

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
        for relay in self._relays:
            relay.stop_accepting()
        stopped = self._server.stop(grace)

        def finish() -> None:
            stopped.wait()
            for relay in self._relays:
                relay.close()
            if self._private_dir:
                shutil.rmtree(self._private_dir, ignore_errors=True)
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
    listen: str | Sequence[ListenAddress] | None = None,
    read_only: bool = False,
    added_latency: float = 0.0,
    max_workers: int = DEFAULT_WORKERS,
    check_dir_sizes: SizeConvention | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    blob_batch: bool = True,
) -> StoreServer:
    """Open the store and serve it on ``listen``; returns the started server.

    ``listen``: a ``--listen-address`` text, the addresses it names
    (listen.listen_addresses), or None for the default (loopback of both
    families). ``read_only`` answers every Put with PERMISSION_DENIED;
    ``added_latency`` sleeps that many seconds at the start of each call
    (to emulate a network hop in tests); ``check_dir_sizes`` makes
    Directory Put check DirectoryNode.size in that convention (default:
    sizes are not checked, docs/protocol.md, 'Directory size');
    ``interceptors`` see every call (the daemon's metrics, server/metrics.py);
    ``blob_batch`` serves tvixmount's own BlobBatchService beside the tvix
    services (server/batch.py; off: a server like tvix-store, for tests).
    """
    addresses = listen_addresses(listen) if listen is None or isinstance(listen, str) else tuple(listen)
    if added_latency < 0:
        raise InvalidArgument(f"added latency {added_latency} must not be negative")
    if max_workers < 1:
        raise InvalidArgument(f"max workers {max_workers} must be at least 1")
    addresses = usable(addresses)
    if not addresses:
        raise Unavailable(f"cannot listen on {DEFAULT_LISTEN_TEXT}: this host has neither loopback address")
    store = open_store(store_urls)
    private_dir = None
    try:
        stats = Stats()
        health = Health((*SERVICES, BLOB_BATCH_SERVICE) if blob_batch else SERVICES)
        options = Options(read_only=read_only, added_latency=added_latency, check_dir_sizes=check_dir_sizes)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-server"),
            options=_SERVER_OPTIONS, interceptors=list(interceptors),
        )
        server.add_generic_rpc_handlers(handlers(store, options, stats))
        if blob_batch:
            server.add_generic_rpc_handlers([BlobBatchServicer(store, options, stats).handler()])
        health.add_to(server)
        endpoints = [(address, _bind(server, address)) for address in addresses if address.fd is None]
        relays = []
        inherited = [address for address in addresses if address.fd is not None]
        if inherited:
            private_dir, private_path = private_socket()
            _bind(server, parse_listen(private_path))
            relays = [Relay(address.fd, private_path) for address in inherited if address.fd is not None]
            endpoints += [(address, 0) for address in inherited]
        server.start()
        for relay in relays:
            relay.start()
    except BaseException:
        store.close()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        raise
    return StoreServer(server, store, endpoints, stats, health, relays, private_dir)


def _bind(server: grpc.Server, address: ListenAddress) -> int:
    """Bind ``address``; its port (0 for a unix socket); Unavailable when grpc cannot."""
    try:
        port = server.add_insecure_port(address.target)
    except RuntimeError as exc:
        raise Unavailable(f"cannot listen on {address.target}: {exc}") from None
    if port == 0 and address.unix_path is None and address.abstract is None:
        raise Unavailable(f"cannot listen on {address.target} (in use, or not an address of this host?)")
    return port if address.unix_path is None and address.abstract is None else 0
