"""One blob of the embedded store: its row, and the file that a reader verifies and a writer fills.

Write path: bytes go to a temp file under ``tmp/`` while they are hashed
whole and per segment (``SegmentHasher``, segments.py); commit
fsyncs the file, renames it to ``blobs/<2 hex>/<64 hex>``, fsyncs that
directory, and only then records the row (size + per-segment digests), so
a reader that finds a row always finds a complete file. A blob that is
already stored is not written again. An aborted or failed writer removes
its temp file; a crashed one leaves it in ``tmp/`` (invisible, swept after
``STALE_TEMP_S`` by the service's next writer).

Read path: the per-segment digests are the blob's "outboard" verification
data, and ``SegmentFile`` (segments.py) reads only the segments covering a
range, each checked against its digest. A segment that is short or does
not match raises IntegrityError naming the blob and the segment index;
nothing unverified is returned or cached.

Inside a batch (blobs.py) a commit places the file without fsync and
leaves its row to the batch; the two ways it may do so are here
(``_create_new``, ``_link_new``), the reasons in blobs.py.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...castore.nodes import b3_text
from ...errors import IntegrityError, InvalidArgument, InvalidData, TvixError, Unavailable
from ..base import BlobReader, BlobWriter, ChunkMeta
from ..segments import BadSegment, Outboard, SegmentFile, SegmentHasher
from .layout import fsync_dir, remove_quietly, sync_file

if TYPE_CHECKING:
    from .blobs import EmbeddedBlobService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlobMeta:
    """A blob's row: its size and the digest of every ``chunk_size`` segment."""

    digest: bytes
    size: int
    chunk_size: int
    chunk_digests: bytes  # 32 bytes per segment; empty when there is at most one
    pack: int | None = None  # the pack holding it (packs.py); None: its own file
    offset: int = 0  # where it starts in that pack

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
    def from_row(
        cls, digest: bytes, size: int, chunk_size: int, chunks: bytes, pack: int | None = None,
        offset: int | None = None,
    ) -> BlobMeta:
        meta = cls(digest, size, chunk_size, bytes(chunks), pack, offset or 0)
        if pack is not None and (offset is None or offset < 0 or size > chunk_size):
            raise InvalidData(
                f"stored blob {b3_text(digest)} has a damaged row: packed at offset {offset} "
                f"with size {size} (a packed blob is one chunk of at most {chunk_size} bytes)"
            )
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
        self._file = SegmentFile(meta.outboard, fd, meta.offset)
        self._where = where
        self._place = "" if meta.pack is None else f" (packed in pack {meta.pack:016x} at {meta.offset})"
        self.size = meta.size
        self.segment_size = meta.outboard.segment_size

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

    def segment_into(self, offset: int, view: memoryview) -> int | None:
        step = self._file.outboard.segment_size
        if step != len(view) or offset % step:
            return None
        try:
            return self._file.segment_into(offset // step, view)
        except BadSegment as bad:
            raise self._failure(bad) from None

    def _failure(self, bad: BadSegment) -> TvixError:
        digest = b3_text(self._file.outboard.digest)
        if bad.error is not None:
            return Unavailable(f"blob {digest} in {self._where}{self._place}: read failed: {bad.error}")
        if bad.short:
            return IntegrityError(
                f"blob {digest} chunk {bad.index}: file in {self._where}{self._place} is truncated "
                f"(got {bad.got} of {bad.want} bytes at offset {bad.start})"
            )
        return IntegrityError(
            f"blob {digest} chunk {bad.index} (bytes {bad.start}..{bad.start + bad.want}) "
            f"in {self._where}{self._place} does not match its digest"
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
            if self._fd < 0 and size <= service.packed_max:
                stored = service.meta(digest)
                if stored is None:
                    return self._commit_packed(meta)
                if stored.pack is not None:
                    if service.packed_copy_intact(stored):
                        return self._skip(digest)
                    log.warning("store %s: blob %s: its packed copy is damaged or gone; storing it again",
                                self._handle.where, b3_text(digest))
                    return self._commit_packed(meta, replace=True)
                # Stored as a file before packs: as below (kept if whole, rewritten if not).
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

    def _commit_packed(self, meta: BlobMeta, replace: bool = False) -> bytes:
        """Append a small blob held in memory to this process's pack (packs.py); row as for a file.

        In a batch the row waits for the batch's durability step like a
        file's; outside one, the pack is fdatasynced before the row.
        ``replace``: the blob's recorded copy is damaged; the new copy is
        made durable at once and its row replaces the old one (whose bytes
        are left unreferenced, for verify to report).
        """
        head, self._head = self._head, None
        appender = self._handle.appender()
        pack, offset = appender.append(head if head is not None else b"")
        meta = dataclasses.replace(meta, pack=pack, offset=offset)
        self._done = True
        if not replace and self._service.add_pending(meta, None):
            return meta.digest
        appender.sync()
        self._service.record(meta, replace=replace)
        return meta.digest

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
