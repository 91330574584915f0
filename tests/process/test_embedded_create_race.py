"""Several processes creating one new embedded store at once (the workers of a mount over a new store).

Each opens ``local://DIR?create=1`` at the same moment (a barrier) and
writes through it; none may fail with "database is locked" (sqlite takes
no busy handler while a file switches to WAL: store/sqlite.py).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from tvixmount.store import StoreUrls, open_store

PROCESSES = 6
ROUNDS = 4


def _open_and_write(url: str, barrier: multiprocessing.synchronize.Barrier, index: int) -> None:
    barrier.wait(30)
    with open_store(StoreUrls.single(url)) as store, store.blobs.open_write() as writer:
        writer.write(b"written by process %d" % index)
        writer.commit()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_create_one_new_store_together(tmp_path: Path, round_: int) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    url = f"local://{tmp_path}/store?create=1"
    procs = [ctx.Process(target=_open_and_write, args=(url, barrier, i)) for i in range(PROCESSES)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES
    with open_store(StoreUrls.single(f"local://{tmp_path}/store")) as store:
        assert sum(1 for _ in store.blobs.iter_digests()) == PROCESSES  # type: ignore[attr-defined]
