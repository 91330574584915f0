"""Blobs of the embedded store: one file each, verified chunk by chunk.

The file of one blob, its row, reader and writer: blobfile.py. This
module holds the service: the row cache, listings, the sweep of temp files
crashed writers left, and batches.

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
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from ...castore.nodes import b3_text
from ...errors import InvalidData, NotFound, TvixError, Unavailable
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter
from .blobfile import BlobMeta, EmbeddedBlobReader, EmbeddedBlobWriter
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
        meta, fd = self._open_file(digest)
        return EmbeddedBlobReader(meta, fd, self.handle.where)

    def _open_file(self, digest: bytes) -> tuple[BlobMeta, int]:
        """The blob's row and its file, open; NotFound without a row, InvalidData without the file."""
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
        return meta, fd

    def read_many(self, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
        """Small blobs whole and verified: their rows in one query, then each file read once.

        Why: a batch of 64 small files cost 64 row look-ups (each a query
        and a transaction) before; now it costs one ``IN (...)`` query for
        the rows not cached, and per blob an open, a read and a close. The
        blob files stay one per blob (a packed format would save the opens
        but is a store format change; see docs/performance.md).
        """
        for digest, _ in wanted:
            records.check_b3(digest, "blob")
        self._load_metas([digest for digest, _ in wanted])
        # Open them all and tell the kernel each is needed whole before reading any: their disk
        # reads then overlap instead of each waiting for the last (a worker reads one at a time).
        opened: list[BlobReader | TvixError] = []
        for digest, _ in wanted:
            try:
                meta, fd = self._open_file(digest)
            except TvixError as exc:
                opened.append(exc)
                continue
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, meta.size, os.POSIX_FADV_WILLNEED)
            opened.append(EmbeddedBlobReader(meta, fd, self.handle.where))
        out: list[bytes | TvixError] = []
        try:
            for reader in opened:
                if isinstance(reader, TvixError):
                    out.append(reader)
                    continue
                try:
                    with reader:
                        out.append(reader.pread(0, reader.size))
                except TvixError as exc:
                    out.append(exc)
        finally:  # a bug above must not leak the files not read yet
            for reader in opened[len(out) + 1:]:
                if isinstance(reader, BlobReader):
                    reader.close()
        return out

    def _load_metas(self, digests: list[bytes]) -> None:
        """Put the rows of ``digests`` not cached yet into the row cache, with one query."""
        with self._lock:
            missing = list(dict.fromkeys(d for d in digests if d not in self._metas))
        if not missing:
            return
        marks = ",".join("?" * len(missing))
        sql = f"SELECT digest, size, chunk_size, chunks FROM blobs WHERE digest IN ({marks})"
        try:
            rows = self.handle.db.all(f"looking up {len(missing)} blobs", sql, tuple(missing))
        except TvixError as exc:  # each blob's own look-up will fail and say why
            log.debug("store %s: batch row look-up failed: %s", self.handle.where, exc)
            return
        for row in rows:
            with contextlib.suppress(InvalidData):  # the blob's own look-up says it, for that blob only
                self._remember(BlobMeta.from_row(bytes(row[0]), *row[1:]))

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
