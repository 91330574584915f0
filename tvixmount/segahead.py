"""Sequential readers find their next segments verified already: fill the segment arena ahead.

Why: a reader going through a big file in order would otherwise pay a
worker round trip (and a pread + blake3 of 256 KiB) for the first half of
every segment; the second half is already served from the arena
(segcache.py). Once a file handle reads in order, the regions after its
position are asked for in the background, a few at a time, so the worker
verifies them while the reader is busy with the bytes it has.

How: a FUSE read reports its position (``on_read``, cheap, under llfuse's
lock); a handle whose reads follow each other (within the kernel's
readahead window, since concurrent requests arrive a little out of order)
for ``STREAK`` reads gets the next ``depth`` regions it does not have yet
queued. A background thread asks a worker for one byte at the start of each
region (an ordinary ``blob_read``, with the handle's affinity): the worker
puts the whole region into the arena as it does for any read. The fill
shares the region's single flight with FUSE reads (fuse_ops), so a read
arriving meanwhile waits for it instead of sending the same work again:
the same op, deadline and re-send on a dead or hung worker as its own
request would have. Random access queues nothing; a queue that is full
drops the request; a failure is only counted (the reader's own read
reports it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

from .castore.nodes import FileNode
from .segcache import REGION, SegmentCache

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 4  # regions (1 MiB) ahead of a sequential reader
STREAK = 2  # reads in order before a handle counts as sequential
WINDOW = 1 << 20  # how far out of order a read may arrive and still be "in order"
HANDLES = 256  # file handles remembered
QUEUED = 64  # fills waiting at most
THREADS = 2

# fill(digest, region index, file handle, blob size): one blob_read that makes a worker put the region.
Fill = Callable[[bytes, int, int, int], object]


class _Handle:
    __slots__ = ("asked", "next", "streak")

    def __init__(self, end: int) -> None:
        self.next = end
        self.streak = 0
        self.asked = -1  # the highest region already asked for


class SegmentAhead:
    def __init__(self, cache: SegmentCache, fill: Fill, depth: int = DEFAULT_DEPTH) -> None:
        self.cache = cache
        self.depth = depth
        self._fill = fill
        self._handles: OrderedDict[int, _Handle] = OrderedDict()
        self._queue: queue.Queue[tuple[bytes, int, int, int] | None] = queue.Queue(QUEUED)
        self._threads: list[threading.Thread] = []  # started on first use: after the worker pool forked
        self._closed = False
        self.asked = 0
        self.failed = 0
        self.dropped = 0

    def on_read(self, fh: int, node: FileNode, offset: int, length: int) -> None:
        """A FUSE read of ``node`` through handle ``fh``; queues fills when the handle reads in order."""
        if self.depth <= 0 or node.size <= REGION:
            return
        end = offset + length
        handle = self._handles.get(fh)
        if handle is None:
            self._handles[fh] = _Handle(end)
            if len(self._handles) > HANDLES:
                self._handles.popitem(last=False)
            return
        if abs(offset - handle.next) > WINDOW:  # a jump: random access, ask for nothing
            handle.streak = 0
            handle.next = end
            return
        handle.streak += 1
        handle.next = max(handle.next, end)
        if handle.streak < STREAK:
            return
        first = max(handle.asked + 1, (end - 1) // REGION + 1)
        last = min((end - 1) // REGION + self.depth, (node.size - 1) // REGION)
        for index in range(first, last + 1):
            if self.cache.holds(node.digest, index):
                continue
            if not self._put((node.digest, index, fh, node.size)):
                break
        handle.asked = max(handle.asked, last)

    def forget(self, fh: int) -> None:
        self._handles.pop(fh, None)

    def _put(self, item: tuple[bytes, int, int, int]) -> bool:
        if self._closed:
            return False
        if not self._threads:
            for i in range(THREADS):
                thread = threading.Thread(target=self._run, name=f"tvixmount-segahead-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            return False
        self.asked += 1
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            digest, index, fh, size = item
            if self.cache.holds(digest, index):
                continue
            try:
                self._fill(digest, index, fh, size)
            except Exception as exc:  # the reader's own read says what is wrong
                self.failed += 1
                log.debug("segment %d of a blob fetched ahead failed: %s", index, exc)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the threads (after llfuse.main returned); bounded."""
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout)
