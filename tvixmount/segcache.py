"""Verified 256 KiB blob regions in shared memory, served by the dispatcher without a round trip.

Why: a 128 KiB read that goes to a worker costs ~390 us of handler time
(docs/performance.md, "Issue 11"): two pipe writes, three wake-ups, the
worker's Python and a pread + blake3 of a whole 256 KiB segment. The bytes
a worker has verified are still verified bytes a moment later; kept in a
shared mapping, the dispatcher's FUSE thread serves the next read of them
with a lookup and one copy. A sequential reader finds the other half of a
segment there, and (``FillAhead``, workers) the segments after it.

What is kept: *regions*, the ``REGION``-aligned pieces of a blob, keyed by
(blob digest, region index). A worker copies a region into a slot only
from its store's verifying reader (``BlobReader.pread_into``: every byte
it writes was checked against the blob's digest, per segment); a read that
fails verification writes nothing that can be served.

Layout of the one anonymous ``MAP_SHARED`` mapping (made by the pool before
it forks the zygote, like shmring.py's rings)::

    [tags: 8 bytes per slot][refs: 1 byte per slot][headers: 64 bytes per slot][data: REGION per slot]
    header: seq u64 | length u64 | region index u64 | stamp u64 | blob digest 32 bytes

Slots form ``sets`` of ``ways`` slots; a region's set is
``(digest's first 8 bytes + index) % sets``, so the regions of one file
fall into consecutive sets. Every worker owns ``ways_per_worker`` ways of
every set, and only the owner ever writes a slot: there is one writer per
slot, across processes, with no lock (a replacement worker owns what the
dead one owned). The owner picks its victim among its ways by clock: a
the oldest write whose reference byte (set by the dispatcher on every hit)
is clear, else the oldest (and every reference byte of its ways is cleared).

Never a torn slot: each slot has a sequence number (a seqlock). The writer
makes it odd, clears the slot's tag, writes key, length and bytes, makes it
even (a new value, the old one plus two), then sets the tag. The reader
finds a candidate by tag (a ``bytes.find`` over the set's tag row, one
probe for all ways), reads the sequence (must be even), checks the key,
copies, and reads the sequence again: the copy counts only if it did not
change. That holds on x86-64, whose stores are seen in program order and
whose loads are not reordered with other loads; 8-byte aligned loads and
stores (a ``memoryview`` cast to ``Q``) are never torn. A worker that dies
mid-write leaves an odd sequence: never served, and its replacement
starts from it. When the FUSE threads outnumber the CPUs, the copy is made
with the GIL released (rawcopy.py, ``SegmentArena.reader``), so that the
other threads run during it; the same sequence check that guards against
writers in other processes guards against this process's threads then.

Two tables, so that streams do not evict or fill what random readers keep.
The regions of a blob read in order (the reader's own, and those filled
ahead of it) go to a small *stream* table of the same shape, in a mapping
of its own; everything else (a random or O_DIRECT miss) goes to the main
one, and both are probed. A stream's bytes are wanted once: the kernel's
page cache keeps them for re-reads, and it can give them back under
memory pressure, which the arena cannot. Kept in the main table, a
stream of 1 GiB would push out 1 GiB of other readers' regions, and would
touch (allocate and zero) 1 GiB of shared pages on its first pass: three
to four times the cost of rewriting a slot whose pages are already there
(docs/performance.md, "A table for streams"). In its own table the same
stream cycles through a few MiB per worker.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from .metrics import counter, gauge
from .rawcopy import Pinned, copy_out

REGION = 256 << 10  # the store's segment size: a region the worker verified is one segment, hashed once
DEFAULT_SIZE = 64 << 20  # the smallest default, and the size for programmatic users (tests, the pool)
MAX_DEFAULT_SIZE = 2 << 30
MEMORY_SHARE = 16
# The stream table, per worker: a stream's fills are one worker's (reads of a handle keep to a
# worker), and FillAhead fills at most a quarter of the worker's stream slots ahead of one reader.
STREAM_PER_WORKER = 16 << 20
TAG = 8
HEADER = 64
_SEQ, _LEN, _INDEX, _STAMP = 0, 1, 2, 3  # u64 fields of a header
_DIGEST_AT = 32
DIGEST_LEN = 32
_KEY = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class SegmentCacheStats:
    """``segment_cache`` in ``user.tvixmount.stats``."""

    size: int = gauge("bytes of the shared verified-segment arena (fixed at mount time)")
    slots: int = gauge("256 KiB slots in the verified-segment arena")
    stream_slots: int = gauge("of those, the slots for the regions of blobs read in order")
    hits: int = counter("FUSE reads served from verified segments in shared memory (no worker)")
    misses: int = counter("FUSE reads whose bytes were not all in the segment arena")
    torn: int = counter("segment-arena reads dropped because the slot was rewritten during the copy")


def default_size(memory: int | None = None) -> int:
    """The command line's arena: a sixteenth of the memory the mount may use, 64 MiB to 2 GiB.

    Why scaled: a random reader whose working set is larger than the arena
    misses in proportion, and a miss costs a worker round trip (~4x a hit's
    CPU). Eight O_DIRECT readers over 1 GiB of big files read 0.7-1.0 GB/s
    with the old fixed 64 MiB and 1.5-2.1 GB/s with 2 GiB (2.0-2.5 with 1-3
    GiB and four FUSE threads; docs/performance.md, "The arena sized to
    memory").

    Why a sixteenth and a cap: the arena's pages stay resident once written
    (shared memory is not reclaimed like the page cache), and they are
    memory the builds on the same machine do not get; the kernel's page
    cache, which is reclaimable, serves buffered re-reads beyond it anyway.
    Pages are touched only as segments are verified, so an idle mount costs
    none of it.
    """
    if memory is None:
        from .hostmem import usable_memory

        memory = usable_memory()
    share = (memory // MEMORY_SHARE) >> 20 << 20  # whole MiB
    return max(DEFAULT_SIZE, min(MAX_DEFAULT_SIZE, share))


def stream_size(size: int, workers: int) -> int:
    """The stream table's share of an arena of ``size`` bytes: ``STREAM_PER_WORKER`` each, at most half."""
    return min(size // 2, workers * STREAM_PER_WORKER)


def tag_of(digest: bytes, index: int) -> bytes:
    """A slot's 8-byte hint for (digest, index); never all zeros (the mark of an empty slot)."""
    value = (int.from_bytes(digest[8:16], "little") ^ (index * 0x9E3779B97F4A7C15)) & ((1 << 64) - 1)
    return _KEY.pack(value | 1)


class SegmentArena:
    """The shared mapping (the main table, and the stream table's if any). Create before forking the
    zygote; both sides take their end of it."""

    def __init__(self, size: int, workers: int, ways_per_worker: int = 2, stream: int = 0) -> None:
        """``size`` bytes for the main table; ``stream`` bytes more for a stream table (0: streams share
        the main one)."""
        if workers < 1 or ways_per_worker < 1:
            raise ValueError(f"bad segment arena shape: {workers} workers, {ways_per_worker} ways each")
        self.ways = workers * ways_per_worker
        self.ways_per_worker = ways_per_worker
        self.workers = workers
        self.sets = max(1, size // (REGION * self.ways)) if size > 0 else 0
        self.slots = self.sets * self.ways
        self.size = self.slots * REGION
        meta = self.slots * (TAG + 1 + HEADER)
        self._data_at = -(-meta // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, max(mmap.PAGESIZE, self._data_at + self.size), flags=mmap.MAP_SHARED)
        whole = memoryview(self._map)
        self.tags = whole[: self.slots * TAG]
        self.refs = whole[self.slots * TAG: self.slots * (TAG + 1)]
        headers_at = self.slots * (TAG + 1)
        self.headers = whole[headers_at: headers_at + self.slots * HEADER]
        self.words = self.headers.cast("Q")  # 8 u64 per header: seq, length, index, stamp, digest
        self.tag_words = self.tags.cast("Q")
        self.data = whole[self._data_at: self._data_at + self.size]
        # Where the data starts in this process, for copies without the GIL. The pin keeps
        # the map mapped while this arena object lives, also after close() (below).
        self._pin = Pinned(self._map)
        self.base = self._pin.address + self._data_at
        self._views = [self.tags, self.refs, self.headers, self.words, self.tag_words, self.data, whole]
        self.stream = SegmentArena(stream, workers, ways_per_worker) if stream > 0 else None
        self.tables = (self,) if self.stream is None else (self, self.stream)

    @classmethod
    def for_mount(cls, size: int, workers: int) -> SegmentArena:
        """``size`` bytes in all, ``stream_size`` of them for streams."""
        stream = stream_size(size, workers)
        return cls(size - stream, workers, stream=stream)

    def holds(self, digest: bytes, index: int) -> bool:
        """Whether a valid slot (any worker's, either table) holds region ``index`` of the blob now."""
        return any(_holds(table, digest, index) for table in self.tables)

    def set_of(self, digest: bytes, index: int) -> int:
        return (int.from_bytes(digest[:8], "little") + index) % self.sets

    def slot_data(self, slot: int) -> memoryview:
        return self.data[slot * REGION: (slot + 1) * REGION]

    def writer(self, worker: int) -> SegmentWriter:
        """The end of worker slot ``worker`` (its ways of every set), in the worker process."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"no worker {worker} in a segment arena of {self.workers}")
        return SegmentWriter(self, worker)

    def reader(self, threads: int = 1) -> SegmentCache:
        """The dispatcher's end: lookups and copies, under llfuse's lock, for ``threads`` FUSE threads.

        The copies release the GIL when the threads outnumber the CPUs, and only
        then. Measured on 2 CPUs, eight O_DIRECT readers served from the arena:
        4 threads 8-15 % faster and 10 threads 14 % (a thread that would sleep
        on the GIL takes its next request instead), 2 threads level, 1 thread
        12 % slower (the release and the ctypes call are pure cost there);
        docs/performance.md, "The arena copy without the GIL (stop 31)".
        """
        return SegmentCache(self, copy_releases_gil=threads > len(os.sched_getaffinity(0)))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.slots = 0  # both ends see an empty arena from now on
        for view in reversed(self._views):
            view.release()
        self._views.clear()
        # The pin (and any straggling view) keeps it mapped until this object is collected,
        # so a reader whose copy began before close() never meets an unmapped page.
        with contextlib.suppress(BufferError):
            self._map.close()


def _candidates(arena: SegmentArena, digest: bytes, index: int) -> list[int]:
    """Slots whose tag matches (digest, index), usually one; the key itself is checked by the caller.

    ``set_of`` and ``tag_of`` are written out here: this runs for every FUSE
    read of a big file, and each call costs more than its arithmetic.
    """
    ways = arena.ways
    first = (int.from_bytes(digest[:8], "little") + index) % arena.sets * ways  # set_of
    row = arena.tags[first * TAG: (first + ways) * TAG].tobytes()
    tag = _KEY.pack((int.from_bytes(digest[8:16], "little") ^ (index * 0x9E3779B97F4A7C15))  # tag_of
                    & 0xFFFF_FFFF_FFFF_FFFF | 1)
    found = []
    at = row.find(tag)
    while at >= 0:
        if at % TAG == 0:
            found.append(first + at // TAG)
        at = row.find(tag, at + 1)
    return found


def _holds(arena: SegmentArena, digest: bytes, index: int) -> bool:
    if arena.slots == 0:
        return False
    for slot in _candidates(arena, digest, index):
        seq = arena.words[slot * (HEADER // 8) + _SEQ]
        if not seq & 1 and _key_matches(arena, slot, digest, index):
            return True
    return False


def _read_slot(arena: SegmentArena, digest: bytes, index: int, start: int, dest: memoryview) -> bool:
    """Copy from a valid slot of region ``index`` into ``dest`` under the seqlock; False: none held it."""
    words = arena.words
    for slot in _candidates(arena, digest, index):
        seq_at = slot * (HEADER // 8) + _SEQ
        before = words[seq_at]
        if before & 1 or not _key_matches(arena, slot, digest, index) \
                or words[seq_at + _LEN] < start + len(dest):
            continue
        base = slot * REGION + start
        dest[:] = arena.data[base: base + len(dest)]
        if words[seq_at] == before:
            return True
    return False


def _key_matches(arena: SegmentArena, slot: int, digest: bytes, index: int) -> bool:
    words = arena.words
    base = slot * (HEADER // 8)
    at = slot * HEADER + _DIGEST_AT
    return words[base + _INDEX] == index and arena.headers[at: at + DIGEST_LEN] == digest


class SegmentCache:
    """Dispatcher side: the verified bytes of a range, if every region of it is in a valid slot.

    One thread at a time (FUSE handlers run under llfuse's lock); workers
    write meanwhile, which the seqlock makes harmless.
    """

    def __init__(self, arena: SegmentArena, copy_releases_gil: bool = False) -> None:
        self.arena = arena
        self.copy_releases_gil = copy_releases_gil
        self.hits = 0
        self.misses = 0
        self.torn = 0

    def read(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` (clipped to the file's size by the caller), or None."""
        if self.arena.slots == 0 or length <= 0:
            return None
        first, last = offset // REGION, (offset + length - 1) // REGION
        if first == last:  # most reads are in one region: no list, no join
            data = self._copy(digest, first, offset - first * REGION, length)
        else:
            parts: list[bytes] = []
            for index in range(first, last + 1):
                base = index * REGION
                start = max(offset, base) - base
                part = self._copy(digest, index, start, min(offset + length, base + REGION) - base - start)
                if part is None:
                    parts = []
                    break
                parts.append(part)
            data = b"".join(parts) if parts else None
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def _copy(self, digest: bytes, index: int, start: int, length: int) -> bytes | None:
        for table in self.arena.tables:
            for slot in _candidates(table, digest, index):
                data = self._copy_slot(table, slot, digest, index, start, length)
                if data is not None:
                    return data
        return None

    def _copy_slot(self, table: SegmentArena, slot: int, digest: bytes, index: int, start: int,
                   length: int) -> bytes | None:
        words = table.words
        seq_at = slot * (HEADER // 8) + _SEQ
        before = words[seq_at]
        if before & 1 or not _key_matches(table, slot, digest, index) \
                or words[seq_at + _LEN] < start + length:
            return None
        data = self._take(table, slot * REGION + start, length)
        if words[seq_at] != before:  # rewritten while we copied: these bytes may be anyone's
            self.torn += 1
            return None
        table.refs[slot] = 1
        return data

    def holds(self, digest: bytes, index: int) -> bool:
        """Whether region ``index`` of the blob is in a valid slot now (no copy, no counting)."""
        return self.arena.holds(digest, index)

    def _take(self, table: SegmentArena, at: int, length: int) -> bytes:
        """The one copy out of the arena (apart so a test can race a writer against it)."""
        if self.copy_releases_gil:
            return copy_out(table.base + at, length)
        return table.data[at: at + length].tobytes()

    def stats(self) -> SegmentCacheStats:
        tables = self.arena.tables
        stream = self.arena.stream
        return SegmentCacheStats(size=sum(t.size for t in tables), slots=sum(t.slots for t in tables),
                                 stream_slots=stream.slots if stream is not None else 0,
                                 hits=self.hits, misses=self.misses, torn=self.torn)


class SegmentWriter:
    """Worker side: put verified regions into this worker's ways. Single-threaded, like a worker."""

    def __init__(self, arena: SegmentArena, worker: int) -> None:
        self.arena = arena
        self._ways = range(worker * arena.ways_per_worker, (worker + 1) * arena.ways_per_worker)
        self.slots = arena.sets * arena.ways_per_worker  # the slots only this worker writes
        self.written = 0
        # (digest, index, slot, length) of the region this worker put last, while its slot holds it.
        self._last: tuple[bytes, int, int, int] | None = None
        # Where ``put(..., ahead=True)`` goes: this worker's end of the stream table, if there is one.
        self.stream = SegmentWriter(arena.stream, worker) if arena.stream is not None else None
        self.ahead_slots = self.stream.slots if self.stream is not None else self.slots

    def has(self, digest: bytes, index: int) -> bool:
        """Whether a valid slot (any worker's, either table) holds the region now."""
        return self.arena.holds(digest, index)

    def read_into(self, digest: bytes, offset: int, dest: memoryview) -> bool:
        """Copy the bytes at ``offset`` into ``dest`` from valid slots (any worker's), under
        the seqlock; False when a region is missing or was rewritten meanwhile (``dest`` is then
        partly written: use another source).

        A read within the region this worker put last (a read the arena
        missed, just filled) is copied from its slot without a look-up: only
        this worker writes its own slots, so nothing can change it meanwhile.
        """
        arena = self.arena
        if arena.slots == 0:
            return False
        if self._read_last(digest, offset, dest):
            return True
        if self.stream is not None and self.stream._read_last(digest, offset, dest):
            return True
        done, total = 0, len(dest)
        while done < total:
            at = offset + done
            index, start = divmod(at, REGION)
            take = min(total - done, REGION - start)
            part = dest[done: done + take]
            if not any(_read_slot(table, digest, index, start, part) for table in arena.tables):
                return False
            done += take
        return True

    def _read_last(self, digest: bytes, offset: int, dest: memoryview) -> bool:
        last = self._last
        if last is not None and last[0] == digest:
            _, index, slot, got = last
            start = offset - index * REGION
            if start >= 0 and start + len(dest) <= got:
                base = slot * REGION + start
                dest[:] = self.arena.data[base: base + len(dest)]
                return True
        return False

    def put(self, digest: bytes, index: int, fill: Callable[[memoryview], int], ahead: bool = False) -> bool:
        """Fill a slot with region ``index`` of ``digest`` through ``fill`` (a verifying reader's
        ``pread_into`` of the region); False when there is no arena. ``ahead``: a region of a blob read
        in order, for the stream table (if any).

        ``fill`` returns how many bytes it wrote (fewer than REGION only for a
        blob's last region). If it raises, the slot is left empty (never
        servable) and the exception goes on.
        """
        if ahead and self.stream is not None:
            return self.stream.put(digest, index, fill)
        arena = self.arena
        if arena.slots == 0 or len(digest) != DIGEST_LEN:
            return False
        # set_of and tag_of written out, as in _candidates: every read a worker answers from the arena
        # puts a region, and in a mount each call costs several times its arithmetic
        # (docs/performance.md "Calls in the worker"); a hypothesis test holds both to the functions.
        first = (int.from_bytes(digest[:8], "little") + index) % arena.sets * arena.ways  # set_of
        slot = self._victim(first)
        if self._last is not None and self._last[2] == slot:
            self._last = None  # its slot is about to hold another region
        words = arena.words
        base = slot * (HEADER // 8)
        seq = words[base + _SEQ] | 1  # odd: being written (a dead writer's odd value stays odd)
        words[base + _SEQ] = seq
        arena.tag_words[slot] = 0
        arena.refs[slot] = 0
        words[base + _LEN] = 0
        try:
            with arena.data[slot * REGION: (slot + 1) * REGION] as view:  # slot_data
                got = fill(view)
        except BaseException:
            words[base + _SEQ] = seq + 1  # even, empty: length 0 and no tag
            raise
        at = slot * HEADER + _DIGEST_AT
        arena.headers[at: at + DIGEST_LEN] = digest
        words[base + _INDEX] = index
        words[base + _LEN] = got
        words[base + _STAMP] = time.monotonic_ns()  # machine-wide, so a replacement worker's are newer
        words[base + _SEQ] = seq + 1  # even and new: readers' earlier copies of the old bytes fail
        tag = (int.from_bytes(digest[8:16], "little") ^ (index * 0x9E3779B97F4A7C15)) & 0xFFFF_FFFF_FFFF_FFFF
        arena.tags[slot * TAG: (slot + 1) * TAG] = _KEY.pack(tag | 1)  # tag_of
        self.written += 1
        self._last = (digest, index, slot, got)
        return True

    def _victim(self, set_base: int) -> int:
        """An empty way of the set, else the oldest write no reader used since the last sweep,
        else (every way used) the oldest, after clearing the reference bits: LRU-ish, like a clock."""
        arena = self.arena
        words = arena.words
        best, best_stamp, referenced = -1, -1, True
        for way in self._ways:
            slot = set_base + way
            if arena.tag_words[slot] == 0:
                return slot
            used = arena.refs[slot] != 0
            stamp = words[slot * (HEADER // 8) + _STAMP]
            if (used, stamp) < (referenced, best_stamp) or best < 0:
                best, best_stamp, referenced = slot, stamp, used
        if referenced:
            for way in self._ways:
                arena.refs[set_base + way] = 0
        return best
