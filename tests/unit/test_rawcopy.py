"""Copies out of shared memory: the right bytes, and the GIL free while they are made."""

from __future__ import annotations

import gc
import mmap
import os
import threading

import pytest

from tvixmount.rawcopy import Pinned, copy_out


def test_a_copy_is_ordinary_bytes_of_the_source() -> None:
    area = mmap.mmap(-1, 1 << 20)
    data = os.urandom(1 << 20)
    area[:] = data
    pin = Pinned(area)
    for start, length in ((0, 1 << 20), (4095, 131072), (777, 1), (5, 0)):
        got = copy_out(pin.address + start, length)
        assert type(got) is bytes and got == data[start: start + length]
    assert hash(copy_out(pin.address, 64)) == hash(data[:64])  # a finished object, hashable like any


def test_a_pinned_map_is_not_unmapped_under_a_copy() -> None:
    area = mmap.mmap(-1, mmap.PAGESIZE)
    pin = Pinned(area)
    with pytest.raises(BufferError):
        area.close()
    assert copy_out(pin.address, 16) == bytes(16)  # still mapped
    del pin
    gc.collect()
    area.close()


def _counted_during(copy) -> int:
    """How often another thread counted while ``copy()`` ran (and a little around it)."""
    counted = [0]
    running, stop = threading.Event(), threading.Event()

    def count() -> None:
        running.set()
        while not stop.is_set():
            counted[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        running.wait(10)
        before = counted[0]
        copy()
        return counted[0] - before
    finally:
        stop.set()
        counter.join()


def test_other_threads_run_while_a_copy_is_made() -> None:
    """What the module is for. The baseline, tobytes(), holds the GIL: the counter moves only
    around it (~45,000 here, against ~1,600,000 during copy_out's 256 MiB)."""
    size = 256 << 20
    area = mmap.mmap(-1, size)
    pin = Pinned(area)
    view = memoryview(area)
    held = _counted_during(view.tobytes)
    free = _counted_during(lambda: copy_out(pin.address, size))
    view.release()
    assert free > 5 * held + 100, f"counted {free} times during copy_out, {held} during tobytes()"
