"""The shared-memory ring for read replies: its bookkeeping, and real pools reading through it
(right bytes, fallback to the pipe, workers killed mid-stream, a lying worker)."""

from __future__ import annotations

import functools
import os
import random
import signal
from collections.abc import Iterator

import pytest

from tests.worker_fixtures import replaced, wait_until
from tvixmount.errors import IntegrityError
from tvixmount.fetcher import PoolFetcher
from tvixmount.pool import WorkerPool
from tvixmount.protocol import messages, ops
from tvixmount.protocol.framing import ProtocolError, RingRef, pack, unpack
from tvixmount.shmring import DEFAULT_CAPACITY, Arena, RingError
from tvixmount.store import StoreUrls, memory, open_store
from workers import handlers
from workers.loop import serve

PAGE = 4096
MEMORY = StoreUrls.single("memory://")
DATA = random.Random(7).randbytes(6 << 20)  # more than a ring: replies wrap around it


# -- bookkeeping --------------------------------------------------------------------------


def test_bytes_round_trip_and_wrap_stay_contiguous():
    arena = Arena(2, 4 * PAGE)
    writer, reader = arena.writer(1), arena.reader(1)
    expected = []
    for i in range(40):  # 3 KiB replies in a 16 KiB ring: wraps many times
        payload = bytes([i]) * 3000
        start, view = writer.reserve(len(payload))
        view[:] = payload
        writer.commit(start, len(payload))
        expected.append((start, payload))
        assert reader.take(start, len(payload)) == payload
    starts = [s for s, _ in expected]
    assert starts == sorted(starts)
    assert any(s % (4 * PAGE) == 0 for s in starts[1:])  # some reply skipped the tail to stay whole
    arena.close()


def test_no_room_until_the_reader_consumes():
    arena = Arena(1, 4 * PAGE)
    writer, reader = arena.writer(0), arena.reader(0)
    first = writer.reserve(3 * PAGE)
    assert first is not None
    writer.commit(first[0], 3 * PAGE)
    assert writer.reserve(2 * PAGE) is None  # only one page free
    assert writer.reserve(5 * PAGE) is None  # bigger than the ring: never
    reader.take(first[0], 3 * PAGE)
    second = writer.reserve(2 * PAGE)
    assert second is not None and second[0] == 4 * PAGE  # skipped the last page to stay contiguous
    arena.close()


def test_a_new_writer_starts_where_the_reader_stopped():
    arena = Arena(1, 4 * PAGE)
    old, reader = arena.writer(0), arena.reader(0)
    start, _ = old.reserve(PAGE)
    old.commit(start, PAGE)
    reader.take(start, PAGE)
    orphan, _ = old.reserve(PAGE)  # written by a worker that died before replying
    old.commit(orphan, PAGE)
    replacement = arena.writer(0)
    start, _ = replacement.reserve(PAGE)
    assert start == PAGE  # the orphan's bytes are reused, nothing is skipped for ever
    arena.close()


@pytest.mark.parametrize("start, length", [(0, PAGE), (PAGE, 4 * PAGE), (3 * PAGE, 2 * PAGE), (PAGE, -1)])
def test_impossible_references_are_refused(start, length):
    arena = Arena(1, 4 * PAGE)
    writer, reader = arena.writer(0), arena.reader(0)
    s, _ = writer.reserve(PAGE)
    writer.commit(s, PAGE)
    reader.take(s, PAGE)  # consumed is now PAGE
    with pytest.raises(RingError):
        reader.take(start, length)
    arena.close()


def test_ring_refs_cross_the_wire_as_an_extension():
    ref = RingRef(5 << 40, 131072)
    assert unpack(pack([7, messages.OK, ref])) == [7, messages.OK, ref]
    with pytest.raises(ProtocolError):
        unpack(b"\xd4\x09\x00")  # fixext 1 of an unknown type


# -- real pools ---------------------------------------------------------------------------


@pytest.fixture
def blob() -> Iterator[bytes]:
    memory.reset()
    with open_store(MEMORY) as store:
        yield store.blobs.put(DATA)
    memory.reset()


@pytest.fixture
def pool(blob) -> Iterator[WorkerPool]:
    pool = WorkerPool(MEMORY, 2, serve, request_timeout=10)
    pool.start()
    yield pool
    pool.close()


def test_reads_come_through_the_ring_and_are_right(pool, blob):
    fetcher = PoolFetcher(pool)
    rng = random.Random(1)
    for fh in range(200):
        offset = rng.randrange(len(DATA))
        length = rng.choice((4096, 65536, 131072, 1 << 20))
        assert fetcher.blob_read(blob, offset, length, affinity=fh % 3) == DATA[offset:offset + length]
    stats = pool.stats()
    assert stats.ring_replies >= 195  # all but reads of the last few bytes (under 4 KiB: inline)
    assert stats.ring_bytes > 5 * DEFAULT_CAPACITY  # far more than the rings hold: they wrapped


def test_reads_bigger_than_a_ring_go_inline(pool, blob):
    fetcher = PoolFetcher(pool)
    length = DEFAULT_CAPACITY + 12345
    assert fetcher.blob_read(blob, 100, length) == DATA[100:100 + length]
    assert pool.stats().ring_replies == 0


def test_sequential_reads_survive_workers_killed_mid_stream(pool, blob):
    fetcher = PoolFetcher(pool)
    for round_ in range(3):
        killed = pool.pids()[0]
        assert killed is not None
        for offset in range(0, len(DATA), 131072):
            if offset == 2 << 20:
                os.kill(killed, signal.SIGKILL)
            got = fetcher.blob_read(blob, offset, 131072, affinity=0)
            assert got == DATA[offset:offset + 131072], f"round {round_} offset {offset}"
        # The dead worker keeps its slot until the collector retires it: wait for
        # its successor, not just for a pid, or the next round kills a dead pid.
        assert wait_until(lambda killed=killed: replaced(pool, 0, killed), 30), \
            f"round {round_}: worker pid {killed} not replaced"
    assert pool.stats().restarts >= 3


def test_a_worker_naming_bytes_it_never_wrote_is_killed_not_believed(blob, tmp_path):
    """A reply pointing outside what the worker may have written ends that worker; the read
    is re-sent and answered right by its replacement."""
    marker = tmp_path / "lied"  # only the first worker lies: its replacement finds the marker

    def liar(ctx, digest, offset, length, size):
        result = handlers.blob_read(ctx, digest, offset, length, size)
        if isinstance(result, RingRef) and not marker.exists():
            marker.touch()
            return RingRef(result.start + DEFAULT_CAPACITY, result.length)
        return result

    lying: ops.Handlers[handlers.Context] = ops.Handlers()
    for op, handler in handlers.HANDLERS.items():
        lying.handles(op)(liar if op is ops.BLOB_READ else handler)
    with WorkerPool(MEMORY, 1, functools.partial(serve, handlers=lying), request_timeout=10) as pool:
        pid = pool.pids()[0]
        assert PoolFetcher(pool).blob_read(blob, 0, 131072) == DATA[:131072]
        assert marker.exists()
        assert pool.pids()[0] != pid
        assert pool.stats().killed == 1


def test_a_corrupt_blob_fails_and_the_next_read_is_right(tmp_path):
    """IntegrityError from the embedded store's verification reaches the caller, and the ring
    stays in step: the worker's next ring reply is the right bytes."""
    urls = StoreUrls.single(f"local://{tmp_path}?create=1")
    good, bad = DATA[:1 << 20], DATA[1 << 20:2 << 20]
    with open_store(urls) as store:
        good_digest, bad_digest = store.blobs.put(good), store.blobs.put(bad)
    path = next(p for p in tmp_path.rglob("*") if p.name == bad_digest.hex())
    damaged = bytearray(path.read_bytes())
    damaged[300_000] ^= 1
    path.write_bytes(bytes(damaged))
    with WorkerPool(urls, 1, serve, request_timeout=10) as pool:
        fetcher = PoolFetcher(pool)
        assert fetcher.blob_read(bad_digest, 0, 131072) == bad[:131072]  # segment 0 is intact
        with pytest.raises(IntegrityError):
            fetcher.blob_read(bad_digest, 262144, 131072)
        for offset in range(0, len(good), 131072):
            assert fetcher.blob_read(good_digest, offset, 131072) == good[offset:offset + 131072]
        assert pool.stats().ring_replies == 9
