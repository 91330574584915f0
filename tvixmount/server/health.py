"""The standard gRPC health service (grpc.health.v1.Health/Check), without a dependency.

A tvix-store daemon registers it too, so load balancers and scripts can
probe ``tvixstore daemon`` the same way. Only ``Check`` is served.

Wire facts: HealthCheckRequest is ``{string service = 1}`` and
HealthCheckResponse is ``{ServingStatus status = 1}`` with SERVING = 1 and
NOT_SERVING = 2. Those encode exactly like the well-known wrappers
StringValue (field 1 string) and Int32Value (field 1 varint), which is
what we parse and build them with.
"""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError

SERVICE = "grpc.health.v1.Health"
CHECK = f"/{SERVICE}/Check"
SERVING = 1
NOT_SERVING = 2


class Health:
    """Answers Check for the overall server ("") and each named service."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._services = frozenset(("", *services))
        self.serving = True

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            service = wrappers_pb2.StringValue.FromString(request).value
        except DecodeError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a HealthCheckRequest")
        if service not in self._services:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}")
        status = SERVING if self.serving else NOT_SERVING
        return wrappers_pb2.Int32Value(value=status).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
        )


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    """Ask a server's health (tests and scripts); the ServingStatus number."""
    method = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
    raw = method(wrappers_pb2.StringValue(value=service).SerializeToString(), timeout=timeout)
    return wrappers_pb2.Int32Value.FromString(raw).value
