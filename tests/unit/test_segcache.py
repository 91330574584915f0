"""The verified-segment arena: lookups, ownership, eviction, and never a torn or failed slot."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvixmount import segcache
from tvixmount.segcache import REGION, SegmentArena, SegmentCache

D1 = bytes(range(32))
D2 = bytes(range(1, 33))


def pattern(digest: bytes, index: int, length: int = REGION) -> bytes:
    """Bytes that say which (digest, region) they are, so a mix-up shows."""
    seed = (digest[0] * 131 + index * 7 + 1) % 251
    return bytes((seed + i) % 251 for i in range(251)) * (length // 251) + bytes(length % 251)


def filler(data: bytes):
    def fill(view: memoryview) -> int:
        view[: len(data)] = data
        return len(data)
    return fill


@pytest.fixture
def arena():
    a = SegmentArena(8 * REGION, workers=2, ways_per_worker=2)
    yield a
    a.close()


def test_shape_is_fixed_and_bounded(arena: SegmentArena) -> None:
    assert arena.slots == 8 and arena.sets == 2 and arena.size == 8 * REGION
    assert SegmentArena(5 * REGION, workers=2).slots == 4  # whole sets only, never more than asked
    empty = SegmentArena(0, workers=2)
    assert empty.slots == 0 and empty.reader().read(D1, 0, 10) is None
    assert not empty.writer(0).put(D1, 0, filler(b"x"))
    empty.close()


def test_put_then_read_any_range(arena: SegmentArena) -> None:
    writer, cache = arena.writer(0), arena.reader()
    for index in (0, 1):
        assert writer.put(D1, index, filler(pattern(D1, index)))
    whole = pattern(D1, 0) + pattern(D1, 1)
    assert cache.read(D1, 0, 128 << 10) == whole[: 128 << 10]
    assert cache.read(D1, 1000, 5000) == whole[1000:6000]
    assert cache.read(D1, REGION - 100, 300) == whole[REGION - 100: REGION + 200]  # two regions, one answer
    assert cache.read(D1, 2 * REGION - 10, 20) is None  # region 2 was never put
    assert cache.read(D2, 0, 10) is None  # another blob with the same regions
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (3, 2)


def test_a_short_last_region_serves_only_its_bytes(arena: SegmentArena) -> None:
    writer, cache = arena.writer(1), arena.reader()
    writer.put(D1, 3, filler(b"tail" * 10))
    assert cache.read(D1, 3 * REGION, 40) == b"tail" * 10
    assert cache.read(D1, 3 * REGION + 30, 20) is None  # past what the slot holds


def test_a_failed_fill_is_never_served(arena: SegmentArena) -> None:
    writer, cache = arena.writer(0), arena.reader()
    writer.put(D1, 0, filler(pattern(D1, 0)))

    def bad(view: memoryview) -> int:
        view[:100] = b"\xff" * 100  # some bytes went in before verification failed
        raise OSError("segment does not match its digest")

    # Fill the same worker's ways of that set until the good slot is the victim too.
    for index in (2, 4):
        with pytest.raises(OSError):
            writer.put(D1, index, bad)
    assert cache.read(D1, 2 * REGION, 100) is None
    assert cache.read(D1, 4 * REGION, 100) is None
    assert not writer.has(D1, 2)


def test_each_worker_writes_only_its_own_ways(arena: SegmentArena) -> None:
    w0, w1, cache = arena.writer(0), arena.writer(1), arena.reader()
    # Regions 0, 2, 4, 6 share a set (2 sets); worker 0 has two ways of it.
    for index in (0, 2, 4, 6):
        w0.put(D1, index, filler(pattern(D1, index)))
    w1.put(D2, 0, filler(pattern(D2, 0)))
    kept = [index for index in (0, 2, 4, 6) if cache.read(D1, index * REGION, 10) is not None]
    assert len(kept) == 2  # worker 0's two ways; it never evicted worker 1's slot
    assert cache.read(D2, 0, 10) == pattern(D2, 0)[:10]
    assert w0.has(D2, 0) and w1.has(D1, kept[0])


def test_clock_keeps_what_readers_use(arena: SegmentArena) -> None:
    writer, cache = arena.writer(0), arena.reader()
    writer.put(D1, 0, filler(pattern(D1, 0)))
    writer.put(D1, 2, filler(pattern(D1, 2)))
    assert cache.read(D1, 0, 10) is not None  # region 0 referenced, region 2 not
    writer.put(D1, 4, filler(pattern(D1, 4)))
    assert cache.read(D1, 0, 10) == pattern(D1, 0)[:10]
    assert cache.read(D1, 2 * REGION, 10) is None
    assert cache.read(D1, 4 * REGION, 10) == pattern(D1, 4)[:10]


def test_a_dead_writers_half_written_slot_is_never_served(arena: SegmentArena) -> None:
    writer, cache = arena.writer(0), arena.reader()
    writer.put(D1, 0, filler(pattern(D1, 0)))
    slot = next(s for s in range(arena.slots) if arena.tag_words[s])
    seq_word = slot * 8
    arena.words[seq_word] |= 1  # as if a writer died between "odd" and "even"
    assert cache.read(D1, 0, 10) is None
    # Its replacement (same worker slot) writes the region again; the odd slot is passed over.
    arena.writer(0).put(D1, 0, filler(pattern(D1, 0)))
    assert cache.read(D1, 0, 10) == pattern(D1, 0)[:10]


class RacingCache(SegmentCache):
    """A reader whose copy is overtaken by a writer: the writer runs between the two sequence reads."""

    def __init__(self, arena: SegmentArena, race) -> None:
        super().__init__(arena)
        self.race = race

    def _take(self, table: SegmentArena, at: int, length: int) -> bytes:
        first = table.data[at: at + length // 2].tobytes()
        self.race()  # the slot is rewritten in the middle of our copy
        return first + table.data[at + length // 2: at + length].tobytes()


def test_a_slot_rewritten_during_the_copy_is_not_served() -> None:
    """Fails if the sequence check after the copy is removed: the copy would mix two regions."""
    arena = SegmentArena(2 * REGION, workers=1, ways_per_worker=1)  # one slot per set: every put evicts
    try:
        writer = arena.writer(0)
        writer.put(D1, 0, filler(pattern(D1, 0)))
        other = 2 if arena.set_of(D1, 2) == arena.set_of(D1, 0) else 4
        assert arena.set_of(D1, other) == arena.set_of(D1, 0)

        def overwrite() -> None:
            writer.put(D1, other, filler(pattern(D1, other)))
            writer.put(D1, 0, filler(pattern(D1, 0)[::-1]))  # same key back, other bytes: only seq tells

        cache = RacingCache(arena, overwrite)
        assert cache.read(D1, 0, 64 << 10) is None
        assert cache.stats().torn == 1
        cache.race = lambda: None
        assert cache.read(D1, 0, 64 << 10) == pattern(D1, 0)[::-1][: 64 << 10]  # the new bytes, whole
    finally:
        arena.close()


def test_copies_beside_a_live_writer_are_whole_regions_or_nothing() -> None:
    """A copy made without the GIL (rawcopy.py) has a writer thread really running during it."""
    arena = SegmentArena(REGION, workers=1, ways_per_worker=1)  # one slot: every put rewrites it
    writer, cache = arena.writer(0), SegmentCache(arena, copy_releases_gil=True)
    forward = pattern(D1, 0)
    backward = forward[::-1]
    stop = threading.Event()

    def rewrite() -> None:
        flip = False
        while not stop.wait(0.0002):  # a pause, so that some reads find the slot still
            writer.put(D1, 0, filler(backward if flip else forward))  # same key, other bytes
            flip = not flip

    thread = threading.Thread(target=rewrite)
    thread.start()
    answers = set()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            got = cache.read(D1, 0, 128 << 10)
            if got is not None:
                answers.add(got)
    finally:
        stop.set()
        thread.join()
        arena.close()
    assert answers <= {forward[: 128 << 10], backward[: 128 << 10]}
    stats = cache.stats()
    assert stats.hits > 0 and stats.torn > 0, stats  # both sides of the race happened (~1,000 tears/s here)


def test_the_copy_releases_the_gil_only_for_more_threads_than_cpus(arena: SegmentArena) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert not arena.reader().copy_releases_gil
    assert not arena.reader(cpus).copy_releases_gil
    assert arena.reader(cpus + 1).copy_releases_gil
    writer = arena.writer(0)
    writer.put(D1, 0, filler(pattern(D1, 0)))
    for cache in (arena.reader(1), arena.reader(cpus + 1)):  # either way, the same bytes
        got = cache.read(D1, 100, 128 << 10)
        assert type(got) is bytes and got == pattern(D1, 0)[100: 100 + (128 << 10)]


def test_random_regions_always_match_their_key() -> None:
    """Many puts and reads over a small arena: every answer is exactly its region's bytes."""
    arena = SegmentArena(6 * REGION, workers=3, ways_per_worker=1)
    try:
        writers, cache = [arena.writer(w) for w in range(3)], arena.reader()
        rnd = int.from_bytes(os.urandom(4), "little")
        for step in range(300):
            rnd = (rnd * 1103515245 + 12345) & 0x7FFFFFFF
            digest, index = (D1, D2)[rnd & 1], (rnd >> 1) % 9
            writers[step % 3].put(digest, index, filler(pattern(digest, index)))
            probe = (rnd >> 5) % 9
            got = cache.read(digest, probe * REGION + 77, 1000)
            assert got is None or got == pattern(digest, probe)[77:1077]
        assert cache.stats().hits > 0
    finally:
        arena.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 1 << 40))
def test_the_readers_written_out_set_and_tag_are_the_writers(digest: bytes, index: int) -> None:
    """_candidates and put compute set_of and tag_of inline; a region put anywhere is found by it."""
    arena = SegmentArena(12 * REGION, workers=2, ways_per_worker=2)
    try:
        arena.writer(1).put(digest, index, filler(b"x" * 100))
        (slot,) = segcache._candidates(arena, digest, index)
        assert slot // arena.ways == arena.set_of(digest, index)
        assert arena.tags[slot * segcache.TAG: (slot + 1) * segcache.TAG] == segcache.tag_of(digest, index)
        assert arena.reader().read(digest, index * REGION, 100) == b"x" * 100
    finally:
        arena.close()


def test_a_worker_reads_kept_regions_back_from_any_workers_slots(arena: SegmentArena) -> None:
    w0, w1 = arena.writer(0), arena.writer(1)
    w0.put(D1, 0, filler(pattern(D1, 0)))
    w1.put(D1, 1, filler(pattern(D1, 1)))
    whole = pattern(D1, 0) + pattern(D1, 1)
    dest = bytearray(300_000)
    assert w0.read_into(D1, 100_000, memoryview(dest))
    assert bytes(dest) == whole[100_000:400_000]
    assert not w0.read_into(D1, REGION + 10, memoryview(bytearray(REGION)))  # region 2 is not there
    assert not w1.read_into(D2, 0, memoryview(bytearray(10)))


def test_a_read_within_the_region_just_put_comes_from_its_slot_until_the_slot_is_reused() -> None:
    """read_into's short way (the writer's last put) never outlives the slot's contents."""
    arena = SegmentArena(2 * REGION, workers=2, ways_per_worker=1)  # one set: worker 0 has one slot
    try:
        writer = arena.writer(0)
        dest = memoryview(bytearray(1000))
        writer.put(D1, 0, filler(pattern(D1, 0)))
        assert writer.read_into(D1, 77, dest) and dest == pattern(D1, 0)[77:1077]
        assert not writer.read_into(D1, REGION - 10, dest)  # past the region: not the short way
        writer.put(D2, 3, filler(pattern(D2, 3)))  # the same slot, another region
        assert not writer.read_into(D1, 77, dest)
        assert writer.read_into(D2, 3 * REGION + 77, dest) and dest == pattern(D2, 3)[77:1077]

        def broken(view: memoryview) -> int:
            view[:10] = b"garbage..."
            raise OSError("the disk failed")

        with pytest.raises(OSError):
            writer.put(D1, 5, broken)  # empties the slot the last put used
        assert not writer.read_into(D2, 3 * REGION + 77, dest)
    finally:
        arena.close()


def in_table(table: SegmentArena, digest: bytes, index: int) -> bool:
    """Whether this table (not its companion) holds the region."""
    return segcache._holds(table, digest, index)


def test_a_mount_arena_keeps_a_bounded_share_for_streams() -> None:
    """``for_mount``: the stream table is STREAM_PER_WORKER per worker, at most half the bytes asked for."""
    per = segcache.STREAM_PER_WORKER
    assert segcache.stream_size(1536 << 20, 8) == 8 * per
    assert segcache.stream_size(4 * REGION, 8) == 2 * REGION  # a tiny arena: half
    arena = SegmentArena.for_mount(64 * per, workers=2)
    try:
        assert arena.stream is not None and arena.stream.size == 2 * per
        assert arena.size + arena.stream.size == 64 * per
        stats = arena.reader().stats()
        assert (stats.size, stats.slots) == (64 * per, 64 * per // REGION)
        assert stats.stream_slots == 2 * per // REGION
        assert arena.writer(1).ahead_slots == per // REGION  # the worker's own stream slots
    finally:
        arena.close()


def test_regions_read_in_order_go_to_the_stream_table_and_both_are_served() -> None:
    arena = SegmentArena(8 * REGION, workers=2, ways_per_worker=2, stream=4 * REGION)
    try:
        writer, cache = arena.writer(0), arena.reader()
        assert arena.stream is not None
        assert writer.put(D1, 0, filler(pattern(D1, 0)))
        assert writer.put(D1, 1, filler(pattern(D1, 1)), ahead=True)
        assert in_table(arena, D1, 0) and not in_table(arena.stream, D1, 0)
        assert in_table(arena.stream, D1, 1) and not in_table(arena, D1, 1)
        assert writer.has(D1, 0) and writer.has(D1, 1) and cache.holds(D1, 1)
        whole = pattern(D1, 0) + pattern(D1, 1)
        assert cache.read(D1, REGION + 5, 100) == whole[REGION + 5: REGION + 105]
        assert cache.read(D1, REGION - 50, 100) == whole[REGION - 50: REGION + 50]  # one region from each
        dest = memoryview(bytearray(REGION))
        assert arena.writer(1).read_into(D1, REGION // 2, dest)  # another worker's slots, both tables
        assert dest == whole[REGION // 2: REGION * 3 // 2]
        assert writer.read_into(D1, REGION + 7, dest[:10]) and dest[:10] == whole[REGION + 7: REGION + 17]
    finally:
        arena.close()


def test_streams_never_evict_what_random_readers_keep() -> None:
    """Fails if fills ahead went to the main table: a stream of many regions through a small arena
    would push out the region a random reader put, and keep only the stream's last ones."""
    arena = SegmentArena(8 * REGION, workers=1, ways_per_worker=2, stream=2 * REGION)
    try:
        writer, cache = arena.writer(0), arena.reader()
        writer.put(D2, 3, filler(pattern(D2, 3)))
        for index in range(40):
            writer.put(D1, index, filler(pattern(D1, index)), ahead=True)
            assert cache.read(D1, index * REGION, 10) == pattern(D1, index)[:10]
        assert cache.read(D2, 3 * REGION, 1000) == pattern(D2, 3)[:1000]
        assert sum(in_table(arena.stream, D1, i) for i in range(40)) == 2  # the stream's own slots, recycled
    finally:
        arena.close()
