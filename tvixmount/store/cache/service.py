"""A local on-disk cache of blobs from a remote store, shared by the workers.

``CachingBlobService(inner, cache_dir, max_bytes)`` wraps a BlobService
(in practice the gRPC client). A blob read once is kept in ``cache_dir``
(layout and index: index.py), so the next open of it, in any
worker process and after a remount, reads the local file and never the
network. Writes, listings and blobs not in the cache go to ``inner``.

Verified before use: each cached file is checked in ``SEGMENT`` (256 KiB)
pieces against digests the index keeps, only the pieces a read covers,
the last two kept in memory (segments.py: sequential 128 KiB reads hash
each byte once, and a random read of a 10 GiB blob hashes 256 KiB, not
10 GiB). A one-segment blob is checked against its own blob digest. The segment
digests are computed while filling from bytes that also had to hash to
the blob digest as a whole before the entry was recorded, so they stand
for the blob digest. A mismatch (a flipped bit, a truncated file) drops
the entry, logs one WARNING naming the digest, and the same reader goes
on serving from ``inner``: the caller sees right bytes, never an error.
What this does not defend against is someone who may write the cache
directory and rewrites a file together with its index row; the
directory is created mode 0700.

Filling, and why a threshold:

* a blob up to ``fill_on_open_max`` (8 MiB, at most a sixteenth of the
  cache) is copied whole when it is opened, then served from the cache
  file. Most files are small, the gRPC client fetches a small blob whole
  anyway, and a blob cached in one go is complete for every other worker
  at once.
* a bigger blob is filled as it is read in order: reads at (or within
  ``GAP_MAX`` ahead of) the fill position extend the fill, from the
  bytes fetched for the read itself; a read elsewhere is passed through
  and the fill waits for reads to come back to where it stopped. A file
  read to its end (a copy, a checksum, ``cat``) ends up cached; a random
  read of one 128 KiB range of a 10 GiB blob costs exactly that range.
  The pool routes the reads of one file to one worker, so that worker
  sees them in order.
* a blob bigger than half the cache is never cached (it would flush
  everything else), nor is the empty blob (nothing to save).

A fill writes a private temp file and becomes visible only by a rename
plus its index row, after its length and whole-blob digest were checked;
a fill that fails, is abandoned (reader closed early) or finds the disk
full leaves nothing visible. ENOSPC/EDQUOT while filling is a WARNING (at
most one a minute) and reads go on from ``inner``. Any other trouble with
the cache (index busy, I/O errors) also only costs the cache: a WARNING
and the read is served from ``inner``.

Eviction: least recently used, approximated: a hit refreshes an entry's
last-use time at most every ``touch_interval`` seconds (one small write
instead of one per open). After a fill is recorded, if the cache holds
more than ``max_bytes``, the oldest entries are removed down to
``LOW_WATER`` of it, in short transactions; reads never wait for that
(WAL readers do not block, and a reader that opened a file keeps its
bytes). The bound is approximate by the fills in flight: each worker may
add one fill before it evicts.

Concurrency: each worker opens its own CachingBlobService (after the
fork, through ``open_store``); they share only the directory and the
index. Two workers filling the same blob both fetch it and the second
commit finds the first one's entry and drops its own copy; nothing is
corrupted, some bytes are fetched twice (rare: the pool routes a file's
reads to one worker).

Statistics (``stats()``) count this process's hits, misses, fills, bytes
filled, evictions, verification failures and fill errors, plus the
entries and bytes the whole cache holds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ...castore.nodes import b3_text
from ...errors import InvalidArgument, InvalidData, TvixError
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter
from ..segments import SEGMENT, BadSegment, SegmentFile, SegmentHasher
from .index import CacheIndex, Entry

log = logging.getLogger(__name__)
T = TypeVar("T")

FILL_ON_OPEN_MAX = 8 << 20  # blobs up to this size are cached whole when opened
FILL_PIECE = 1 << 20  # bytes read from the inner store per call while filling whole
GAP_MAX = 1 << 20  # a read this far past the fill position still extends the fill (readahead reorders)
LOW_WATER = 0.9  # eviction goes down to this fraction of the budget, so it is not run on every fill
TOUCH_INTERVAL_S = 60.0
NO_SPACE_WARN_S = 60.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_COUNTERS = ("hits", "misses", "fills", "bytes_filled", "fills_abandoned", "not_cached", "evictions",
             "evicted_bytes", "verify_failures", "fill_errors", "cache_errors")


class CachingBlobService(BlobService):
    """``inner``'s blobs, read from ``cache_dir`` whenever a verified copy is there."""

    def __init__(self, inner: BlobService, cache_dir: str | os.PathLike[str], max_bytes: int, *,
                 fill_on_open_max: int | None = None, touch_interval: float = TOUCH_INTERVAL_S) -> None:
        if max_bytes <= 0:
            raise InvalidArgument(f"blob cache size must be positive, not {max_bytes}")
        self.inner = inner
        self.max_bytes = max_bytes
        self.index = CacheIndex(Path(cache_dir))
        self.fill_on_open_max = (min(FILL_ON_OPEN_MAX, max_bytes // 16) if fill_on_open_max is None
                                 else fill_on_open_max)
        self.touch_interval = touch_interval
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_no_space = -NO_SPACE_WARN_S

    # -- BlobService -----------------------------------------------------------

    def stat(self, digest: bytes) -> BlobStat | None:
        records.check_b3(digest, "blob")
        entry = self._lookup(digest)
        if entry is not None:
            return BlobStat(entry.size)
        return self.inner.stat(digest)

    def open_read(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        records.check_b3(digest, "blob")
        cached = self._open_cached(digest)
        if cached is not None:
            self._counts["hits"] += 1
            return cached
        self._counts["misses"] += 1
        return self._open_and_fill(digest, size_hint)

    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        return self.inner.open_write(expected_digest)

    def iter_digests(self) -> Iterator[bytes]:
        return self.inner.iter_digests()

    def close(self) -> None:
        try:
            self.index.close()
        finally:
            self.inner.close()

    def stats(self) -> dict[str, int]:
        """This process's counters, and what the whole cache holds (``entries``, ``bytes``)."""
        result = dict(self._counts)
        try:
            result["entries"], result["bytes"] = self.index.totals()
        except TvixError as exc:
            log.debug("blob cache totals unavailable: %s", exc)
        result["max_bytes"] = self.max_bytes
        return result

    # -- hits ------------------------------------------------------------------

    def _lookup(self, digest: bytes) -> Entry | None:
        try:
            return self.index.lookup(digest)
        except InvalidData as exc:  # the row itself is broken: as good as a bad file
            self._counts["verify_failures"] += 1
            log.warning("%s; dropped it, serving from the store", exc)
            self._drop(digest, None)
        except TvixError as exc:
            self._cache_trouble(digest, "looking it up", exc)
        return None

    def _open_cached(self, digest: bytes) -> CachedBlobReader | None:
        entry = self._lookup(digest)
        if entry is None:
            return None
        try:
            fd = os.open(self.index.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.info("cached blob %s: its file is gone; fetching it again", b3_text(digest))
            self._drop(digest, None)
            return None
        except OSError as exc:
            self._cache_trouble(digest, "opening its file", exc)
            return None
        try:
            reader = CachedBlobReader(self, entry, fd)
        except OSError as exc:  # fstat
            os.close(fd)
            self._cache_trouble(digest, "opening its file", exc)
            return None
        if reader.opened.st_size != entry.size:
            self.corrupt(reader, f"the file has {reader.opened.st_size} bytes, not {entry.size}")
            reader.close()
            return None
        now = time.time()
        if now - entry.last_used >= self.touch_interval:
            try:
                self.index.touch(digest, now)
            except TvixError as exc:  # only the LRU order suffers
                log.debug("blob %s: could not refresh its cache entry: %s", b3_text(digest), exc)
        return reader

    def corrupt(self, reader: CachedBlobReader, why: str) -> None:
        """A cached file failed verification: forget it and say so once."""
        self._counts["verify_failures"] += 1
        log.warning("cached blob %s in %s failed verification (%s); dropped it, serving from the store",
                    b3_text(reader.digest), self.index.directory, why)
        self._drop(reader.digest, reader.opened)

    def _drop(self, digest: bytes, opened: os.stat_result | None) -> None:
        try:
            self.index.drop(digest, opened)
        except (TvixError, OSError) as exc:
            self._cache_trouble(digest, "dropping it", exc)

    # -- misses and fills ------------------------------------------------------

    def _open_and_fill(self, digest: bytes, size_hint: int | None) -> BlobReader:
        reader = self.inner.open_read(digest, size_hint)
        size = reader.size
        if size == 0 or size > self.max_bytes // 2:
            self._counts["not_cached"] += 1
            return reader
        fill = self._start_fill(digest, size)
        if fill is None:
            return reader
        if size > self.fill_on_open_max:
            return FillingBlobReader(self, reader, fill)
        try:
            position = 0
            while position < size:
                data = reader.pread(position, min(FILL_PIECE, size - position))
                if not data:
                    break
                if not self.extend(fill, data):
                    return reader
                position += len(data)
        except TvixError as exc:
            # Let the caller's own reads decide: the part it wants may be fine.
            log.debug("blob %s: filling the cache stopped: %s", b3_text(digest), exc)
            self.abandon(fill)
            return reader
        if not self.finish(fill):
            return reader
        cached = self._open_cached(digest)
        if cached is None:
            return reader
        reader.close()
        return cached

    def _start_fill(self, digest: bytes, size: int) -> _Fill | None:
        try:
            fd, path = self.index.new_temp(digest)
        except OSError as exc:
            self._fill_failed(digest, exc)
            return None
        return _Fill(digest, size, fd, path)

    def extend(self, fill: _Fill, data: bytes) -> bool:
        """Append to a fill; False (and the fill is gone) when the disk refused."""
        try:
            fill.add(data)
        except OSError as exc:
            fill.discard()
            self._fill_failed(fill.digest, exc)
            return False
        return True

    def finish(self, fill: _Fill) -> bool:
        """Record a complete fill; False if it did not hash right or could not be recorded."""
        actual = fill.hasher.digest()
        if fill.position != fill.size or actual != fill.digest:
            log.warning("blob %s: the store served %d bytes hashing to %s; not cached", b3_text(fill.digest),
                        fill.position, b3_text(actual))
            self.abandon(fill)
            return False
        try:
            fill.close()
            entry = Entry(fill.digest, fill.size, fill.hasher.segment_digests(), time.time())
            stored, total = self.index.commit(entry, fill.path)
        except (TvixError, OSError) as exc:
            fill.discard()
            self._fill_failed(fill.digest, exc)
            return False
        if stored:
            self._counts["fills"] += 1
            self._counts["bytes_filled"] += fill.size
            log.debug("cached blob %s (%d bytes)", b3_text(fill.digest), fill.size)
        if total > self.max_bytes:
            self._evict()
        return True

    def abandon(self, fill: _Fill) -> None:
        self._counts["fills_abandoned"] += 1
        fill.discard()

    def _evict(self) -> None:
        try:
            count, size = self.index.evict(self.max_bytes, int(self.max_bytes * LOW_WATER))
        except (TvixError, OSError) as exc:
            log.warning("blob cache %s: eviction failed: %s", self.index.directory, exc)
            return
        self._counts["evictions"] += count
        self._counts["evicted_bytes"] += size
        if count:
            log.debug("blob cache %s: evicted %d blobs (%d bytes)", self.index.directory, count, size)

    def _fill_failed(self, digest: bytes, exc: BaseException) -> None:
        self._counts["fill_errors"] += 1
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            now = time.monotonic()
            if now - self._last_no_space >= NO_SPACE_WARN_S:
                self._last_no_space = now
                log.warning("blob cache %s is out of space (%s) while caching blob %s; serving from the "
                            "store without caching", self.index.directory, exc.strerror, b3_text(digest))
            else:
                log.debug("blob cache out of space while caching blob %s", b3_text(digest))
            return
        self._cache_trouble(digest, "caching it", exc)

    def _cache_trouble(self, digest: bytes, doing: str, exc: BaseException) -> None:
        self._counts["cache_errors"] += 1
        log.warning("blob cache %s: blob %s: %s failed (%s); serving from the store", self.index.directory,
                    b3_text(digest), doing, exc)


class _Fill:
    """A temp file being filled in order, hashed whole and per segment as it grows."""

    def __init__(self, digest: bytes, size: int, fd: int, path: Path) -> None:
        self.digest = digest
        self.size = size
        self.path = path
        self.position = 0
        self.hasher = SegmentHasher(SEGMENT)
        self._fd: int | None = fd

    def add(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.hasher.update(data)
        self.position += len(data)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the temp file; safe to call twice."""
        with contextlib.suppress(OSError):
            self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("removing cache temp file %s failed: %s", self.path, exc)


# -- readers -------------------------------------------------------------------------


class CachedBlobReader(BlobReader):
    """A cached file, verified segment by segment; falls back to the inner store on a mismatch."""

    def __init__(self, service: CachingBlobService, entry: Entry, fd: int) -> None:
        self._service = service
        self.digest = entry.digest
        self.size = entry.size
        self.opened = os.fstat(fd)
        self._file: SegmentFile | None = SegmentFile(entry.outboard, fd)
        self._fallback: BlobReader | None = None
        self.segment_size = entry.outboard.segment_size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"pread offset {offset} and length {length} must not be negative")
        return self._read(lambda source: source.pread(offset, length))

    def pread_into(self, offset: int, buf: memoryview) -> int:
        return self._read(lambda source: source.pread_into(offset, buf))

    def segment_into(self, offset: int, view: memoryview) -> int | None:
        step = self.segment_size
        if step != len(view) or offset % step:
            return None
        # From the cached file, checked in place; once it proved bad, the store's verified bytes.
        return self._read(lambda source: source.segment_into(offset // step, view)
                          if isinstance(source, SegmentFile) else source.pread_into(offset, view))

    def _read(self, read: Callable[[SegmentFile | BlobReader], T]) -> T:
        """``read`` from the cached file; from the inner store once that file proved bad."""
        if self._fallback is None:
            if self._file is None:
                raise InvalidArgument(f"blob {b3_text(self.digest)}: reader is closed")
            try:
                return read(self._file)
            except BadSegment as bad:
                self._give_up(bad)
        assert self._fallback is not None
        return read(self._fallback)

    def _give_up(self, bad: BadSegment) -> None:
        """Drop the cached copy and serve this reader from the inner store from now on."""
        if bad.error is not None:
            why = f"reading segment {bad.index}: {bad.error.strerror}"
        elif bad.short:
            why = f"segment {bad.index} is {bad.got} bytes, not {bad.want}"
        else:
            why = f"segment {bad.index} (bytes {bad.start}-{bad.start + bad.want - 1}) does not match"
        self._service.corrupt(self, why)
        self._close_file()
        self._fallback = self._service.inner.open_read(self.digest)

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def close(self) -> None:
        self._close_file()
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None


class FillingBlobReader(BlobReader):
    """The inner store's reader, copying what is read in order into a cache fill."""

    def __init__(self, service: CachingBlobService, inner: BlobReader, fill: _Fill) -> None:
        self._service = service
        self._inner = inner
        self._fill: _Fill | None = fill
        self.size = inner.size

    def pread(self, offset: int, length: int) -> bytes:
        fill = self._fill
        end = min(self.size, offset + max(length, 0))
        if fill is None or offset < 0 or offset >= end or end <= fill.position or \
                offset > fill.position + GAP_MAX:
            return self._inner.pread(offset, length)
        start = fill.position
        fresh = self._inner.pread(start, end - start)
        if len(fresh) != end - start:  # the inner contract was broken: do not cache
            self._service.abandon(fill)
            self._fill = None
            return self._inner.pread(offset, length)
        if self._service.extend(fill, fresh):
            if fill.position == fill.size:
                self._fill = None
                self._service.finish(fill)
        else:
            self._fill = None
        if offset >= start:
            return fresh[offset - start :]
        return self._inner.pread(offset, start - offset) + fresh

    def close(self) -> None:
        if self._fill is not None:
            self._service.abandon(self._fill)
            self._fill = None
        self._inner.close()
