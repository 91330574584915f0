"""The standard gRPC health service (grpc.health.v1.Health: Check and Watch) and reflection.

Both come from gRPC's own packages (grpcio-health-checking,
grpcio-reflection), so ``grpcurl``, ``grpc_health_probe`` and Kubernetes'
gRPC probes work against ``tvixstore daemon`` as against any gRPC server.
The overall server ("") and each tvix service are SERVING while the daemon
serves; ``shutdown`` turns them all NOT_SERVING for good when a stop
begins, and every Watch hears it at once. Watch is non-blocking: a
watcher holds no server thread.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVICE = health.SERVICE_NAME
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The health servicer of one server: "" and ``services`` SERVING until ``shutdown``."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = services
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        for service in ("", *services):
            self.servicer.set(service, SERVING)

    def add_to(self, server: grpc.Server) -> None:
        """Register health, and reflection listing the tvix services, health and reflection itself."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        reflection.enable_server_reflection((*self.services, SERVICE, reflection.SERVICE_NAME), server)

    def shutdown(self) -> None:
        """Every service NOT_SERVING from now on (a stop has begun)."""
        self.servicer.enter_graceful_shutdown()


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> int:
    """Ask a server's health (tests and scripts); the ServingStatus number."""
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status)
