"""What the FUSE layer asks the store, behind one interface with two implementations.

``PoolFetcher`` sends each question to a worker process (pool.py) and
blocks the calling thread until the answer or the deadline; the FUSE layer
releases llfuse's lock around every call (this module never imports
llfuse). ``LocalFetcher`` runs the very same handler functions in-process,
for unit tests of the layers above and for tools.

Both return castore values and raise only ``tvixmount.errors`` classes:
NotFound for a directory or blob the store does not have, InvalidData for
broken data, Timeout / WorkerLost / Unavailable when the answer did not come.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol
from .castore.directory import Directory
from .castore.nodes import Node
from .metrics import untyped
from .pool import WorkerPool
from .poolstate import PoolStats
from .store import Store


@dataclass(frozen=True, slots=True)
class LocalFetcherStats:
    calls: int = untyped("store calls run in this process")
    open_readers: int = untyped("blob readers open")
    readers_opened: int = untyped("blob readers opened")


FetcherStats = PoolStats | LocalFetcherStats


class Fetcher(Protocol):
    def path_info(self, digest20: bytes) -> Node | None:
        """The root node stored under a 20-byte store path digest, or None. May block."""

    def directory(self, digest: bytes) -> Directory:
        """One validated Directory (NotFound if absent). May block."""

    def directory_tree(self, digest: bytes, max_entries: int) -> list[tuple[bytes, Directory]]:
        """The directory and what is below it, parents first, as (digest, Directory). May block.

        Bounded: stops once ``max_entries`` entries were sent (the root always comes).
        """

    def list_root(self) -> list[Node]:
        """Every root node, in the store's order. May block."""

    def blob_stat(self, digest: bytes) -> int | None:
        """A blob's size, or None if absent. May block."""

    def blob_read(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                  size: int | None = None) -> bytes:
        """``length`` verified bytes at ``offset`` (short only at EOF). May block.

        Reads with the same ``affinity`` (an open file handle) go to the same
        worker, which keeps that blob's reader and its verified chunks.
        ``size``: the blob's size as the FileNode says, a hint for the store.
        """

    def stats(self) -> FetcherStats: ...

    def close(self) -> None: ...


class _OpFetcher:
    """The Fetcher methods, written once: each is one op; subclasses say how an op runs."""

    def _call(self, op: str, *args: Any, affinity: int | None = None) -> Any:
        raise NotImplementedError

    def path_info(self, digest20: bytes) -> Node | None:
        return self._call("path_info", digest20)  # type: ignore[no-any-return]

    def directory(self, digest: bytes) -> Directory:
        return self._call("directory", digest)  # type: ignore[no-any-return]

    def directory_tree(self, digest: bytes, max_entries: int) -> list[tuple[bytes, Directory]]:
        return self._call("directory_tree", digest, max_entries)  # type: ignore[no-any-return]

    def list_root(self) -> list[Node]:
        return self._call("list_root")  # type: ignore[no-any-return]

    def blob_stat(self, digest: bytes) -> int | None:
        return self._call("blob_stat", digest)  # type: ignore[no-any-return]

    def blob_read(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                  size: int | None = None) -> bytes:
        hint = -1 if size is None else size
        return self._call("blob_read", digest, offset, length, hint, affinity=affinity)  # type: ignore[no-any-return]


class PoolFetcher(_OpFetcher):
    """Fetches through a started WorkerPool; every method blocks until reply or deadline."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def _call(self, op: str, *args: Any, affinity: int | None = None) -> Any:
        return protocol.OPS[op].decode(self.pool.call(op, *args, affinity=affinity))

    def stats(self) -> PoolStats:
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()


class LocalFetcher(_OpFetcher):
    """Runs the worker handlers in this process, one call at a time.

    With ``wire=True`` every argument and result also makes the msgpack
    round trip a worker's would, so tests catch encoding mistakes without
    processes. The store is owned by the caller unless ``owns_store``.
    """

    def __init__(self, store: Store, *, wire: bool = False, owns_store: bool = False) -> None:
        from workers.handlers import HANDLERS, Context

        self._handlers = HANDLERS
        self._ctx = Context(-1, store)
        self._wire = wire
        self._owns_store = owns_store
        self._lock = threading.Lock()  # handlers and their reader cache are single-threaded
        self._calls = 0

    def _call(self, op: str, *args: Any, affinity: int | None = None) -> Any:
        with self._lock:
            self._calls += 1
            spec = protocol.OPS[op]
            if not self._wire:
                protocol.check_args(op, list(args))
                return self._handlers[op](self._ctx, *args)
            args = tuple(protocol.unpack(protocol.pack(list(args))))
            protocol.check_args(op, list(args))
            result = self._handlers[op](self._ctx, *args)
            return spec.decode(protocol.unpack(protocol.pack(spec.encode(result))))

    def stats(self) -> LocalFetcherStats:
        with self._lock:
            return LocalFetcherStats(calls=self._calls, open_readers=len(self._ctx.readers),
                                     readers_opened=self._ctx.readers.opened)

    def close(self) -> None:
        with self._lock:
            self._ctx.readers.clear()
            if self._owns_store:
                self._ctx.store.close()
