"""A worker's arena fills: regions kept from verified reads, and filled ahead of in-order reads only."""

from __future__ import annotations

import pytest

from tests.store_suite import pattern
from tvixmount import segcache
from tvixmount.errors import IntegrityError, Unavailable
from tvixmount.segcache import REGION, SegmentArena
from tvixmount.store import BlobReader
from workers.segfill import FillAhead, keep_regions, read_kept

DIGEST = bytes(range(32))
READ = 128 << 10


class Reader(BlobReader):
    """Bytes in memory; ``bad`` regions fail like a segment that does not match its digest."""

    segment_size = REGION

    def __init__(self, data: bytes, bad: tuple[int, ...] = ()) -> None:
        self.data = data
        self.size = len(data)
        self.bad = bad
        self.reads: list[int] = []
        self.away_from: int | None = None  # reads reaching this region fail: the server went away
        self.stop_after: int | None = None  # from this region on, no more regions (a stream that ended)

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        if self.away_from is not None and (offset + max(length, 1) - 1) // REGION >= self.away_from:
            raise Unavailable("the server is away")
        for index in range(offset // REGION, (offset + max(length, 1) - 1) // REGION + 1):
            if index in self.bad:
                raise IntegrityError(f"region {index} does not match its digest")
        if self.stop_after is not None and offset // REGION >= self.stop_after:
            self.segment_size = None  # type: ignore[assignment]
        return self.data[offset: offset + length]


@pytest.fixture
def arena():
    a = SegmentArena(32 * REGION, workers=1)
    yield a
    a.close()


def test_kept_regions_are_served_back_whole(arena: SegmentArena) -> None:
    writer, data = arena.writer(0), pattern(5 * REGION + 99)
    reader = Reader(data)
    assert keep_regions(writer, reader, DIGEST, REGION - 10, 20)  # touches regions 0 and 1
    assert writer.has(DIGEST, 0) and writer.has(DIGEST, 1) and not writer.has(DIGEST, 2)
    dest = bytearray(20)
    assert read_kept(writer, reader, DIGEST, REGION - 10, memoryview(dest)) == 20
    assert bytes(dest) == data[REGION - 10: REGION + 10]
    assert arena.reader().read(DIGEST, 0, 2 * REGION) == data[: 2 * REGION]
    assert not keep_regions(writer, Reader(b"x" * READ), DIGEST, 0, 10)  # one FUSE read: not kept
    remote = Reader(data)
    remote.segment_size = None  # type: ignore[assignment]
    assert not keep_regions(writer, remote, DIGEST, 3 * REGION, 10)  # no segments of its own: not widened
    assert not writer.has(DIGEST, 3)


def test_only_a_read_out_of_order_within_one_region_skips_the_look_up(arena: SegmentArena) -> None:
    """The dispatcher asks for a read within one region only after the arena missed it, and no fill
    runs ahead of a reader out of order, so the worker reads it without looking; a read across
    regions, and a read in order (whose region a fill may have put meanwhile), still skip the regions
    already there."""
    writer, data = arena.writer(0), pattern(8 * REGION)
    reader = Reader(data)
    assert keep_regions(writer, reader, DIGEST, 0, READ)
    assert reader.reads == [0]
    assert keep_regions(writer, reader, DIGEST, REGION - 10, 20)  # region 0 is there: only region 1 is read
    assert reader.reads == [0, REGION]
    assert keep_regions(writer, reader, DIGEST, READ, READ)  # within region 0 again: read once more
    assert reader.reads == [0, REGION, 0]
    assert arena.reader().read(DIGEST, 0, 2 * REGION) == data[: 2 * REGION]  # both copies serve the same
    fill, other = FillAhead(writer), bytes(range(1, 33))
    ordered = Reader(data)
    assert keep_regions(writer, ordered, other, 0, READ, fill)  # a first read: not in order yet
    writer.put(other, 1, lambda view: ordered.pread_into(REGION, view))  # as a fill ahead of it would
    assert keep_regions(writer, ordered, other, READ, READ, fill)  # in order: region 0 is looked up
    assert keep_regions(writer, ordered, other, REGION, READ, fill)  # and so is region 1, there already
    assert ordered.reads == [0, REGION]  # each region read once: by the first read, and by the fill


def test_a_bad_region_is_not_kept_and_the_read_is_left_to_the_reader(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    reader = Reader(pattern(4 * REGION), bad=(2,))
    assert not keep_regions(writer, reader, DIGEST, 2 * REGION + 5, 10)  # the reader answers (and fails) it
    assert not writer.has(DIGEST, 2)
    assert arena.reader().read(DIGEST, 2 * REGION, 10) is None
    with pytest.raises(IntegrityError):
        reader.pread(2 * REGION + 5, 10)


def test_a_reader_away_fails_the_read_it_touches(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    reader = Reader(pattern(4 * REGION))
    reader.away_from = 0
    with pytest.raises(Unavailable):
        keep_regions(writer, reader, DIGEST, 2 * REGION + 5, 10)
    assert not writer.has(DIGEST, 2)


def test_a_streamed_reader_fills_several_regions_on_a_read_in_order(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(40 * REGION)
    reader = Reader(data)
    reader.segments_per_fill = 4
    fill = FillAhead(writer, depth=8)
    assert keep_regions(writer, reader, DIGEST, 0, READ, fill)  # the first read: not yet "in order"
    assert [writer.has(DIGEST, i) for i in range(2)] == [True, False]
    assert keep_regions(writer, reader, DIGEST, REGION, READ, fill)  # in order: regions 1-4 at once
    assert [writer.has(DIGEST, i) for i in range(1, 6)] == [True] * 4 + [False]
    assert arena.reader().read(DIGEST, 0, 5 * REGION) == data[: 5 * REGION]
    assert keep_regions(writer, reader, DIGEST, 30 * REGION, READ, fill)  # a jump: that region alone
    assert writer.has(DIGEST, 30) and not writer.has(DIGEST, 31)
    plain = Reader(data)  # segments_per_fill 1 (a store's own segments): the read's regions only
    other = bytes(range(1, 33))
    for offset in (0, REGION):
        assert keep_regions(writer, plain, other, offset, READ, fill)
    assert writer.has(other, 1) and not writer.has(other, 2)


def test_a_reader_holding_its_blob_whole_fills_several_regions_on_any_miss(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(10 * REGION + 5)
    reader = Reader(data)
    reader.holds_whole, reader.segments_per_fill = True, 4
    fill = FillAhead(writer, depth=8)
    assert keep_regions(writer, reader, DIGEST, 0, READ, fill)  # the first read already: regions 0-3
    assert [writer.has(DIGEST, i) for i in range(5)] == [True] * 4 + [False]
    assert arena.reader().read(DIGEST, 0, 4 * REGION) == data[: 4 * REGION]
    assert keep_regions(writer, reader, DIGEST, 9 * REGION, READ, fill)  # a jump: from there to the end
    assert writer.has(DIGEST, 9) and writer.has(DIGEST, 10) and not writer.has(DIGEST, 8)


def test_a_bad_region_past_the_read_ends_the_filling_not_the_read(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(10 * REGION)
    reader = Reader(data, bad=(3,))
    reader.segments_per_fill = 4
    fill = FillAhead(writer, depth=8)
    keep_regions(writer, reader, DIGEST, 0, READ, fill)
    assert keep_regions(writer, reader, DIGEST, REGION, READ, fill)  # regions 1-4 wanted, 3 is bad
    assert [writer.has(DIGEST, i) for i in range(1, 5)] == [True, True, False, False]
    dest = bytearray(READ)
    assert read_kept(writer, reader, DIGEST, REGION, memoryview(dest)) == READ
    assert bytes(dest) == data[REGION: REGION + READ]
    other = bytes(range(2, 34))
    reader.away_from = 2  # the server goes away before region 2, filled past the read: the read is served
    for offset in (0, REGION):
        assert keep_regions(writer, reader, other, offset, READ, fill)
    assert [writer.has(other, i) for i in range(1, 4)] == [True, False, False]


def test_a_reader_that_stops_streaming_is_not_filled_further(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(10 * REGION)
    reader = Reader(data)
    reader.segments_per_fill = 4
    fill = FillAhead(writer, depth=8)
    keep_regions(writer, reader, DIGEST, 0, READ, fill)
    reader.stop_after = 1  # it reads region 1, then its stream ends: chunk by chunk from there
    assert keep_regions(writer, reader, DIGEST, REGION, READ, fill)
    assert writer.has(DIGEST, 1) and not writer.has(DIGEST, 2)
    while fill.todo:
        fill.step(lambda digest, size: reader)
    assert not writer.has(DIGEST, 2)  # nor ahead of the reads


def test_in_order_misses_fill_ahead_and_a_jump_stops_it(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(40 * REGION)
    reader = Reader(data)
    fill = FillAhead(writer, depth=4)
    fill.note(DIGEST, 0, READ, len(data))
    assert not fill.todo  # one read says nothing yet
    fill.note(DIGEST, READ, READ, len(data))
    assert fill.todo
    while fill.todo:
        fill.step(lambda digest, size: reader)
    assert [writer.has(DIGEST, i) for i in range(1, 6)] == [True] * 4 + [False]
    assert fill.filled == 4
    fill.note(DIGEST, 5 * REGION, READ, len(data))  # the reader went through them: the next miss
    while fill.todo:
        fill.step(lambda digest, size: reader)
    assert all(writer.has(DIGEST, i) for i in range(6, 10)) and not writer.has(DIGEST, 10)
    fill.note(DIGEST, 30 * REGION, READ, len(data))  # a jump: random access
    assert not fill.todo


def test_a_fill_that_fails_is_counted_and_kept_out(arena: SegmentArena) -> None:
    writer = arena.writer(0)
    data = pattern(10 * REGION)
    reader = Reader(data, bad=(2,))
    fill = FillAhead(writer, depth=3)
    fill.note(DIGEST, 0, READ, len(data))
    fill.note(DIGEST, READ, READ, len(data))
    while fill.todo:
        fill.step(lambda digest, size: reader)
    assert (fill.filled, fill.failed) == (2, 1)
    assert writer.has(DIGEST, 1) and not writer.has(DIGEST, 2) and writer.has(DIGEST, 3)


def test_a_worker_never_idle_keeps_a_bounded_wish_list(arena: SegmentArena) -> None:
    fill = FillAhead(arena.writer(0), depth=8)
    size = 10_000 * REGION
    for region in range(0, 2000):
        fill.note(DIGEST, region * REGION, READ, size)
    assert len(fill.todo) <= 64


@pytest.mark.parametrize(("size", "workers", "depth"), [
    (64 << 20, 2, 32),  # the default arena on 2 workers: 128 slots each, up to 8 MiB ahead
    (64 << 20, 8, 8),  # 32 slots each: a quarter of them
    (4 << 20, 2, 2),  # a small arena: 8 slots each
])
def test_the_default_fill_reaches_at_most_a_quarter_of_the_workers_slots(size: int, workers: int,
                                                                         depth: int) -> None:
    """A fill ahead never claims more than its share of the slots other readers' regions live in."""
    arena = SegmentArena(size, workers)
    try:
        fill = FillAhead(arena.writer(0))
        assert fill.depth == depth and fill.first_depth == min(8, depth)
    finally:
        arena.close()


def _wished(fill: FillAhead) -> list[int]:
    wished = [index for _, index in fill.todo]
    fill.todo.clear()  # as if the worker had filled them
    return wished


def test_the_fill_deepens_while_the_reader_goes_through_it_and_not_for_runs_of_misses() -> None:
    """Past a whole fill without a miss: twice as far, up to ``depth``; adjacent misses: as far as before."""
    arena = SegmentArena(64 << 20, 2)
    try:
        fill = FillAhead(arena.writer(0))
        size = 1000 * REGION
        fill.note(DIGEST, 0, READ, size)
        fill.note(DIGEST, REGION, READ, size)  # in order, adjacent: the first 8
        assert _wished(fill) == list(range(2, 10))
        for region in (2, 3):  # the kernel's readahead: more adjacent misses, no deeper
            fill.note(DIGEST, region * REGION, READ, size)
        assert _wished(fill) == [10, 11]
        fill.note(DIGEST, 12 * REGION, READ, size)  # went through 4..11 from the arena
        assert _wished(fill) == list(range(13, 12 + 16 + 1))  # twice as far
        fill.note(DIGEST, 29 * REGION, READ, size)
        assert _wished(fill) == list(range(30, 29 + 32 + 1))
        fill.note(DIGEST, 62 * REGION, READ, size)
        assert _wished(fill) == list(range(63, 62 + 32 + 1))  # at most depth
        fill.note(DIGEST, 500 * REGION, READ, size)  # a jump: back to the first depth
        fill.note(DIGEST, 501 * REGION, READ, size)
        assert _wished(fill) == list(range(502, 510))
    finally:
        arena.close()


def test_a_streams_regions_go_to_the_stream_table_and_a_random_readers_to_the_main_one() -> None:
    """Fails if keep_regions or FillAhead.step put a stream's regions in the main table, or a random
    miss in the stream table."""
    arena = SegmentArena(32 * REGION, workers=1, stream=16 * REGION)
    try:
        writer, data = arena.writer(0), pattern(40 * REGION)
        assert arena.stream is not None
        reader, fill = Reader(data), FillAhead(writer)
        assert fill.depth == 4  # a quarter of the worker's 16 stream slots, not of its 32 main ones

        def where(index: int) -> str:
            main, stream = segcache._holds(arena, DIGEST, index), segcache._holds(arena.stream, DIGEST, index)
            return "main" * main + "stream" * stream or "-"

        assert keep_regions(writer, reader, DIGEST, 0, READ, fill)  # a first read: random, so far
        assert keep_regions(writer, reader, DIGEST, REGION, READ, fill)  # in order: its region, a stream's
        while fill.todo:
            fill.step(lambda digest, size: reader)
        assert [where(i) for i in range(7)] == ["main"] + ["stream"] * 5 + ["-"]
        assert keep_regions(writer, reader, DIGEST, 30 * REGION + 5, 10, fill)  # a jump: random again
        assert where(30) == "main" and not fill.todo
        whole = Reader(data)
        whole.holds_whole, whole.segments_per_fill = True, 3
        other = bytes(range(1, 33))
        assert keep_regions(writer, whole, other, 20 * REGION, READ)  # a random miss fills two more with it
        assert segcache._holds(arena, other, 20) and not segcache._holds(arena.stream, other, 20)
        assert all(segcache._holds(arena.stream, other, i) for i in (21, 22))
    finally:
        arena.close()
