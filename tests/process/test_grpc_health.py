"""The daemon's standard health (Check, Watch) and reflection, asked with gRPC's own stubs.

A real daemon subprocess: Check answers SERVING for the server and each
tvix service and NOT_FOUND for others; a Watch hears SERVING, then
NOT_SERVING the moment a stop begins; reflection lists our services and
resolves their descriptors, as grpcurl would.
"""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.grpc_daemon import Daemon, scratch_dir
from tvixmount.server.servicers import SERVICES

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def daemon():
    d = Daemon(scratch_dir("tvx-health-")).start()
    yield d
    d.stop()


def test_check_serving_for_the_server_and_each_service(daemon):
    with grpc.insecure_channel("unix:" + daemon.listen) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", *SERVICES):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_watch_hears_not_serving_when_a_stop_begins(daemon):
    with grpc.insecure_channel("unix:" + daemon.listen) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]), timeout=20)
        seen: list[int] = []
        first = threading.Event()

        def read() -> None:
            try:
                for reply in stream:
                    seen.append(reply.status)
                    first.set()
            except grpc.RpcError:
                pass  # the server went away after saying NOT_SERVING

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(10)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        reader.join(20)
        assert not reader.is_alive()
        assert seen[0] == SERVING and NOT_SERVING in seen, seen
    assert daemon.proc.wait(20) == 0


def test_reflection_lists_and_describes_our_services(daemon):
    with grpc.insecure_channel("unix:" + daemon.listen) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        expected = {*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        assert expected <= services
        blob = db.FindFileContainingSymbol("tvix.castore.v1.BlobService")
        assert blob.package == "tvix.castore.v1"
        assert {"Stat", "Read", "Put"} <= {m.name for s in blob.service for m in s.method}
