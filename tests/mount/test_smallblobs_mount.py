"""Small files in batches through real mounts: ``tar`` of a tree of many small files gives the
source's bytes (embedded store and gRPC daemon), a corrupt blob in a batch is EIO for its file
only, and a worker killed while it holds batches costs no read."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.embedded_layout import flip_byte, stored_at
from tests.faults import stats, workers
from tests.grpc_daemon import Daemon, scratch_dir
from tests.mounting import FUSE_MISSING, Mount
from tvixmount.admin.ingest import Ingester
from tvixmount.store import StoreUrls

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

NAME = "smalls-1.0"


def _make_tree(root: Path) -> dict[str, bytes]:
    """Nested directories of small files (some shared), a few bigger ones and a symlink."""
    expected: dict[str, bytes] = {}
    for d in range(4):
        for sub in ("", "inner/", "inner/deeper/"):
            where = root / f"d{d}" / sub
            where.mkdir(parents=True, exist_ok=True)
            for i in range(40):
                size = (i * 997 + d * 131) % 20_000 + 1
                data = os.urandom(size) if i % 10 else b"shared %d\n" % i
                rel = f"d{d}/{sub}f{i:03d}"
                (root / rel).write_bytes(data)
                expected[rel] = data
    for i in range(3):
        data = os.urandom(200_000 + i)
        (root / f"big{i}").write_bytes(data)
        expected[f"big{i}"] = data
    (root / "link").symlink_to("d0/f001")
    return expected


def _tar_and_compare(mounted: Path, source: Path, out: Path) -> None:
    """tar the mounted tree into a pipe, unpack it, and compare every file with the source."""
    out.mkdir()
    packed = subprocess.run(["tar", "cf", "-", "-C", str(mounted), "."], capture_output=True, timeout=120)
    assert packed.returncode == 0, packed.stderr.decode()
    subprocess.run(["tar", "xf", "-", "-C", str(out)], input=packed.stdout, check=True, timeout=120)
    found = 0
    for dirpath, _dirs, files in os.walk(source):
        for f in files:
            src = Path(dirpath) / f
            rel = src.relative_to(source)
            copy = out / rel
            if src.is_symlink():
                assert os.readlink(copy) == os.readlink(src)
            else:
                assert copy.read_bytes() == src.read_bytes(), rel
            found += 1
    assert found == sum(1 for _ in source.rglob("*") if not _.is_dir())


@pytest.fixture
def tree(tmp_path: Path, local_store) -> tuple[Path, str, dict[str, bytes]]:
    """(source directory, its store path's basename, file contents by relative path)."""
    source = tmp_path / "src" / NAME
    expected = _make_tree(source)
    imported = Ingester(local_store).import_path(source)
    return source, os.fsdecode(imported.store_path.basename), expected


def test_tar_of_many_small_files_on_the_embedded_store(mount, tree, tmp_path):
    source, name, _ = tree
    m = mount("--small-batches", "2")
    _tar_and_compare(m.path(name), source, tmp_path / "out")
    small = stats(m.mountpoint)["small_blobs"]
    files = 4 * 3 * 40
    assert small["hits"] >= files * 0.9, small
    assert small["batches"] <= files / 8, small  # many files per request
    assert small["failed"] == 0 and small["cached_bytes"] <= small["capacity"]


@contextlib.contextmanager
def _over_grpc(store_dir: Path, tmp_path: Path, *daemon_args: str) -> Iterator[tuple[Mount, dict[str, str]]]:
    """A mount of a daemon serving ``store_dir``; the dict gets the daemon's log once both stopped."""
    root = scratch_dir("tvx-small-")
    daemon = Daemon(root, "--read-only", *daemon_args, store_urls=StoreUrls.embedded(store_dir)).start()
    logs: dict[str, str] = {}
    try:
        m = Mount(tmp_path / "mnt", None, "--small-batches", "2", urls=(daemon.url,) * 3).start()
        try:
            yield m, logs
        finally:
            assert m.stop() == 0
    finally:
        daemon.stop()
        logs["daemon"] = daemon.log()
        shutil.rmtree(root, ignore_errors=True)


def _read_all_but_one(base: Path, expected: dict[str, bytes], prefix: str, victim: str) -> None:
    """Every file under ``prefix`` reads as expected, except ``victim``, which is EIO."""
    for rel in sorted(k for k in expected if k.startswith(prefix)):
        if rel == victim:
            with pytest.raises(OSError) as failed:
                (base / rel).read_bytes()
            assert failed.value.errno == errno.EIO
        else:
            assert (base / rel).read_bytes() == expected[rel], rel


@pytest.mark.parametrize("extension", [True, False], ids=["batch-service", "tvix-services-only"])
def test_tar_over_grpc_from_a_daemon(tree, store_dir, tmp_path, extension):
    """With our BlobBatchService a batch is one call; without it (as a tvix-store) one Read per blob."""
    source, name, _ = tree
    with _over_grpc(store_dir, tmp_path, *(() if extension else ("--no-blob-batch",))) as (m, logs):
        _tar_and_compare(m.mountpoint / name, source, tmp_path / "out")
        small = stats(m.mountpoint)["small_blobs"]
        assert small["hits"] >= 4 * 3 * 40 * 0.9 and small["failed"] == 0, small
    batch_calls = logs["daemon"].count("batch Read of ")
    blob_reads = logs["daemon"].count("Read b3:")
    fallbacks = m.log().count("has no batch read")
    if extension:
        assert batch_calls >= 4 and fallbacks == 0, (batch_calls, fallbacks)
        assert blob_reads < small["batches"], (blob_reads, small)  # the small files came in batches
    else:
        assert batch_calls == 0 and blob_reads >= 4 * 3 * 40 * 0.9, (batch_calls, blob_reads)
        assert 1 <= fallbacks <= 2, m.log()  # once per worker's channel (2 workers)


def test_a_corrupt_blob_over_grpc_fails_its_file_only(tree, store_dir, tmp_path):
    """The daemon's batch answers a blob its store cannot verify with an error for that blob alone."""
    _source, name, expected = tree
    victim = "d2/inner/deeper/f013"
    _damage(store_dir, expected, victim, "d2/inner/deeper/f012")
    with _over_grpc(store_dir, tmp_path) as (m, logs):
        _read_all_but_one(m.mountpoint / name, expected, "d2/", victim)
        small = stats(m.mountpoint)["small_blobs"]
        assert small["failed"] == 1 and small["hits"] >= 100, small
    assert logs["daemon"].count("batch Read of ") >= 2


def _damage(store_dir: Path, expected: dict[str, bytes], victim: str, neighbour: str) -> None:
    """Flip a byte in the middle of ``victim``'s blob, which shares a pack with ``neighbour``'s.

    The neighbours of a damaged blob in its batch share its pack, so the damage
    sits next to bytes that must still be served.
    """
    digest = blake3.blake3(expected[victim]).digest()
    path, _, size = stored_at(store_dir, digest)
    beside = blake3.blake3(expected[neighbour]).digest()
    assert path.parent.name == "packs" and stored_at(store_dir, beside)[0] == path
    flip_byte(store_dir, digest, size // 2)


def test_a_corrupt_blob_in_a_batch_fails_its_file_only(mount, tree, store_dir):
    _source, name, expected = tree
    victim = "d1/inner/f007"
    _damage(store_dir, expected, victim, "d1/inner/f006")
    m = mount("--small-batches", "2", expect_errors=True)
    _read_all_but_one(m.path(name), expected, "d1/", victim)
    small = stats(m.mountpoint)["small_blobs"]
    assert small["failed"] == 1 and small["hits"] >= 100, small


def _worker_holding_a_batch(m: Mount, within: float = 20.0) -> int | None:
    """The pid of a worker busy while a batch is in flight (it holds the batch, or a read)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        now = stats(m.mountpoint)
        busy = [int(w) for w, s in now["fetcher"]["workers"].items() if s["inflight"] >= 1]
        if now["small_blobs"]["in_flight"] >= 1 and busy:
            return workers(m)[busy[0]]
        time.sleep(0.005)
    return None


def test_a_worker_killed_while_it_holds_batches_costs_no_read(tree, store_dir, tmp_path):
    """Batches are slow here (the daemon adds 50 ms per call, 8 streams at once); one worker is
    killed while a reader goes through the tree: every file still reads right."""
    _source, name, expected = tree
    root = scratch_dir("tvx-small-kill-")
    daemon = Daemon(root, "--read-only", "--added-latency", "0.05",
                    store_urls=StoreUrls.embedded(store_dir)).start()
    m = Mount(tmp_path / "mnt", None, "--small-batches", "2", urls=(daemon.url,) * 3).start()
    try:
        base = m.mountpoint / name
        names = sorted(expected)
        killed = threading.Event()

        def kill_soon() -> None:
            pid = _worker_holding_a_batch(m)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.set()

        killer = threading.Thread(target=kill_soon)
        killer.start()
        for rel in names:
            assert (base / rel).read_bytes() == expected[rel], rel
        killer.join()
        assert killed.is_set()
        pool = stats(m.mountpoint)["fetcher"]
        assert pool["restarts"] >= 1 and pool["resent"] >= 1 and pool["lost"] == 0, pool
    finally:
        assert m.stop() == 0
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_worker_stopped_while_it_holds_a_batch_delays_its_files_one_second_at_most(tree, store_dir,
                                                                                      tmp_path):
    """A worker frozen (SIGSTOP) with a batch on it: the reads waiting for that batch give up
    after the pool's stall time and ask a worker that answers; none waits for the hang kill."""
    _source, name, expected = tree
    root = scratch_dir("tvx-small-stop-")
    daemon = Daemon(root, "--read-only", "--added-latency", "0.05",
                    store_urls=StoreUrls.embedded(store_dir)).start()
    m = Mount(tmp_path / "mnt", None, "--small-batches", "2", "--request-timeout", "20",
              urls=(daemon.url,) * 3).start()
    frozen: list[int] = []
    try:
        base = m.mountpoint / name
        names = sorted(expected)

        def freeze_soon() -> None:
            pid = _worker_holding_a_batch(m)
            if pid is not None:
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)

        freezer = threading.Thread(target=freeze_soon)
        freezer.start()
        slowest = 0.0
        for rel in names:
            started = time.monotonic()
            assert (base / rel).read_bytes() == expected[rel], rel
            slowest = max(slowest, time.monotonic() - started)
        freezer.join()
        assert frozen, "no batch was ever in flight"
        # the hang kill comes at half the 20 s deadline: a read that waited for it took >= 10 s
        assert slowest < 4.0, slowest
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert m.stop() == 0
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
