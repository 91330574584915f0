"""The on-disk blob cache (tvixmount/store/cache/) over memory://, in two processes, and
in front of a real daemon that is stopped once the cache is warm.

"Served from the cache" is shown by taking the blob away from the inner
store (``memory.reset()``, or stopping the daemon) and reading it again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store_suite import pattern
from tvixmount.castore.nodes import b3_text
from tvixmount.errors import InvalidArgument, NotFound, Unavailable
from tvixmount.store import BlobCacheConfig, StoreUrls, describe, memory, open_store
from tvixmount.store.cache.service import CachedBlobReader, CachingBlobService, FillingBlobReader
from tvixmount.store.memory import MemoryBlobService
from tvixmount.store.segments import SEGMENT

READ = 128 * 1024
MiB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_memory() -> Iterator[None]:
    memory.reset()
    yield
    memory.reset()


def cache(directory: Path, max_bytes: int = 64 * MiB, **kwargs) -> CachingBlobService:
    return CachingBlobService(MemoryBlobService(), directory, max_bytes, **kwargs)


def read_all(reader, step: int = READ) -> bytes:
    parts = []
    for offset in range(0, reader.size, step):
        parts.append(reader.pread(offset, step))
    return b"".join(parts)


def blob_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "blobs").rglob("*") if p.is_file())


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_second_open_and_restart_are_served_from_disk(tmp_path: Path) -> None:
    data = pattern(3 * SEGMENT + 5)
    service = cache(tmp_path / "c")
    digest = service.put(data)
    with service.open_read(digest) as reader:  # miss: filled whole on open
        assert isinstance(reader, CachedBlobReader)
        assert reader.pread(SEGMENT - 3, 10) == data[SEGMENT - 3 : SEGMENT + 7]
    memory.reset()  # the inner store forgets the blob: only the cache has it now
    with service.open_read(digest) as reader:
        assert read_all(reader) == data
    assert service.stat(digest).size == len(data)
    counts = service.stats()
    assert (counts["misses"], counts["hits"], counts["fills"]) == (1, 1, 1)
    assert (counts["entries"], counts["bytes"], counts["bytes_filled"]) == (1, len(data), len(data))
    service.close()

    restarted = cache(tmp_path / "c")  # a remount: new process state, same directory
    with restarted.open_read(digest) as reader:
        assert read_all(reader, 100_000) == data
        assert reader.pread(len(data) - 2, 10) == data[-2:]
        assert reader.pread(len(data), 10) == b""
    assert restarted.stats()["hits"] == 1
    with pytest.raises(NotFound):  # uncached and gone from the store: the store's answer
        restarted.open_read(b"\1" * 32)
    restarted.close()


def test_big_blob_is_cached_by_reading_it_in_order_not_by_a_random_read(tmp_path: Path) -> None:
    data = pattern(3 * MiB + 17, seed=1)
    service = cache(tmp_path / "c", fill_on_open_max=MiB)
    digest = service.put(data)
    with service.open_read(digest) as reader:  # one random read: passed through, nothing kept
        assert isinstance(reader, FillingBlobReader)
        assert reader.pread(2 * MiB, READ) == data[2 * MiB : 2 * MiB + READ]
    assert service.stats()["entries"] == 0
    assert not list((tmp_path / "c" / "tmp").iterdir()), "an abandoned fill left its temp file"

    with service.open_read(digest) as reader:  # in order, with readahead-like reordering
        offsets = list(range(0, len(data), READ))
        for i in range(0, len(offsets) - 1, 2):
            offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
        for offset in [0, *offsets]:
            assert reader.pread(offset, READ) == data[offset : offset + READ]
    assert service.stats()["fills"] == 1
    memory.reset()
    with service.open_read(digest) as reader:
        assert isinstance(reader, CachedBlobReader)
        assert read_all(reader) == data
    service.close()


def test_flipped_bit_is_detected_served_right_and_refilled(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    data = pattern(4 * SEGMENT, seed=2)
    service = cache(tmp_path / "c")
    digest = service.put(data)
    service.open_read(digest).close()
    [path] = blob_files(tmp_path / "c")
    flip_bit(path, 2 * SEGMENT + 1000)  # in the third segment

    with caplog.at_level(logging.WARNING, logger="tvixmount.store.cache"):
        reader = service.open_read(digest)
        assert reader.pread(0, READ) == data[:READ]  # an intact segment is still served from disk
        assert reader.pread(2 * SEGMENT, 2 * READ) == data[2 * SEGMENT : 2 * SEGMENT + 2 * READ]
        assert read_all(reader) == data
        reader.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and b3_text(digest) in warnings[0].getMessage()
    assert "segment 2" in warnings[0].getMessage()
    assert service.stats()["verify_failures"] == 1
    assert not path.exists() and service.stats()["entries"] == 0

    with service.open_read(digest) as reader:  # the next open fills it again
        assert read_all(reader) == data
    memory.reset()
    with service.open_read(digest) as reader:
        assert read_all(reader) == data
    assert service.stats()["verify_failures"] == 1
    service.close()


def _cached_with_segment_1_flipped(directory: Path, data: bytes) -> tuple[CachingBlobService, bytes]:
    """A cache holding ``data`` (read once, so it is on disk) with a bit of its second segment flipped."""
    service = cache(directory)
    digest = service.put(data)
    service.open_read(digest).close()
    flip_bit(blob_files(directory)[0], SEGMENT + 7)
    return service, digest


def test_pread_into_a_flipped_bit_is_served_right_from_the_store(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Workers read into their shared ring (pread_into): the same check and fallback as pread."""
    data = pattern(3 * SEGMENT, seed=5)
    service, digest = _cached_with_segment_1_flipped(tmp_path / "c", data)
    with caplog.at_level(logging.WARNING, logger="tvixmount.store.cache"), \
            service.open_read(digest) as reader:
        assert isinstance(reader, CachedBlobReader)
        buf = bytearray(2 * READ)
        assert reader.pread_into(0, memoryview(buf)) == 2 * READ and bytes(buf) == data[: 2 * READ]
        assert reader.pread_into(SEGMENT, memoryview(buf)) == 2 * READ
        assert bytes(buf) == data[SEGMENT : SEGMENT + 2 * READ]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "segment 1" in warnings[0].getMessage()
    service.close()


def test_truncated_or_missing_file_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small, other = pattern(1000, seed=3), pattern(2000, seed=4)
    service = cache(tmp_path / "c")
    small_digest, other_digest = service.put(small), service.put(other)
    service.open_read(small_digest).close()
    service.open_read(other_digest).close()
    small_path, other_path = service.index.path_for(small_digest), service.index.path_for(other_digest)
    os.truncate(small_path, 999)
    other_path.unlink()
    with caplog.at_level(logging.WARNING, logger="tvixmount.store.cache"):
        with service.open_read(small_digest) as reader:
            assert reader.pread(0, 5000) == small
        with service.open_read(other_digest) as reader:
            assert reader.pread(0, 5000) == other
    assert [b3_text(small_digest) in r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING] == [True]
    assert service.stats()["misses"] == 4
    assert service.stats()["entries"] == 2  # both filled again
    service.close()


def test_least_recently_used_blobs_are_evicted(tmp_path: Path) -> None:
    service = cache(tmp_path / "c", max_bytes=MiB, fill_on_open_max=MiB, touch_interval=0)
    blobs = {name: pattern(300 * 1024, seed=10 + i) for i, name in enumerate("abcd")}
    digests = {name: service.put(data) for name, data in blobs.items()}
    for name in "abc":
        service.open_read(digests[name]).close()
    service.open_read(digests["a"]).close()  # a hit: "a" is now newer than "b" and "c"
    service.open_read(digests["d"]).close()  # 4 x 300 KiB > 1 MiB: "b" must go, down to 90 %
    counts = service.stats()
    assert (counts["evictions"], counts["evicted_bytes"], counts["entries"]) == (1, 300 * 1024, 3)
    assert counts["bytes"] == 3 * 300 * 1024 <= MiB
    assert not service.index.path_for(digests["b"]).exists()
    assert len(blob_files(tmp_path / "c")) == 3
    assert not list((tmp_path / "c" / "tmp").iterdir())
    memory.reset()
    for name in "acd":
        with service.open_read(digests[name]) as reader:
            assert read_all(reader) == blobs[name]
    with pytest.raises(NotFound):
        service.open_read(digests["b"])

    huge = service.put(pattern(600 * 1024, seed=20))  # more than half the cache: never cached
    service.open_read(huge).close()
    assert service.stats()["not_cached"] == 1 and service.stats()["entries"] == 3
    service.close()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_full_disk_while_filling_serves_from_the_store(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    small_disk = tmp_path / "small"
    if not _tmpfs(small_disk, "1m"):
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        service = cache(small_disk / "c", max_bytes=64 * MiB, fill_on_open_max=8 * MiB)
        data = pattern(2 * MiB, seed=5)
        digest = service.put(data)
        with caplog.at_level(logging.WARNING, logger="tvixmount.store.cache"):
            with service.open_read(digest) as reader:
                assert read_all(reader) == data
            with service.open_read(digest) as reader:  # again: still right, one warning a minute
                assert read_all(reader) == data
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "out of space" in warnings[0] and b3_text(digest) in warnings[0]
        assert service.stats()["fill_errors"] == 2 and service.stats()["entries"] == 0
        assert not list((small_disk / "c" / "tmp").iterdir()), "a failed fill left its temp file"
        service.close()
    finally:
        subprocess.run(["umount", "-l", str(small_disk)], check=False)


def test_unusable_cache_directory_is_a_clear_error_at_open(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    for where in (not_a_dir, not_a_dir / "below"):
        with pytest.raises(InvalidArgument, match=f"blob cache directory {where}"):
            cache(where)
    urls = StoreUrls("memory://", "memory://", "memory://", blob_cache=BlobCacheConfig(not_a_dir))
    with pytest.raises(InvalidArgument, match="not a directory"):
        open_store(urls)
    created = tmp_path / "new" / "cache"  # a missing directory is made, private
    cache(created).close()
    assert (created / "blobs").is_dir() and (created.stat().st_mode & 0o777) == 0o700


def test_store_urls_wrap_remote_blobs_and_refuse_local(tmp_path: Path) -> None:
    config = BlobCacheConfig(tmp_path / "c", 10 * MiB)
    with pytest.raises(InvalidArgument, match="on local disk already"):
        StoreUrls(f"local://{tmp_path}/store", "memory://", "memory://", blob_cache=config)
    urls = StoreUrls("memory://", "memory://", "memory://", blob_cache=config)
    with open_store(urls) as store:
        assert isinstance(store.blobs, CachingBlobService) and store.blobs.max_bytes == 10 * MiB
        digest = store.blobs.put(b"through the store")
        assert store.blobs.open_read(digest).pread(0, 100) == b"through the store"
    assert describe(urls) == f"store memory:// through blob cache {tmp_path / 'c'} (10M)"


# -- two processes ---------------------------------------------------------------------------

_SHARED = [pattern(size, seed=100 + i) for i, size in enumerate(
    [1, 4000, SEGMENT, SEGMENT + 1, 700_000, 1_500_000, 3 * MiB] * 3)]


def _worker(directory: str, order: int, results: multiprocessing.Queue) -> None:
    # Forked: the inner memory:// store is this child's copy of the parent's.
    service = cache(Path(directory), max_bytes=256 * MiB, fill_on_open_max=MiB)
    digests = [MemoryBlobService().put(data) for data in _SHARED]
    indexes = list(range(len(_SHARED)))[::order]
    wrong = 0
    for _ in range(3):
        for i in indexes:
            with service.open_read(digests[i]) as reader:
                wrong += read_all(reader) != _SHARED[i]
    results.put((wrong, service.stats()))
    service.close()


def test_two_processes_fill_and_share_one_cache(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    workers = [context.Process(target=_worker, args=(str(tmp_path / "c"), order, results))
               for order in (1, -1)]
    for worker in workers:
        worker.start()
    answers = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    assert [wrong for wrong, _ in answers] == [0, 0]
    for _, counts in answers:
        assert counts["verify_failures"] == counts["cache_errors"] == counts["fill_errors"] == 0
        assert counts["hits"] >= 2 * len(_SHARED)  # rounds 2 and 3 at least
    distinct = {MemoryBlobService().put(x) for x in _SHARED}
    service = cache(tmp_path / "c", max_bytes=256 * MiB)
    assert service.stats()["entries"] == len(distinct) == len(blob_files(tmp_path / "c"))
    assert service.stats()["bytes"] == sum(len(x) for x in set(_SHARED))
    assert not list((tmp_path / "c" / "tmp").iterdir())
    memory.reset()
    for data in _SHARED:
        digest = MemoryBlobService().put(data)
        memory.reset()
        with service.open_read(digest) as reader:
            assert read_all(reader) == data
    service.close()


# -- a real daemon ----------------------------------------------------------------------------


def test_cached_blobs_are_read_after_the_daemon_is_gone(tmp_path: Path) -> None:
    from tests.grpc_daemon import Daemon, scratch_dir

    root = scratch_dir("tvx-cache-")
    daemon = Daemon(root, log_level="info").start()
    try:
        blobs = [pattern(50_000, seed=200), pattern(5 * MiB + 3, seed=201), pattern(20 * MiB, seed=202)]
        with open_store(StoreUrls.single(daemon.url)) as plain:
            digests = [plain.blobs.put(data) for data in blobs]
            uncached = plain.blobs.put(b"never read through the cache")
            cut_off = plain.blobs.put(pattern(12 * MiB, seed=203))
        config = BlobCacheConfig(tmp_path / "c", 256 * MiB)
        urls = StoreUrls(daemon.url, daemon.url, daemon.url, blob_cache=config)
        with open_store(urls) as store:
            for digest, data in zip(digests, blobs, strict=True):
                with store.blobs.open_read(digest) as reader:
                    assert read_all(reader) == data
            assert store.blobs.stats()["fills"] == 3
            # A fill that breaks off half way (the daemon dies) leaves nothing visible.
            partial = store.blobs.open_read(cut_off)
            assert isinstance(partial, FillingBlobReader)
            assert partial.pread(0, 4 * MiB) == pattern(12 * MiB, seed=203)[: 4 * MiB]
            daemon.stop(signal.SIGKILL)  # gone at once (a graceful stop waits for the open streams)
            with pytest.raises(Unavailable):
                for offset in range(4 * MiB, partial.size, READ):
                    partial.pread(offset, READ)
            partial.close()
            assert not list((tmp_path / "c" / "tmp").iterdir())
            assert store.blobs.stats()["entries"] == 3
        assert daemon.problems() == []
        with open_store(urls) as store:  # a remount: the daemon is gone, the cache is not
            for digest, data in zip(digests, blobs, strict=True):
                assert store.blobs.stat(digest).size == len(data)
                with store.blobs.open_read(digest) as reader:
                    assert read_all(reader, 4 * READ) == data
                    assert reader.pread(len(data) // 2, 7) == data[len(data) // 2 : len(data) // 2 + 7]
            assert store.blobs.stats()["hits"] == 3
            with pytest.raises(Unavailable):
                store.blobs.open_read(uncached)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_many_processes_opening_a_new_cache_at_once_all_succeed(tmp_path):
    """Every worker of a mount opens the index at the same moment; the first one switches the new
    file to WAL, the others must wait for it rather than fail with 'database is locked'."""
    from tvixmount.store.cache.index import CacheIndex

    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()

    def opener() -> None:
        go.wait(10)
        try:
            CacheIndex(tmp_path / "cache")
            results.put("ok")
        except Exception as exc:  # reported to the test, which shows it
            results.put(f"{type(exc).__name__}: {exc}")

    for _round in range(3):
        cache = tmp_path / "cache"
        if cache.exists():
            shutil.rmtree(cache)
        go.clear()
        procs = [ctx.Process(target=opener) for _ in range(8)]
        for p in procs:
            p.start()
        go.set()
        outcomes = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert outcomes == ["ok"] * 8


def test_segment_into_a_flipped_bit_is_served_right_from_the_store(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The segment arena reads a cached segment in place (segment_into): the same check and fallback."""
    data = pattern(3 * SEGMENT + 10, seed=6)
    service, digest = _cached_with_segment_1_flipped(tmp_path / "c", data)
    with caplog.at_level(logging.WARNING, logger="tvixmount.store.cache"), \
            service.open_read(digest) as reader:
        assert isinstance(reader, CachedBlobReader) and reader.segment_size == SEGMENT
        slot = bytearray(SEGMENT)
        assert reader.segment_into(0, memoryview(slot)) == SEGMENT and bytes(slot) == data[:SEGMENT]
        assert reader.segment_into(SEGMENT, memoryview(slot)) == SEGMENT  # bad on disk: from the store
        assert bytes(slot) == data[SEGMENT: 2 * SEGMENT]
        assert reader.segment_into(100, memoryview(slot)) is None  # not a segment's start
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "segment 1" in warnings[0].getMessage()
    service.close()
