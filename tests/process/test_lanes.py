"""Reads answered on the caller's own lane (tvixmount/lanes.py), with real worker processes: the
right bytes from many threads, more threads than lanes, a killed worker, a timed-out read whose
late answer must not reach the next one, forged and malformed answers, and who holds which end
of a lane. (close() with a caller on its lane: test_pool.py.)"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.faults import reply_pipe_writer
from tests.worker_fixtures import (
    BIG,
    ROOT,
    b3,
    open_fds,
    replaced,
    stopped_behind_an_earlier_call,
    wait_until,
)
from tvixmount import collector, poolstate
from tvixmount.errors import InvalidArgument, Timeout, Unavailable
from tvixmount.lanes import LANE_BYTES, Lanes
from tvixmount.pool import WorkerPool
from tvixmount.protocol import framing, ops, readwire
from tvixmount.store import StoreUrls
from workers.loop import serve

MEMORY = StoreUrls.single("memory://")
DIGEST = b3(BIG)


@pytest.fixture
def pool(tree) -> Iterator[WorkerPool]:
    pool = WorkerPool(MEMORY, 2, serve, request_timeout=10, lanes=4)
    pool.start()
    yield pool
    pool.close()


def _read(pool: WorkerPool, offset: int, length: int = 4096, **kwargs) -> bytes:
    return pool.call(ops.BLOB_READ, DIGEST, offset, length, len(BIG), **kwargs)


def _reads(pool: WorkerPool, seed: int, count: int) -> None:
    for i in range(count):
        offset = (seed * 7919 + i * 4096) % (len(BIG) - 8192)
        length = 8192 if i % 3 else LANE_BYTES  # up to a whole lane, cut at EOF
        assert _read(pool, offset, length, affinity=(seed + i) % 3) == BIG[offset:offset + length]


def _inflight_call(pool: WorkerPool, slot: int) -> poolstate.Call:
    worker = pool._state.slots[slot].worker
    assert worker is not None
    return next(iter(worker.inflight.values()))


def _lane_writer(pool: WorkerPool, lane: int) -> int:
    """A write end of ``lane``'s pipe, opened through the zygote's (the dispatcher holds none)."""
    assert pool._lanes is not None
    return os.open(f"/proc/{pool._zygote_pid}/fd/{pool._lanes.write_fds()[lane]}", os.O_WRONLY)


def test_reads_from_many_threads_come_on_their_lanes_with_their_own_bytes(pool):
    with ThreadPoolExecutor(4) as executor:
        for future in [executor.submit(_reads, pool, seed, 100) for seed in range(4)]:
            future.result(timeout=60)
    stats = pool.stats()
    assert stats.lane_replies == 400 and stats.own_replies == 2  # the pings of start-up: on the pipes
    assert stats.ring_replies == 0 and stats.lanes_given_up == 0 and stats.failures == 0
    assert stats.lanes == 4
    assert pool.call(ops.DIRECTORY_TREE, ROOT.digest(), 1) == [(ROOT.digest(), ROOT)]  # other ops: the pipes


def test_threads_beyond_the_lanes_use_the_shared_pipes(pool):
    with ThreadPoolExecutor(8) as executor:
        for future in [executor.submit(_reads, pool, seed, 60) for seed in range(8)]:
            future.result(timeout=60)
    stats = pool.stats()
    assert 0 < stats.lane_replies < 480 and stats.ring_replies > 0
    assert stats.failures == 0


def test_a_read_longer_than_a_lane_uses_the_pipe(pool):
    before = pool.stats().ring_replies
    assert _read(pool, 0, LANE_BYTES + 4096) == BIG[:LANE_BYTES + 4096]
    assert pool.stats().ring_replies == before + 1


def test_read_view_lends_the_lane_until_the_threads_next_call_and_copies_elsewhere(pool):
    view = pool.read_view(DIGEST, 4096, 8192, len(BIG), affinity=0)
    assert type(view) is memoryview and view == BIG[4096:4096 + 8192]
    assert pool._latches.lane.buffer.obj is view.obj  # this thread's own lane, not a copy
    with ThreadPoolExecutor(3) as executor:  # other threads' reads, on their lanes, leave it alone
        for future in [executor.submit(_reads, pool, seed, 30) for seed in range(3)]:
            future.result(timeout=60)
    assert view == BIG[4096:4096 + 8192]
    assert pool.read_view(DIGEST, 0, 100, len(BIG)) == BIG[:100]  # the next call: the view is the new bytes
    assert view[:100] == BIG[:100]
    assert type(_read(pool, 0, 100)) is bytes  # call() always copies
    longer = pool.read_view(DIGEST, 0, LANE_BYTES + 1, len(BIG))  # no lane holds it: the pipes, bytes
    assert type(longer) is bytes and longer == BIG[:LANE_BYTES + 1]
    with pytest.raises(InvalidArgument):
        pool.read_view(DIGEST[:5], 0, 100, len(BIG))


def test_a_lane_read_whose_worker_dies_is_resent_and_answered_on_the_lane(pool, monkeypatch):
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(_read, pool, 4096, 8192, affinity=0)
        assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 5)
        time.sleep(0.1)  # the caller is waiting on its lane
        os.kill(victim, signal.SIGKILL)
        assert future.result(timeout=10) == BIG[4096:4096 + 8192]
    stats = pool.stats()
    assert stats.resent == 1 and stats.lost == 0 and stats.lanes_given_up == 0
    assert wait_until(lambda: replaced(pool, 0, victim), 15)
    assert _read(pool, 0, affinity=0) == BIG[:4096]


@contextlib.contextmanager
def _lane_read_on_a_spared_worker(pool: WorkerPool, monkeypatch) -> Iterator[tuple[Future, int, list[int]]]:
    """A read on its lane held by worker 0, stopped, which then sends garbage and is killed as the
    pool kills, except that its process lives on until the block ends (or the test kills it)."""
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    spared: list[int] = []

    def kill_later(self, worker, why):  # as PoolState.kill, but the process lives on, for now
        worker.doomed = why
        spared.append(worker.pid)

    monkeypatch.setattr(poolstate.PoolState, "kill", kill_later)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as executor:
            future = executor.submit(_read, pool, 4096, 8192, affinity=0)
            assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 5)
            fd = reply_pipe_writer(victim, os.getpid())
            try:
                os.write(fd, b"\x00\x00\x00\x05\xc1junk")
            finally:
                os.close(fd)
            yield future, victim, spared
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def test_a_killed_workers_lane_calls_are_resent_only_once_its_process_is_gone(pool, monkeypatch):
    """Retired at once for garbage, the worker still runs until its pipe ends: only then may another
    worker answer on the lane, which the old one could otherwise still write."""
    with _lane_read_on_a_spared_worker(pool, monkeypatch) as (future, victim, spared):
        assert wait_until(lambda: spared == [victim], 5)
        time.sleep(0.5)  # retired, but its process has not exited
        assert pool.stats().resent == 0 and not future.done()
        os.kill(victim, signal.SIGKILL)
        assert future.result(timeout=10) == BIG[4096:4096 + 8192]
    assert pool.stats().resent == 1


def test_a_killed_worker_that_does_not_exit_has_its_lane_calls_resent_without_their_lane(
        pool, monkeypatch, caplog):
    """Stuck in the kernel, the old process may still complete a read into the lane's buffer: the
    call goes to another worker without a lane, and its thread gives that lane up."""
    monkeypatch.setattr(collector, "END_WAIT", 0.3)
    with _lane_read_on_a_spared_worker(pool, monkeypatch) as (future, victim, _):
        assert future.result(timeout=10) == BIG[4096:4096 + 8192]  # the victim still alive
    stats = pool.stats()
    assert (stats.resent, stats.lanes_given_up, stats.failures) == (1, 1, 0)
    assert any(f"pid {victim}: its reply pipe did not end within 0 s; re-sending its calls without their "
               "lanes" in r.getMessage() for r in caplog.records)


def test_a_timed_out_lane_is_given_up_and_its_late_answer_reaches_no_later_read(pool, monkeypatch):
    """The worker is stopped behind another thread's earlier call, so the timed-out read does not
    get it killed: it runs on later, writes the old lane's buffer and answers there."""
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    assert _read(pool, 0, affinity=0) == BIG[:4096]  # this thread has its lane now
    first_lane = pool._latches.lane
    victim = pool.pids()[0]
    with stopped_behind_an_earlier_call(pool):
        with pytest.raises(Timeout):
            _read(pool, 65536, LANE_BYTES, affinity=0, timeout=0.3)
        assert pool.stats().lanes_given_up == 1
    assert wait_until(lambda: select.select([first_lane.fd], [], [], 0)[0], 5)  # the late answer came there
    for offset in (0, 8192, 131072):
        assert _read(pool, offset, affinity=0) == BIG[offset:offset + 4096]
    assert pool._latches.lane is not first_lane and pool._latches.lane.index != first_lane.index
    assert pool.pids()[0] == victim


@contextlib.contextmanager
def _read_held_by_a_stopped_worker(pool: WorkerPool,
                                   offset: int) -> Iterator[tuple[Future[bytes], int, int, int]]:
    """A read of 4 KiB at ``offset`` held by worker 0, stopped: (its future, its request id, its
    lane, a write end of that lane's pipe). The worker runs on (or was killed) after."""
    victim = pool.pids()[0]
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    writer = -1
    try:
        with ThreadPoolExecutor(1) as executor:
            future = executor.submit(_read, pool, offset, 4096, affinity=0)
            assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 5)
            call = _inflight_call(pool, 0)
            lane = readwire.decode_request(call.frame[framing.HEADER_LEN:]).lane
            writer = _lane_writer(pool, lane)
            yield future, call.id, lane, writer
            future.exception(timeout=10)  # ended, however, before the executor is shut down
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
        if writer >= 0:
            os.close(writer)


def test_an_answer_from_a_process_that_does_not_hold_the_call_is_ignored(pool):
    with _read_held_by_a_stopped_worker(pool, 8192) as (future, req_id, lane, writer):
        assert pool._lanes is not None
        pool._lanes._map[lane * LANE_BYTES: lane * LANE_BYTES + 4096] = b"X" * 4096
        os.write(writer, framing.frame(readwire.encode_lane_reply(req_id, pool._zygote_pid, 4096)))
        time.sleep(0.2)
        assert not future.done()
        os.kill(pool.pids()[0], signal.SIGCONT)
        assert future.result(timeout=10) == BIG[8192:8192 + 4096]
    assert pool.stats().lanes_given_up == 0 and pool.stats().killed == 0


def test_a_malformed_answer_on_a_lane_fails_the_read_at_once_and_kills_the_worker(pool, caplog):
    victim = pool.pids()[0]
    with _read_held_by_a_stopped_worker(pool, 0) as (future, _, lane, writer):
        started = time.monotonic()
        os.write(writer, framing.frame(framing.pack(["not", "a", "lane", "reply"])))
        with pytest.raises(Unavailable, match=f"a malformed reply on lane {lane}"):
            future.result(timeout=5)
        assert time.monotonic() - started < 2
    assert wait_until(lambda: replaced(pool, 0, victim), 15)
    assert pool.stats().lanes_given_up == 1 and pool.stats().resent == 0 and pool.stats().errors == 1
    assert any(f"worker 0 pid {victim}: sent a malformed reply on lane {lane}" in r.getMessage()
               for r in caplog.records)
    assert _read(pool, 0, affinity=0) == BIG[:4096]


def test_workers_hold_every_lanes_write_end_and_only_the_dispatcher_a_read_end(pool):
    assert _read(pool, 0) == BIG[:4096]  # one lane taken: its read end is open here
    lanes = pool._lanes
    assert lanes is not None
    pipes = {_pipe_of(os.getpid(), r) for r, _ in lanes._pipes}
    mine = _ends(os.getpid(), pipes)
    assert mine and all(mode == os.O_RDONLY for mode in mine.values())  # read ends only
    for pid in (pool._zygote_pid, *pool.pids()):
        assert pid is not None
        held = _ends(pid, pipes)
        assert set(held) == pipes, f"pid {pid} lacks a lane"
        assert all(mode == os.O_WRONLY for mode in held.values()), f"pid {pid} holds a lane's read end"
    with WorkerPool(MEMORY, 1, serve, request_timeout=10, lanes=2) as other:  # forked after: none of ours
        for pid in (other._zygote_pid, *other.pids()):
            assert pid is not None and not _ends(pid, pipes), f"pid {pid} of another pool holds our lanes"


def test_lanes_are_never_handed_out_twice_nor_after_they_were_given_up():
    lanes = Lanes(3, 4096)
    try:
        first, second = lanes.take(), lanes.take()
        assert first is not None and second is not None and first.index != second.index
        first.give_up()
        third = lanes.take()
        assert third is not None and third.index not in (first.index, second.index)
        assert lanes.take() is None and first.given_up and not second.given_up
    finally:
        lanes.close()


def _pipe_of(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _ends(pid: int, pipes: set[str]) -> dict[str, int]:
    """The lane pipes ``pid`` holds, each with the access mode of its end."""
    out = {}
    for fd, target in open_fds(pid).items():
        if target in pipes:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
            out[target] = flags & os.O_ACCMODE
    return out


@pytest.mark.parametrize("args", [(DIGEST, 0, "4096", -1), (DIGEST, 0), (DIGEST[:31], 0, 4096, -1)],
                         ids=["length-a-string", "too-few", "short-digest"])
def test_a_read_with_bad_arguments_is_invalid_before_any_lane_is_taken(pool, args):
    with pytest.raises(InvalidArgument):
        pool.call(ops.BLOB_READ, *args)
    assert pool.stats().requests == 2  # the pings of start-up: nothing was sent
