"""The worker pool with real processes: concurrency, killed, stopped and babbling workers, start-up
failures, clean shutdown, and worker log records reaching the dispatcher's handlers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import multiprocessing_logging
import pytest

from tests.worker_fixtures import (
    BIG,
    LEAF,
    ROOT,
    SMALL,
    b3,
    open_fds,
    populate,
    process_exists,
    replaced,
    stopped_behind_an_earlier_call,
    wait_until,
)
from tvixmount import poolstate
from tvixmount.errors import InvalidArgument, NotFound, Timeout, Unavailable, WorkerLost
from tvixmount.fetcher import PoolFetcher
from tvixmount.pool import WorkerPool
from tvixmount.protocol import ops
from tvixmount.store import StoreUrls, open_store
from workers.loop import serve

MEMORY = StoreUrls.single("memory://")
SMALL_READ = (b3(SMALL), 0, 100, -1)  # blob_read arguments: digest, offset, length, size hint


@pytest.fixture
def pool(tree) -> Iterator[WorkerPool]:
    pool = WorkerPool(MEMORY, 2, serve, request_timeout=10)
    pool.start()
    yield pool
    pool.close()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("bad", [{"workers": 0}, {"request_timeout": 0}, {"hang_fraction": 1.5},
                                 {"lanes": -1}, {"fuse_threads": 0}])
def test_bad_settings_are_refused_before_anything_starts(bad):
    settings = {"workers": 2, **bad}
    workers = settings.pop("workers")
    with pytest.raises(InvalidArgument, match=r"worker pool needs|bad pool settings"):
        WorkerPool(MEMORY, workers, serve, **settings)


def test_start_ping_close_leaves_nothing_behind(tree):
    fds_before = open_fds()
    children_before = _children()
    pool = WorkerPool(MEMORY, 3, serve, request_timeout=10)
    pool.start()
    pids = pool.pids()
    zygote_pid = pool._zygote_pid
    assert all(pids) and len(set(pids)) == 3
    for slot, pid in enumerate(pids):
        assert pool.call(ops.PING, affinity=slot) == (slot, pid)
    assert pool.alive()
    pools_fds = _opened_since(fds_before)
    assert len(pools_fds) >= 2 * 3, pools_fds  # each worker's two pipes, at least
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 5
    assert not pool.alive()
    for pid in [*pids, zygote_pid]:
        assert wait_until(lambda pid=pid: not process_exists(pid), 2), f"pid {pid} left behind (zombie?)"
    assert _children() == children_before
    # The same fd number on the same pipe or socket (inode) is the pool's, still open. Earlier
    # tests leave other threads behind (grpc channels reconnecting, HTTP handlers) that may
    # hold a socket for a moment, so an fd new since close must only go away soon: close
    # itself opens nothing that stays.
    after = open_fds()
    assert {fd: target for fd, target in pools_fds.items() if after.get(fd) == target} == {}
    assert wait_until(lambda: not _opened_since(fds_before), 2), _opened_since(fds_before)
    with pytest.raises(Unavailable, match="closed"):
        pool.call(ops.PING)
    pool.close()  # twice is fine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_are_for_the_dispatcher_only(pool, sig):
    """Ctrl-C reaches the process group, systemd's SIGTERM the cgroup; workers and zygote ignore both."""
    pids = pool.pids()
    for pid in [*pids, pool._zygote_pid]:
        os.kill(pid, sig)
    time.sleep(0.2)
    assert pool.pids() == pids and pool.alive()
    assert [pool.call(ops.PING, affinity=i)[1] for i in range(2)] == pids


def test_many_threads_many_calls(pool):
    f = PoolFetcher(pool)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(60):
                op = (n + i) % 4
                if op == 0:
                    got = f.blob_read(b3(BIG), i * 1000, 131072, affinity=n)
                    assert got == BIG[i * 1000:i * 1000 + 131072]
                elif op == 1:
                    assert f.directory_tree(ROOT.digest(), 1) == [(ROOT.digest(), ROOT)]
                elif op == 2:
                    assert f.blob_read(b3(SMALL), 0, 100) == SMALL
                else:
                    with pytest.raises(NotFound):
                        f.directory_tree(b3(b"absent"), 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    stats = pool.stats()
    assert stats.requests >= 16 * 60
    assert stats.timeouts == stats.lost == stats.restarts == 0
    assert all(w.inflight == 0 for w in stats.workers.values())


def test_sigkill_with_requests_in_flight_resends_them(pool, caplog, monkeypatch):
    # A worker silent for STALLED_AFTER gets no new calls; on a loaded machine the calls
    # below may take longer than that to be made, and would then avoid the stopped worker.
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    f = PoolFetcher(pool)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)  # let calls pile up on it, then kill it
    assert wait_until(lambda: _stopped(victim), 2)
    with ThreadPoolExecutor(8) as executor:
        # All with affinity 0, so they stay on the stopped worker: without it, least-loaded routing
        # sends most of them to the other worker whenever it is idle (it answers fast).
        futures = [executor.submit(pool.call, ops.DIRECTORY_TREE, (ROOT if i % 2 else LEAF).digest(), 1,
                                   affinity=0) for i in range(8)]
        futures += [executor.submit(f.blob_read, b3(BIG), 0, 4096, 0) for _ in range(4)]  # affinity 0
        assert wait_until(lambda: pool.stats().workers[0].inflight >= 4, 15)
        os.kill(victim, signal.SIGKILL)
        results = [fut.result(timeout=30) for fut in futures]
    assert results[:8] == [[(ROOT.digest(), ROOT)] if i % 2 else [(LEAF.digest(), LEAF)] for i in range(8)]
    assert results[8:] == [BIG[:4096]] * 4
    stats = pool.stats()
    assert stats.resent >= 4 and stats.lost == 0
    assert wait_until(lambda: replaced(pool, 0, victim), 15)
    assert stats.workers[0].restarts <= 1
    assert f.blob_read(b3(BIG), 0, 10, affinity=0) == BIG[:10]
    assert any(f"worker 0 pid {victim} is gone" in r.getMessage() for r in caplog.records)


def test_sigstop_times_out_within_the_deadline_and_recovers(pool):
    victim = pool.pids()[1]
    os.kill(victim, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(Timeout, match=rf"blob_read\(b3:.*\) timed out after 0.5 s on worker 1 pid {victim}"):
        pool.call(ops.BLOB_READ, *SMALL_READ, affinity=1, timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5  # the deadline, plus scheduling slack on a busy machine
    assert wait_until(lambda: replaced(pool, 1, victim), 5)
    assert not process_exists(victim) or wait_until(lambda: not process_exists(victim), 2)
    assert pool.call(ops.BLOB_READ, *SMALL_READ, affinity=1) == SMALL
    assert pool.stats().killed == 1


def test_lost_calls_fail_with_worker_lost_and_a_warning(pool, caplog):
    """Not idempotent: never re-sent. Idempotent but its second worker dies too: lost as well."""
    first, second = pool.pids()
    os.kill(first, signal.SIGSTOP)
    os.kill(second, signal.SIGSTOP)
    with ThreadPoolExecutor(2) as executor:
        once = executor.submit(pool.call, ops.BLOB_READ, *SMALL_READ, affinity=0, idempotent=False)
        twice = executor.submit(pool.call, ops.DIRECTORY_TREE, ROOT.digest(), 1, affinity=0)
        assert wait_until(lambda: pool.stats().workers[0].inflight == 2, 5)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WorkerLost, match=rf"blob_read\(b3:.*\): worker 0 pid {first} died"):
            once.result(timeout=5)
        assert wait_until(lambda: pool.stats().workers[1].inflight == 1, 5)  # re-sent once
        os.kill(second, signal.SIGKILL)
        with pytest.raises(WorkerLost, match=rf"directory_tree\(b3:.*\): worker 1 pid {second} died"):
            twice.result(timeout=5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("blob_read(b3:" in m and f"worker 0 pid {first}" in m and "not idempotent" in m
               for m in warnings)
    assert any("directory_tree(b3:" in m and f"worker 1 pid {second}" in m and "already re-sent" in m
               for m in warnings)
    assert wait_until(lambda: replaced(pool, 0, first) and replaced(pool, 1, second), 5)
    assert pool.call(ops.DIRECTORY_TREE, LEAF.digest(), 1) == [(LEAF.digest(), LEAF)]


def test_worker_that_keeps_failing_backs_off_then_recovers(tmp_path, caplog):
    store_dir = tmp_path / "store"
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        populate(store)
    with WorkerPool(StoreUrls.embedded(store_dir), 2, serve, request_timeout=5) as pool:
        victim = pool.pids()[0]
        store_dir.rename(tmp_path / "away")
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(_open_failures(caplog)) >= 3, 10)
        assert pool.pids()[0] is None or not pool.stats().workers[0].ready
        (tmp_path / "away").rename(store_dir)
        assert wait_until(lambda: replaced(pool, 0, victim), 10)
        assert pool.call(ops.BLOB_READ, *SMALL_READ, affinity=0) == SMALL
    failures = _open_failures(caplog)
    assert all(m.startswith("worker 0 pid ") for m in failures)
    assert pool.stats().restarts >= 4


def test_zygote_death_fails_calls_fast(pool, caplog):
    pids = pool.pids()
    os.kill(pool._zygote_pid, signal.SIGKILL)
    for pid in pids:  # PR_SET_PDEATHSIG takes the workers down with it
        assert wait_until(lambda pid=pid: not process_exists(pid) or _zombie(pid), 5)
    assert wait_until(lambda: not pool.alive(), 5)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="zygote is gone"):
        pool.call(ops.PING)
    assert time.monotonic() - started < 1
    assert any("zygote pid" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_calls_wait_in_the_backlog_while_the_only_worker_restarts(tree):
    with WorkerPool(MEMORY, 1, serve, request_timeout=10) as pool:
        victim = pool.pids()[0]
        os.kill(pool._zygote_pid, signal.SIGSTOP)  # no replacement until we say so
        try:
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: pool.pids()[0] is None, 5)
            with ThreadPoolExecutor(1) as executor:
                waiting = executor.submit(pool.call, ops.BLOB_READ, *SMALL_READ)
                assert wait_until(lambda: pool.stats().backlog == 1, 5)
                os.kill(pool._zygote_pid, signal.SIGCONT)
                assert waiting.result(timeout=5) == SMALL
        finally:
            os.kill(pool._zygote_pid, signal.SIGCONT)
        assert pool.stats().restarts == 1 and pool.stats().backlog == 0


def test_close_under_load_ends_every_caller(tree):
    pool = WorkerPool(MEMORY, 2, serve, request_timeout=10)
    pool.start()
    pids = [*pool.pids(), pool._zygote_pid]
    outcomes: list[str] = []

    def hammer() -> None:
        while True:
            try:
                pool.call(ops.DIRECTORY_TREE, ROOT.digest(), 1)
            except Unavailable as exc:
                outcomes.append(type(exc).__name__)
                return

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    started = time.monotonic()
    pool.close()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - started < 5
    assert outcomes == ["Unavailable"] * 16
    for pid in pids:
        assert wait_until(lambda pid=pid: not process_exists(pid), 2)


def test_worker_writing_garbage_isreplaced(pool, caplog):
    victim_slot = pool._state.slots[0].worker
    assert victim_slot is not None
    victim = victim_slot.pid
    # A second write end of the worker's reply pipe, as if the worker wrote it.
    fd = os.open(f"/proc/self/fd/{victim_slot.rep_fd}", os.O_WRONLY)
    try:
        os.write(fd, b"\xff\xff\xff\xffgarbage")
    finally:
        os.close(fd)
    assert wait_until(lambda: replaced(pool, 0, victim), 5)
    assert wait_until(lambda: not process_exists(victim), 2)
    assert pool.call(ops.PING, affinity=0)[1] == pool.pids()[0]
    assert any("malformed frame" in r.getMessage() for r in caplog.records)


def test_store_that_cannot_open_fails_start_clearly(tmp_path):
    missing = tmp_path / "nope"
    pool = WorkerPool(StoreUrls.embedded(missing), 2, serve, request_timeout=5, start_timeout=10)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=rf"^worker \d could not open store local://{missing}: "):
        pool.start()
    assert time.monotonic() - started < 5
    assert not pool.alive()


def test_worker_logs_reach_the_dispatcher_handlers(tree):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = [Keep()]
    root.setLevel(logging.DEBUG)
    multiprocessing_logging.install_mp_handler()
    try:
        with WorkerPool(MEMORY, 2, serve, request_timeout=10) as pool:
            pids = set(pool.pids())
    finally:
        mp_handlers = root.handlers[:]
        multiprocessing_logging.uninstall_mp_handler()
        for handler in mp_handlers:
            handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    from_workers = [r for r in records if r.process in pids]
    assert {r.process for r in from_workers} == pids
    assert any("serving store memory://" in r.getMessage() for r in from_workers)
    # Records a worker logs just before it exits are flushed, not lost with the process.
    exits = [r for r in from_workers if "request pipe closed; exiting" in r.getMessage()]
    assert {r.process for r in exits} == pids
    assert {r.processName for r in exits} == {"tvixmount-worker-0", "tvixmount-worker-1"}


def test_workers_hold_no_fd_they_do_not_need(tree):
    fuse = os.open("/dev/fuse", os.O_RDWR) if os.path.exists("/dev/fuse") else None
    decoy = os.open(os.devnull, os.O_RDONLY)
    try:
        with WorkerPool(MEMORY, 2, serve, request_timeout=10) as pool, \
                WorkerPool(MEMORY, 1, serve, request_timeout=10) as other:
            mine = {w.id: (w.pid, _pipe(w.req_fd), _pipe(w.rep_fd))
                    for s in pool._state.slots if (w := s.worker)}
            theirs = [_pipe(w.req_fd) for s in other._state.slots if (w := s.worker)]
            for slot, (pid, req, rep) in mine.items():
                held = set(open_fds(pid).values())
                assert "/dev/fuse" not in held
                assert req in held and rep in held
                others = {p for s, (_, q, r) in mine.items() if s != slot for p in (q, r)}
                assert not held & others, "a worker holds another worker's pipe"
                assert not held & set(theirs), "a worker holds another pool's pipe"
            for zygote in (pool._zygote_pid, other._zygote_pid):
                held = set(open_fds(zygote).values())
                assert not held & {p for _, q, r in mine.values() for p in (q, r)}
    finally:
        if fuse is not None:
            os.close(fuse)
        os.close(decoy)


def test_dispatcher_death_ends_zygote_and_workers(tree, tmp_path):
    """Kill -9 the process that owns a pool: its zygote and workers must go by themselves."""
    script = tmp_path / "owner.py"
    out = tmp_path / "pids"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tvixmount.pool import WorkerPool\n"
        "from tvixmount.store import StoreUrls\n"
        "from workers.loop import serve\n"
        "pool = WorkerPool(StoreUrls.single('memory://'), 2, serve)\n"
        "pool.start()\n"
        f"open({str(out)!r}, 'w').write(' '.join(map(str, [pool._zygote_pid, *pool.pids()])))\n"
        "time.sleep(60)\n"
    )
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, str(script)])
    try:
        assert wait_until(lambda: out.exists() and out.read_text(), 10)
        pids = [int(p) for p in out.read_text().split()]
        owner.kill()
        owner.wait(5)
        for pid in pids:
            assert wait_until(lambda pid=pid: not process_exists(pid) or _zombie(pid), 5), pid
    finally:
        owner.kill()
        owner.wait()


# -- helpers --------------------------------------------------------------------------------


def _open_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "could not open store" in r.getMessage()]


def _pipe(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _opened_since(before: dict[int, str]) -> dict[int, str]:
    """This process's fds (fd -> what it points to) that were not open as the same thing in ``before``."""
    return {fd: target for fd, target in open_fds().items() if before.get(fd) != target}


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        found.add(int(entry))
            except OSError:
                pass
    return found


def test_a_busy_affinity_worker_hands_other_files_calls_to_an_idle_one(pool):
    """Affinity is a preference: a call whose worker is busy with another file's call goes to an
    idle worker; a call of the same file as the busy one stays and waits (its reader is there)."""
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as ex:
            held = ex.submit(pool.call, ops.PING, affinity=0)
            assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 2)
            started = time.monotonic()
            assert pool.call(ops.PING, affinity=2)[0] == 1  # slot 0 as well, but another file
            assert time.monotonic() - started < 0.5
            same = ex.submit(pool.call, ops.PING, affinity=0)
            time.sleep(0.3)
            assert not same.done()
            os.kill(victim, signal.SIGCONT)
            assert held.result(5)[0] == 0 and same.result(5)[0] == 0
    finally:
        os.kill(victim, signal.SIGCONT)


def test_a_late_reply_to_a_timed_out_call_wakes_nobody(pool, monkeypatch):
    """A calling thread reuses its latch: the reply to its call that timed out must not end its next call.

    The worker is stopped behind an earlier call of another thread, so the
    timed-out call does not get it killed; its reply comes once it runs on.
    """
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    victim = pool.pids()[0]
    with stopped_behind_an_earlier_call(pool), pytest.raises(Timeout):
        pool.call(ops.BLOB_READ, *SMALL_READ, affinity=0, timeout=0.3)
    for offset in (0, 4096, 131072):  # each its own bytes, none ended early by the stale reply
        got = pool.call(ops.BLOB_READ, b3(BIG), offset, 4096, len(BIG), affinity=0)
        assert got == BIG[offset:offset + 4096]
    assert pool.pids()[0] == victim and pool.stats().timeouts == 1


def test_a_lone_caller_reads_its_own_replies(pool):
    """No collector hop: with nobody else reading a worker's pipe, the caller takes its reply itself."""
    before = pool.stats()
    for offset in range(0, len(BIG), 16384):
        got = pool.call(ops.BLOB_READ, b3(BIG), offset, 16384, len(BIG), affinity=offset % 2)
        assert got == BIG[offset:offset + 16384]
    after = pool.stats()
    calls = after.requests - before.requests
    assert calls == len(range(0, len(BIG), 16384))
    assert after.own_replies - before.own_replies == calls


def test_a_caller_reading_its_pipe_when_the_worker_dies_gets_its_call_resent(pool, monkeypatch):
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(pool.call, ops.BLOB_READ, b3(BIG), 4096, 8192, len(BIG), affinity=0)
        assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 5)
        time.sleep(0.1)  # the caller is polling the stopped worker's pipe
        os.kill(victim, signal.SIGKILL)
        assert future.result(timeout=10) == BIG[4096:4096 + 8192]
    stats = pool.stats()
    assert stats.resent == 1 and stats.lost == 0
    assert wait_until(lambda: replaced(pool, 0, victim), 15)
    assert pool.call(ops.BLOB_READ, *SMALL_READ, affinity=0) == SMALL


def test_a_caller_reading_its_pipe_delivers_the_replies_of_others_in_order(pool, monkeypatch):
    """Several callers on one worker: whoever reads the pipe completes each call with its own bytes."""
    monkeypatch.setattr(poolstate, "STALLED_AFTER", 60.0)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    offsets = [i * 4096 for i in range(12)]
    try:
        with ThreadPoolExecutor(12) as executor:
            futures = [executor.submit(pool.call, ops.BLOB_READ, b3(BIG), off, 4096, len(BIG), affinity=0)
                       for off in offsets]
            assert wait_until(lambda: pool.stats().workers[0].inflight == 12, 5)
            os.kill(victim, signal.SIGCONT)
            results = [f.result(timeout=10) for f in futures]
    finally:
        os.kill(victim, signal.SIGCONT)
    assert results == [BIG[off:off + 4096] for off in offsets]
    assert pool.stats().killed == 0 and pool.stats().timeouts == 0


def test_after_callers_read_their_own_replies_the_collector_still_stops_at_once(tree):
    """The collector may act on readiness a caller used up meanwhile: it must not block in that read.

    It did once (a blocking read of an empty pipe), and then noticed nothing,
    deaths and its own stop included, until the idle worker wrote again.
    """
    pool = WorkerPool(MEMORY, 2, serve, request_timeout=10)
    pool.start()
    try:
        def reads(seed: int) -> None:
            for i in range(150):
                offset = (seed * 7919 + i * 4096) % (len(BIG) - 4096)
                got = pool.call(ops.BLOB_READ, b3(BIG), offset, 4096, len(BIG), affinity=(seed + i) % 3)
                assert got == BIG[offset:offset + 4096]

        with ThreadPoolExecutor(8) as executor:
            for future in [executor.submit(reads, seed) for seed in range(8)]:
                future.result(timeout=60)
        assert pool.stats().own_replies > 0
        victim = pool.pids()[1]
        os.kill(victim, signal.SIGKILL)  # noticed by the collector alone: nobody calls
        assert wait_until(lambda: replaced(pool, 1, victim), 5)
    finally:
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 3


def test_the_collector_acting_on_used_up_readiness_does_not_block(pool):
    """The race behind the test above, made certain: the collector reads a pipe a caller emptied."""
    assert pool.call(ops.BLOB_READ, *SMALL_READ, affinity=0) == SMALL  # its caller read the reply
    worker = pool._state.slots[0].worker
    stale = threading.Thread(target=pool._collector._on_replies, args=(worker,), daemon=True)
    stale.start()
    stale.join(2)
    assert not stale.is_alive()
    assert worker.reading is None and not worker.doomed  # given back, the worker still serving
    assert pool.call(ops.BLOB_READ, *SMALL_READ, affinity=0) == SMALL


@pytest.mark.parametrize("lanes", [0, 2], ids=["pipe", "lane"])
def test_close_ends_a_caller_reading_its_own_reply_at_once(tree, lanes):
    """close() fails pending calls; a caller polling its stopped worker's pipe, or its own lane
    (lanes.py), must hear it too."""
    pool = WorkerPool(MEMORY, 1, serve, request_timeout=30, lanes=lanes)
    pool.start()
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    ended: list[float] = []

    def call() -> None:
        try:
            pool.call(ops.BLOB_READ, *SMALL_READ)
        except Unavailable:
            ended.append(time.monotonic())

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert wait_until(lambda: pool.stats().workers[0].inflight == 1, 5)
        time.sleep(0.1)  # it is polling the pipe (or its lane)
        started = time.monotonic()
        pool.close()  # the stopped worker keeps it a while (the zygote waits for it)
        caller.join(5)
        assert ended and ended[0] - started < 2
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed at close, as a rule
            os.kill(victim, signal.SIGCONT)
        pool.close()
