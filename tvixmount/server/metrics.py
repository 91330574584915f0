"""The daemon's Prometheus metrics: requests, errors, bytes and latency per RPC.

``RpcMetrics`` is a grpc server interceptor: it wraps the handler of every
method of the tvix services (health and reflection are left alone; the
health Watch must keep its non-blocking form) and counts, per method
(``BlobService/Read``)::

    tvixstore_rpc_requests_total{method}         calls begun
    tvixstore_rpc_errors_total{method, code}     calls ended with a gRPC error status
    tvixstore_rpc_cancelled_total{method}        calls the client left before their end
                                                 (a reader that had what it wanted)
    tvixstore_rpc_received_bytes_total{method}   request message bytes
    tvixstore_rpc_sent_bytes_total{method}       response message bytes
    tvixstore_rpc_seconds{method}                histogram: from the call's start to its
                                                 last message (a whole stream for Read)

The same conventions as the mount's ``tvixmount_fuse_*`` families (a
counter per thing, ``_seconds`` histograms on the same buckets), beside
``tvixstore_build_info`` and the process families (metrics_common). The
servicers stay unaware of it; their own counters feed the periodic log line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from ..errors import Unavailable
from ..metrics import LATENCY_BUCKETS, ListenAddress, ListenError, parse_listen
from ..metrics_common import MetricsServer, registry_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-listen", type=_listen, default=None, metavar="[HOST]:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (requests, errors, "
                             "bytes and latency per RPC); HOST defaults to 127.0.0.1, port 0 picks a "
                             "free port (logged). Default: off")


def serve_metrics(metrics: RpcMetrics, address: ListenAddress) -> None:
    """Start ``metrics``' endpoint; a taken port is the daemon's Unavailable (exit 1, one line)."""
    try:
        metrics.serve(address)
    except ListenError as exc:
        raise Unavailable(str(exc)) from None


def _listen(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(message: Any) -> int:
    return len(message) if isinstance(message, bytes | bytearray | memoryview) else int(message.ByteSize())


class RpcMetrics(grpc.ServerInterceptor):
    """Counts every call of ``services``' methods into its own registry."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = frozenset(services)
        self.registry = registry_for("tvixstore")
        r = self.registry
        self.requests = Counter("tvixstore_rpc_requests", "gRPC calls begun, by method", ["method"],
                                registry=r)
        self.errors = Counter("tvixstore_rpc_errors", "gRPC calls ended with an error status",
                              ["method", "code"], registry=r)
        self.cancelled = Counter("tvixstore_rpc_cancelled", "gRPC calls the client left before their end",
                                 ["method"], registry=r)
        self.received = Counter("tvixstore_rpc_received_bytes", "request message bytes received",
                                ["method"], registry=r)
        self.sent = Counter("tvixstore_rpc_sent_bytes", "response message bytes sent", ["method"],
                            registry=r)
        self.seconds = Histogram("tvixstore_rpc_seconds", "time from a call's start to its last message",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self._server: MetricsServer | None = None

    def serve(self, address: ListenAddress) -> None:
        """Start the HTTP endpoint (ListenError when the port is taken)."""
        self._server = MetricsServer(address, self.registry, "daemon")

    @property
    def address(self) -> ListenAddress | None:
        return None if self._server is None else self._server.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # -- grpc.ServerInterceptor ----------------------------------------------------------------

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        service, _, name = details.method.lstrip("/").rpartition("/")  # type: ignore[attr-defined]
        if handler is None or service not in self.services:
            return handler
        method = f"{service.rsplit('.', 1)[-1]}/{name}"
        for requests in (False, True):
            for responses in (False, True):
                kind = f"{'stream' if requests else 'unary'}_{'stream' if responses else 'unary'}"
                fn = getattr(handler, kind)
                if fn is not None:
                    make = getattr(grpc, f"{kind}_rpc_method_handler")
                    return make(self._wrap(method, fn, requests, responses),
                                request_deserializer=handler.request_deserializer,
                                response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, method: str, fn: Callable[..., Any], requests: bool,
              responses: bool) -> Callable[..., Any]:
        received, sent = self.received.labels(method), self.sent.labels(method)

        def counted_requests(it: Iterator[Any]) -> Iterator[Any]:
            for message in it:
                received.inc(_size(message))
                yield message

        def begin(request: Any) -> Any:
            self.requests.labels(method).inc()
            if requests:
                return counted_requests(request)
            received.inc(_size(request))
            return request

        def end(start: float, context: grpc.ServicerContext, failed: bool) -> None:
            self.seconds.labels(method).observe(time.monotonic() - start)
            code = context.code()  # type: ignore[attr-defined]  # set by abort/set_code
            if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                self.errors.labels(method, code.name).inc()
            elif failed and not context.is_active():  # the client stopped reading: not our error
                self.cancelled.labels(method).inc()
            elif failed:
                self.errors.labels(method, grpc.StatusCode.UNKNOWN.name).inc()

        if responses:
            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start, failed = time.monotonic(), True
                try:
                    for message in fn(begin(request), context):
                        sent.inc(_size(message))
                        yield message
                    failed = False
                finally:
                    end(start, context, failed)

            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start, failed = time.monotonic(), True
            try:
                reply = fn(begin(request), context)
                sent.inc(_size(reply))
                failed = False
                return reply
            finally:
                end(start, context, failed)

        return unary
