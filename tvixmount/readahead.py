"""Fetch the next small files of a directory while the reader is still on this one.

Why: a compiler, ``tar`` or a loader opens the files of a directory one
after another and reads each whole. Cold, every such read waits for a
worker round trip and, on the embedded store, for the disk (one file per
blob), and the reader has only one of them in flight at a time, so the
workers and the disk idle while the reader is between files. After the
open of a small file, the small files a walk reads after it (the rest of
its directory, the subdirectories there, what follows the directory in
its parent) are fetched in the background into a bounded cache of
verified bytes, and their first reads are served from there.

Fetches go in groups: one ``blob_batch`` (protocol/batch.py) of the
files chosen together, up to ``GROUP_BYTES``, instead of one whole-blob
read each: a worker request less per file, and over gRPC one
BlobBatchService call instead of a Read (and a Stat above 128 KiB) per
file, where the daemon's Python grpc server spent about a millisecond of
CPU per call in a cold ``tar``. Files are chosen only once the fetches
pending fall to half of ``depth``, and then up to ``2 * depth`` at once:
choosing at every open found the one file that had just come into the
window, a group of one. A group's files are ready together; the reader
is meanwhile on the files chosen before them (docs/performance.md,
"Mid-size files in groups").

What does not trigger it: walks that only stat (find, ls -l, a build tool
checking timestamps) open nothing, so they fetch nothing. Files bigger
than ``max_file`` are left to the kernel's own readahead.

A read of a file still being fetched ahead waits for that fetch, at most
``wait`` seconds (the pool's stall time, as for a batch: smallblobs.py),
and then, or if the fetch failed, sends its own request and gets the real
answer. Not waiting cost a second request for the same bytes: over gRPC,
with fetches slower than the reader, 409 of a cold ``tar``'s 2,633 such
reads went to the workers twice (docs/performance.md, "gRPC: blobs held
whole go to the arena").

Thread model: ``note_lookup``, ``on_open``, ``take`` and ``waiter`` are
called from FUSE handlers (under llfuse's lock); the fetches run on this
module's own threads, without that lock. The cache has its own lock.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .castore.nodes import DirectoryNode, FileNode, b3_text
from .metrics import counter, gauge
from .protocol import batch
from .smallblobs import DEFAULT_WAIT, ReadWhole
from .vfs import Listing
from .walkplaces import WalkPlaces

log = logging.getLogger(__name__)

LOOKUPS_REMEMBERED = 8192  # inode -> where it was looked up, for the opens that follow
# Files up to this size are fetched ahead whole. 1 MiB rather than 256 KiB: a cold tar of the
# bench closure over gRPC waited 3.2 s in reads instead of 3.9 (the whole-blob fetches of its
# 318 files of 256 KiB-1 MiB no longer block tar), the embedded mount 1.4 s instead of 1.9;
# docs/performance.md, "gRPC: blobs held whole go to the arena".
MAX_FILE = 1 << 20
# Look at most depth * SCAN_LIMIT entries past the opened one, in walk order. In a tree where
# few files are of this size (6 % in the bench's closure) a window of 32 entries found one or
# two, and most groups were of one file: a Read (and a Stat) each over gRPC.
SCAN_LIMIT = 32
GROUP_BYTES = batch.MAX_BYTES  # claimed bytes of the files fetched in one request
# Entries of the listings whose fetchable files are remembered (then all forgotten at once): the
# listings are held for that, beside the Vfs's bounded cache.
SCANNED_ENTRIES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ReadaheadStats:
    scheduled: int = counter("small files queued to be fetched ahead of their reader")
    fetched: int = counter("small files fetched ahead and kept")
    failed: int = counter("fetches ahead that failed (the reader's own read reports why)")
    hits: int = counter("FUSE reads answered from the files fetched ahead")
    waited: int = counter("FUSE reads that waited for their file's fetch ahead")
    evicted: int = counter("files fetched ahead and dropped unread (cache full)")
    cached_files: int = 0
    cached_bytes: int = gauge("bytes fetched ahead, not yet read")
    pending: int = 0  # fetches queued or running


@dataclass(frozen=True, slots=True)
class TreeAheadStats:
    scheduled: int = 0
    fetched: int = counter("trees fetched ahead of a walk (store paths; directories the batches wait for)")
    failed: int = 0


class SmallFileReadahead:
    def __init__(self, fetch: Callable[[list[FileNode]], list[bytes | None]], *, depth: int,
                 max_file: int = MAX_FILE, max_bytes: int = 64 << 20, min_file: int = 0,
                 wait: float = DEFAULT_WAIT, listing_of: Callable[[bytes], Listing | None] | None = None,
                 places: WalkPlaces | None = None) -> None:
        """``fetch(nodes)`` returns each node's whole blob, verified, or None where that one failed;
        it may block, and raise (all of them failed). At most ``batch.MAX_FILES`` nodes and
        ``GROUP_BYTES`` claimed bytes, but always at least one node.

        Files of at most ``min_file`` bytes are left to the small-file batches (smallblobs.py).
        With ``listing_of`` (the Vfs's cached listings, under llfuse's lock) the window goes
        on into the subdirectories listed already, and with ``places`` past the opened file's
        directory too, as a walk does; without them it ends with the directory.
        """
        self._fetch = fetch
        self.depth = depth
        self.max_file = max_file
        self.min_file = min_file
        self.max_bytes = max_bytes
        self.wait = wait
        self._listing_of = listing_of
        self._places = places
        self._walked_from: Listing | None = None  # the listing a small file's open last looked from
        # inode -> the listing it was found in, its place there and that directory's digest
        self._lookups: OrderedDict[int, tuple[Listing, int, bytes | None]] = OrderedDict()
        # id(listing) -> the listing and _steps's answer for it
        self._scanned: dict[int, tuple[Listing, list[int], list[FileNode | DirectoryNode]]] = {}
        self._scanned_entries = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._served = ReadWhole()  # a second tar of the same tree opened every file and fetched them all
        self._pending: dict[bytes, threading.Event] = {}  # set once the fetch ended, either way
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after the worker pool forked
        self._closed = False
        self.counts = dict.fromkeys(("scheduled", "fetched", "failed", "hits", "waited", "evicted"), 0)

    # -- called from FUSE handlers ------------------------------------------------------

    def note_lookup(self, ino: int, listing: Listing, name: bytes, directory: bytes | None = None) -> None:
        """Remember where ``ino`` was found (``listing``, the listing of ``directory``), so its open
        knows what a walk reads after it."""
        if self.depth <= 0:
            return
        pos = listing.index.get(name)
        if pos is None:
            return
        lookups = self._lookups
        lookups[ino] = (listing, pos, directory)
        lookups.move_to_end(ino)
        if len(lookups) > LOOKUPS_REMEMBERED:
            lookups.popitem(last=False)

    def on_open(self, ino: int, node: FileNode) -> None:
        """A file was opened: fetch what a walk reads after it, in groups.

        The window ahead holds at most ``2 * depth`` files; new ones are
        chosen once they are at least as many as those still ahead of the
        reader (fetching, or fetched and not read): a window that slid by a
        file at each open gave groups of one file (each a Read, and a Stat
        above 128 KiB, over gRPC). A file left to the batches looks ahead
        only from a directory it was not opened in last time (the walk
        costs ~20 us; there are tens of thousands of such opens).
        """
        if self.depth <= 0 or node.size > self.max_file:
            return
        found = self._lookups.get(ino)
        if found is None:
            return
        if node.size <= self.min_file:
            if found[0] is self._walked_from:
                return
            self._walked_from = found[0]
        chosen: list[FileNode] = []
        with self._lock:
            if self._closed or len(self._pending) > self.depth // 2:
                return
            ahead = 0
            for later in self._following(*found):
                if later in self._served:
                    continue
                if later.digest in self._pending or later.digest in self._cache:
                    ahead += 1
                else:
                    chosen.append(later)
                if ahead + len(chosen) >= 2 * self.depth:
                    break
            if not chosen or len(chosen) < ahead:
                return
            for later in chosen:
                self._pending[later.digest] = threading.Event()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="tvixmount-readahead")
            self.counts["scheduled"] += len(chosen)
            pool = self._pool
        for group in _groups(chosen):
            pool.submit(self._run, group)

    def _following(self, listing: Listing, pos: int, directory: bytes | None) -> Iterator[FileNode]:
        """The files fetched here that a walk reads after entry ``pos`` of ``listing``, in its order,
        within ``depth * SCAN_LIMIT`` entries: the rest of the listing, entering subdirectories
        listed already where they appear (as ``tar`` and ``cp -r`` go), then what follows the
        directory in its parent, and so on up to the store path (smallblobs.py walks the same way).
        """
        budget = self.depth * SCAN_LIMIT
        stack = [(listing, pos + 1)]  # listings being walked and the next entry of each
        below = directory
        while budget > 0:
            if not stack:  # the directory's tree is done: on in its parent, after it
                up = None if below is None or self._places is None else self._places.place(below)
                parent = None if up is None or self._listing_of is None else self._listing_of(up[0])
                if up is None or parent is None:
                    return
                below = up[0]
                stack.append((parent, up[1] + 1))
            current, start = stack.pop()
            positions, steps = self._steps(current)
            end = start + budget
            i = bisect.bisect_left(positions, start)
            while i < len(positions) and positions[i] < end:
                step, at = steps[i], positions[i]
                i += 1
                if type(step) is FileNode:
                    yield step
                    continue
                listed = None if self._listing_of is None else self._listing_of(step.digest)
                if listed is not None:
                    budget -= at + 1 - start
                    stack += [(current, at + 1), (listed, 0)]
                    break
            else:
                budget -= min(len(current.entries), end) - start

    def _steps(self, listing: Listing) -> tuple[list[int], list[FileNode | DirectoryNode]]:
        """The entries of ``listing`` a walk ahead stops at, and their positions: the files fetched
        here (sized within the bounds) and the directories; found once per listing.

        Why: in a tree of mostly small files (left to the batches) looking
        through the entries after each opened one for a file to fetch cost
        more than the rest of the open: a cold ``tar`` opens each of its
        40,000 files (tools/handler_cpu.py: 6.7-7.4 -> 2.1-2.2 us per open and release).
        Keyed by the listing's identity; the listing is held with the answer,
        so its id is not reused meanwhile.
        """
        scanned = self._scanned.get(id(listing))
        if scanned is not None and scanned[0] is listing:
            return scanned[1], scanned[2]
        positions: list[int] = []
        steps: list[FileNode | DirectoryNode] = []
        for pos, node in enumerate(listing.entries):
            if ((type(node) is FileNode and self.min_file < node.size <= self.max_file)
                    or type(node) is DirectoryNode):
                positions.append(pos)
                steps.append(node)
        if self._scanned_entries + len(listing.entries) > SCANNED_ENTRIES:
            self._scanned.clear()
            self._scanned_entries = 0
        self._scanned[id(listing)] = (listing, positions, steps)
        self._scanned_entries += len(listing.entries)
        return positions, steps

    def take(self, node: FileNode, offset: int, length: int) -> bytes | None:
        """The bytes of a read if the file was fetched ahead; the entry goes once its end is served."""
        with self._lock:
            data = self._cache.get(node.digest)
            if data is None:
                return None
            self.counts["hits"] += 1
            if offset + length >= len(data):
                del self._cache[node.digest]
                self._cached_bytes -= len(data)
                self._served.add(node)
        return data[offset:offset + length]

    def missed(self, node: FileNode) -> None:
        """A read of a file this fetches found nothing here (it asks a worker alone)."""
        if self.min_file < node.size <= self.max_file:
            with self._lock:
                self._served.add(node)

    def waiter(self, node: FileNode) -> threading.Event | None:
        """The event set when the fetch of ``node`` ends, if one is in flight."""
        with self._lock:
            event = self._pending.get(node.digest)
            if event is not None:
                self.counts["waited"] += 1
            return event

    # -- background ---------------------------------------------------------------------

    def _run(self, group: list[FileNode]) -> None:
        try:
            blobs = self._fetch(group)
        except Exception as exc:  # the readers' own reads will fail and say why, with an errno
            log.debug("readahead of %d files from %s failed: %s", len(group), b3_text(group[0].digest), exc)
            blobs = [None] * len(group)
        with self._lock:
            for node, data in zip(group, blobs, strict=True):
                self._ended(node.digest)
                if data is None:
                    self.counts["failed"] += 1
                elif not self._closed and len(data) == node.size and node.digest not in self._cache:
                    self.counts["fetched"] += 1
                    self._cache[node.digest] = data
                    self._cached_bytes += len(data)
            while self._cached_bytes > self.max_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= len(old)
                self.counts["evicted"] += 1

    def _ended(self, digest: bytes) -> None:
        """The fetch of ``digest`` is over: wake the reads waiting for it (under ``_lock``, so a read
        woken now finds the bytes cached, or nothing)."""
        event = self._pending.pop(digest, None)
        if event is not None:
            event.set()

    def stats(self) -> ReadaheadStats:
        with self._lock:
            return ReadaheadStats(**self.counts, cached_files=len(self._cache),
                                  cached_bytes=self._cached_bytes, pending=len(self._pending))

    def close(self) -> None:
        """Stop fetching; fetches in flight end by their own deadline (bounded)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            self._cache.clear()
            self._cached_bytes = 0
            for digest in list(self._pending):  # cancelled fetches never end: nobody waits for them
                self._ended(digest)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _groups(files: list[FileNode]) -> list[list[FileNode]]:
    """``files`` in order, cut into requests of at most ``GROUP_BYTES`` claimed bytes and
    ``batch.MAX_FILES`` files (a file bigger than that alone)."""
    groups: list[list[FileNode]] = []
    size = 0
    for node in files:
        if not groups or size + node.size > GROUP_BYTES or len(groups[-1]) >= batch.MAX_FILES:
            groups.append([])
            size = 0
        groups[-1].append(node)
        size += node.size
    return groups


class TreeAhead:
    """While a walk is in one store path, fetch the trees of the next ones in root listing order.

    Why: ``find``, ``du`` or a backup walk the store paths one after
    another, and each fresh store path costs one tree fetch the walk waits
    for (the worker reads and checks every directory below it). Fetching
    the next ``ahead`` trees while the walk works through the current one
    hides that wait behind the walk, on the worker side of the machine.
    Triggered only when a store path's tree had to be fetched for a walk,
    so ``ls`` of the root alone fetches no tree. ``fetch`` asks for one
    directory's tree on the same thread: the small-file batches wait for
    a listing there (smallblobs.py).

    The fetch runs on one daemon thread (it must never hold up the
    process's exit while waiting for llfuse's lock) through ``fetch_tree``,
    which the FUSE layer provides; this class only decides what and when.
    """

    def __init__(self, fetch_tree: Callable[[bytes], None], *, ahead: int) -> None:
        self._fetch_tree = fetch_tree
        self.ahead = ahead
        self._order: list[bytes] = []
        self._pos: dict[bytes, int] = {}
        self._asked: set[bytes] = set()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(("scheduled", "fetched", "failed"), 0)

    def set_order(self, digests: list[bytes]) -> None:
        """The root listing's directory digests, in the order a walk visits them. Under llfuse's lock."""
        self._order = digests
        self._pos = {digest: i for i, digest in enumerate(digests)}

    def on_walk(self, digest: bytes, listed: Callable[[bytes], bool]) -> None:
        """A walk had to fetch store path ``digest``: queue the next ones not listed yet. Under the lock."""
        pos = self._pos.get(digest)
        if pos is None or self.ahead <= 0:
            return
        self._asked.add(digest)
        for following in self._order[pos + 1: pos + 1 + self.ahead]:
            if following in self._asked or listed(following):
                continue
            self._asked.add(following)
            self.counts["scheduled"] += 1
            self._start()
            self._queue.put(following)

    def fetch(self, digest: bytes) -> None:
        """Fetch the tree of directory ``digest`` in the background (smallblobs.py: a walk waits for
        its listing). Under the lock."""
        self.counts["scheduled"] += 1
        self._start()
        self._queue.put(digest)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tvixmount-tree-ahead", daemon=True)
            self._thread.start()

    def stats(self) -> TreeAheadStats:
        return TreeAheadStats(**self.counts)

    def _run(self) -> None:
        while (digest := self._queue.get()) is not None:
            try:
                self._fetch_tree(digest)
                self.counts["fetched"] += 1
            except Exception as exc:  # the walk's own fetch will fail and say why
                self.counts["failed"] += 1
                log.debug("tree prefetch of %s failed: %s", b3_text(digest), exc)

    def close(self) -> None:
        self._queue.put(None)
