"""Small files brought to the dispatcher in batches, ahead of their reads, in tree order.

Why: a cold ``tar`` of a closure is tens of thousands of lookup, open, read,
release sequences, and each read that goes to a worker is a round trip
(hand-offs, the worker's Python, on the embedded store an open and a row
look-up) with one file in flight at a time. Here, the first open of a
small file in a directory queues the small files of that directory and of
the directories below it whose listings are already known, in the order a
walk (``tar``, ``cp -r``, a loader) visits them: each listing's entries in
readdir order, descending into a subdirectory where it appears; and then
what the walk meets after it, in its parent and so up to the store path.
A directory whose listing is not known yet (a store path's tree bigger
than one fetch brings) holds the queueing there until the listing comes,
asked for in the background, so the queue stays in the walk's order. The queue
goes to the workers as ``blob_batch`` requests (protocol/batch.py) of up to
``MAX_FILES`` blobs, at most ``in_flight`` at once, spread over the workers
by the pool; each blob is verified against its digest by the worker that
read it. Their bytes wait in a bounded cache until read; an entry goes once
its last byte was served (the page cache has it from then on).

Bounds: the cache holds at most ``capacity`` bytes (oldest dropped first),
new batches are sent only while less than half of it is unread or coming
(so a walk that stops reading stops the fetching; and only with
``MIN_BATCH_ROOM`` left of that half), the queue holds at most
``QUEUE_LIMIT`` files. Batches in flight count against that half too, so
a batch never pushes out another's unread files. Stat-only walks (find, ls -l) open nothing and
fetch nothing.

A read of a file whose batch is in flight waits for that batch, at most
``wait`` seconds, instead of sending its own request (it would be a second
round trip for the same bytes). Then, or if the batch failed or left this
blob out (corrupt, missing, wrong size), the read sends its own request
and gets the real answer: EIO for that file only. A batch whose worker
dies is re-sent by the pool (it is idempotent); a hung worker costs the
waiting reads at most ``wait`` (one second, the pool's stall time) before they ask alone.

Thread model: ``note_lookup``, ``on_open``, ``take`` and ``waiter`` are
called from FUSE handlers under llfuse's lock; batches run on this
module's threads without it. The cache has its own lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .castore.nodes import DirectoryNode, FileNode, b3_text, identity
from .metrics import counter, gauge
from .protocol import batch
from .vfs import Listing
from .walkplaces import WalkPlaces

log = logging.getLogger(__name__)

MAX_FILE = 64 << 10  # "small": bigger files are read ahead whole (readahead.py) or by the kernel's readahead
# A batch goes out only with at least this much room in the cache (or an eighth of a smaller
# cache): with the cache's half full of unread files, each file read made room for a batch of
# about one file (docs/performance.md, "Batches that follow the walk").
MIN_BATCH_ROOM = batch.MAX_BYTES // 4
QUEUE_LIMIT = 16_384  # files queued ahead of a walk, at most
LOOKUPS_REMEMBERED = 8192  # inode -> the directory it was looked up in, for the open that follows
DIRS_REMEMBERED = 200_000  # directories whose files were queued (then forgotten, all at once)
# Files read whole remembered (then forgotten, all at once): see ReadWhole.
SERVED_REMEMBERED = 65_536
# Walks stopped at a directory not listed yet, waiting for its listing (then all given up at once).
STOPS_REMEMBERED = 1024
DEFAULT_CAPACITY = 64 << 20
# A read waits for its batch no longer than the pool takes to call a silent worker stalled
# (poolstate.STALLED_AFTER): a batch stuck on a hung worker then costs the read about that,
# and its own request goes to a worker that answers, as any read's would.
DEFAULT_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class SmallBlobStats:
    batches: int = counter("blob_batch requests sent for small files")
    fetched: int = counter("small files fetched in batches and kept")
    failed: int = counter("small files a batch could not bring (their reads asked alone)")
    hits: int = counter("FUSE reads answered from small files fetched in batches")
    waited: int = counter("FUSE reads that waited for their file's batch")
    misses: int = counter("reads of small files not found in the batch cache")
    evicted: int = counter("small files fetched in batches and dropped unread (cache full)")
    cached_files: int = 0
    cached_bytes: int = gauge("bytes of small files fetched in batches, not yet read")
    capacity: int = gauge("bytes the small-file batch cache may hold")
    queued: int = 0
    in_flight: int = 0


FetchBatch = Callable[[list[tuple[bytes, int]]], list[bytes | None]]


class ReadWhole:
    """Files read whole, from what was fetched ahead or by their reader alone: not fetched again.

    Why: files of one content and mode share an inode (castore.nodes.identity, the
    Vfs's key), whose pages the page cache holds once read. A cold ``tar`` of the
    bench's closure had the batches fetch 1,264 files it never read (6.4 MB: files
    read alone before their batch, later copies of a content), holding the room new
    batches wait for; a warm ``tar`` had the readahead fetch every 64 KiB-1 MiB file
    again. Bounded: past ``limit`` all are forgotten at once. Callers hold their lock.
    """

    def __init__(self, limit: int = SERVED_REMEMBERED) -> None:
        self._limit = limit
        self._read: set[tuple[object, ...]] = set()

    def add(self, node: FileNode) -> None:
        if len(self._read) >= self._limit:
            self._read.clear()
        self._read.add(identity(node))

    def __contains__(self, node: FileNode) -> bool:
        return identity(node) in self._read


class SmallBlobs:
    def __init__(self, fetch_batch: FetchBatch, listing_of: Callable[[bytes], Listing | None], *,
                 in_flight: int, capacity: int = DEFAULT_CAPACITY, max_file: int = MAX_FILE,
                 wait: float = DEFAULT_WAIT, places: WalkPlaces | None = None,
                 want_listing: Callable[[bytes], None] = lambda digest: None) -> None:
        """``fetch_batch(wanted)`` answers a ``blob_batch`` (may block); ``listing_of(digest)`` is the
        Vfs's cached listing (called under llfuse's lock only); ``places`` tells where each
        directory was looked up (the FUSE layer notes them), for queueing past it;
        ``want_listing(digest)`` asks for a directory's listing in the background, and
        ``on_listed`` is to be called when one comes."""
        self._fetch_batch = fetch_batch
        self._listing_of = listing_of
        self.in_flight = in_flight
        self.capacity = capacity
        self._min_room = min(MIN_BATCH_ROOM, capacity // 8)
        self.max_file = min(max_file, MAX_FILE)
        self.wait = wait
        self._lookups: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._queued_dirs: set[bytes] = set()
        self._served = ReadWhole()
        self.places = places if places is not None else WalkPlaces()
        self._want_listing = want_listing
        # directory not listed yet -> the walk that stopped there: its stack and where it goes up from
        self._stops: dict[bytes, tuple[list[tuple[bytes, Listing, int, bool]], bytes]] = {}
        self._lock = threading.Lock()
        self._queue: deque[FileNode] = deque()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[bytes, threading.Event] = {}
        self._running = 0
        self._running_bytes = 0
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after the worker pool forked
        self._closed = False
        self.counts = dict.fromkeys(("batches", "fetched", "failed", "hits", "waited", "misses",
                                     "evicted"), 0)

    @property
    def enabled(self) -> bool:
        return self.in_flight > 0

    # -- called from FUSE handlers (llfuse's lock held) ------------------------------------

    def note_lookup(self, ino: int, node: FileNode, directory: bytes, position: int) -> None:
        """Remember which directory a small file was found in, and where, for its open."""
        if not self.enabled or node.size > self.max_file:
            return
        lookups = self._lookups
        lookups[ino] = (directory, position)
        lookups.move_to_end(ino)
        if len(lookups) > LOOKUPS_REMEMBERED:
            lookups.popitem(last=False)

    def on_open(self, ino: int, node: FileNode) -> None:
        """A small file was opened: queue its directory's tree, unless that was done already."""
        if not self.enabled or node.size > self.max_file:
            return
        found = self._lookups.get(ino)
        if found is None or found[0] in self._queued_dirs:
            return
        self._enqueue(self._tree_order(*found), first=True)

    def on_listed(self, directory: bytes) -> None:
        """A directory's listing came, or could not be had: a walk that stopped there goes on, from
        that directory (or past it). Under llfuse's lock, like the handlers."""
        stopped = self._stops.pop(directory, None)
        if stopped is not None:  # the walk goes on after what it queued before the stop
            self._enqueue(self._tree_order(directory, 0, stopped), first=False)

    def _enqueue(self, found: list[FileNode], first: bool) -> None:
        """Queue a walk's files: ``first`` where the walk is now (before whatever an earlier walk
        left queued), else after what is queued."""
        with self._lock:
            if self._closed:
                return
            if first:
                self._queue.extendleft(reversed(found))
            else:
                self._queue.extend(found)
            while len(self._queue) > QUEUE_LIMIT:
                self._queue.pop()
            self._pump()

    def take(self, node: FileNode, offset: int, length: int) -> bytes | None:
        """The bytes of a read from a batch, or None; an entry goes once its end is served."""
        if node.size > self.max_file:
            return None
        with self._lock:
            data = self._cache.get(node.digest)
            if data is None:
                return None
            self.counts["hits"] += 1
            if offset + length >= len(data):
                del self._cache[node.digest]
                self._cached_bytes -= len(data)
                self._served.add(node)
                self._pump()
        return data[offset:offset + length]

    def waiter(self, node: FileNode) -> threading.Event | None:
        """The event set when the batch carrying ``node`` is done, if one is in flight."""
        with self._lock:
            event = self._pending.get(node.digest)
            if event is not None:
                self.counts["waited"] += 1
            return event

    def missed(self, node: FileNode) -> None:
        """A read of a small file found nothing here (it asks a worker alone)."""
        if self.enabled and node.size <= self.max_file:
            with self._lock:
                self.counts["misses"] += 1
                self._served.add(node)

    def _tree_order(self, start: bytes, at: int,
                    stopped: tuple[list[tuple[bytes, Listing, int, bool]], bytes] | None = None,
                    ) -> list[FileNode]:
        """Small files of ``start`` from entry ``at`` on (where the walk is) and below, then of what
        follows ``start`` in its parent (and so up to the store path), as a walk meets them; marks
        their directories queued.

        Why past ``start``: a walk's next directories are usually listed
        already (a store path's tree comes whole), and queueing only each
        directory's own tree sent a batch per directory: in a tree of
        ~9 files per directory a cold ``tar`` made 1,737 batches for 33,040
        files, most of a few files (docs/performance.md, "Batches that
        follow the walk"). A parent queued before keeps its own files
        (queued then) and only its directories not queued yet are entered;
        one not queued before gets its files after ``start`` queued (a walk
        has read those before it) and counts as queued from then on.

        A directory not listed yet stops the walk there (``stopped`` is the
        walk going on from it once listed: its stack and where it goes up
        from), and its listing is asked for in the background. Walking past
        it queued the files after it first; the reader, once there, found the
        cache's half full of them and its reads in that directory missed
        (701 of a cold ``tar``'s 709 misses, in a store path whose tree was
        more than one fetch; docs/performance.md, "Walks that wait for a listing").
        """
        if len(self._queued_dirs) > DIRS_REMEMBERED:
            self._queued_dirs.clear()
        found: list[FileNode] = []
        first = self._listing_of(start)
        # (directory, its listing, the next entry, whether its files are still to be queued)
        stack, below = stopped if stopped is not None else ([], start)
        if first is not None:
            stack.append((start, first, at, True))
            self._queued_dirs.add(start)
        elif not stack:
            return found
        while len(found) < QUEUE_LIMIT:
            if not stack:  # the tree of ``below`` is done: on with what follows it in its parent
                up = self.places.place(below)
                listing = None if up is None else self._listing_of(up[0])
                if up is None or listing is None:
                    break
                below = up[0]
                stack.append((below, listing, up[1] + 1, below not in self._queued_dirs))
                self._queued_dirs.add(below)
            digest, listing, pos, files = stack.pop()
            entries = listing.entries
            while pos < len(entries):
                node = entries[pos]
                pos += 1
                if type(node) is FileNode:
                    if files and 0 < node.size <= self.max_file:
                        found.append(node)
                elif type(node) is DirectoryNode and node.digest not in self._queued_dirs:
                    listed = self._listing_of(node.digest)
                    if listed is None:
                        stack.append((digest, listing, pos, files))
                        self._stop_at(node.digest, stack, below)
                        return found
                    self._queued_dirs.add(node.digest)
                    stack.append((digest, listing, pos, files))
                    stack.append((node.digest, listed, 0, True))
                    break
        for digest, _, _, _ in stack:  # cut short by the limit: an open there queues the rest
            self._queued_dirs.discard(digest)
        return found

    def _stop_at(self, directory: bytes, stack: list[tuple[bytes, Listing, int, bool]], below: bytes) -> None:
        """Hold the walk at ``directory`` (not listed) until ``on_listed``; its listing is asked for."""
        if len(self._stops) >= STOPS_REMEMBERED:  # walks that never got there: their directories are free
            for held, _ in self._stops.values():
                for digest, _, _, _ in held:
                    self._queued_dirs.discard(digest)
            self._stops.clear()
        self._stops[directory] = (stack, below)
        self._want_listing(directory)

    # -- batches (any thread, self._lock held) ----------------------------------------------

    def _pump(self) -> None:
        """Send batches while there is room in flight and in the cache."""
        while self._running < self.in_flight and self._queue and not self._closed:
            # Unread and coming bytes stay within half the cache, so a batch never evicts
            # another's unread files (the eviction below is only the last bound).
            budget = min(batch.MAX_BYTES, self.capacity // 2 - self._cached_bytes - self._running_bytes)
            if budget < self._min_room:
                return  # the reads taking their files make room, and pump again
            wanted: list[tuple[bytes, int]] = []
            total = 0
            while self._queue and len(wanted) < batch.MAX_FILES:
                node = self._queue[0]
                if (node.digest in self._cache or node.digest in self._pending
                        or node in self._served):
                    self._queue.popleft()
                    continue
                if total + node.size > budget:
                    break
                self._queue.popleft()
                wanted.append((node.digest, node.size))
                total += node.size
            if not wanted:
                return
            event = threading.Event()
            for digest, _ in wanted:
                self._pending[digest] = event
            self._running += 1
            self._running_bytes += total
            self.counts["batches"] += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="tvixmount-smallblobs")
            self._pool.submit(self._run, wanted, event)

    def _run(self, wanted: list[tuple[bytes, int]], event: threading.Event) -> None:
        try:
            blobs: list[bytes | None] = self._fetch_batch(wanted)
        except Exception as exc:  # each reader asks alone and gets the real error
            log.debug("batch of %d small blobs from %s failed: %s", len(wanted), b3_text(wanted[0][0]), exc)
            blobs = [None] * len(wanted)
        with self._lock:
            self._running -= 1
            self._running_bytes -= sum(size for _, size in wanted)
            for (digest, size), data in zip(wanted, blobs, strict=True):
                self._pending.pop(digest, None)
                if data is None or len(data) != size:
                    self.counts["failed"] += 1
                elif not self._closed and digest not in self._cache:
                    self.counts["fetched"] += 1
                    self._cache[digest] = data
                    self._cached_bytes += len(data)
            while self._cached_bytes > self.capacity:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)
                self.counts["evicted"] += 1
            self._pump()
        event.set()

    def stats(self) -> SmallBlobStats:
        with self._lock:
            return SmallBlobStats(**self.counts, cached_files=len(self._cache),
                                  cached_bytes=self._cached_bytes, capacity=self.capacity,
                                  queued=len(self._queue), in_flight=self._running)

    def close(self) -> None:
        """Stop sending batches; those in flight end by their own deadline (bounded)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            self._queue.clear()
            self._cache.clear()
            self._cached_bytes = 0
            events = list(self._pending.values())
        for event in events:
            event.set()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
