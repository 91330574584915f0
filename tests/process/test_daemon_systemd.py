"""``tvixstore daemon`` under systemd (READY=1, WATCHDOG=1, STOPPING=1) and its /metrics.

Real daemon subprocesses: the notify socket is one the test binds and reads
(tests/notify_socket.py); the metrics are scraped over HTTP after real
gRPC calls and parsed with prometheus_client's own parser, and must count
exactly the calls made and at least the bytes moved.
"""

from __future__ import annotations

import os
import signal
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.grpc_daemon import Daemon, free_port, scratch_dir
from tests.notify_socket import NotifySocket
from tvixmount.server import health
from tvixmount.store import StoreUrls, open_store


def test_ready_once_serving_watchdog_then_stopping(monkeypatch):
    with NotifySocket(abstract=True) as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        daemon = Daemon(scratch_dir("tvx-sd-")).launch()
        try:
            ready = notify.wait_for("READY=1")
            assert daemon.listen in ready["STATUS"]
            # Serving the moment systemd hears it: no retry, no wait.
            with grpc.insecure_channel("unix:" + daemon.listen) as channel:
                assert health.check(channel, timeout=2) == health.SERVING
            for _ in range(2):
                notify.wait_for("WATCHDOG=1", timeout=5)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = notify.wait_for("STOPPING=1", timeout=10)
            assert "served" in stopping["STATUS"]
            assert daemon.proc.wait(20) == 0
        finally:
            daemon.stop()
        assert notify.count("READY=1") == 1


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_calls_errors_bytes_and_latency():
    port = free_port()
    daemon = Daemon(scratch_dir("tvx-mx-"), "--metrics-listen", f"127.0.0.1:{port}").start()
    try:
        data = os.urandom(300_000)
        with open_store(StoreUrls.single(daemon.url)) as store:
            digest = store.blobs.put(data)
            reader = store.blobs.open_read(digest)
            assert reader.pread(0, len(data)) == data
            reader.close()
            assert store.blobs.stat(bytes(32)) is None  # Stat of a missing blob: NOT_FOUND
            assert store.path_infos.get(bytes(20)) is None
        samples = _scrape(port)
    finally:
        daemon.stop()
    put, read = "BlobService/Put", "BlobService/Read"
    assert _get(samples, "tvixstore_rpc_requests_total", method=put) == 1
    assert _get(samples, "tvixstore_rpc_requests_total", method=read) >= 1
    assert len(data) <= _get(samples, "tvixstore_rpc_received_bytes_total", method=put) < len(data) + 1000
    assert len(data) <= _get(samples, "tvixstore_rpc_sent_bytes_total", method=read) < len(data) + 1000
    for method in (put, read, "BlobService/Stat", "PathInfoService/Get"):
        calls = _get(samples, "tvixstore_rpc_requests_total", method=method)
        assert _get(samples, "tvixstore_rpc_seconds_count", method=method) == calls > 0, method
    errors = {labels: v for (name, labels), v in samples.items() if name == "tvixstore_rpc_errors_total"}
    assert errors == {(("code", "NOT_FOUND"), ("method", "BlobService/Stat")): 1.0,
                      (("code", "NOT_FOUND"), ("method", "PathInfoService/Get")): 1.0}, errors
    assert not any(dict(labels).get("method", "").startswith("Health") for labels in errors)
    info = [labels for (name, labels), _ in samples.items() if name == "tvixstore_build_info"]
    assert info and dict(info[0])["version"] and dict(info[0])["python"]
    assert _get(samples, "process_resident_memory_bytes") > 0


def test_a_taken_metrics_port_fails_the_start(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(scratch_dir("tvx-mx-"), "--metrics-listen", f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="exited with 1"):
            daemon.start()
        assert "cannot listen" in daemon.log()
