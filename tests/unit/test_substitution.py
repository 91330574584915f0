"""Root lookups over a substituting store (tvixmount/substitution.py), with a scripted inner fetcher.

What is checked: a path the store holds costs one quick ``path_info`` and
no held lookup; a missing one is asked again with ``held_path_info`` and
the long timeout; at most ``jobs`` held lookups run at once while quick
ones go on; a lookup that finds no free slot in time is a Timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tvixmount.castore.nodes import Node, SymlinkNode
from tvixmount.errors import InvalidArgument, Timeout
from tvixmount.fetcher import Fetcher, LocalFetcherStats
from tvixmount.protocol import ops
from tvixmount.protocol.ops import Op
from tvixmount.substitution import SubstitutingFetcher, default_jobs

HELD = b"h" * 20
PRESENT = b"p" * 20
NODE = SymlinkNode(b"x" * 32 + b"-found", b"target")


class Scripted(Fetcher):
    """path_info knows PRESENT; held_path_info waits for ``release`` and answers NODE."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def _call(self, op: Op[Any], *args: Any, affinity: int | None = None,
              timeout: float | None = None) -> Any:
        with self._lock:
            self.calls.append((op.name, timeout))
        if op is ops.PATH_INFO:
            return NODE if args[0] == PRESENT else None
        assert op is ops.HELD_PATH_INFO
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(10)
            return NODE
        finally:
            with self._lock:
                self.running -= 1

    def stats(self) -> LocalFetcherStats:
        return LocalFetcherStats()

    def close(self) -> None:
        return None


def test_a_present_path_costs_one_quick_lookup() -> None:
    inner = Scripted()
    fetcher = SubstitutingFetcher(inner, jobs=1, timeout=50.0)
    assert fetcher.path_info(PRESENT) == NODE
    assert inner.calls == [("path_info", None)]


def test_a_missing_path_is_held_with_the_long_timeout_and_jobs_bound_them() -> None:
    inner = Scripted()
    fetcher = SubstitutingFetcher(inner, jobs=2, timeout=50.0)
    found: list[Node | None] = []
    threads = [threading.Thread(target=lambda: found.append(fetcher.path_info(HELD))) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while inner.running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetcher.path_info(PRESENT) == NODE  # quick lookups go on meanwhile
    time.sleep(0.1)
    assert inner.running == 2
    inner.release.set()
    for t in threads:
        t.join(10)
    assert found == [NODE] * 5 and inner.most == 2
    held = [timeout for name, timeout in inner.calls if name == "held_path_info"]
    assert len(held) == 5 and all(t is not None and 0 < t <= 50.0 for t in held)


def test_no_free_slot_in_time_is_a_timeout() -> None:
    inner = Scripted()
    fetcher = SubstitutingFetcher(inner, jobs=1, timeout=0.3)
    first = threading.Thread(target=lambda: fetcher.path_info(HELD))
    first.start()
    while inner.running < 1:
        time.sleep(0.01)
    with pytest.raises(Timeout, match="no substitution slot free within"):
        fetcher.path_info(HELD)
    inner.release.set()
    first.join(10)


def test_settings() -> None:
    assert [default_jobs(n) for n in (1, 2, 3, 4, 8)] == [1, 1, 1, 2, 4]
    with pytest.raises(InvalidArgument):
        SubstitutingFetcher(Scripted(), jobs=0)
