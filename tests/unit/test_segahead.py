"""Fill-ahead of the segment arena: sequential handles get their next regions asked for, random ones none."""

from __future__ import annotations

import threading
import time

from tvixmount.castore.nodes import FileNode
from tvixmount.segahead import SegmentAhead
from tvixmount.segcache import REGION, SegmentArena

DIGEST = bytes(range(32))
READ = 128 << 10


class Recorder:
    def __init__(self, arena: SegmentArena | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.arena = arena

    def __call__(self, digest: bytes, index: int, fh: int, size: int) -> None:
        with self.lock:
            self.calls.append((index, fh))

    def wait(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.calls) >= count:
                    return sorted(self.calls)
            time.sleep(0.01)
        with self.lock:
            return sorted(self.calls)


def make(depth: int = 4) -> tuple[SegmentAhead, Recorder, SegmentArena]:
    arena = SegmentArena(16 * REGION, workers=1)
    fill = Recorder()
    return SegmentAhead(arena.reader(), fill, depth=depth), fill, arena


def test_a_sequential_reader_gets_the_next_regions_once() -> None:
    ahead, fill, arena = make()
    node = FileNode(b"f", DIGEST, 40 * REGION)
    try:
        for off in range(0, 4 * READ, READ):
            ahead.on_read(7, node, off, READ)
        # The 3rd read (two in order after the first) is in region 1: the 4 regions after it.
        assert fill.wait(4) == [(index, 7) for index in range(2, 6)]
        ahead.on_read(7, node, 4 * READ, READ)  # into region 2: one more
        assert fill.wait(5) == [(index, 7) for index in range(2, 7)]
        assert ahead.asked == 5
    finally:
        ahead.close()
        arena.close()


def test_random_reads_ask_for_nothing() -> None:
    ahead, fill, arena = make()
    node = FileNode(b"f", DIGEST, 400 * REGION)
    try:
        for off in (0, 300 * REGION, 17 * REGION, 250 * REGION, 90 * REGION, 3 * REGION):
            ahead.on_read(1, node, off, READ)
        time.sleep(0.1)
        assert fill.calls == [] and ahead.asked == 0
    finally:
        ahead.close()
        arena.close()


def test_regions_already_held_and_past_the_end_are_not_asked_for() -> None:
    ahead, fill, arena = make()
    node = FileNode(b"f", DIGEST, 3 * REGION + 10)  # regions 0-3
    writer = arena.writer(0)
    writer.put(DIGEST, 2, lambda view: len(view))
    try:
        for off in (0, READ // 2, READ):
            ahead.on_read(3, node, off, READ // 2)
        assert fill.wait(2, timeout=1.0) == [(1, 3), (3, 3)]
    finally:
        ahead.close()
        arena.close()


def test_small_files_and_depth_zero_are_left_alone() -> None:
    ahead, fill, arena = make(depth=0)
    try:
        for off in range(0, 8 * READ, READ):
            ahead.on_read(1, FileNode(b"f", DIGEST, 40 * REGION), off, READ)
        small, fill2, arena2 = make()
        for off in (0, READ):
            small.on_read(1, FileNode(b"s", DIGEST, REGION), off, READ)
        time.sleep(0.1)
        assert fill.calls == [] and fill2.calls == []
        small.close()
        arena2.close()
    finally:
        ahead.close()
        arena.close()
