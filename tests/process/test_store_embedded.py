"""The store suite against the embedded on-disk store, plus its own promises:
per-chunk verification of blob files, atomic writes, the on-disk layout,
clear errors for missing or damaged stores, and many processes at once."""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded_layout import flip_byte, pack_bytes, pack_files, stored_at
from tests.store_suite import (
    CHUNK,
    DIR_A,
    BlobTests,
    DirectoryTests,
    Harness,
    PathInfoTests,
    b3,
    make_info,
    pattern,
    read_all,
    store_path,
)
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, b3_text
from tvixmount.errors import IntegrityError, InvalidArgument, InvalidData, NotFound, Unavailable
from tvixmount.store import (
    StoreUrls,
    open_blob_service,
    open_directory_service,
    open_path_info_service,
    open_store,
)
from tvixmount.store.embedded import db as embedded_db
from tvixmount.store.embedded.layout import DB_FILE, FORMAT_FILE
from tvixmount.store.embedded.packs import PACKED_MAX


def _update(root: Path, table: str, digest: bytes, data: bytes) -> None:
    conn = sqlite3.connect(root / DB_FILE)
    with conn:
        conn.execute(f"UPDATE {table} SET data = ? WHERE digest = ?", (data, digest))
    conn.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def harness(root: Path) -> Iterator[Harness]:
    with open_store(StoreUrls.embedded(root, create=True)) as store:
        yield Harness(
            store,
            lambda digest, data: _update(root, "directories", digest, data),
            lambda digest, data: _update(root, "path_infos", digest, data),
        )


class TestEmbeddedBlobs(BlobTests):
    pass


class TestEmbeddedDirectories(DirectoryTests):
    pass


class TestEmbeddedPathInfos(PathInfoTests):
    pass


def blob_file(root: Path, digest: bytes) -> Path:
    return root / "blobs" / digest.hex()[:2] / digest.hex()


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


# -- layout and chunk metadata ------------------------------------------------------


def test_layout(harness: Harness, root: Path) -> None:
    digest = harness.store.blobs.put(b"Hello World!")
    big = pattern(PACKED_MAX + 1)
    big_digest = harness.store.blobs.put(big)
    [pack] = pack_files(root)  # the small one is packed...
    assert stored_at(root, digest) == (pack, 0, 12) and pack.read_bytes() == b"Hello World!"
    assert blob_files(root) == [blob_file(root, big_digest)]  # ...the big one has its own file
    assert blob_file(root, big_digest).read_bytes() == big
    marker = (root / FORMAT_FILE).read_text().splitlines()
    assert marker[0] == "tvixmount-store" and "format=2" in marker and f"chunk_size={CHUNK}" in marker
    conn = sqlite3.connect(root / DB_FILE)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert os.listdir(root / "tmp") == []


@pytest.mark.parametrize(("size", "count"), [(0, 0), (1, 0), (CHUNK, 0), (CHUNK + 1, 2), (3 * CHUNK, 3)])
def test_stat_reports_segments(harness: Harness, size: int, count: int) -> None:
    data = pattern(size)
    digest = harness.store.blobs.put(data)
    stat = harness.store.blobs.stat(digest)
    assert stat is not None and len(stat.chunks) == count
    for index, chunk in enumerate(stat.chunks):
        assert chunk.digest == b3(data[index * CHUNK : (index + 1) * CHUNK])


# -- integrity ----------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_corrupt_byte_fails_only_its_chunk(harness: Harness, root: Path) -> None:
    data = pattern(3 * CHUNK + 100)
    digest = harness.store.blobs.put(data)
    _flip(blob_file(root, digest), CHUNK + 777)  # inside chunk 1
    name = re.escape(b3_text(digest))
    with harness.store.blobs.open_read(digest) as reader:
        assert reader.pread(0, CHUNK) == data[:CHUNK]
        assert reader.pread(2 * CHUNK, CHUNK + 100) == data[2 * CHUNK :]
        with pytest.raises(IntegrityError, match=f"{name} chunk 1 "):
            reader.pread(CHUNK + 5, 10)
        with pytest.raises(IntegrityError, match="chunk 1 "):
            reader.pread(CHUNK - 10, 20)  # spans chunks 0 and 1: nothing is returned
        with pytest.raises(IntegrityError):
            reader.pread(CHUNK + 5, 10)  # the bad chunk was not cached
        assert reader.pread(CHUNK - 10, 10) == data[CHUNK - 10 : CHUNK]


def test_corrupt_small_blob(harness: Harness, root: Path) -> None:
    digest = harness.store.blobs.put(b"Hello World!")
    neighbour = harness.store.blobs.put(b"next in the pack")
    flip_byte(root, digest, 3)
    with harness.store.blobs.open_read(digest) as reader, \
            pytest.raises(IntegrityError, match=r"chunk 0.*packed"):
        reader.pread(0, 1)
    assert read_all(harness.store, neighbour) == b"next in the pack"
    damaged_at = stored_at(root, digest)
    assert harness.store.blobs.put(b"Hello World!") == digest  # storing it again repairs it...
    assert stored_at(root, digest) != damaged_at  # ...as a new copy; the damaged bytes stay unreferenced
    assert read_all(harness.store, digest) == b"Hello World!"
    assert harness.store.blobs.put(b"next in the pack") == neighbour
    assert pack_bytes(root) == 2 * 12 + 16  # an intact copy is not stored twice


def test_truncated_blob_file(harness: Harness, root: Path) -> None:
    data = pattern(2 * CHUNK + 10)
    digest = harness.store.blobs.put(data)
    os.truncate(blob_file(root, digest), CHUNK + 5)
    with harness.store.blobs.open_read(digest) as reader:
        assert reader.pread(0, 100) == data[:100]
        with pytest.raises(IntegrityError, match="truncated"):
            reader.pread(CHUNK, 10)
        with pytest.raises(IntegrityError, match="truncated"):
            reader.pread(2 * CHUNK, 10)


def test_missing_blob_file_is_invalid_data(harness: Harness, root: Path) -> None:
    gone = pattern(PACKED_MAX + 10, seed=5)
    digest = harness.store.blobs.put(gone)
    blob_file(root, digest).unlink()
    with pytest.raises(InvalidData, match="missing"):
        harness.store.blobs.open_read(digest)
    harness.store.blobs.put(gone)  # re-importing repairs it
    assert read_all(harness.store, digest) == gone


def test_missing_pack_is_invalid_data(harness: Harness, root: Path) -> None:
    digest = harness.store.blobs.put(b"packed, soon gone")
    [pack] = pack_files(root)
    pack.unlink()
    with pytest.raises(InvalidData, match=r"its pack .* is missing"):
        harness.store.blobs.open_read(digest)
    [result] = harness.store.blobs.read_many([(digest, 17)])
    assert isinstance(result, InvalidData) and "missing" in str(result)


def test_damaged_blob_row(harness: Harness, root: Path) -> None:
    digest = harness.store.blobs.put(pattern(CHUNK * 2))
    conn = sqlite3.connect(root / DB_FILE)
    with conn:
        conn.execute("UPDATE blobs SET chunks = ? WHERE digest = ?", (b"short", digest))
    conn.close()
    fresh = open_blob_service(StoreUrls.embedded(root).blob)  # shares the handle, not the row cache
    try:
        with pytest.raises(InvalidData, match=re.escape(b3_text(digest))):
            fresh.stat(digest)
    finally:
        fresh.close()


# -- writes ---------------------------------------------------------------------------


def test_idempotent_put_writes_no_new_file(harness: Harness, root: Path) -> None:
    data = pattern(CHUNK + 3)
    digest = harness.store.blobs.put(data)
    inode = blob_file(root, digest).stat().st_ino
    harness.store.blobs.put(data)
    assert blob_file(root, digest).stat().st_ino == inode
    assert len(blob_files(root)) == 1
    assert os.listdir(root / "tmp") == []


def test_aborted_and_dropped_writers_leave_no_files(harness: Harness, root: Path) -> None:
    writer = harness.store.blobs.open_write()
    writer.write(pattern(CHUNK * 2))
    assert len(os.listdir(root / "tmp")) == 1  # invisible while written
    assert harness.store.blobs.stat(b3(pattern(CHUNK * 2))) is None
    writer.abort()
    assert os.listdir(root / "tmp") == []
    dropped = harness.store.blobs.open_write()
    dropped.write(pattern(CHUNK + 1, seed=5))
    assert len(os.listdir(root / "tmp")) == 1
    del dropped
    assert os.listdir(root / "tmp") == []
    assert blob_files(root) == []


def test_stale_temp_files_are_swept(root: Path) -> None:
    store = open_store(StoreUrls.embedded(root, create=True))
    store.close()
    stale = root / "tmp" / "123.deadbeef.tmp"
    stale.write_bytes(b"half a blob")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = root / "tmp" / "124.cafe.tmp"
    fresh.write_bytes(b"someone is writing this")
    with open_store(StoreUrls.embedded(root)) as store:
        store.blobs.put(b"x")
    assert sorted(os.listdir(root / "tmp")) == ["124.cafe.tmp"]


# -- opening -------------------------------------------------------------------------


def test_missing_store_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(NotFound, match=re.escape(str(missing)) + ".*tvixstore import"):
        open_store(StoreUrls.embedded(missing))
    assert not missing.exists()  # readers create nothing
    missing.mkdir()
    with pytest.raises(NotFound, match="tvixstore import"):
        open_blob_service(StoreUrls.embedded(missing).blob)


def test_refuses_to_create_in_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty"):
        open_store(StoreUrls.embedded(tmp_path / "home", create=True))


def test_unknown_format_version(root: Path) -> None:
    open_store(StoreUrls.embedded(root, create=True)).close()
    marker = root / FORMAT_FILE
    marker.write_text(marker.read_text().replace("format=2", "format=9"))
    with pytest.raises(InvalidData, match="format 9"):
        open_store(StoreUrls.embedded(root))


def test_odd_characters_in_store_path(tmp_path: Path) -> None:
    odd = tmp_path / "a dir?#%x"
    with open_store(StoreUrls.embedded(odd, create=True)) as store:
        digest = store.blobs.put(b"odd")
    with open_store(StoreUrls.embedded(odd)) as store:
        assert read_all(store, digest) == b"odd"


def test_services_opened_separately_share_data(root: Path) -> None:
    urls = StoreUrls.embedded(root, create=True)
    blobs = open_blob_service(urls.blob)
    dirs = open_directory_service(StoreUrls.embedded(root).directory)
    infos = open_path_info_service(StoreUrls.embedded(root).path_info)
    digest = blobs.put(b"")
    dirs.put(DIR_A)
    info = make_info(FileNode(b"", digest, 0), store_path(1))
    infos.put(info)
    for service in (blobs, dirs, infos):
        service.close()
    with open_store(StoreUrls.embedded(root)) as store:
        assert store.path_infos.get(store_path(1).digest) == info
        assert store.directories.get(DIR_A.digest()) == DIR_A
        assert read_all(store, digest) == b""


def test_closed_store_refuses_work(root: Path) -> None:
    store = open_store(StoreUrls.embedded(root, create=True))
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        store.directories.get(DIR_A.digest())


# -- sqlite failures -----------------------------------------------------------------


def test_damaged_database_file(root: Path) -> None:
    open_store(StoreUrls.embedded(root, create=True)).close()
    db = root / DB_FILE
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(InvalidData, match=re.escape(str(root)) + ".*damaged"):
        open_store(StoreUrls.embedded(root))


def test_locked_database_is_unavailable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_store(StoreUrls.embedded(root, create=True)).close()
    monkeypatch.setattr(embedded_db, "BUSY_TIMEOUT_S", 0.2)  # read when connecting
    blocker = sqlite3.connect(root / DB_FILE, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with open_store(StoreUrls.embedded(root)) as store:
            with pytest.raises(Unavailable, match=re.escape(str(root)) + ".*locked"):
                store.directories.put(DIR_A)
            assert store.directories.get(DIR_A.digest()) is None  # readers are not blocked (WAL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# -- processes -----------------------------------------------------------------------


def test_store_opened_before_fork_is_refused_in_child(root: Path) -> None:
    store = open_store(StoreUrls.embedded(root, create=True))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(store, queue))
    child.start()
    message = queue.get(timeout=20)
    child.join(20)
    store.close()
    assert "open store services after fork" in message


def _use_inherited(store, queue) -> None:
    try:
        store.directories.get(DIR_A.digest())
        queue.put("no error")
    except Unavailable as exc:
        queue.put(str(exc))


ITEMS = 40


def _item(i: int) -> tuple[bytes, Directory]:
    data = pattern((i * 37_813) % (3 * CHUNK) + i, seed=i)
    directory = Directory(files=(FileNode(b"file", b3(data), len(data)),))
    return data, directory


def _writer(root: str, ready) -> None:
    with open_store(StoreUrls.embedded(root)) as store:
        for i in range(ITEMS):
            data, directory = _item(i)
            store.blobs.put(data)
            store.directories.put_many([directory])
            store.path_infos.put(make_info(DirectoryNode(b"", directory.digest(), 1), store_path(i)))
            if i == 0:
                ready.set()


def _reader(root: str, done, results) -> None:
    try:
        with open_store(StoreUrls.embedded(root)) as store:
            passes = 0
            while True:
                finished = done.is_set()
                seen = 0
                for info in store.path_infos.list():
                    (directory,) = store.directories.get_recursive(info.node.digest)
                    node = directory.files[0]
                    data = read_all(store, node.digest)
                    assert len(data) == node.size and b3(data) == node.digest
                    seen += 1
                passes += 1
                if finished:
                    results.put(("ok", seen, passes))
                    return
    except BaseException:
        results.put(("error", traceback.format_exc(), 0))


def test_concurrent_readers_while_importing(root: Path) -> None:
    open_store(StoreUrls.embedded(root, create=True)).close()  # nothing open across the fork
    ctx = multiprocessing.get_context("fork")
    ready, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(str(root), done, results)) for _ in range(3)]
    writer = ctx.Process(target=_writer, args=(str(root), ready))
    writer.start()
    for r in readers:
        r.start()
    writer.join(60)
    done.set()
    outcomes = [results.get(timeout=60) for _ in readers]
    for r in readers:
        r.join(10)
    assert writer.exitcode == 0
    for status, detail, passes in outcomes:
        assert status == "ok", detail
        assert detail == ITEMS  # the last pass, after the import finished, saw everything
        assert passes >= 1


def test_threads_reading_one_blob_service(harness: Harness) -> None:
    data = pattern(4 * CHUNK)
    digest = harness.store.blobs.put(data)
    failures: list[str] = []

    def work() -> None:
        for _ in range(10):
            if read_all(harness.store, digest, piece=100_000) != data:
                failures.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_sequential_reads_hash_each_chunk_once(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tvixmount.store import segments

    data = pattern(3 * CHUNK)
    digest = harness.store.blobs.put(data)
    hashed: list[int] = []
    real = segments.blake3.blake3

    def counting(data: bytes = b"", **kw):
        hashed.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(segments, "blake3", SimpleNamespace(blake3=counting))
    assert read_all(harness.store, digest, piece=128 * 1024) == data
    assert hashed == [CHUNK, CHUNK, CHUNK]


# -- batches: no fsync per blob, rows only once the bytes are durable ------------------


def _rows(root: Path) -> set[bytes]:
    """The blob rows as another connection (another process) sees them."""
    conn = sqlite3.connect(root / DB_FILE)
    try:
        return {bytes(d) for (d,) in conn.execute("SELECT digest FROM blobs")}
    finally:
        conn.close()


def _stat_elsewhere(root: str, digests: list[bytes], queue) -> None:
    with open_store(StoreUrls.embedded(root)) as store:
        queue.put([store.blobs.stat(d) is not None for d in digests])


def _seen_by_other_process(root: Path, digests: list[bytes]) -> list[bool]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_stat_elsewhere, args=(str(root), digests, queue))
    child.start()
    seen = queue.get(timeout=20)
    child.join(20)
    return seen


def test_batch_rows_invisible_until_the_end(harness: Harness, root: Path) -> None:
    blobs = harness.store.blobs
    small, big = pattern(1000, seed=1), pattern(2 * CHUNK + 7, seed=2)
    with blobs.batch():
        digests = [blobs.put(small), blobs.put(big)]
        assert pack_bytes(root) == len(small) and blob_file(root, digests[1]).is_file()  # bytes in place...
        assert _rows(root) == set()  # ...but no row
        assert [blobs.stat(d) for d in digests] == [None, None]
        with pytest.raises(NotFound):
            blobs.open_read(digests[0])
        assert list(blobs.iter_digests()) == []
        assert _seen_by_other_process(root, digests) == [False, False]
        assert os.listdir(root / "tmp") == []  # the big one's temp file was linked, then removed
    assert _rows(root) == set(digests)
    assert read_all(harness.store, digests[0]) == small
    assert read_all(harness.store, digests[1]) == big
    assert blobs.stat(digests[1]).chunks[1].digest == b3(big[CHUNK : 2 * CHUNK])
    assert _seen_by_other_process(root, digests) == [True, True]


def test_batch_exception_leaves_no_rows(harness: Harness, root: Path) -> None:
    blobs = harness.store.blobs
    data = pattern(CHUNK + 5, seed=3)
    with pytest.raises(RuntimeError, match="import failed"), blobs.batch():
        digest = blobs.put(data)
        blobs.put(b"also lost")
        raise RuntimeError("import failed")
    assert _rows(root) == set()
    assert blobs.stat(digest) is None
    assert blob_file(root, digest).is_file()  # left behind, unrecorded
    # A leftover may be incomplete or damaged (a crash before the sync):
    # writing the blob again, in a batch or not, replaces it.
    blob_file(root, digest).write_bytes(b"torn")
    with blobs.batch():
        assert blobs.put(data) == digest
    assert read_all(harness.store, digest) == data
    blob_file(root, b3(b"also lost")).write_bytes(b"torn")
    blobs.put(b"also lost")
    assert read_all(harness.store, b3(b"also lost")) == b"also lost"


def test_batch_stores_each_blob_once(harness: Harness, root: Path) -> None:
    blobs = harness.store.blobs
    kept = blobs.put(b"stored before")
    with blobs.batch():
        first = blobs.put(pattern(CHUNK * 2, seed=4))
        assert blobs.put(pattern(CHUNK * 2, seed=4)) == first  # pending: not written again
        blobs.put(b"stored before")
        small = blobs.put(b"small, new")
        assert blobs.put(b"small, new") == small  # pending in the pack: not appended again
    assert pack_bytes(root) == len(b"stored before") + len(b"small, new")
    assert _rows(root) == {kept, first, small}
    assert len(blob_files(root)) == 1
    assert os.listdir(root / "tmp") == []


def test_nested_batches_and_threads(harness: Harness, root: Path) -> None:
    blobs = harness.store.blobs
    datas = [pattern(100 + i * 5000, seed=i) for i in range(40)]
    with blobs.batch():
        with blobs.batch():
            inner = blobs.put(b"inner")
        assert _rows(root) == {inner}  # every normal exit records what is pending
        threads = [threading.Thread(target=lambda d=d: blobs.put(d)) for d in datas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _rows(root) == {inner}
    assert _rows(root) == {inner} | {b3(d) for d in datas}
    assert all(read_all(harness.store, b3(d)) == d for d in datas)


def test_batch_without_syncfs_syncs_each_file(harness: Harness, root: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tvixmount.store.embedded import blobs as embedded_blobs

    synced: list[str] = []
    real_sync_file = embedded_blobs.sync_file
    monkeypatch.setattr(embedded_blobs, "sync_filesystem", lambda path: False)  # a libc without syncfs
    monkeypatch.setattr(embedded_blobs, "sync_file", lambda p: (synced.append(p), real_sync_file(p)))
    packs_synced: list[int] = []
    appender = harness.store.blobs.handle.appender()
    real_pack_sync = appender.sync
    monkeypatch.setattr(appender, "sync", lambda: (packs_synced.append(1), real_pack_sync()))
    with harness.store.blobs.batch():
        digests = [harness.store.blobs.put(pattern(PACKED_MAX + i, seed=i)) for i in range(1, 4)]
        digests += [harness.store.blobs.put(pattern(10, seed=i)) for i in range(3)]
    assert sorted(synced) == sorted(str(blob_file(root, d)) for d in digests[:3])
    assert packs_synced == [1]  # the three small ones: one fdatasync of their pack
    assert _rows(root) == set(digests)


def test_batch_whose_sync_fails_records_nothing(harness: Harness, root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tvixmount.store.embedded import blobs as embedded_blobs

    def broken(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(embedded_blobs, "sync_filesystem", broken)
    failed = re.escape(str(root)) + ".*2 blobs durable failed.*Input/output"
    with pytest.raises(Unavailable, match=failed), harness.store.blobs.batch():
        harness.store.blobs.put(b"one")
        harness.store.blobs.put(b"two")
    assert _rows(root) == set()


def test_big_batch_is_recorded_in_parts(harness: Harness, root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tvixmount.store.embedded import blobs as embedded_blobs

    monkeypatch.setattr(embedded_blobs, "BATCH_MAX_BLOBS", 3)
    with harness.store.blobs.batch():
        digests = [harness.store.blobs.put(pattern(10, seed=i)) for i in range(4)]
        assert _rows(root) == set(digests[:3])
    assert _rows(root) == set(digests)


def test_sync_filesystem_works_here(root: Path) -> None:
    from tvixmount.store.embedded.layout import sync_filesystem

    root.mkdir()
    assert sync_filesystem(root) is True  # Linux with glibc: syncfs(2) exists


def _die_in_batch(root: str, datas: list[bytes]) -> None:
    with open_store(StoreUrls.embedded(root)) as store, store.blobs.batch():
        for data in datas:
            store.blobs.put(data)
        os._exit(3)  # a crash: no batch end, no cleanup


def test_process_dying_in_a_batch_leaves_only_unrecorded_files(root: Path) -> None:
    open_store(StoreUrls.embedded(root, create=True)).close()
    datas = [pattern(CHUNK * 2, seed=7), b"small one"]
    child = multiprocessing.get_context("fork").Process(target=_die_in_batch, args=(str(root), datas))
    child.start()
    child.join(20)
    assert child.exitcode == 3
    assert _rows(root) == set()
    assert len(blob_files(root)) == 1 and pack_bytes(root) == len(datas[1])  # in place, never recorded
    with open_store(StoreUrls.embedded(root)) as store:
        assert [store.blobs.stat(b3(d)) for d in datas] == [None, None]
        with store.blobs.batch():
            for data in datas:
                store.blobs.put(data)
        assert [read_all(store, b3(d)) for d in datas] == datas
    # The second writer took the dead one's pack and cut its unrecorded tail back first.
    assert pack_bytes(root) == len(datas[1]) and stored_at(root, b3(datas[1]))[1] == 0
