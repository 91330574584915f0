"""Blobs of the embedded store: a file each, or packed when small; verified chunk by chunk.

The file of one blob, its row, reader and writer: blobfile.py; small
blobs packed together: packs.py. This module holds the service: the row
cache, listings, batched reads of small blobs, the sweep of temp files
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

Packed blobs (packs.py) join a batch the same way: appended to this
process's pack without fsync, their rows pending; the same ``syncfs`` makes
them durable (or, without syncfs, one fdatasync per pack appended to).

What a batch leaves on a crash or an exception: files in ``blobs/`` without
rows, possibly incomplete, and bytes at the end of a pack without rows.
They are invisible (every read, stat and listing goes through the rows, so
a blob whose file is in place but whose row is not yet committed is simply
absent, also to readers in other processes) and harmless: a later write of
the same blob replaces such a file durably before recording it, and nothing
ever trusts a file or pack bytes without a row. They only cost disk space;
no repair step is needed (the next writer to take a pack cuts back its
unrecorded tail, packs.py; ``tvixstore verify`` reports such bytes).

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
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import blake3

from ...castore.nodes import b3_text
from ...errors import IntegrityError, InvalidData, NotFound, TvixError, Unavailable
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter
from .blobfile import BlobMeta, EmbeddedBlobReader, EmbeddedBlobWriter
from .layout import StoreHandle, fsync_dir, remove_quietly, sync_file, sync_filesystem
from .packs import PACKED_MAX, PackUsage, Read, pack_path, pack_usage, plan_reads

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
        self._pending_packed = False
        # Blobs up to this size are packed: at most one chunk, so one digest verifies each whole.
        self.packed_max = min(PACKED_MAX, handle.chunk_size)

    def _columns(self) -> str:
        """The row's columns to select (a store made before packs has no pack columns)."""
        if self.handle.packed_rows:
            return "size, chunk_size, chunks, pack, pack_offset"
        return "size, chunk_size, chunks, NULL, NULL"

    def _insert(self, conn: sqlite3.Connection, metas: list[BlobMeta], conflict: str = "IGNORE") -> None:
        if self.handle.packed_rows:
            conn.executemany(
                f"INSERT OR {conflict} INTO blobs (digest, size, chunk_size, chunks, pack, pack_offset) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(m.digest, m.size, m.chunk_size, m.chunk_digests, m.pack,
                  None if m.pack is None else m.offset) for m in metas],
            )
            return
        assert all(m.pack is None for m in metas), "packed blob in a store without pack columns"
        conn.executemany(
            f"INSERT OR {conflict} INTO blobs (digest, size, chunk_size, chunks) VALUES (?, ?, ?, ?)",
            [(m.digest, m.size, m.chunk_size, m.chunk_digests) for m in metas],
        )

    def meta(self, digest: bytes) -> BlobMeta | None:
        """The blob's row (cached: rows never change once written), or None."""
        with self._lock:
            meta = self._metas.get(digest)
            if meta is not None:
                self._metas.move_to_end(digest)
                return meta
        what = f"looking up blob {b3_text(digest)}"
        sql = f"SELECT {self._columns()} FROM blobs WHERE digest = ?"
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

    def record(self, meta: BlobMeta, replace: bool = False) -> None:
        """Register a blob whose bytes are in place (idempotent); ``replace``: over its old row."""
        with self.handle.db.transaction(f"recording blob {b3_text(meta.digest)}") as conn:
            self._insert(conn, [meta], "REPLACE" if replace else "IGNORE")
        if replace:
            with self._lock:
                old = self._metas.pop(meta.digest, None)
                if old is not None:
                    self._meta_bytes -= len(old.chunk_digests)
        self._remember(meta)

    def packed_copy_intact(self, meta: BlobMeta) -> bool:
        """Whether a packed blob's recorded bytes still hash to its digest (a writer's dedup check).

        Costs one small pread and hash per blob already stored, and lets a
        re-import repair a damaged packed blob as it repairs a damaged file.
        """
        try:
            fd = os.open(self._path(meta), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = _pread_full(fd, meta.size, meta.offset)
            finally:
                os.close(fd)
        except OSError:
            return False
        return len(data) == meta.size and blake3.blake3(data).digest() == meta.digest

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

    def add_pending(self, meta: BlobMeta, final: str | None) -> bool:
        """Queue the row of a blob placed without fsync (``final``: its file, None if packed).

        False if no batch is open (any more): the caller makes it durable and records it alone.
        """
        with self._batch_lock:
            if self._batch_depth == 0:
                return False
            if meta.digest not in self._pending:
                self._pending[meta.digest] = meta
                self._pending_bytes += meta.size
            if final is None:
                self._pending_packed = True
            else:
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
            packed, self._pending_packed = self._pending_packed, False
            self._pending_bytes = 0
        if not pending:
            return
        started = time.monotonic()
        try:
            if not sync_filesystem(self.handle.root):
                for meta in pending.values():
                    if meta.pack is None:
                        sync_file(self.handle.blob_path(meta.digest))
                if packed:
                    self.handle.appender().sync()
            for directory in sorted(dirs):
                fsync_dir(directory)
        except OSError as exc:
            raise Unavailable(
                f"store {self.handle.where}: making {len(pending)} blobs durable failed: {exc}; "
                "none of them was recorded"
            ) from None
        synced = time.monotonic()
        with self.handle.db.transaction(f"recording {len(pending)} blobs") as conn:
            self._insert(conn, list(pending.values()))
        log.debug("store %s: batch of %d blobs synced in %.3f s, recorded in %.3f s", self.handle.where,
                  len(pending), synced - started, time.monotonic() - synced)

    def _discard(self) -> None:
        with self._batch_lock:
            dropped = len(self._pending)
            self._pending.clear()
            self._pending_dirs.clear()
            self._pending_packed = False
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
        """The blob's row and its file or pack, open; NotFound without a row, InvalidData without the file."""
        meta = self.meta(digest)
        if meta is None:
            raise NotFound(f"blob {b3_text(digest)} not found in store {self.handle.where}")
        path = self._path(meta)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if meta.pack is None and self._packed_since_open():
                return self._open_file(digest)
            raise InvalidData(
                f"blob {b3_text(digest)} is recorded in store {self.handle.where} "
                f"but its {'file' if meta.pack is None else 'pack'} {path} is missing"
            ) from None
        except OSError as exc:
            raise Unavailable(f"blob {b3_text(digest)}: cannot open {path}: {exc}") from None
        return meta, fd

    def _path(self, meta: BlobMeta) -> str:
        if meta.pack is None:
            return self.handle.blob_path(meta.digest)
        return pack_path(self.handle.packs_dir, meta.pack)

    def _packed_since_open(self) -> bool:
        """Whether rows read without pack columns may be stale: another writer packed since open."""
        if self.handle.packed_rows or not self.handle.refresh_packed_rows():
            return False
        with self._lock:
            self._metas.clear()
            self._meta_bytes = 0
        return True

    def read_many(self, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
        """Small blobs whole and verified: their rows in one query, then few reads.

        Why: a batch of 64 small files cost 64 row look-ups (each a query
        and a transaction) before; now it costs one ``IN (...)`` query for
        the rows not cached. Packed blobs (packs.py) are then read by pack:
        one open per pack, and one pread per run of blobs lying close
        together; a blob in its own file costs an open, a read and a close.
        """
        for digest, _ in wanted:
            records.check_b3(digest, "blob")
        self._load_metas([digest for digest, _ in wanted])
        out: list[bytes | TvixError | None] = [None] * len(wanted)
        by_pack: dict[int, list[tuple[int, int, int]]] = {}
        metas: dict[int, BlobMeta] = {}
        # Open them all and tell the kernel what is needed before reading any: their disk
        # reads then overlap instead of each waiting for the last (a worker reads one at a time).
        files: list[tuple[int, EmbeddedBlobReader]] = []
        packs: list[tuple[int, list[Read], int]] = []  # (pack, reads, fd)
        try:
            for index, (digest, _) in enumerate(wanted):
                meta = self.meta(digest) if self.handle.packed_rows else None
                if meta is not None and meta.pack is not None:
                    metas[index] = meta
                    by_pack.setdefault(meta.pack, []).append((meta.offset, meta.size, index))
                    continue
                try:
                    meta, fd = self._open_file(digest)
                except TvixError as exc:
                    out[index] = exc
                    continue
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, meta.offset, meta.size, os.POSIX_FADV_WILLNEED)
                files.append((index, EmbeddedBlobReader(meta, fd, self.handle.where)))
            for pack, ranges in by_pack.items():
                path = pack_path(self.handle.packs_dir, pack)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    for _, _, index in ranges:
                        out[index] = self._pack_failure(metas[index], exc)
                    continue
                reads = plan_reads(ranges)
                packs.append((pack, reads, fd))
                for read in reads:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, read.start, read.end - read.start, os.POSIX_FADV_WILLNEED)
            for index, reader in files:
                try:
                    out[index] = reader.pread(0, reader.size)
                except TvixError as exc:
                    out[index] = exc
            for _, reads, fd in packs:
                for read in reads:
                    self._read_run(fd, read, metas, out)
        finally:
            for _, reader in files:
                reader.close()
            for _, _, fd in packs:
                os.close(fd)
        return [r if r is not None else InvalidData("blob not read (internal error)") for r in out]

    def _read_run(self, fd: int, read: Read, metas: dict[int, BlobMeta],
                  out: list[bytes | TvixError | None]) -> None:
        """One pread covering several packed blobs; each verified against its own digest."""
        start, end, items = read.start, read.end, read.items
        try:
            data = _pread_full(fd, end - start, start)
        except OSError as exc:
            for index in items:
                out[index] = self._pack_failure(metas[index], exc)
            return
        with memoryview(data) as view:
            for index in items:
                meta = metas[index]
                piece = view[meta.offset - start : meta.offset - start + meta.size]
                if len(piece) < meta.size:
                    out[index] = self._pack_failure(meta, None, len(piece))
                elif blake3.blake3(piece).digest() != meta.digest:
                    out[index] = self._pack_failure(meta, None, meta.size)
                else:
                    out[index] = bytes(piece)

    def _pack_failure(self, meta: BlobMeta, error: OSError | None, got: int = 0) -> TvixError:
        """The error for one packed blob, worded as the blob reader words it (blobfile.py)."""
        where = f"{self.handle.where} (packed in pack {meta.pack:016x} at {meta.offset})"
        digest = b3_text(meta.digest)
        if isinstance(error, FileNotFoundError):
            path = self._path(meta)
            return InvalidData(f"blob {digest} is recorded in store {self.handle.where} "
                               f"but its pack {path} is missing")
        if error is not None:
            return Unavailable(f"blob {digest} in {where}: read failed: {error}")
        if got < meta.size:
            return IntegrityError(f"blob {digest} chunk 0: file in {where} is truncated "
                                  f"(got {got} of {meta.size} bytes at offset 0)")
        return IntegrityError(f"blob {digest} chunk 0 (bytes 0..{meta.size}) in {where} "
                              "does not match its digest")

    def _load_metas(self, digests: list[bytes]) -> None:
        """Put the rows of ``digests`` not cached yet into the row cache, with one query."""
        with self._lock:
            missing = list(dict.fromkeys(d for d in digests if d not in self._metas))
        if not missing:
            return
        marks = ",".join("?" * len(missing))
        sql = f"SELECT digest, {self._columns()} FROM blobs WHERE digest IN ({marks})"
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

    def pack_usage(self) -> list[PackUsage]:
        """Every pack with its recorded bytes; the rest is dead weight (``tvixstore verify``)."""
        return pack_usage(self.handle.packs_dir, self.handle.db, self.handle.refresh_packed_rows())

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


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread until ``length`` bytes or end of file (one call unless the kernel splits it)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data
