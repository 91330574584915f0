"""The ``memory://`` backend: one in-process store, for unit tests only.

All services opened with ``memory://`` in one process share one set of
tables (``_Tables``), so a test can fill blobs, directories and path infos
through separately opened services and read them back through others (for
example an importer's ``Store`` and a fetcher's own services). ``reset()``
empties it between tests. A forked child gets a copy of the parent's
tables at fork time; nothing is shared back.

Rows are kept as bytes and go through ``records`` exactly as the on-disk
store's rows do, so both backends accept and report the same things.
Readers re-hash the blob when opened: cheap at test sizes, and it keeps the
"every returned byte was checked" contract literal.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator

import blake3

from ..castore.directory import Directory
from ..castore.nodes import Node, b3_text
from ..castore.pathinfo import PathInfo
from ..errors import IntegrityError, InvalidArgument, NotFound
from . import records
from .base import (
    BlobReader,
    BlobService,
    BlobStat,
    BlobWriter,
    DirectoryService,
    PathInfoService,
)
from .narcalc import calculate_nar


class _Tables:
    """The process-wide contents of ``memory://``; every access holds ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blobs: dict[bytes, bytes] = {}
        self.directories: dict[bytes, bytes] = {}
        self.path_infos: dict[bytes, bytes] = {}


_tables = _Tables()


def _renew_lock_after_fork() -> None:
    # Another thread may have held the lock when we forked; the child's copy
    # would then stay locked forever.
    _tables.lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_after_fork)


def reset() -> None:
    """Forget everything stored under ``memory://`` in this process (tests)."""
    with _tables.lock:
        _tables.blobs.clear()
        _tables.directories.clear()
        _tables.path_infos.clear()


def tables() -> _Tables:
    """The shared tables, for tests that need to damage a row on purpose."""
    return _tables


# -- blobs --------------------------------------------------------------------


class MemoryBlobReader(BlobReader):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"pread offset {offset} and length {length} must not be negative")
        return self._data[offset : offset + length]


class MemoryBlobWriter(BlobWriter):
    def __init__(self, expected_digest: bytes | None) -> None:
        self._expected = expected_digest
        self._parts: list[bytes] | None = []
        self._hasher = blake3.blake3()

    def write(self, data: bytes) -> None:
        if self._parts is None:
            raise InvalidArgument("blob writer is already committed or aborted")
        chunk = bytes(data)
        self._hasher.update(chunk)
        self._parts.append(chunk)

    def commit(self) -> bytes:
        if self._parts is None:
            raise InvalidArgument("blob writer is already committed or aborted")
        digest = self._hasher.digest()
        data = b"".join(self._parts)
        self._parts = None
        if self._expected is not None and digest != self._expected:
            raise IntegrityError(
                f"blob written as {b3_text(self._expected)} hashes to {b3_text(digest)}; not stored"
            )
        with _tables.lock:
            _tables.blobs.setdefault(digest, data)
        return digest

    def abort(self) -> None:
        self._parts = None


class MemoryBlobService(BlobService):
    def stat(self, digest: bytes) -> BlobStat | None:
        records.check_b3(digest, "blob")
        with _tables.lock:
            data = _tables.blobs.get(digest)
        # The memory backend never chunks (as in tvix): no chunk list.
        return None if data is None else BlobStat(len(data))

    def open_read(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        records.check_b3(digest, "blob")
        with _tables.lock:
            data = _tables.blobs.get(digest)
        if data is None:
            raise NotFound(f"blob {b3_text(digest)} not found in memory://")
        actual = blake3.blake3(data).digest()
        if actual != digest:
            raise IntegrityError(f"blob {b3_text(digest)} in memory:// hashes to {b3_text(actual)}")
        return MemoryBlobReader(data)

    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        """A writer; with ``expected_digest`` a commit of other bytes fails."""
        if expected_digest is not None:
            records.check_b3(expected_digest, "expected blob")
        return MemoryBlobWriter(expected_digest)

    def iter_digests(self) -> Iterator[bytes]:
        with _tables.lock:
            digests = list(_tables.blobs)
        return iter(digests)


# -- directories ----------------------------------------------------------------


class MemoryDirectoryService(DirectoryService):
    def get(self, digest: bytes) -> Directory | None:
        records.check_b3(digest, "directory")
        with _tables.lock:
            data = _tables.directories.get(digest)
        return None if data is None else records.directory_from_row(digest, data)

    def get_tree(self, digest: bytes) -> Iterator[tuple[bytes, Directory]]:
        """Breadth first, each directory once; NotFound naming a missing descendant."""
        root = self.get(digest)
        if root is None:
            return
        yield digest, root
        seen = {digest}
        queue = deque([(digest, root)])
        while queue:
            parent_digest, parent = queue.popleft()
            for child in parent.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                directory = self.get(child.digest)
                if directory is None:
                    raise NotFound(
                        f"directory {b3_text(child.digest)} referenced by {b3_text(parent_digest)} "
                        f"(below {b3_text(digest)}) is missing from memory://"
                    )
                yield child.digest, directory
                queue.append((child.digest, directory))

    def put(self, directory: Directory) -> bytes:
        digest, data = records.directory_row(directory)
        with _tables.lock:
            _tables.directories[digest] = data
        return digest

    def put_many(self, directories: Iterable[Directory]) -> bytes | None:
        """Store a closure sent leaves first, all or nothing; return the root digest."""
        with _tables.lock:
            stored = set(_tables.directories)
        rows, root = records.closure_rows(directories, stored.__contains__)
        with _tables.lock:
            _tables.directories.update(rows)
        return root

    def iter_digests(self) -> Iterator[bytes]:
        with _tables.lock:
            digests = list(_tables.directories)
        return iter(digests)


# -- path infos -------------------------------------------------------------------


class MemoryPathInfoService(PathInfoService):
    def get(self, digest: bytes) -> PathInfo | None:
        records.check_store_path_digest(digest)
        with _tables.lock:
            data = _tables.path_infos.get(digest)
        return None if data is None else records.pathinfo_from_row(digest, data)

    def put(self, info: PathInfo) -> PathInfo:
        digest, data = records.pathinfo_row(info)
        with _tables.lock:
            _tables.path_infos[digest] = data
        return info

    def list(self) -> Iterator[PathInfo]:
        """Every path info, ordered by store path digest (like local://)."""
        with _tables.lock:
            rows = sorted(_tables.path_infos.items())
        for digest, data in rows:
            yield records.pathinfo_from_row(digest, data)

    def calculate_nar(self, node: Node) -> tuple[int, bytes] | None:
        """Render the NAR from the blobs and directories of ``memory://``."""
        return calculate_nar(node, MemoryBlobService(), MemoryDirectoryService())
