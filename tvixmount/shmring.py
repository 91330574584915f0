"""Blob bytes from a worker to the dispatcher through shared memory instead of the reply pipe.

Why: a 128 KiB read answered through the reply pipe is copied four times
(worker buffer -> pipe -> dispatcher frame buffer -> msgpack's bytes object)
and the big frames make the dispatcher's reader grow and shuffle buffers.
Measured on this machine (docs/architecture.md, 'The read path'), a pipe round trip carrying
128 KiB took ~220 us; with the bytes in shared memory and only a short
descriptor on the pipe, ~59 us. Here the worker copies the verified bytes
into its ring once and the dispatcher copies them out once; the reply
carries a ``RingRef`` (protocol/framing.py) of a dozen bytes.

Layout: one anonymous ``MAP_SHARED`` arena, mapped by the pool before it
forks the zygote, so every worker the zygote ever forks inherits the same
pages (no names, no files, nothing to clean up after a crash). Worker slot
``i`` owns ring ``i``: a header page whose first 8 bytes hold how far the
dispatcher has consumed, then ``capacity`` data bytes::

    arena: [hdr 0 | data 0 .......][hdr 1 | data 1 .......] ...
            consumed (u64), written by the dispatcher only

Positions are byte counts since the arena was made and never wrap; a
position's place is ``position % capacity``. A reply's bytes are always
contiguous: when they would run past the end, the producer skips to the
start of the ring (the skipped tail counts as consumed with the reply).

One producer and one consumer per ring, and the pipe orders them:

* the worker (producer) writes bytes into the free space
  ``[produced, consumed + capacity)``, then sends the reply naming them;
* the collector thread (consumer) reads that reply from the pipe, copies
  the bytes out, and only then stores the new ``consumed``;
* the worker reads ``consumed`` to know what it may overwrite. It is one
  aligned 8-byte load and store (ctypes), so it is never torn, and a stale
  value only makes the worker think there is less room than there is.

No room (the dispatcher is slow to read, or a read is bigger than the ring)
is not an error: the worker sends the bytes inline on the pipe as before.
A worker that dies mid-copy leaves bytes nobody names; its replacement
starts producing at ``consumed``, where the dispatcher stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

from .errors import TvixError
from .lanes import Lanes, LaneWriter
from .segcache import SegmentArena, SegmentWriter

HEADER = mmap.PAGESIZE  # keeps each ring's data page-aligned
DEFAULT_CAPACITY = 4 << 20  # 32 replies of 128 KiB in flight per worker before falling back to the pipe


class RingError(TvixError):
    """A reply names ring bytes that cannot be the producer's: the worker is broken."""

    code = "protocol"


class Arena:
    """The shared mapping: one ring per worker slot. Create before forking the zygote."""

    def __init__(self, rings: int, capacity: int = DEFAULT_CAPACITY,
                 segments: SegmentArena | None = None, lanes: Lanes | None = None) -> None:
        """``segments``: the verified-segment arena (segcache.py) the workers fill beside their rings;
        ``lanes``: the callers' own reply channels for reads (lanes.py)."""
        if rings < 1 or capacity < mmap.PAGESIZE or capacity % mmap.PAGESIZE:
            raise ValueError(f"bad arena shape: {rings} rings of {capacity} bytes")
        self.rings = rings
        self.capacity = capacity
        self.segments = segments
        self.lanes = lanes
        self._map = mmap.mmap(-1, rings * (HEADER + capacity), flags=mmap.MAP_SHARED)
        self._views: list[memoryview] = []
        self._counters: list[ctypes.c_uint64] = []

    def _ring(self, index: int) -> tuple[ctypes.c_uint64, memoryview]:
        if not 0 <= index < self.rings:
            raise ValueError(f"no ring {index} in an arena of {self.rings}")
        base = index * (HEADER + self.capacity)
        consumed = ctypes.c_uint64.from_buffer(self._map, base)
        data = memoryview(self._map)[base + HEADER: base + HEADER + self.capacity]
        self._counters.append(consumed)
        self._views.append(data)
        return consumed, data

    def writer(self, index: int) -> RingWriter:
        """The producer's end of ring ``index`` (in the worker process that owns the slot)."""
        consumed, data = self._ring(index)
        return RingWriter(consumed, data, None if self.segments is None else self.segments.writer(index),
                          None if self.lanes is None else self.lanes.writer())

    def reader(self, index: int) -> RingReader:
        """The consumer's end of ring ``index`` (in the dispatcher's collector thread)."""
        consumed, data = self._ring(index)
        return RingReader(consumed, data)

    def close(self) -> None:
        """Unmap, once nobody uses a ring any more (the pool's workers are gone)."""
        for view in self._views:
            view.release()
        self._views.clear()
        self._counters.clear()
        if self.segments is not None:
            self.segments.close()
        if self.lanes is not None:
            self.lanes.close()
        with contextlib.suppress(BufferError):  # a straggling reference keeps it mapped until collected
            self._map.close()


class RingWriter:
    """Worker side: reserve room for one reply, fill it, commit it. Single-threaded."""

    def __init__(self, consumed: ctypes.c_uint64, data: memoryview,
                 segments: SegmentWriter | None = None, lanes: LaneWriter | None = None) -> None:
        self._consumed = consumed
        self._data = data
        self.capacity = len(data)
        self.segments = segments  # this worker's ways of the verified-segment arena
        self.lanes = lanes  # every lane's buffer and pipe, for reads that came on a lane
        self._produced = consumed.value  # a new worker starts where the dispatcher stopped reading

    def reserve(self, length: int) -> tuple[int, memoryview] | None:
        """(start position, writable view of ``length`` bytes), or None when there is no room now."""
        capacity = self.capacity
        if length > capacity:
            return None
        start = self._produced
        place = start % capacity
        if place + length > capacity:  # keep the bytes contiguous: skip the tail
            start += capacity - place
            place = 0
        if start + length - self._consumed.value > capacity:
            return None
        return start, self._data[place: place + length]

    def commit(self, start: int, length: int) -> None:
        """``length`` bytes from ``start`` are written and about to be named in a reply."""
        self._produced = start + length


class RingReader:
    """Dispatcher side: copy out the bytes a reply names and free them. Collector thread only."""

    def __init__(self, consumed: ctypes.c_uint64, data: memoryview) -> None:
        self._consumed = consumed
        self._data = data
        self.capacity = len(data)

    def take(self, start: int, length: int) -> bytes:
        """The bytes at ``start``; raises RingError for a range the producer cannot have written."""
        consumed = self._consumed.value
        place = start % self.capacity
        if start < consumed or length < 0 or place + length > self.capacity \
                or start + length - consumed > self.capacity:
            raise RingError(f"reply names ring bytes [{start}, {start + length}) but the ring "
                            f"holds [{consumed}, {consumed + self.capacity})")
        data = bytes(self._data[place: place + length])
        self._consumed.value = start + length
        return data
