"""Root lookups over a store that substitutes (a binary cache): a quick question, then a held one.

A lookup of a store path asks first what the store holds now (``path_info``,
the normal request deadline). Only when that is None does it ask again
with ``held_path_info``, which may download and ingest a NAR: that call
gets ``--substitute-timeout`` instead of the request timeout, and at most
``--substitute-jobs`` of them run at once, so substitutions never occupy
every worker and reads of other files go on meanwhile. A lookup waiting
for a free slot counts its wait against the same timeout.

Lookups of one path in one mount already share one call (fuse_ops'
single flight); across workers and mounts the store's per-path lock
makes it one download (store/nixhttp/service.py).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, TypeVar

from .castore import nixbase32
from .castore.nodes import Node
from .errors import InvalidArgument, Timeout
from .fetcher import Fetcher, FetcherStats
from .protocol.ops import Op
from .segcache import SegmentCache

log = logging.getLogger(__name__)

R = TypeVar("R")

DEFAULT_TIMEOUT = 300.0
SLOW_LOOKUP = 1.0  # a held lookup taking longer than this is logged at INFO with its time


def default_jobs(workers: int) -> int:
    """Half the workers (at least one), and always one worker left for reads when there are two."""
    return max(1, min(workers // 2, workers - 1))


class SubstitutingFetcher(Fetcher):
    """``inner``, with root lookups that may substitute (bounded in time and in number)."""

    def __init__(self, inner: Fetcher, jobs: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if jobs < 1 or timeout <= 0:
            raise InvalidArgument(f"bad substitution settings: {jobs} jobs, timeout {timeout}")
        self.inner = inner
        self.jobs = jobs
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(jobs)

    def _call(self, op: Op[R], *args: Any, affinity: int | None = None, timeout: float | None = None) -> R:
        return self.inner._call(op, *args, affinity=affinity, timeout=timeout)

    def blob_read_reply(self, digest: bytes, offset: int, length: int, affinity: int | None = None,
                        size: int | None = None) -> bytes | memoryview:
        return self.inner.blob_read_reply(digest, offset, length, affinity=affinity, size=size)

    def path_info(self, digest20: bytes) -> Node | None:
        found = self.inner.path_info(digest20)
        if found is not None:
            return found
        started = time.monotonic()
        if not self._slots.acquire(timeout=self.timeout):
            raise Timeout(f"{nixbase32.encode(digest20)}: no substitution slot free within "
                          f"{self.timeout:.0f} s ({self.jobs} substitutions at once at most)")
        try:
            waited = time.monotonic() - started
            found = self.inner.held_path_info(digest20, max(0.001, self.timeout - waited))
        finally:
            self._slots.release()
        seconds = time.monotonic() - started
        if found is not None and seconds >= SLOW_LOOKUP:
            log.info("lookup of %s took %.2f s (substituted)", found.name.decode(errors="replace"), seconds)
        return found

    def segments(self) -> SegmentCache | None:
        return self.inner.segments()

    def stats(self) -> FetcherStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()
