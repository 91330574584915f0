"""Single-flight: concurrent callers asking for the same key share one fetch.

Used by the FUSE layer so that a hundred threads listing the same fresh
directory send one request to the workers, not a hundred. The lock guards
only the table of in-flight calls; the fetch itself runs unlocked, in the
first caller's thread, and the others wait on its result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")


class SingleFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [done, error, result] of the fetch in flight. ``done`` is a plain lock held until
        # the outcome is known, not an Event (which builds a Condition and a second lock): a waiter
        # takes it and hands it on at once, so any number of waiters pass one after another. A
        # list, not an object: one is made for every FUSE read the arena missed.
        self._calls: dict[Hashable, list[Any]] = {}

    @overload
    def run(self, key: Hashable, fn: Callable[..., T], *args: Any, share: Literal[True] = True) -> T: ...

    @overload
    def run(self, key: Hashable, fn: Callable[..., T], *args: Any, share: Literal[False]) -> T | None: ...

    def run(self, key: Hashable, fn: Callable[..., T], *args: Any, share: bool = True) -> T | None:
        """Run ``fn(*args)`` unless a call for ``key`` is already running; share its outcome.

        Blocks until the outcome is known. Waiters are bounded by ``fn``'s own
        deadline (every fetch carries one), so this never waits forever.

        ``share=False`` is for a result that belongs to the thread that
        fetched it (a view of its lane, pool.py ``read_view``): a waiter gets
        None, only the news that the fetch is over (or its error), and looks
        where the fetch left its bytes (the segment arena).
        """
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = [threading.Lock(), None, None]
                call[0].acquire()
        assert call is not None
        if not leader:
            call[0].acquire()
            call[0].release()
            if call[1] is not None:
                raise call[1]
            return call[2] if share else None  # type: ignore[no-any-return]
        try:
            result = fn(*args)
            if share:
                call[2] = result
            return result
        except BaseException as exc:
            call[1] = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call[0].release()
