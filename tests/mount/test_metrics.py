"""Mount metrics: /metrics (Prometheus text) and the stats xattr count what really happened.

The mount tests read known files from a real mount, then scrape the real
HTTP endpoint and parse it with prometheus_client's own parser: the bytes
read must equal the bytes the files hold, each op's histogram count must
equal its counter, a killed worker must show as one restart. The CLI tests
check that a bad --metrics-listen and a busy port fail before anything is
mounted.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import llfuse
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fs_fixtures import (
    BLOB_B,
    BLOB_B_NAME,
    DIRECTORY_COMPLICATED_NAME,
    HELLOWORLD,
    HELLOWORLD_BLOB_NAME,
    Populate,
)
from tests.mounting import FUSE_MISSING, Mount, is_mounted
from tvixmount.fuse_timing import timed
from tvixmount.metrics import (
    LATENCY_BUCKETS,
    TIMED_OPS,
    FuseMetrics,
    MountStats,
    exported,
    parse_listen,
    quantile,
)
from tvixmount.metrics_export import MountCollector
from tvixmount.poolstate import PoolStats, WorkerStats
from tvixmount.readahead import ReadaheadStats, TreeAheadStats
from tvixmount.segcache import SegmentCacheStats
from tvixmount.smallblobs import SmallBlobStats
from tvixmount.vfs import VfsStats

# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("9100", "127.0.0.1", 9100),
    (":9100", "127.0.0.1", 9100),
    ("0.0.0.0:80", "0.0.0.0", 80),
    ("[::1]:0", "::1", 0),
    ("metrics.example:65535", "metrics.example", 65535),
])
def test_parse_listen(text, host, port):
    address = parse_listen(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize(("text", "said"), [
    ("", "port must be a number"),
    ("host:", "port must be a number"),
    (":65536", "0 to 65535"),
    ("::1:9100", "brackets"),
    ("[]:9100", "empty IPv6"),
    ("host:-1", "port must be a number"),
])
def test_parse_listen_refuses(text, said):
    with pytest.raises(ValueError, match=said):
        parse_listen(text)


def test_quantile_interpolates_inside_the_bucket():
    # 10 samples <= 1 ms, 10 more in (1 ms, 2 ms], none above.
    cumulative = [(0.001, 10), (0.002, 20), (math.inf, 20)]
    assert quantile(0.5, cumulative) == pytest.approx(0.001)
    assert quantile(0.75, cumulative) == pytest.approx(0.0015)
    assert quantile(0.99, cumulative) == pytest.approx(0.00198)
    assert quantile(0.5, [(0.001, 0), (math.inf, 0)]) is None
    # Beyond the last finite bound all that is known is "more than that".
    assert quantile(0.99, [(0.001, 1), (math.inf, 100)]) == 0.001


def test_latency_buckets_hold_upper_bounds():
    metrics = FuseMetrics()
    for seconds in (50e-6, 51e-6, 0.003, 0.003, 11.0):
        metrics.done("read", seconds)
    cumulative = dict(metrics.latency["read"].cumulative())
    assert (cumulative[50e-6], cumulative[100e-6], cumulative[2.5e-3], cumulative[5e-3]) == (1, 2, 2, 4)
    assert (cumulative[10.0], cumulative[math.inf]) == (4, 5)
    summary = metrics.summary()
    assert summary["ops"] == {"lookup": 0, "readdir": 0, "open": 0, "read": 5}
    assert summary["latency"]["read"]["count"] == 5
    assert summary["latency"]["read"]["sum_s"] == pytest.approx(11.006101)
    assert summary["latency"]["read"]["p50_s"] == pytest.approx(0.003125)  # rank 2.5 of 2..4 in (2.5, 5] ms
    assert summary["latency"]["lookup"] == {"count": 0, "sum_s": 0.0, "p50_s": None, "p99_s": None}


class _Handlers:
    """Two handlers timed as TvixOperations' are, with the errno a FUSE reply would carry."""

    def __init__(self) -> None:
        self.metrics = FuseMetrics()

    @timed("read", counts_bytes=True)
    def read(self, size: int) -> bytes:
        if size < 0:
            raise llfuse.FUSEError(errno.EIO)
        return bytes(size)

    @timed("readdir")
    def readdir(self, names: list[str]):
        for name in names:
            if not name:
                raise llfuse.FUSEError(errno.ENOENT)
            yield name


def test_timed_counts_ops_errnos_and_read_bytes():
    h = _Handlers()
    assert h.read(10) == bytes(10)
    with pytest.raises(llfuse.FUSEError):
        h.read(-1)
    assert list(h.readdir(["a", "b"])) == ["a", "b"]
    with pytest.raises(llfuse.FUSEError):
        list(h.readdir(["a", ""]))
    summary = h.metrics.summary()
    assert summary["ops"] == {"lookup": 0, "readdir": 2, "open": 0, "read": 2}
    assert summary["errors"] == {"read": {"EIO": 1}, "readdir": {"ENOENT": 1}}
    assert summary["read_bytes"] == 10  # a failed read returned nothing


def _mount_stats(metrics: FuseMetrics) -> MountStats:
    pool = PoolStats(workers={0: WorkerStats(pid=11, ready=True, inflight=2, restarts=1),
                              1: WorkerStats(pid=None, ready=False, inflight=0, restarts=3)},
                     state="running", requests=7, restarts=4, failures=1, backlog=5, lanes=20)
    return MountStats(fuse=metrics.snapshot(), vfs=VfsStats(inodes=3), fetcher=pool,
                      readahead=ReadaheadStats(hits=6, waited=3, pending=2),
                      tree_ahead=TreeAheadStats(fetched=9), small_blobs=SmallBlobStats(hits=12, capacity=64),
                      open_files=1, open_dirs=2,
                      segment_cache=SegmentCacheStats(size=1 << 20, slots=4, hits=5))


# What /metrics promises an operator's dashboards: every family's name and type.
SCRAPED = {
    "tvixmount_fuse_op_seconds": "histogram", "tvixmount_fuse_ops": "counter",
    "tvixmount_fuse_errors": "counter", "tvixmount_read_bytes": "counter",
    "tvixmount_cache_hits": "counter", "tvixmount_cache_misses": "counter",
    "tvixmount_open_files": "gauge", "tvixmount_open_dirs": "gauge",
    **{f"tvixmount_vfs_{k}": "gauge" for k in ("inodes", "listings", "listed_entries", "root_names")},
    **{f"tvixmount_pool_{k}": "counter"
       for k in ("requests", "errors", "timeouts", "lost", "resent", "killed", "ring_replies", "ring_bytes",
                 "own_replies", "lane_replies", "lanes_given_up")},
    "tvixmount_worker_restarts": "counter", "tvixmount_pool_backlog": "gauge",
    "tvixmount_pool_lanes": "gauge",
    "tvixmount_pool_workers_ready": "gauge", "tvixmount_pool_inflight": "gauge",
    **{f"tvixmount_readahead_{k}": "counter"
       for k in ("scheduled", "fetched", "failed", "hits", "waited", "evicted")},
    "tvixmount_readahead_cached_bytes": "gauge", "tvixmount_tree_ahead_fetched": "counter",
    **{f"tvixmount_small_blobs_{k}": "counter"
       for k in ("batches", "fetched", "failed", "hits", "waited", "misses", "evicted")},
    "tvixmount_small_blobs_cached_bytes": "gauge", "tvixmount_small_blobs_capacity": "gauge",
    "tvixmount_segment_cache_size": "gauge", "tvixmount_segment_cache_slots": "gauge",
    "tvixmount_segment_cache_stream_slots": "gauge",
    **{f"tvixmount_segment_cache_{k}": "counter" for k in ("hits", "misses", "torn")},
}


def test_scrape_exports_the_declared_fields_under_their_promised_names():
    metrics = FuseMetrics()
    metrics.done("read", 0.001)
    stats = _mount_stats(metrics)
    families = list(MountCollector(metrics, lambda: stats).collect())
    assert {f.name: f.type for f in families} == SCRAPED
    assert len(families) == len(SCRAPED)  # no name twice
    values = {s.name: s.value for f in families for s in f.samples if not s.labels}
    assert values["tvixmount_pool_requests_total"] == 7
    assert values["tvixmount_worker_restarts_total"] == 4
    assert values["tvixmount_pool_backlog"] == 5
    assert values["tvixmount_pool_lanes"] == 20
    assert values["tvixmount_pool_workers_ready"] == 1
    assert values["tvixmount_pool_inflight"] == 2
    assert values["tvixmount_readahead_hits_total"] == 6
    assert values["tvixmount_tree_ahead_fetched_total"] == 9
    assert values["tvixmount_small_blobs_hits_total"] == 12
    assert values["tvixmount_segment_cache_hits_total"] == 5
    assert values["tvixmount_vfs_inodes"] == 3
    assert (values["tvixmount_open_files"], values["tvixmount_open_dirs"]) == (1, 2)
    helps = {f.name: f.documentation for f in families}
    assert helps["tvixmount_pool_killed"] == "workers killed as hung"
    assert all(helps.values())


def test_stats_json_keys_are_the_dataclass_fields():
    shown = json.loads(json.dumps(_mount_stats(FuseMetrics()).as_json(), sort_keys=True))
    assert set(shown) == {"ops", "errors", "read_bytes", "cache", "latency", "vfs", "open_files", "open_dirs",
                          "fetcher", "readahead", "tree_ahead", "small_blobs", "segment_cache"}
    assert shown["fetcher"]["workers"] == {
        "0": {"pid": 11, "ready": True, "inflight": 2, "restarts": 1},
        "1": {"pid": None, "ready": False, "inflight": 0, "restarts": 3}}
    assert shown["fetcher"]["restarts"] == 4 and shown["fetcher"]["state"] == "running"
    # Fields /metrics leaves out are still in the xattr.
    assert shown["readahead"]["pending"] == 2 and shown["fetcher"]["failures"] == 1
    assert shown["tree_ahead"] == {"scheduled": 0, "fetched": 9, "failed": 0}
    assert shown["cache"]["listing"] == {"hits": 0, "misses": 0}
    assert shown["segment_cache"] == {"size": 1 << 20, "slots": 4, "stream_slots": 0, "hits": 5, "misses": 0,
                                     "torn": 0}
    assert exported(next(f for f in fields(ReadaheadStats) if f.name == "pending")) is None


# -- a real mount ------------------------------------------------------------------------

mount_only = pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")
METRICS_AT = re.compile(r"metrics on http://(\S+)/metrics")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def metrics_url(m: Mount) -> str:
    """The endpoint the mount logged. Waits for the line: log records reach the file through
    multiprocessing-logging's queue, so the mount can be up before its earlier lines are written."""
    deadline = time.monotonic() + 10
    while (found := METRICS_AT.search(m.log())) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert found, f"no 'metrics on' line in the log:\n{m.log()[-2000:]}"
    return f"http://{found.group(1)}/metrics"


def xattr_stats(mountpoint: Path) -> dict:
    """What ``getfattr -n user.tvixmount.stats --only-values MNT`` prints, as the operator runs it."""
    out = subprocess.run(["getfattr", "-n", "user.tvixmount.stats", "--only-values", str(mountpoint)],
                         capture_output=True, check=True, timeout=10).stdout
    return json.loads(out)


@mount_only
@pytest.mark.mount
def test_metrics_count_what_was_read(local_store, mount):
    fixtures = Populate(local_store)
    fixtures.helloworld()
    fixtures.blob_b()
    fixtures.directory_complicated()
    m = mount("--metrics-listen", "127.0.0.1:0")
    url = metrics_url(m)
    before = scrape(url)
    assert metric(before, "tvixmount_read_bytes_total") == 0
    from tvixmount import __version__
    assert metric(before, "tvixmount_build_info", version=__version__, python=platform.python_version()) == 1
    assert metric(before, "process_resident_memory_bytes") > 0 and metric(before, "process_open_fds") > 0
    assert metric(before, "tvixmount_fuse_ops_total", op="read") == 0

    assert m.path(HELLOWORLD_BLOB_NAME).read_bytes() == HELLOWORLD
    assert m.path(BLOB_B_NAME).read_bytes() == BLOB_B
    assert sorted(os.listdir(m.path(DIRECTORY_COMPLICATED_NAME))) == [".keep", "aa", "keep"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.path(DIRECTORY_COMPLICATED_NAME, "missing"))

    after = scrape(url)
    assert metric(after, "tvixmount_read_bytes_total") == len(HELLOWORLD) + len(BLOB_B)
    reads = metric(after, "tvixmount_fuse_ops_total", op="read")
    assert reads >= 2  # at least one per file; BLOB_B (1 MiB) takes several
    for op in TIMED_OPS:
        count = metric(after, "tvixmount_fuse_ops_total", op=op)
        assert metric(after, "tvixmount_fuse_op_seconds_count", op=op) == count
        assert metric(after, "tvixmount_fuse_op_seconds_bucket", op=op, le="+Inf") == count
    assert metric(after, "tvixmount_fuse_ops_total", op="lookup") >= 4  # three names and a missing one
    assert metric(after, "tvixmount_fuse_ops_total", op="open") == 2
    assert metric(after, "tvixmount_fuse_ops_total", op="readdir") >= 1
    assert metric(after, "tvixmount_fuse_op_seconds_sum", op="read") > 0
    assert metric(after, "tvixmount_fuse_errors_total", op="lookup", errno="ENOENT") == 1
    # Two store paths the kernel had not seen, one directory listed once and then cached.
    assert metric(after, "tvixmount_cache_misses_total", cache="root_name") == 3
    assert metric(after, "tvixmount_cache_misses_total", cache="listing") == 1
    assert metric(after, "tvixmount_cache_hits_total", cache="listing") >= 1
    assert metric(after, "tvixmount_pool_requests_total") > metric(before, "tvixmount_pool_requests_total")
    assert metric(after, "tvixmount_pool_timeouts_total") == 0
    assert metric(after, "tvixmount_pool_lanes") >= 12  # 2 x (threads + readahead files) + 4
    assert metric(after, "tvixmount_pool_lane_replies_total") >= 1  # the reads came on their lanes
    assert metric(after, "tvixmount_pool_workers_ready") == 2
    assert metric(after, "tvixmount_vfs_inodes") >= 3

    stats = xattr_stats(m.mountpoint)
    assert stats["read_bytes"] == len(HELLOWORLD) + len(BLOB_B)
    assert stats["ops"]["read"] == reads
    assert stats["errors"] == {"lookup": {"ENOENT": 1}}
    assert stats["cache"]["listing"]["misses"] == 1
    read = stats["latency"]["read"]
    assert read["count"] == reads
    assert 0 < read["p50_s"] <= read["p99_s"] <= LATENCY_BUCKETS[-1]
    assert read["sum_s"] == pytest.approx(metric(after, "tvixmount_fuse_op_seconds_sum", op="read"),
                                          abs=1e-5)


@mount_only
@pytest.mark.mount
def test_a_killed_worker_counts_one_restart(local_store, mount):
    Populate(local_store).helloworld()
    m = mount("--metrics-listen", ":0")
    url = metrics_url(m)
    assert "127.0.0.1:" in url  # no host means loopback
    victim = xattr_stats(m.mountpoint)["fetcher"]["workers"]["0"]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (restarts := metric(scrape(url), "tvixmount_worker_restarts_total")) < 1:
        assert time.monotonic() < deadline, "the restart never showed in /metrics"
        time.sleep(0.05)
    assert restarts == 1
    assert m.path(HELLOWORLD_BLOB_NAME).read_bytes() == HELLOWORLD
    assert xattr_stats(m.mountpoint)["fetcher"]["restarts"] == 1


def run_cli(mountpoint: Path, store_dir: Path, *args: str) -> subprocess.CompletedProcess:
    mountpoint.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "tvixmount.cli", str(mountpoint), "--store-dir",
                           str(store_dir), "--workers", "1", *args],
                          capture_output=True, text=True, timeout=30)


def test_bad_metrics_listen_is_a_usage_error(tmp_path, store_dir):
    result = run_cli(tmp_path / "mnt", store_dir, "--metrics-listen", "localhost:http")
    assert result.returncode == 2
    assert ("argument --metrics-listen: 'localhost:http': the port must be a number from 0 to 65535"
            in result.stderr)


@mount_only
@pytest.mark.mount
def test_busy_metrics_port_fails_with_nothing_mounted(tmp_path, local_store, store_dir):
    Populate(local_store).helloworld()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mountpoint = tmp_path / "mnt"
        started = time.monotonic()
        result = run_cli(mountpoint, store_dir, "--metrics-listen", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert f"tvixmount: error: --metrics-listen 127.0.0.1:{port}: cannot listen: Address already in use" \
        in result.stderr
    assert time.monotonic() - started < 20
    assert not is_mounted(mountpoint)
    assert list(mountpoint.iterdir()) == []
    assert "Traceback" not in result.stderr
