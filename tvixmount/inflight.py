"""Single-flight: concurrent callers asking for the same key share one fetch.

Used by the FUSE layer so that a hundred threads listing the same fresh
directory send one request to the workers, not a hundred. The lock guards
only the table of in-flight calls; the fetch itself runs unlocked, in the
first caller's thread, and the others wait on its result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class _Call:
    """One fetch in flight. ``done`` is a plain lock held until the outcome is known.

    Not an Event: an Event builds a Condition and a second lock, and one
    _Call is made per FUSE read; a waiter takes ``done`` and hands it on
    at once, so any number of waiters pass one after another.
    """

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call] = {}
        self._waits: dict[Hashable, list[Any]] = {}  # run_or_wait's: [done lock, error or None]

    def run(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` unless a call for ``key`` is already running; share its outcome.

        Blocks until the outcome is known. Waiters are bounded by ``fn``'s own
        deadline (every fetch carries one), so this never waits forever.
        """
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = _Call()
        assert call is not None
        if not leader:
            call.done.acquire()
            call.done.release()
            if call.error is not None:
                raise call.error
            return call.result  # type: ignore[no-any-return]
        try:
            call.result = fn()
            return call.result  # type: ignore[no-any-return]
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.release()

    def run_or_wait(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T | None:
        """Run ``fn(*args)`` unless a call for ``key`` is already running; then wait for it and
        return None.

        For a result that belongs to the thread that fetched it (a view of
        its lane, pool.py ``read_view``): a waiter gets only the news that
        the fetch is over, or its error, and looks where the fetch left its
        bytes (the segment arena). Bounded like ``run``. Every FUSE read of a
        big file that the arena missed passes here, so it is written for few
        Python calls: a list in the table, ``fn`` called with ``args``.
        """
        with self._lock:
            entry = self._waits.get(key)
            leader = entry is None
            if leader:
                entry = self._waits[key] = [threading.Lock(), None]
                entry[0].acquire()
        assert entry is not None
        if not leader:
            entry[0].acquire()
            entry[0].release()
            if entry[1] is not None:
                raise entry[1]
            return None
        try:
            return fn(*args)
        except BaseException as exc:
            entry[1] = exc
            raise
        finally:
            with self._lock:
                del self._waits[key]
            entry[0].release()
