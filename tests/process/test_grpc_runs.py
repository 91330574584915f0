"""Whole-blob streams ("runs") of the gRPC blob reader, and reads that wait for a restarting daemon.

Runs: a chunked blob read in order (or a small one) comes from one
``Read(blob)`` call cut at the chunk list's boundaries. Checked against a
fake server that sends exactly the bytes a test wants: one call instead
of one per chunk, every chunk verified before it is handed on (a bad one
is an IntegrityError naming the blob and the chunk, and nothing of it
is served), a stream that ends early or stalls hands over to chunk reads.

Reconnects: against a real daemon that is stopped and started again, a
read inside a ``request_deadline`` scope waits for the channel and is
served; without a scope it waits only ``reconnect_wait``; a daemon that
stays away is Unavailable once the patience is spent, never later.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import blake3
import grpc
import pytest

from tests.grpc_daemon import Daemon, FakeServer, scratch_dir
from tests.store_suite import pattern
from tvixmount.castore.nodes import b3_text
from tvixmount.errors import IntegrityError, Unavailable
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.segcache import REGION, SegmentArena
from tvixmount.store import StoreUrls, open_store
from tvixmount.store.grpc import blobs as grpc_blobs
from tvixmount.store.grpc import client as grpc_client
from tvixmount.store.grpc import copies as grpc_copies
from tvixmount.store.grpc import reader as grpc_reader
from tvixmount.store.grpc.channel import ClientConfig
from tvixmount.store.grpc.copies import WHOLE_FILL
from workers.segfill import keep_regions

STAT = "/tvix.castore.v1.BlobService/Stat"
READ = "/tvix.castore.v1.BlobService/Read"
FAST = ClientConfig(unary_timeout=2.0, stream_gap=2.0, connect_timeout=1.0)
CHUNK = 1000


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


class Blobs:
    """Stat lists ``listing``; Read serves ``contents`` in ``piece``-byte messages and records the digest."""

    def __init__(self, piece: int = 700) -> None:
        self.contents: dict[bytes, bytes] = {}
        self.listing: dict[bytes, list[tuple[bytes, int]]] = {}
        self.piece = piece
        self.reads: list[bytes] = []
        self.sent: dict[bytes, int] = {}  # bytes sent per digest
        self.stall_after: int | None = None  # stop sending (but keep the call open) after this many bytes

    def add_chunked(self, data: bytes, serve_chunks: bool = True, chunk: int = CHUNK) -> bytes:
        digest = b3(data)
        parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.listing[digest] = [(b3(p), len(p)) for p in parts]
        self.contents[digest] = data
        if serve_chunks:
            for p in parts:
                self.contents[b3(p)] = p
        return digest

    def stat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        digest = blob_pb.StatBlobRequest.FromString(request).digest
        if digest not in self.listing:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        msg = blob_pb.StatBlobResponse()
        for chunk, size in self.listing[digest]:
            msg.chunks.add(digest=chunk, size=size)
        return msg.SerializeToString()

    def read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        digest = blob_pb.ReadBlobRequest.FromString(request).digest
        self.reads.append(digest)
        if digest not in self.contents:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        data = self.contents[digest]
        for start in range(0, len(data), self.piece):
            if self.stall_after is not None and start >= self.stall_after:
                while context.is_active():
                    time.sleep(0.05)
                return
            self.sent[digest] = self.sent.get(digest, 0) + min(self.piece, len(data) - start)
            yield blob_pb.BlobChunk(data=data[start : start + self.piece]).SerializeToString()

    def server(self) -> FakeServer:
        return FakeServer({STAT: self.stat, READ: self.read})


@pytest.fixture
def blobs() -> Blobs:
    return Blobs()


@pytest.fixture
def big(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat the test blobs as big ones: no whole local copy, runs only for reads in order."""
    monkeypatch.setattr(grpc_reader, "WHOLE_RUN", 0)


def test_reading_in_order_is_one_stream_cut_into_verified_chunks(blobs: Blobs, big: None) -> None:
    data = pattern(10 * CHUNK + 123, seed=1)
    digest = blobs.add_chunked(data)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            got = b"".join(reader.pread(offset, 256) for offset in range(0, len(data), 256))
        assert got == data
        assert blobs.reads == [digest]  # one Read of the whole blob, no chunk reads
        assert server.calls[STAT] == 1
        service.close()


def test_small_blob_is_streamed_whole_even_read_out_of_order(blobs: Blobs) -> None:
    data = pattern(6 * CHUNK, seed=2)
    digest = blobs.add_chunked(data)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(4500, 700) == data[4500:5200]
            assert reader.pread(100, 50) == data[100:150]  # passed on the way: kept
            assert reader.pread(5900, 500) == data[5900:]
        assert blobs.reads == [digest]
        service.close()


def test_big_blob_read_at_random_fetches_only_its_chunks(blobs: Blobs, big: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_reader, "RUN_SKIP", 2 * CHUNK)
    data = pattern(20 * CHUNK, seed=3)
    digest = blobs.add_chunked(data)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(15 * CHUNK + 10, 100) == data[15 * CHUNK + 10 : 15 * CHUNK + 110]
            assert reader.pread(7 * CHUNK, 10) == data[7 * CHUNK : 7 * CHUNK + 10]
        assert digest not in blobs.reads
        assert blobs.reads[:2] == [b3(data[15 * CHUNK : 16 * CHUNK]), b3(data[7 * CHUNK : 8 * CHUNK])]
        service.close()


def test_bad_chunk_in_a_stream_is_never_served(blobs: Blobs, big: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    data = pattern(5 * CHUNK, seed=4)
    digest = blobs.add_chunked(data)
    bad = bytearray(data)
    bad[3 * CHUNK + 17] ^= 1
    blobs.contents[digest] = bytes(bad)  # the whole-blob stream carries a flipped bit in chunk 3
    chunk3 = b3(data[3 * CHUNK : 4 * CHUNK])
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(0, 3 * CHUNK) == data[: 3 * CHUNK]  # chunks before it are good
            assert reader.pread(3 * CHUNK, 2 * CHUNK) == data[3 * CHUNK :]  # from chunk reads
        assert blobs.reads == [digest, chunk3, b3(data[4 * CHUNK :])]
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warning) == 1 and b3_text(digest) in warning[0]
        assert re.search(rf"chunk 3 \({re.escape(b3_text(chunk3))}, 1000 bytes\) .* hashes to", warning[0])
        blobs.contents[chunk3] = bytes(bad[3 * CHUNK : 4 * CHUNK])  # and now its chunk is bad too
        with service.open_read(digest) as reader:
            assert reader.pread(0, 100) == data[:100]
            with pytest.raises(IntegrityError, match=rf"chunk 3 \({re.escape(b3_text(chunk3))}\) of blob "
                                                     rf"{re.escape(b3_text(digest))}"):
                reader.pread(3 * CHUNK, 100)
        service.close()


def test_small_blob_with_a_bad_chunk_is_read_by_chunks(blobs: Blobs) -> None:
    data = pattern(5 * CHUNK, seed=10)
    digest = blobs.add_chunked(data)
    bad = bytearray(data)
    bad[4 * CHUNK + 1] ^= 1
    blobs.contents[digest] = bytes(bad)
    blobs.contents[b3(data[4 * CHUNK :])] = bytes(bad[4 * CHUNK :])
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        reader = service.open_read(digest)
        assert reader.pread(0, 100) == data[:100]  # the copy failed whole; chunk 0 verifies on its own
        with pytest.raises(IntegrityError, match=rf"chunk 4 .* of blob {re.escape(b3_text(digest))}"):
            reader.pread(4 * CHUNK, 100)
        assert blobs.reads[0] == digest
        reader.close()
        service.close()


def test_small_blob_whose_chunk_list_is_not_the_blob_is_refused(blobs: Blobs) -> None:
    data, other = pattern(3 * CHUNK, seed=14), pattern(3 * CHUNK, seed=15)
    digest = blobs.add_chunked(data)
    blobs.add_chunked(other)
    blobs.listing[digest] = blobs.listing[b3(other)]  # the chunks of another blob, each fine by itself
    blobs.contents[digest] = other
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            with pytest.raises(IntegrityError, match="together hash to"):
                reader.pread(0, 10)
            with pytest.raises(IntegrityError):  # and never by chunk reads either
                reader.pread(0, 10)
        service.close()


def test_stream_ending_early_hands_over_to_chunk_reads(blobs: Blobs, big: None) -> None:
    data = pattern(8 * CHUNK, seed=5)
    digest = blobs.add_chunked(data)
    blobs.contents[digest] = data[: 4 * CHUNK + 300]  # the stream stops inside chunk 4
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            got = b"".join(reader.pread(offset, 500) for offset in range(0, len(data), 500))
        assert got == data
        assert blobs.reads[0] == digest
        assert set(blobs.reads[1:]) == {b3(data[i : i + CHUNK]) for i in range(4 * CHUNK, 8 * CHUNK, CHUNK)}
        service.close()


def test_stalled_stream_is_cancelled_and_chunks_take_over(blobs: Blobs, big: None) -> None:
    data = pattern(6 * CHUNK, seed=6)
    digest = blobs.add_chunked(data)
    blobs.stall_after = 2 * CHUNK
    blobs.piece = CHUNK
    config = ClientConfig(unary_timeout=2.0, stream_gap=0.5, connect_timeout=1.0)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, config)
        with service.open_read(digest) as reader:
            started = time.monotonic()
            assert reader.pread(0, len(data)) == data
            assert time.monotonic() - started < 3
        service.close()


def test_runs_open_at_once_are_bounded(blobs: Blobs, big: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_blobs, "MAX_RUNS", 1)  # each open run holds a server thread
    first, second = pattern(6 * CHUNK, seed=12), pattern(6 * CHUNK, seed=13)
    digests = [blobs.add_chunked(first), blobs.add_chunked(second)]
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        one, two = service.open_read(digests[0]), service.open_read(digests[1])
        assert one.pread(0, 100) == first[:100]  # a run, left open
        assert two.pread(0, 100) == second[:100]  # no slot: chunk 0 alone
        assert blobs.reads[:2] == [digests[0], b3(second[:CHUNK])] and digests[1] not in blobs.reads
        one.close()
        three = service.open_read(digests[1])
        assert three.pread(0, len(second)) == second  # the slot is free again
        assert blobs.reads.count(digests[1]) == 1
        two.close()
        three.close()
        service.close()


def test_server_that_serves_no_whole_blob_is_read_by_chunks(blobs: Blobs, big: None) -> None:
    data = pattern(4 * CHUNK, seed=7)
    digest = blobs.add_chunked(data)
    del blobs.contents[digest]
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(0, len(data)) == data
            assert reader.pread(0, len(data)) == data
        assert blobs.reads.count(digest) == 1  # asked once, then chunks only
        service.close()


def test_size_hint_reads_a_small_blob_without_stat(blobs: Blobs) -> None:
    data = pattern(3 * CHUNK, seed=8)
    digest = blobs.add_chunked(data)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest, size_hint=len(data)) as reader:
            assert reader.pread(0, len(data)) == data
        assert server.calls.get(STAT) is None and blobs.reads == [digest]
        blobs.contents[digest] = data[:-1] + b"?"
        with pytest.raises(IntegrityError, match=re.escape(b3_text(digest))):
            service.open_read(digest, size_hint=len(data))
        service.close()


def test_a_blob_held_whole_offers_its_regions_to_the_arena_and_a_chunk_reader_does_not(
        blobs: Blobs, monkeypatch: pytest.MonkeyPatch) -> None:
    data = pattern(3 * REGION + 777, seed=12)
    digest = blobs.add_chunked(data)
    arena = SegmentArena(16 * REGION, workers=1)
    writer = arena.writer(0)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert not reader.holds_whole and reader.segment_size is None  # nothing fetched yet
            assert reader.pread(0, 10) == data[:10]  # the first read streams it whole
            assert reader.holds_whole
            assert (reader.segment_size, reader.segments_per_fill) == (REGION, WHOLE_FILL)
            assert keep_regions(writer, reader, digest, REGION + 5, 10)  # any miss: its region and more
            assert arena.reader().read(digest, REGION, len(data) - REGION) == data[REGION:]
        assert blobs.reads == [digest]  # the regions came from the local copy
        monkeypatch.setattr(grpc_reader, "WHOLE_RUN", 0)
        with service.open_read(digest) as reader:
            assert reader.pread(2 * REGION, 10) == data[2 * REGION: 2 * REGION + 10]  # out of order: a chunk
            assert not reader.holds_whole and reader.segment_size is None
            assert not keep_regions(writer, reader, bytes(32), 2 * REGION, 10)  # not widened to a region
        service.close()
    arena.close()


def test_a_chunk_reader_on_the_region_grid_offers_its_regions(blobs: Blobs,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of one region each (as tvixmount's daemon lists an embedded store's blobs): a random
    read's chunk is its region, so it goes to the arena, and a bad chunk keeps only its region out."""
    data = pattern(6 * REGION + 777, seed=13)
    digest = blobs.add_chunked(data, chunk=REGION)
    monkeypatch.setattr(grpc_reader, "WHOLE_RUN", 0)
    arena = SegmentArena(16 * REGION, workers=1)
    writer = arena.writer(0)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert (reader.segment_size, reader.segments_per_fill) == (REGION, 1)
            assert keep_regions(writer, reader, digest, 4 * REGION + 5, 10)  # out of order: its region
            assert arena.reader().read(digest, 4 * REGION, REGION) == data[4 * REGION:5 * REGION]
            assert blobs.reads == [blobs.listing[digest][4][0]]  # one chunk fetched: the region's own
            assert not arena.reader().read(digest, 3 * REGION, REGION)  # nothing widened past it
            blobs.contents[blobs.listing[digest][2][0]] = b"?" * REGION  # chunk 2 turns bad
            assert not keep_regions(writer, reader, digest, 2 * REGION, 10)  # its region is not kept...
            with pytest.raises(IntegrityError):
                reader.pread(2 * REGION, 10)  # ...and its read fails
            assert keep_regions(writer, reader, digest, REGION, 10)  # the region beside it is served
            assert arena.reader().read(digest, REGION, REGION) == data[REGION:2 * REGION]
        service.close()
    arena.close()


@pytest.mark.parametrize("kind", ["run", "chunks", "small copy", "copy on disk"])
def test_pread_into_fills_the_buffer_as_pread_answers(blobs: Blobs, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str) -> None:
    data = pattern(7 * CHUNK + 321, seed=11)
    digest = blobs.add_chunked(data)
    if kind in ("run", "chunks"):
        monkeypatch.setattr(grpc_reader, "WHOLE_RUN", 0)
    if kind == "chunks":
        monkeypatch.setattr(grpc_reader, "RUN_SKIP", -1)
    if kind == "copy on disk":
        monkeypatch.setattr(grpc_copies, "MEMORY_COPY", 1000)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            for offset, length in ((0, 1500), (1500, 2000), (3500, 4000), (7000, 5000), (len(data), 10)):
                buf = memoryview(bytearray(length))
                got = reader.pread_into(offset, buf)
                assert bytes(buf[:got]) == data[offset : offset + length] == reader.pread(offset, length)
        assert (digest in blobs.reads) == (kind != "chunks")
        service.close()


# -- a daemon that restarts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[Daemon, bytes]]:
    root = scratch_dir("tvx-reconnect-")
    data = pattern(50_000, seed=9)
    with open_store(StoreUrls.embedded(root / "store", create=True)) as store:
        digest = store.blobs.put(data)
    d = Daemon(root, "--read-only").start()
    try:
        yield d, digest
    finally:
        d.stop()


def _restart_after(d: Daemon, gap: float) -> threading.Thread:
    d.stop()

    def later() -> None:
        time.sleep(gap)
        d.start()

    thread = threading.Thread(target=later)
    thread.start()
    return thread


def test_read_in_a_request_scope_waits_for_a_restarting_daemon(daemon: tuple[Daemon, bytes]) -> None:
    d, digest = daemon
    service = grpc_client.open_blob_service(d.url)
    assert service.stat(digest) is not None  # connected
    thread = _restart_after(d, 1.0)
    try:
        started = time.monotonic()
        with grpc_client.request_deadline(time.monotonic() + 15), service.open_read(digest) as reader:
            assert len(reader.pread(0, 100_000)) == 50_000  # patience: 0.4 of 15 s
        took = time.monotonic() - started
        assert 0.5 < took < 6
    finally:
        thread.join()
        service.close()


def test_daemon_that_stays_away_is_unavailable_when_patience_is_spent(daemon: tuple[Daemon, bytes]) -> None:
    d, digest = daemon
    service = grpc_client.open_blob_service(d.url)
    assert service.stat(digest) is not None
    d.stop()
    try:
        with grpc_client.request_deadline(time.monotonic() + 3):  # patience: 1.2 s
            started = time.monotonic()
            with pytest.raises(Unavailable, match="not back after waiting"):
                service.stat(digest)
            assert 1.0 < time.monotonic() - started < 2.5
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:  # the same request again: it does not wait twice
                service.stat(digest)
            assert "not back" not in str(info.value) and time.monotonic() - started < 1.0
        started = time.monotonic()
        no_scope = grpc_client.open_blob_service(d.url, ClientConfig(reconnect_wait=0.3))
        with pytest.raises(Unavailable):
            no_scope.stat(digest)
        assert time.monotonic() - started < 1.5
        no_scope.close()
    finally:
        d.start()
    with grpc_client.request_deadline(time.monotonic() + 10):  # the channel may be in its back-off
        assert service.stat(digest) is not None  # back: served, nothing to reopen
    service.close()


def test_request_scope_nests_and_restores() -> None:
    from tvixmount.store.grpc.deadline import patience_until, request_deadline

    assert patience_until(0.0) <= time.monotonic()
    with request_deadline(time.monotonic() + 10):
        outer = patience_until(0.0)
        assert 3.5 < outer - time.monotonic() <= 4.0
        with request_deadline(time.monotonic() + 1):
            assert patience_until(0.0) < outer
        assert patience_until(0.0) == outer
    assert patience_until(0.0) <= time.monotonic()
