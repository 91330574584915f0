"""What the FUSE layer asks the store: one typed method per op, two ways to run an op.

``Fetcher`` turns each op of ``protocol.ops`` into a method with its
arguments and result type; subclasses say only how an op runs.
``PoolFetcher`` sends it to a worker process (pool.py) and blocks the
calling thread until the answer or the deadline; the FUSE layer releases
llfuse's lock around every call (this module never imports llfuse).
``LocalFetcher`` runs the very same handlers in-process, for unit tests of
the layers above and for tools; its owner hands it the handler table
(``workers.handlers.HANDLERS``), since the core never imports the workers.

Both return castore values and raise only ``tvixmount.errors`` classes:
NotFound for a directory or blob the store does not have, InvalidData for
broken data, Timeout / WorkerLost / Unavailable when the answer did not come.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .castore.directory import Directory
from .castore.nodes import Node
from .metrics import untyped
from .pool import WorkerPool
from .poolstate import PoolStats
from .protocol import batch, ops
from .protocol.framing import pack, unpack
from .protocol.ops import Handlers, Op
from .segcache import SegmentCache

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class LocalFetcherStats:
    calls: int = untyped("store calls run in this process")
    open_readers: int = untyped("blob readers open")
    readers_opened: int = untyped("blob readers opened")


FetcherStats = PoolStats | LocalFetcherStats


class Fetcher(ABC):
    """The store as the FUSE layer sees it; every method may block."""

    @abstractmethod
    def _call(self, op: Op[R], *args: Any, affinity: int | None = None, timeout: float | None = None) -> R:
        """Run ``op``; ``affinity`` asks for the worker that ran the last op with it; ``timeout``
        replaces the request timeout (a pool's; an in-process call has none)."""

    def path_info(self, digest20: bytes) -> Node | None:
        """The root node stored under a 20-byte store path digest, or None. May block."""
        return self._call(ops.PATH_INFO, digest20)

    def held_path_info(self, digest20: bytes, timeout: float) -> Node | None:
        """``path_info``, substituting the path first where the store can; may block ``timeout`` seconds."""
        return self._call(ops.HELD_PATH_INFO, digest20, timeout=timeout)

    def directory_tree(self, digest: bytes, max_entries: int) -> list[tuple[bytes, Directory]]:
        """The directory and what is below it, parents first, as (digest, Directory). May block.

        Bounded: stops once ``max_entries`` entries were sent (the root always comes).
        """
        return self._call(ops.DIRECTORY_TREE, digest, max_entries)

    def list_root(self) -> list[Node]:
        """Every root node, in the store's order. May block."""
        return self._call(ops.LIST_ROOT)

    def blob_read(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                  size: int | None = None) -> bytes:
        """``length`` verified bytes at ``offset`` (short only at EOF). May block.

        Reads with the same ``affinity`` (an open file handle) go to the same
        worker, which keeps that blob's reader and its verified chunks.
        ``size``: the blob's size as the FileNode says, a hint for the store.
        """
        hint = -1 if size is None else size
        return self._call(ops.BLOB_READ, digest, offset, length, hint, affinity=affinity)

    def blob_read_reply(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                        size: int | None = None) -> bytes | memoryview:
        """``blob_read`` for a caller that hands the bytes to the kernel at once and keeps nothing.

        The bytes may be a view of memory the calling thread uses again on
        its next read (its lane, pool.py ``read_view``), which saves the copy
        of every read a worker answers.
        """
        return self.blob_read(digest, offset, length, affinity=affinity, size=size)

    def blob_batch(self, wanted: list[tuple[bytes, int]]) -> list[bytes | None]:
        """Small blobs (digest, size) whole and verified, None for each that failed. May block.

        At most ``protocol.batch.MAX_FILES`` blobs and ``MAX_BYTES`` bytes.
        """
        return batch.decode_reply(self._call(ops.BLOB_BATCH, *batch.encode_request(wanted)))

    def segments(self) -> SegmentCache | None:
        """The shared arena of verified segments the workers fill, if any (segcache.py)."""
        return None

    @abstractmethod
    def stats(self) -> FetcherStats: ...

    @abstractmethod
    def close(self) -> None: ...


class PoolFetcher(Fetcher):
    """Fetches through a started WorkerPool; every method blocks until reply or deadline."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def _call(self, op: Op[R], *args: Any, affinity: int | None = None, timeout: float | None = None) -> R:
        return self.pool.call(op, *args, affinity=affinity, timeout=timeout)

    def blob_read_reply(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                        size: int | None = None) -> bytes | memoryview:
        return self.pool.read_view(digest, offset, length, -1 if size is None else size, affinity=affinity)

    def segments(self) -> SegmentCache | None:
        return self.pool.segments

    def stats(self) -> PoolStats:
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()


class _Readers(Protocol):
    opened: int

    def __len__(self) -> int: ...

    def clear(self) -> None: ...


class LocalContext(Protocol):
    """What LocalFetcher needs of the handlers' context: its reader cache, and its store to close."""

    @property
    def readers(self) -> _Readers: ...

    def close(self) -> None:
        """Drop the readers and close the store."""


C = TypeVar("C", bound=LocalContext)


class LocalFetcher(Fetcher, Generic[C]):
    """Runs the worker handlers in this process, one call at a time.

    ``handlers`` answer the ops with ``context`` (for a mount's handlers:
    ``LocalFetcher(HANDLERS, Context(-1, store))``). With ``wire=True``
    every argument and result also makes the msgpack round trip a worker's
    would, so tests catch encoding mistakes without processes. The store is
    owned by the caller unless ``owns_store``.
    """

    def __init__(self, handlers: Handlers[C], context: C, *, wire: bool = False,
                 owns_store: bool = False) -> None:
        self._handlers = handlers
        self._ctx = context
        self._wire = wire
        self._owns_store = owns_store
        self._lock = threading.Lock()  # handlers and their reader cache are single-threaded
        self._calls = 0

    def _call(self, op: Op[R], *args: Any, affinity: int | None = None, timeout: float | None = None) -> R:
        with self._lock:
            self._calls += 1
            if not self._wire:
                return self._handlers.run(self._ctx, op, *args)
            args = tuple(unpack(pack(list(args))))
            result = self._handlers.run(self._ctx, op, *args)
            return op.decode(unpack(pack(op.encode(result))))

    def stats(self) -> LocalFetcherStats:
        with self._lock:
            return LocalFetcherStats(calls=self._calls, open_readers=len(self._ctx.readers),
                                     readers_opened=self._ctx.readers.opened)

    def close(self) -> None:
        with self._lock:
            if self._owns_store:
                self._ctx.close()
            else:
                self._ctx.readers.clear()
