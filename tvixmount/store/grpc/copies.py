"""Verified whole blobs held locally, and where a streamed blob waits while it is hashed.

A blob the client reads whole (small, unchunked, or the fallback when a
server stops serving chunks) is streamed into a ``Spool``: memory up to
``MEMORY_COPY`` bytes, an unlinked temp file beyond, so a huge blob never
sits in memory and leaves nothing on disk after a crash. Only once its
digest matched does the spool become a ``LocalCopy``, which readers then
serve ranges of; a spool that did not verify is discarded unread.
"""

from __future__ import annotations

import os
import tempfile

from ...castore.nodes import b3_text
from ...errors import InvalidArgument, InvalidData
from ..base import BlobReader

MEMORY_COPY = 1024 * 1024  # whole-blob copies up to this size stay in memory
# A reader that holds a blob whole hands out pieces of this size (the embedded store's segment,
# the worker arena's region: tvixmount/segcache.py) and WHOLE_FILL of them per read the arena
# missed: the worker copies them into the arena, and the dispatcher serves the reads after it
# without a round trip each (docs/performance.md, "gRPC: blobs held whole go to the arena").
SEGMENT = 256 * 1024
WHOLE_FILL = 4


class LocalCopy:
    """A verified blob, in memory or in an unlinked temp file; read-only once made."""

    def __init__(self, digest: bytes, data: bytes | None, fd: int | None, size: int) -> None:
        self.digest = digest
        self._data = data
        self._file = os.fdopen(fd, "rb", buffering=0) if fd is not None else None
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        if self._data is not None:
            return self._data[offset:end]
        assert self._file is not None
        fd = self._file.fileno()
        parts = []
        while offset < end:
            piece = os.pread(fd, end - offset, offset)
            if not piece:  # our own temp file cannot shrink; guard the loop anyway
                raise InvalidData(f"blob {b3_text(self.digest)}: local copy is truncated at {offset}")
            parts.append(piece)
            offset += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


    def pread_into(self, offset: int, buf: memoryview) -> int:
        """``pread`` straight into ``buf``: one copy (from memory, or the kernel's from the file)."""
        end = min(self.size, offset + len(buf))
        if offset >= end:
            return 0
        if self._data is not None:
            buf[: end - offset] = memoryview(self._data)[offset:end]
            return end - offset
        assert self._file is not None
        fd = self._file.fileno()
        position = offset
        while position < end:
            got = os.preadv(fd, [buf[position - offset : end - offset]], position)
            if not got:
                raise InvalidData(f"blob {b3_text(self.digest)}: local copy is truncated at {position}")
            position += got
        return end - offset


class Spool:
    """Where a streamed blob goes while it is hashed: memory first, a temp file past a limit."""

    def __init__(self, expected_size: int | None) -> None:
        self._memory: bytearray | None = bytearray()
        self._fd: int | None = None
        self.size = 0
        if expected_size is not None and expected_size > MEMORY_COPY:
            self._to_file()

    def _to_file(self) -> None:
        fd, name = tempfile.mkstemp(prefix="tvixmount-blob-")
        os.unlink(name)  # private, and gone with the last descriptor
        self._fd = fd
        if self._memory:
            self._write(self._memory)
        self._memory = None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def add(self, data: bytes | memoryview) -> None:
        if self._memory is not None and len(self._memory) + len(data) > MEMORY_COPY:
            self._to_file()
        if self._memory is not None:
            self._memory += data
        else:
            self._write(data)
        self.size += len(data)

    def finish(self, digest: bytes) -> LocalCopy:
        if self._memory is not None:
            return LocalCopy(digest, bytes(self._memory), None, self.size)
        fd, self._fd = self._fd, None
        return LocalCopy(digest, None, fd, self.size)

    def discard(self) -> None:
        self._memory = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



class WholeBlobReader(BlobReader):
    """Serves ranges of one verified local copy."""

    holds_whole = True
    segment_size = SEGMENT
    segments_per_fill = WHOLE_FILL

    def __init__(self, copy: LocalCopy) -> None:
        self._copy: LocalCopy | None = copy
        self.size = copy.size

    def pread(self, offset: int, length: int) -> bytes:
        check_range(offset, length)
        if self._copy is None:
            raise InvalidArgument("blob reader is closed")
        return self._copy.pread(offset, length)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        check_range(offset, len(buf))
        if self._copy is None:
            raise InvalidArgument("blob reader is closed")
        return self._copy.pread_into(offset, buf)

    def close(self) -> None:
        self._copy = None  # the temp file closes with its last reference



def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidArgument(f"pread offset {offset} and length {length} must not be negative")

