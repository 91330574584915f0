"""Where an import's blobs go: small files stored on a thread pool from memory, big ones streamed.

Split from ingest.py, whose walk feeds it: the NAR hash is one sequential
stream and stays on the walking thread, while storing a blob (blake3, a
file, a database look-up) is independent per file. Memory is bounded by
``MAX_IN_FLIGHT`` bytes of small files queued and not yet stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import blake3

from ..store import Store

MAX_IN_FLIGHT = 64 << 20  # bytes of small files queued for the pool at most


class _Budget:
    """Bytes of small files handed to the pool and not yet stored: the walk waits above the limit."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._used = 0
        self._limit = limit

    def take(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit:
                self._cond.wait()
            self._used += n

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


class BlobSink:
    """Stores blobs: small ones on a thread pool from memory, big ones streamed by the caller.

    Remembers the digests this run already stored or found, so duplicate
    contents cost one blake3 and no store round trip. The first failure of
    a pooled store is kept in ``failure`` so the walk can stop early.
    """

    def __init__(self, store: Store, workers: int) -> None:
        self._blobs = store.blobs
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="blob") if workers > 0 else None
        self._budget = _Budget(MAX_IN_FLIGHT)
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()
        self.failure: BaseException | None = None

    def put_small(self, data: bytes) -> Future[bytes]:
        if self.failure is not None:
            raise self.failure
        if self._pool is None:
            done: Future[bytes] = Future()
            done.set_result(self._store(data))
            return done
        cost = len(data) + 4096  # the fixed part also caps how many tiny files queue up
        self._budget.take(cost)
        future = self._pool.submit(self._store, data)
        future.add_done_callback(lambda f: self._done(f, cost))
        return future

    def _done(self, future: Future[bytes], cost: int) -> None:
        self._budget.give(cost)
        if not future.cancelled() and future.exception() is not None and self.failure is None:
            self.failure = future.exception()

    def _store(self, data: bytes) -> bytes:
        digest = blake3.blake3(data).digest()
        with self._lock:
            if digest in self._seen:
                return digest
        # stat first: a re-import then opens no writer at all (measured on the
        # 40,000-file tree: 3,600 files/s re-importing with it, 2,600 without).
        if self._blobs.stat(digest) is None:
            with self._blobs.open_write(expected_digest=digest) as writer:  # the store re-checks it
                writer.write(data)
                writer.commit()
        with self._lock:
            self._seen.add(digest)
        return digest

    def stream(self, chunks: Callable[[Callable[[bytes], None]], None]) -> bytes:
        """Store a big blob: ``chunks(write)`` calls ``write`` with each piece in order."""
        with self._blobs.open_write() as writer:
            chunks(writer.write)
            digest = writer.commit()
        with self._lock:
            self._seen.add(digest)
        return digest

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
