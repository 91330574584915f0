"""Blobs of the embedded store: one file each, verified chunk by chunk.

Write path: bytes go to a temp file under ``tmp/`` while they are hashed
whole and per segment (``SegmentHasher``, segments.py); commit
fsyncs the file, renames it to ``blobs/<2 hex>/<64 hex>``, fsyncs that
directory, and only then records the row (size + per-segment digests), so
a reader that finds a row always finds a complete file. A blob that is
already stored is not written again. An aborted or failed writer removes
its temp file; a crashed one leaves it in ``tmp/`` (invisible, swept after
``STALE_TEMP_S`` by the next writer).

Read path: the per-segment digests are the blob's "outboard" verification
data, and ``SegmentFile`` (segments.py) reads only the segments covering a
range, each checked against its digest. A segment that is short or does
not match raises IntegrityError naming the blob and the segment index;
nothing unverified is returned or cached.

Batches (``EmbeddedBlobService.batch()``, for importers): two fsyncs per
blob cap an import at a few hundred files/s, so inside a batch a commit
puts the blob under its final name without any fsync (a blob still held
in memory, up to one segment, is written there directly; a bigger one's
temp file is hard-linked there), and its row waits. When the batch ends
(or grows past ``BATCH_MAX_BLOBS`` / ``BATCH_MAX_BYTES``) everything is
made durable at once, with one ``syncfs`` of the store's filesystem (or,
where there is none, an fdatasync per file) and an fsync of each touched
``blobs/xx``, and only then are all the rows committed in one
transaction. So the rule stays the same as outside a batch: a row is never
visible before its file's bytes are durable.

What a batch leaves on a crash or an exception: files in ``blobs/`` without
rows, possibly incomplete. They are invisible (every read, stat and listing
goes through the rows, so a blob whose file is in place but whose row is not
yet committed is simply absent, also to readers in other processes) and
harmless: a later write of the same blob replaces such a file durably
before recording it, and nothing ever trusts a file without its row. They
only cost disk space; no repair step is needed.

Why ``O_EXCL`` or a hard link and not a rename inside a batch: neither ever
replaces an existing file. A file already at the final name may belong to
a recorded blob (another process's, or one being repaired), and swapping it
for bytes that are not yet durable could leave a recorded blob truncated
after a power cut; when the name is taken, that one blob takes the fully
durable path (fsync, rename, fsync) instead.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from ...castore.nodes import b3_text
from ...errors import IntegrityError, InvalidArgument, InvalidData, NotFound, TvixError, Unavailable
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta
from ..segments import BadSegment, Outboard, SegmentFile, SegmentHasher
from .layout import StoreHandle, fsync_dir, remove_quietly, sync_file, sync_filesystem

log = logging.getLogger(__name__)

STALE_TEMP_S = 3600.0
# Blob rows kept per service (they never change): at most this many, and at
# most this many bytes of chunk digests (a 1 GiB blob alone has 128 KiB).
_META_CACHE = 4096
_META_CACHE_BYTES = 8 * 1024 * 1024
# A batch is made durable and recorded early once it holds this many blobs
# or bytes: bounds the memory its pending rows take and how much work a
# crash leaves unrecorded.
BATCH_MAX_BLOBS = 20_000
BATCH_MAX_BYTES = 2 << 30


@dataclass(frozen=True, slots=True)
class BlobMeta:
    """A blob's row: its size and the digest of every ``chunk_size`` segment."""

    digest: bytes
    size: int
    chunk_size: int
    chunk_digests: bytes  # 32 bytes per segment; empty when there is at most one

    @property
    def outboard(self) -> Outboard:
        return Outboard(self.digest, self.size, self.chunk_size, self.chunk_digests)

    def chunks(self) -> tuple[ChunkMeta, ...]:
        """The segment list for ``stat`` (empty for a one-segment blob, as tvix reports)."""
        outboard = self.outboard
        count = outboard.count
        if count <= 1:
            return ()
        last = self.size - (count - 1) * self.chunk_size
        return tuple(
            ChunkMeta(outboard.segment_digest(i), self.chunk_size if i < count - 1 else last)
            for i in range(count)
        )

    @classmethod
    def from_row(cls, digest: bytes, size: int, chunk_size: int, chunks: bytes) -> BlobMeta:
        meta = cls(digest, size, chunk_size, bytes(chunks))
        if size < 0 or chunk_size <= 0 or not meta.outboard.well_formed():
            expected = meta.outboard.expected_len if chunk_size > 0 else 0
            raise InvalidData(
                f"stored blob {b3_text(digest)} has a damaged row: size {size}, chunk size "
                f"{chunk_size}, {len(meta.chunk_digests)} bytes of chunk digests (expected {expected})"
            )
        return meta


class EmbeddedBlobReader(BlobReader):
    """Verified random access to one blob file (segments.py); its failures named for this store."""

    def __init__(self, meta: BlobMeta, fd: int, where: str) -> None:
        self._file = SegmentFile(meta.outboard, fd)
        self._where = where
        self.size = meta.size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return self._file.pread(offset, length)
        except BadSegment as bad:
            raise self._failure(bad) from None

    def pread_into(self, offset: int, buf: memoryview) -> int:
        try:
            return self._file.pread_into(offset, buf)
        except BadSegment as bad:
            raise self._failure(bad) from None

    def _failure(self, bad: BadSegment) -> TvixError:
        digest = b3_text(self._file.outboard.digest)
        if bad.error is not None:
            return Unavailable(f"blob {digest} in {self._where}: read failed: {bad.error}")
        if bad.short:
            return IntegrityError(
                f"blob {digest} chunk {bad.index}: file in {self._where} is truncated "
                f"(got {bad.got} of {bad.want} bytes at offset {bad.start})"
            )
        return IntegrityError(
            f"blob {digest} chunk {bad.index} (bytes {bad.start}..{bad.start + bad.want}) "
            f"in {self._where} does not match its digest"
        )

    def close(self) -> None:
        self._file.close()


class EmbeddedBlobWriter(BlobWriter):
    """Streams one blob to a temp file, hashing it whole and per segment.

    The first ``chunk_size`` bytes are held in memory and the temp file is
    created only when more arrive or at commit, so re-importing small
    files that are already stored costs a hash and a look-up, no file I/O.
    """

    def __init__(self, service: EmbeddedBlobService, expected_digest: bytes | None) -> None:
        self._service = service
        self._handle = service.handle
        self._expected = expected_digest
        self._chunk_size = self._handle.chunk_size
        self._hasher = SegmentHasher(self._chunk_size)
        self._head: bytearray | None = bytearray()  # bytes not yet in a temp file
        self._fd = -1
        self._temp: str | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise InvalidArgument("blob writer is already committed or aborted")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        if self._head is not None and len(self._head) + len(view) <= self._chunk_size:
            self._head += view
            return
        self._to_file(view)

    def _to_file(self, view: memoryview | bytearray) -> None:
        """Append to the temp file, creating it (with the held head) first."""
        try:
            if self._fd < 0:
                name = f"{os.getpid()}.{secrets.token_hex(8)}.tmp"
                self._temp = f"{self._handle.tmp_dir}/{name}"
                self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                head, self._head = self._head, None
                if head:
                    _write_all(self._fd, memoryview(head))
            _write_all(self._fd, memoryview(view))
        except OSError as exc:
            self.abort()
            raise Unavailable(f"store {self._handle.where}: writing a blob failed: {exc}") from None

    def commit(self) -> bytes:
        if self._done:
            raise InvalidArgument("blob writer is already committed or aborted")
        digest = self._hasher.digest()
        size = self._hasher.size
        try:
            if self._expected is not None and digest != self._expected:
                raise IntegrityError(
                    f"blob written as {b3_text(self._expected)} hashes to {b3_text(digest)}; not stored"
                )
            meta = BlobMeta(digest, size, self._chunk_size, self._hasher.segment_digests())
            final = self._handle.blob_path(digest)
            service = self._service
            if service.is_pending(digest):
                return self._skip(digest)
            # In a batch, try to place the blob first: a new blob (the common
            # case there) then costs no look-up; a taken name is checked below.
            if service.batching() and (self._link_new(final) if self._fd >= 0 else self._create_new(final)):
                self._done = True
                if service.add_pending(meta, final):
                    return digest
                # The batch ended while this blob was being placed: make it durable alone.
                sync_file(final)
                fsync_dir(os.path.dirname(final))
                service.record(meta)
                return digest
            if service.meta(digest) is not None and _has_size(final, size):
                return self._skip(digest)
            if self._fd < 0:
                self._to_file(bytearray())
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            assert self._temp is not None
            os.replace(self._temp, final)
            self._temp = None
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            self.abort()
            raise Unavailable(
                f"store {self._handle.where}: storing blob {b3_text(digest)} failed: {exc}"
            ) from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._service.record(meta)
        return digest

    def _skip(self, digest: bytes) -> bytes:
        log.debug("blob %s already stored", b3_text(digest))
        self.abort()
        return digest

    def _create_new(self, final: str) -> bool:
        """Write a blob held wholly in memory straight to its final name (in a batch).

        No temp file: until the batch records it, a file at its final name is
        invisible anyway, and a crash mid-write leaves the same unrecorded
        leftover as a crash before the batch's sync. O_EXCL, because a file
        already there may be a recorded blob's: then False, nothing done.
        Once created, the file is never removed here, even if writing fails:
        another writer may have replaced it with a recorded one meanwhile.
        """
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        head, self._head = self._head, None
        try:
            if head:
                _write_all(fd, memoryview(head))
        finally:
            os.close(fd)
        return True

    def _link_new(self, final: str) -> bool:
        """Give the temp file its final name without fsync; False (nothing done) if the name is taken.

        Any other failure to link (a filesystem without hard links) is also
        False: the caller then takes the durable path, which renames.
        """
        assert self._temp is not None
        try:
            os.link(self._temp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            log.debug("store %s: cannot hard-link blobs (%s); writing durably", self._handle.where, exc)
            return False
        os.close(self._fd)
        self._fd = -1
        remove_quietly(self._temp)
        self._temp = None
        return True

    def abort(self) -> None:
        self._done = True
        self._head = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._temp is not None:
            remove_quietly(self._temp)
            self._temp = None

    def __del__(self) -> None:
        # A writer dropped without commit or abort must not leave its temp file.
        if getattr(self, "_temp", None) is not None:
            self.abort()


def _write_all(fd: int, view: memoryview) -> None:
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])


def _has_size(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


class EmbeddedBlobService(BlobService):
    def __init__(self, handle: StoreHandle) -> None:
        self.handle = handle
        self._lock = threading.Lock()
        self._metas: OrderedDict[bytes, BlobMeta] = OrderedDict()
        self._meta_bytes = 0
        self._closed = False
        # Batch state, shared by every thread writing through this service.
        self._batch_lock = threading.Lock()
        self._batch_depth = 0
        self._pending: dict[bytes, BlobMeta] = {}
        self._pending_dirs: set[str] = set()
        self._pending_bytes = 0

    def meta(self, digest: bytes) -> BlobMeta | None:
        """The blob's row (cached: rows never change once written), or None."""
        with self._lock:
            meta = self._metas.get(digest)
            if meta is not None:
                self._metas.move_to_end(digest)
                return meta
        what = f"looking up blob {b3_text(digest)}"
        sql = "SELECT size, chunk_size, chunks FROM blobs WHERE digest = ?"
        row = self.handle.db.one(what, sql, (digest,))
        if row is None:
            return None
        meta = BlobMeta.from_row(digest, *row)
        self._remember(meta)
        return meta

    def _remember(self, meta: BlobMeta) -> None:
        with self._lock:
            if meta.digest in self._metas:
                return
            self._metas[meta.digest] = meta
            self._meta_bytes += len(meta.chunk_digests)
            while len(self._metas) > _META_CACHE or self._meta_bytes > _META_CACHE_BYTES:
                _, old = self._metas.popitem(last=False)
                self._meta_bytes -= len(old.chunk_digests)

    def record(self, meta: BlobMeta) -> None:
        """Register a blob whose file is in place (idempotent)."""
        with self.handle.db.transaction(f"recording blob {b3_text(meta.digest)}") as conn:
            conn.execute(
                "INSERT OR IGNORE INTO blobs (digest, size, chunk_size, chunks) VALUES (?, ?, ?, ?)",
                (meta.digest, meta.size, meta.chunk_size, meta.chunk_digests),
            )
        self._remember(meta)

    # -- batches ---------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commit many blobs with one durability step at the end (see the module doc).

        Covers every writer of this service that commits while the batch is
        open, from any thread. Blobs committed inside it are absent (stat
        None, open_read NotFound, not listed) until it ends; on a normal
        exit they are made durable and recorded, and after that they are
        visible. On an exception no row is written: the files stay behind
        unrecorded, to be replaced by a later write of the same blob.
        Batches nest; each normal exit records everything pending so far.
        """
        with self._batch_lock:
            self._batch_depth += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._batch_lock:
                self._batch_depth -= 1
                last = self._batch_depth == 0
            if ok:
                self.flush()
            elif last:
                self._discard()

    def batching(self) -> bool:
        return self._batch_depth > 0

    def is_pending(self, digest: bytes) -> bool:
        """Whether a batch already placed this blob (its row not yet written)."""
        with self._batch_lock:
            return digest in self._pending

    def add_pending(self, meta: BlobMeta, final: str) -> bool:
        """Queue the row of a blob placed without fsync; False if no batch is open any more."""
        with self._batch_lock:
            if self._batch_depth == 0:
                return False
            if meta.digest not in self._pending:
                self._pending[meta.digest] = meta
                self._pending_bytes += meta.size
            self._pending_dirs.add(os.path.dirname(final))
            full = len(self._pending) >= BATCH_MAX_BLOBS or self._pending_bytes >= BATCH_MAX_BYTES
        if full:
            self.flush()
        return True

    def flush(self) -> None:
        """Make every pending blob durable, then record them all in one transaction."""
        with self._batch_lock:
            pending, self._pending = self._pending, {}
            dirs, self._pending_dirs = self._pending_dirs, set()
            self._pending_bytes = 0
        if not pending:
            return
        started = time.monotonic()
        try:
            if not sync_filesystem(self.handle.root):
                for digest in pending:
                    sync_file(self.handle.blob_path(digest))
            for directory in sorted(dirs):
                fsync_dir(directory)
        except OSError as exc:
            raise Unavailable(
                f"store {self.handle.where}: making {len(pending)} blobs durable failed: {exc}; "
                "none of them was recorded"
            ) from None
        synced = time.monotonic()
        with self.handle.db.transaction(f"recording {len(pending)} blobs") as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO blobs (digest, size, chunk_size, chunks) VALUES (?, ?, ?, ?)",
                [(m.digest, m.size, m.chunk_size, m.chunk_digests) for m in pending.values()],
            )
        log.debug("store %s: batch of %d blobs synced in %.3f s, recorded in %.3f s", self.handle.where,
                  len(pending), synced - started, time.monotonic() - synced)

    def _discard(self) -> None:
        with self._batch_lock:
            dropped = len(self._pending)
            self._pending.clear()
            self._pending_dirs.clear()
            self._pending_bytes = 0
        if dropped:
            log.info("store %s: batch failed; %d blob files stay unrecorded (harmless, replaced "
                     "when written again)", self.handle.where, dropped)

    # -- reading -----------------------------------------------------------------

    def stat(self, digest: bytes) -> BlobStat | None:
        records.check_b3(digest, "blob")
        meta = self.meta(digest)
        return None if meta is None else BlobStat(meta.size, meta.chunks())

    def open_read(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        records.check_b3(digest, "blob")
        meta = self.meta(digest)
        if meta is None:
            raise NotFound(f"blob {b3_text(digest)} not found in store {self.handle.where}")
        path = self.handle.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidData(
                f"blob {b3_text(digest)} is recorded in store {self.handle.where} "
                f"but its file {path} is missing"
            ) from None
        except OSError as exc:
            raise Unavailable(f"blob {b3_text(digest)}: cannot open {path}: {exc}") from None
        return EmbeddedBlobReader(meta, fd, self.handle.where)

    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        """A writer; with ``expected_digest`` a commit of other bytes fails and stores nothing."""
        if expected_digest is not None:
            records.check_b3(expected_digest, "expected blob")
        self._sweep_temp_once()
        return EmbeddedBlobWriter(self, expected_digest)

    def iter_digests(self) -> Iterator[bytes]:
        for row in self.handle.db.pages("listing blobs", "blobs", "size"):
            yield row[0]

    def _sweep_temp_once(self) -> None:
        """Remove temp files that crashed writers left (first writer per store only)."""
        if self.handle.temp_swept:
            return
        self.handle.temp_swept = True
        cutoff = time.time() - STALE_TEMP_S
        try:
            with os.scandir(self.handle.tmp_dir) as entries:
                for entry in entries:
                    if entry.name.endswith(".tmp") and entry.stat().st_mtime < cutoff:
                        log.info("removing stale temp blob %s", entry.path)
                        remove_quietly(entry.path)
        except OSError as exc:
            log.warning("store %s: cannot sweep %s: %s", self.handle.where, self.handle.tmp_dir, exc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handle.release()
