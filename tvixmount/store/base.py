"""The store interface every backend implements, and its small value types.

Three services, as in tvix: blobs by blake3 digest, directories by digest,
path infos by the 20-byte digest of a store path. Backends are opened from a
URL (``tvixmount.store.open_blob_service`` and friends) inside the process
that uses them: a backend object is never shared across a fork.

Contract for every backend:

* Absent objects are ``None`` from ``stat``/``get`` (never an exception);
  ``NotFound`` is raised only where an object was required (reading a blob).
* Every byte a ``BlobReader`` returns has been checked against the blob's
  digest (whole, or per chunk); a mismatch raises ``IntegrityError`` and
  nothing of it is cached.
* Every Directory returned has been validated and its digest checked; every
  PathInfo returned has been validated.
* Failures to reach the store raise ``Unavailable``; broken data raises
  ``InvalidData``. Nothing else escapes (see errors.py).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..castore.directory import Directory
from ..castore.nodes import Node, b3_text
from ..castore.pathinfo import PathInfo
from ..errors import NotFound, TvixError


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    digest: bytes
    size: int


@dataclass(frozen=True, slots=True)
class BlobStat:
    """A blob's size and, where the backend keeps them, its chunks in order."""

    size: int
    chunks: tuple[ChunkMeta, ...] = ()


class BlobReader(abc.ABC):
    """Random access to one blob's verified bytes; not thread-safe."""

    size: int
    # The size of the segments ``segment_into`` reads and verifies in place, or (a remote reader
    # streaming the blob, whose ``pread_into`` of a segment costs no extra fetch) that it hands out
    # whole segments cheaply; None: neither (reads should not be widened to whole segments).
    segment_size: int | None = None
    # Segments worth filling at once for a read in order: more than one where the next ones are
    # arriving anyway (a stream), so a reader waits for them once instead of once per segment.
    segments_per_fill: int = 1
    # The whole blob is here, verified (a local copy): its segments cost a memory copy each, so
    # even a blob's first read is worth ``segments_per_fill`` of them, not a round trip per read.
    holds_whole: bool = False

    @abc.abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``, fewer only at EOF, none past it."""

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` with the bytes from ``offset`` (as ``pread``); return how many were written.

        For a destination that is not ours to allocate (a worker's shared
        ring). Readers that hold verified bytes override it to copy once.
        """
        data = self.pread(offset, len(buf))
        buf[:len(data)] = data
        return len(data)

    def segment_into(self, offset: int, view: memoryview) -> int | None:
        """The verified segment at ``offset`` read and checked right in ``view``; its length.

        Only for a reader whose segments are ``len(view)`` bytes and start at
        ``offset``; None when it has no such segments (then use ``pread_into``).
        Raises as ``pread`` for a bad segment; ``view`` then holds garbage.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the reader holds."""

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobWriter(abc.ABC):
    """Accepts a blob's bytes; nothing is visible in the store before ``commit``."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self) -> bytes:
        """Make the blob durable and visible; return its blake3 digest."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was written; safe to call after a failed write."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


class BlobService(abc.ABC):
    @abc.abstractmethod
    def stat(self, digest: bytes) -> BlobStat | None:
        """Size (and chunks) of a blob, or None when it is absent."""

    @abc.abstractmethod
    def open_read(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        """A verified reader; raises NotFound when the blob is absent.

        ``size_hint`` is the size the caller expects (a FileNode's), for a
        backend that can save a round trip with it (gRPC: no Stat for a small
        blob). It is never trusted over the bytes: the reader's ``size`` and
        data are the store's, verified against the digest.
        """

    def read_many(self, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
        """Each blob of ``wanted`` (digest, expected size) whole and verified, or the error it got.

        For batches of small blobs (the mount's ``blob_batch``): one blob's
        failure is its own answer, never the batch's. The size is a hint as
        for ``open_read``. Backends with a cheaper bulk path override this
        (the embedded store: one query; gRPC: several streams at once).
        """
        out: list[bytes | TvixError] = []
        for digest, size in wanted:
            try:
                with self.open_read(digest, size) as reader:
                    out.append(reader.pread(0, reader.size))
            except TvixError as exc:
                out.append(exc)
        return out

    @abc.abstractmethod
    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        """A writer for a new blob (content-addressed: its digest comes at commit).

        With ``expected_digest``, commit raises IntegrityError and stores
        nothing when the bytes hash to anything else.
        """

    @abc.abstractmethod
    def iter_digests(self) -> Iterator[bytes]:
        """Every blob digest held (for verify and copy); order unspecified."""

    def put(self, data: bytes) -> bytes:
        """Store a small blob held in memory; return its digest."""
        with self.open_write() as w:
            w.write(data)
            return w.commit()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


class DirectoryService(abc.ABC):
    @abc.abstractmethod
    def get(self, digest: bytes) -> Directory | None:
        """One validated Directory whose digest is ``digest``, or None."""

    def get_tree(self, digest: bytes) -> Iterator[tuple[bytes, Directory]]:
        """(digest, Directory) for the root, then every directory below it once, parents first.

        Yields nothing when the root is absent; raises NotFound for a missing
        descendant. Backends with a cheaper bulk path override this.
        """
        root = self.get(digest)
        if root is None:
            return
        seen = {digest}
        queue = [(digest, root)]
        while queue:
            parent_digest, directory = queue.pop(0)
            yield parent_digest, directory
            for child in directory.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                got = self.get(child.digest)
                if got is None:
                    raise NotFound(f"directory {b3_text(child.digest)} referenced below "
                                   f"{b3_text(digest)} is missing")
                queue.append((child.digest, got))

    def get_recursive(self, digest: bytes) -> Iterator[Directory]:
        """The directories of ``get_tree``, without their digests."""
        for _, directory in self.get_tree(digest):
            yield directory

    @abc.abstractmethod
    def put(self, directory: Directory) -> bytes:
        """Store one validated Directory; return its digest."""

    def put_many(self, directories: Iterable[Directory]) -> bytes | None:
        """Store a closure, leaves first; return the last (root) digest."""
        root = None
        for directory in directories:
            root = self.put(directory)
        return root

    @abc.abstractmethod
    def iter_digests(self) -> Iterator[bytes]:
        """Every directory digest held (for verify); order unspecified."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


class PathInfoService(abc.ABC):
    @abc.abstractmethod
    def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo stored under a 20-byte store path digest, or None."""

    @abc.abstractmethod
    def put(self, info: PathInfo) -> PathInfo:
        """Validate and store ``info`` under its root node's store path digest."""

    @abc.abstractmethod
    def list(self) -> Iterator[PathInfo]:
        """Every PathInfo held, in the backend's order."""

    def calculate_nar(self, node: Node) -> tuple[int, bytes] | None:
        """(nar_size, nar_sha256) if the backend can compute it, else None."""
        return None

    # A service that fetches what it lacks from elsewhere (a binary cache) splits ``get``
    # in two: what it holds now (quick), and fetching (long, bounded by a deadline).

    def get_present(self, digest: bytes) -> PathInfo | None:
        """What ``get`` answers without fetching anything from elsewhere."""
        return self.get(digest)

    def fetch(self, digest: bytes, deadline: float) -> PathInfo | None:
        """``get``, fetching what is missing, never past ``deadline`` (``time.monotonic()``)."""
        return self.get(digest)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""
