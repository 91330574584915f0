"""The embedded on-disk store (``local:///path``): the default store.

This module holds the directory and path-info services and the three
``open_*`` functions the URL dispatch calls; the other pieces are listed
in the package's docstring (``__init__.py``).

Opening: ``local:///path`` opens an existing store and fails with NotFound
(naming the path, hinting at ``tvixstore import``) when there is none;
``local:///path?create=1`` creates it first (writers: import, copy).
Every service may be used from several threads; open services after fork,
never before (see db.py).

Rows go through ``records`` on the way in and out: a directory is stored as
its canonical encoding under its digest and checked against that digest on
every read; a path info is stored under its store path digest and validated
on every read, so a damaged row is InvalidData naming the object.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ...castore.directory import Directory
from ...castore.nodes import Node, b3_text
from ...castore.pathinfo import PathInfo
from ...errors import NotFound
from .. import records
from ..base import DirectoryService, PathInfoService
from ..narcalc import calculate_nar
from .blobs import EmbeddedBlobService
from .layout import StoreHandle, acquire

# Directories fetched per query in get_recursive (well under sqlite's
# 32766 host-parameter limit, and small enough to keep each query short).
_BULK = 256


class EmbeddedDirectoryService(DirectoryService):
    def __init__(self, handle: StoreHandle) -> None:
        self.handle = handle
        self._closed = False

    def _has(self, digest: bytes) -> bool:
        what = f"looking up directory {b3_text(digest)}"
        return self.handle.db.one(what, "SELECT 1 FROM directories WHERE digest = ?", (digest,)) is not None

    def get(self, digest: bytes) -> Directory | None:
        records.check_b3(digest, "directory")
        row = self.handle.db.one(
            f"reading directory {b3_text(digest)}", "SELECT data FROM directories WHERE digest = ?", (digest,)
        )
        return None if row is None else records.directory_from_row(digest, row[0])

    def get_tree(self, digest: bytes) -> Iterator[tuple[bytes, Directory]]:
        """Breadth first, fetching each level's new directories in bulk queries."""
        root = self.get(digest)
        if root is None:
            return
        yield digest, root
        seen = {digest}
        level = [(digest, root)]
        while level:
            wanted: list[tuple[bytes, bytes]] = []  # (digest, parent digest) in first-seen order
            for parent_digest, parent in level:
                for child in parent.directories:
                    if child.digest not in seen:
                        seen.add(child.digest)
                        wanted.append((child.digest, parent_digest))
            level = []
            for start in range(0, len(wanted), _BULK):
                batch = wanted[start : start + _BULK]
                found = self._fetch_many([d for d, _ in batch])
                for child_digest, parent_digest in batch:
                    data = found.get(child_digest)
                    if data is None:
                        raise NotFound(
                            f"directory {b3_text(child_digest)} referenced by {b3_text(parent_digest)} "
                            f"(below {b3_text(digest)}) is missing from store {self.handle.where}"
                        )
                    directory = records.directory_from_row(child_digest, data)
                    yield child_digest, directory
                    level.append((child_digest, directory))

    def _fetch_many(self, digests: list[bytes]) -> dict[bytes, bytes]:
        marks = ",".join("?" * len(digests))
        rows = self.handle.db.all(
            f"reading {len(digests)} directories",
            f"SELECT digest, data FROM directories WHERE digest IN ({marks})",
            tuple(digests),
        )
        return {bytes(d): bytes(data) for d, data in rows}

    def put(self, directory: Directory) -> bytes:
        digest, data = records.directory_row(directory)
        with self.handle.db.transaction(f"storing directory {b3_text(digest)}") as conn:
            conn.execute("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)", (digest, data))
        return digest

    def put_many(self, directories: Iterable[Directory]) -> bytes | None:
        """Store a closure sent leaves first in one transaction; return the root digest."""
        rows, root = records.closure_rows(directories, self._has)
        if rows:
            with self.handle.db.transaction(f"storing {len(rows)} directories") as conn:
                conn.executemany("INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)", rows)
        return root

    def iter_digests(self) -> Iterator[bytes]:
        # Digests only: sqlite answers from the primary key's index alone, so a
        # damaged page of rows fails reading those rows, not the whole listing.
        for row in self.handle.db.pages("listing directories", "directories", "NULL"):
            yield bytes(row[0])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handle.release()


class EmbeddedPathInfoService(PathInfoService):
    def __init__(self, handle: StoreHandle) -> None:
        self.handle = handle
        self._closed = False

    def get(self, digest: bytes) -> PathInfo | None:
        records.check_store_path_digest(digest)
        row = self.handle.db.one(
            f"reading path info {records.store_path_text(digest)}",
            "SELECT data FROM path_infos WHERE digest = ?",
            (digest,),
        )
        return None if row is None else records.pathinfo_from_row(digest, row[0])

    def put(self, info: PathInfo) -> PathInfo:
        digest, data = records.pathinfo_row(info)
        with self.handle.db.transaction(f"storing path info {records.store_path_text(digest)}") as conn:
            conn.execute("INSERT OR REPLACE INTO path_infos (digest, data) VALUES (?, ?)", (digest, data))
        return info

    def list(self) -> Iterator[PathInfo]:
        """Every path info, ordered by store path digest."""
        for digest, data in self.handle.db.pages("listing path infos", "path_infos", "data", page=256):
            yield records.pathinfo_from_row(bytes(digest), bytes(data))

    def calculate_nar(self, node: Node) -> tuple[int, bytes] | None:
        """Render the NAR from this store's own blobs and directories."""
        blobs = EmbeddedBlobService(self.handle.retain())
        directories = EmbeddedDirectoryService(self.handle.retain())
        try:
            return calculate_nar(node, blobs, directories)
        finally:
            blobs.close()
            directories.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handle.release()


def open_blob_service(root: Path, create: bool = False) -> EmbeddedBlobService:
    return EmbeddedBlobService(acquire(root, create))


def open_directory_service(root: Path, create: bool = False) -> EmbeddedDirectoryService:
    return EmbeddedDirectoryService(acquire(root, create))


def open_path_info_service(root: Path, create: bool = False) -> EmbeddedPathInfoService:
    return EmbeddedPathInfoService(acquire(root, create))
