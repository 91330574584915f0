"""A worker's half of the verified-segment arena (tvixmount/segcache.py): what it puts there.

A read of a blob bigger than one FUSE read puts every 256 KiB region it
touches into the arena, so the dispatcher serves the rest of the region
(the other half of a sequential reader's segment, an O_DIRECT re-read)
without asking a worker again, and the read itself is then copied out of
the arena. Where the store's segments are the arena's regions (the
embedded store), the segment is read and hashed right in the slot
(``BlobReader.segment_into``): no extra copy of 256 KiB per miss. Every
byte in a slot was checked against the blob's digest before the slot is
marked valid, and a segment that fails leaves the slot empty.

Only readers with such segments take part: a remote reader fetching
chunk by chunk would turn a 4 KiB read into a 256 KiB fetch, unless its
chunks lie on the regions' grid (a region is then the chunk the read
fetches anyway; store/grpc/reader.py). A gRPC reader also takes part while
it streams the blob (a run): the regions are arriving anyway, each chunk
verified before it is copied. Such
a reader says a read in order is worth several regions at once
(``segments_per_fill``): a reader that has caught up with the stream then
waits for one worker answer per MiB instead of one per region, and finds
the rest in the arena. Small blobs stay out too: a file read in one FUSE
request is read once (the page cache keeps it), and its slot would evict
a big file's region.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial

from tvixmount.castore.nodes import b3_text
from tvixmount.errors import IntegrityError, TvixError
from tvixmount.segcache import REGION, SegmentWriter
from tvixmount.store import BlobReader

log = logging.getLogger(__name__)

ONE_FUSE_READ = 128 << 10  # libfuse 2's largest read: a blob this small is read in one request
FIRST_DEPTH = 8  # regions (2 MiB) filled ahead of a blob once it is read in order
DEPTH = 32  # regions (8 MiB) at most, once the reader keeps going through what was filled
DEPTH_SHARE = 4  # and at most this fraction of the worker's own slots (its ways of every set)
BLOBS = 64  # blobs whose read position is remembered
TODO = 64  # regions waiting to be filled at most
BEHIND = 4  # regions a miss may lag the last one and still be in order (requests overtake each other)


def keep_regions(writer: SegmentWriter, reader: BlobReader, digest: bytes, offset: int, length: int,
                 fill_ahead: FillAhead | None = None) -> bool:
    """Put the regions of ``[offset, offset + length)`` that no slot holds yet; False: the reader serves it.

    False for a small blob or a reader without regions, and when a region
    the read touches does not verify: a remote reader verifies chunks
    smaller than a region, so the read's own bytes may be good, and if they
    are not, the reader fails the read itself. With ``fill_ahead``, the
    read is noted there as a miss, and a read in order also puts the
    regions after it up to the reader's ``segments_per_fill``, as does any
    read of a reader that holds its blob whole (a copy costs no fetch); one
    of those that fails ends that (the region stays empty) without failing
    the read. The regions of a read in order, and those put after a read,
    go to the stream table (segcache.py, "Two tables"); a random read's own
    regions to the main one.
    A region that fails for another reason (the server is away) goes to
    the caller. Nothing that failed is ever kept.

    The region of a read out of order within one region is not looked
    up first. A FUSE read reaches a worker only after the dispatcher's
    probe of the arena missed, and no fill puts regions ahead of a reader
    out of order, so the look-up would almost always miss too; in a mount
    it costs as much as a tenth of the worker's Python per read
    (docs/performance.md "Calls in the worker"). If the region is there
    after all (another worker put it meanwhile, or a background fetch of a
    small file's whole blob), it is read and verified once more, into this
    worker's slot; both copies are good. A read in order is looked up: the
    fills ahead of it (this worker's own, while requests for the regions
    they cover wait in its queue) often put its region after the probe.
    """
    size = reader.size
    if size <= ONE_FUSE_READ or length <= 0 or reader.segment_size != REGION:
        return False
    touched = (min(offset + length, size) - 1) // REGION
    last = touched
    in_order = fill_ahead is not None and fill_ahead.note(digest, offset, length, size)
    filled = in_order or reader.holds_whole  # reads whose regions fills put, ahead of them or with them
    if filled:
        last = min(touched + reader.segments_per_fill - 1, (size - 1) // REGION)
    unseen = not filled and offset // REGION == touched  # see the docstring
    for index in range(offset // REGION, last + 1):
        if index > touched and reader.segment_size != REGION:
            break  # the reader stopped streaming: filling more would fetch for nobody
        if not unseen and writer.has(digest, index):
            continue
        try:
            ahead = in_order or index > touched  # a stream's region, or one put after the read
            writer.put(digest, index, partial(_fill, reader, index * REGION), ahead=ahead)
        except IntegrityError as exc:
            log.debug("region %d of blob %s not kept: %s", index, b3_text(digest), exc)
            return index > touched
        except TvixError as exc:
            if index <= touched:
                raise
            log.debug("region %d of blob %s not filled ahead: %s", index, b3_text(digest), exc)
            break
    return True


def read_kept(writer: SegmentWriter, reader: BlobReader, digest: bytes, offset: int, dest: memoryview) -> int:
    """``reader.pread_into`` for regions just kept: from the arena, the reader only if a slot moved on."""
    length = min(len(dest), reader.size - offset)
    if length > 0 and writer.read_into(digest, offset, dest[:length]):
        return length
    return reader.pread_into(offset, dest)


def _fill(reader: BlobReader, base: int, view: memoryview) -> int:
    got = reader.segment_into(base, view)
    return reader.pread_into(base, view) if got is None else got


class FillAhead:
    """Regions verified into the arena ahead of a blob read in order, while the worker is idle.

    Why here and not in the dispatcher: a fill asked for by the dispatcher
    costs a whole round trip of its CPU, as much as the read it saves. The
    worker sees only the reads the arena missed; a miss at or just past the
    regions it filled ahead means the reader went through them in order, so
    it fills the next ``depth`` regions, one per idle moment (the loop asks
    ``step`` only when no request waits). A miss anywhere else is random
    access: that blob's fill stops. A failing region is skipped (the read
    of it reports the failure); nothing here ever answers a request.

    How far: ``FIRST_DEPTH`` regions, doubled (up to ``depth``) each time the
    reader misses past regions it read from the arena, i.e. went through a
    whole fill. A random reader under the kernel's readahead sends runs of
    adjacent misses and never gets past a fill, so it keeps the short one.
    """

    def __init__(self, writer: SegmentWriter, depth: int | None = None, blobs: int = BLOBS) -> None:
        self.writer = writer
        # The reader sends the worker nothing while it reads filled regions,
        # so the fill stops at the edge until the reader misses there: the
        # deeper the fill, the fewer reads wait for a round trip (page-cache
        # warm sequential read, 2 workers, 64 MiB arena: depth 8 564-931 MB/s,
        # 32 817-1144, docs/performance.md "Filling further ahead"). Bounded by
        # a share of the worker's slots for streams (segcache.py, "Two
        # tables"), so one stream's fill does not push out another's regions
        # before they are read.
        self.depth = depth if depth is not None else min(DEPTH, writer.ahead_slots // DEPTH_SHARE)
        self.first_depth = min(FIRST_DEPTH, self.depth)
        self._blobs = blobs
        # digest -> [first region not asked for yet, last region of the last miss, size hint, reach]
        self._state: OrderedDict[bytes, list[int]] = OrderedDict()
        self.todo: deque[tuple[bytes, int]] = deque()  # (digest, region) to fill; the worker's loop tests it
        self.filled = 0
        self.failed = 0

    def note(self, digest: bytes, offset: int, length: int, size: int) -> bool:
        """A read the dispatcher could not serve from the arena (blob of ``size`` bytes); True: in order."""
        if self.depth <= 0 or size <= ONE_FUSE_READ or length <= 0:
            return False
        first, last = offset // REGION, (min(offset + length, size) - 1) // REGION
        state = self._state.get(digest)
        if state is None:
            self._state[digest] = [last + 1, last, size, self.first_depth]
            if len(self._state) > self._blobs:
                self._state.popitem(last=False)
            return False
        self._state.move_to_end(digest)
        ahead, previous, _, reach = state
        if not previous - BEHIND <= first <= max(ahead, previous + 1) + 1:
            state[0], state[1], state[3] = last + 1, last, self.first_depth  # a jump: random access
            return False
        if first > previous + 1:  # the reader went through filled regions without missing
            reach = state[3] = min(self.depth, reach * 2)
        state[1] = max(previous, last)
        want = min(last + reach, (size - 1) // REGION)
        for index in range(max(ahead, last + 1), want + 1):
            self.todo.append((digest, index))
        while len(self.todo) > TODO:  # a worker never idle: the oldest wishes go (bounded memory)
            self.todo.popleft()
        state[0] = max(ahead, want + 1)
        return True

    def step(self, readers: Callable[[bytes, int | None], BlobReader]) -> None:
        """Fill one region asked for (``readers(digest, size)``: the worker's open reader)."""
        digest, index = self.todo.popleft()
        state = self._state.get(digest)
        if state is None or index < state[1] or self.writer.has(digest, index):
            return  # forgotten, passed already, or there
        try:
            reader = readers(digest, state[2])
            if reader.segment_size != REGION:
                # a remote reader off the region grid that stopped streaming: a fill would widen into
                # fetches of its own (on the grid it is the chunk fetch the reader is about to make)
                return
            self.writer.put(digest, index, partial(_fill, reader, index * REGION), ahead=True)
            self.filled += 1
        except TvixError as exc:
            self.failed += 1
            log.debug("filling region %d of blob %s ahead failed: %s", index, b3_text(digest), exc)
