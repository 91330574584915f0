"""Worker faults against a real mount: killed, hung, babbling, and unable to start.

The mount runs two workers with a 6 s request deadline (hung after 3 s). Faults are real:
SIGKILL and SIGSTOP of a worker's pid (found below the mount's fork
server), garbage written into a worker's reply pipe, and a store that new
workers cannot open. Reads are routed by file handle (even handles to
worker 0, odd to worker 1), so a fault on one worker hits the reads of
the files opened on it; every file is looked up before the fault, so only
reads are in flight. Each test checks what the readers saw (bytes or EIO,
and how long they waited), the log lines that name the worker, the pool's
counters in ``user.tvixmount.stats``, and that the worker was replaced and
the mount serves again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import (
    LogCursor,
    attempt,
    b3,
    path_info,
    read_bytes,
    reply_pipe_writer,
    serving,
    stats,
    stopped,
    store_path,
    wait_until,
    wait_workers,
    workers,
    zygote,
)
from tests.mounting import FUSE_MISSING, Mount
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.store import StoreUrls, open_store

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

DEADLINE = 6.0  # a worker is declared hung after 3 s: margin for setting faults up on a loaded machine
SLACK = 1.5  # scheduling on a loaded 2-core machine
GROUPS = ("kill", "stop", "garbage", "startup", "deadline", "threads")
FILES = 16
TREE = store_path("worker-faults")
OTHER = store_path("worker-faults-other")

ALLOWED_ERRORS = (  # when no worker answers at all (the last test), calls fail:
    r"timed out after 6\.0 s",  # at their deadline,
    r": worker \d pid \d+ died",  # or earlier, once the second hung worker they were re-sent to is killed
)


def _contents(group: str, i: int) -> bytes:
    return random.Random(f"{group}{i}").randbytes(40_000 + 997 * i)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    base = tmp_path_factory.mktemp("workers")
    store_dir = base / "store"
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        subdirs = []
        for group in GROUPS:
            files = []
            for i in range(FILES):
                data = _contents(group, i)
                store.blobs.put(data)
                files.append(FileNode(b"f%02d" % i, b3(data), len(data)))
            sub = Directory(files=tuple(files))
            store.directories.put(sub)
            subdirs.append(DirectoryNode(group.encode(), sub.digest(), 2 * FILES))
        top = Directory(directories=tuple(sorted(subdirs, key=lambda d: d.name)))
        store.directories.put(top)
        store.path_infos.put(path_info(DirectoryNode(TREE.basename.encode(), top.digest(), 1)))
        other = Directory(files=(FileNode(b"file", b3(b""), 0),))
        store.blobs.put(b"")
        store.directories.put(other)
        store.path_infos.put(path_info(DirectoryNode(OTHER.basename.encode(), other.digest(), 2)))
    # No small-file batches and no file readahead: these tests follow reads that go to a worker
    # one by one (routing by handle, resends, deadlines); a batch, or a readahead group (also a
    # blob_batch), would bring the files after the first before their reads reach the worker.
    # A batch's own worker faults: test_smallblobs_mount.py.
    with serving(base / "mnt", store_dir, "--request-timeout", str(DEADLINE), "--threads", "8",
                 "--small-batches", "0", "--readahead-files", "0", allowed_errors=ALLOWED_ERRORS) as m:
        wait_workers(m, 2)
        yield m, store_dir


def _group(m: Mount, group: str) -> list[Path]:
    paths = [m.path(TREE.basename, group, f"f{i:02d}") for i in range(FILES)]
    for p in paths:
        os.stat(p)  # looked up now: the kernel keeps entries, so only reads reach the pool later
    return paths


class Readers:
    """One thread per file: open it (handles in order), then read it all when told to."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.files = [open(p, "rb", buffering=0) for p in paths]  # noqa: SIM115 - closed in join()
        self.results: dict[int, tuple[int, float]] = {}
        self.data: dict[int, bytes] = {}
        self._threads = [threading.Thread(target=self._read, args=(i,)) for i in range(len(paths))]

    def _read(self, i: int) -> None:
        f = self.files[i]
        started = time.monotonic()
        try:
            self.data[i] = f.read()
            code = 0
        except OSError as exc:
            code = exc.errno or -1
        self.results[i] = (code, time.monotonic() - started)

    def start(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float = 30.0) -> dict[int, tuple[int, float]]:
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "a reader hung"
        for f in self.files:
            f.close()
        return self.results


def _pool(m: Mount) -> dict:
    return stats(m.mountpoint)["fetcher"]


def test_sigkill_with_reads_in_flight_resends_them(mounted: tuple[Mount, Path]) -> None:
    m, _ = mounted
    paths = _group(m, "kill")[:6]
    victim = wait_workers(m, 2)[0]
    before = _pool(m)
    cursor = LogCursor(m)
    os.kill(victim, signal.SIGSTOP)  # let reads pile up on it first
    assert wait_until(lambda: stopped(victim), 2)
    readers = Readers(paths).start()
    try:
        # At least one read waits on the stopped worker; more may (the pool gives a busy worker's
        # reads to an idle one, so how many depends on the other worker's pace).
        assert wait_until(lambda: _pool(m)["workers"]["0"]["inflight"] >= 1, 2.0)
        time.sleep(0.2)
        held = _pool(m)["workers"]["0"]["inflight"]
    finally:
        os.kill(victim, signal.SIGKILL)
    results = readers.join()
    assert [code for code, _ in results.values()] == [0] * len(paths)  # re-sent and served
    assert all(readers.data[i] == _contents("kill", i) for i in range(len(paths)))
    assert max(took for _, took in results.values()) < DEADLINE / 2
    line = cursor.wait_for(rf"WARNING .*worker 0 pid {victim} is gone \(its reply pipe closed\)")
    found = re.search(r"with (\d+) requests in flight", line)
    assert found is not None and int(found.group(1)) >= held >= 1
    replaced = wait_workers(m, 2, exclude=(victim,))
    after = _pool(m)
    assert after["resent"] - before["resent"] >= int(found.group(1))
    assert (after["lost"], after["timeouts"], after["killed"]) == (before["lost"], before["timeouts"],
                                                                   before["killed"])
    assert after["workers"]["0"]["restarts"] == before["workers"]["0"]["restarts"] + 1
    assert after["workers"]["0"]["pid"] == replaced[0] != victim
    assert read_bytes(_group(m, "kill")[-1]) == _contents("kill", FILES - 1)


def test_hung_worker_is_killed_at_half_the_deadline_and_its_reads_resent(mounted: tuple[Mount, Path]) -> None:
    m, _ = mounted
    paths = _group(m, "stop")
    victim = wait_workers(m, 2)[1]
    before = _pool(m)
    cursor = LogCursor(m)
    os.kill(victim, signal.SIGSTOP)
    readers = Readers(paths).start()  # odd handles: worker 1, more of them than FUSE threads
    results = readers.join()
    assert [code for code, _ in results.values()] == [0] * FILES
    assert all(readers.data[i] == _contents("stop", i) for i in range(FILES))
    assert max(took for _, took in results.values()) < DEADLINE / 2 + SLACK
    line = cursor.wait_for(rf"WARNING .*worker 1 pid {victim}: hung: no reply for 3\.\d s while holding \d+ "
                           r"requests, the oldest blob_read\(b3:.*\); killing it")
    assert cursor.lines("ERROR") == []
    replaced = wait_workers(m, 2, exclude=(victim,))
    after = _pool(m)
    assert after["killed"] == before["killed"] + 1
    assert after["resent"] > before["resent"], (before, after, cursor.lines("WARNING"))
    assert (after["timeouts"], after["lost"]) == (before["timeouts"], before["lost"])
    assert after["workers"]["1"]["pid"] == replaced[1]
    assert "hung" in line


def test_a_hung_worker_does_not_hold_up_the_other_workers_reads(mounted: tuple[Mount, Path]) -> None:
    """A worker silent for a second gets no new reads, affinity or not: they go to the other one.

    A mount of its own, with a 10 s deadline: the hung worker is killed only
    after 5 s, so reads issued before that show where they were routed.
    """
    m0, store_dir = mounted
    # No fetching ahead either (batches, --readahead-files): a file fetched ahead of its read
    # on the other worker would be served without the routing this test follows.
    with serving(m0.mountpoint.parent / "mnt-routing", store_dir, "--request-timeout", "10",
                 "--small-batches", "0", "--readahead-files", "0") as m:
        paths = _group(m, "threads")
        victim = wait_workers(m, 2)[1]
        cursor = LogCursor(m)
        os.kill(victim, signal.SIGSTOP)
        try:
            held = Readers(paths[:2]).start()  # two handles in a row: one read waits on the hung worker
            time.sleep(1.2)  # past STALLED_AFTER
            code, took = attempt(lambda: [read_bytes(p) for p in paths[2:]])
            assert (code, took < 2.0) == (0, True), (code, took)  # no read waited for the hang kill at 5 s
            results = held.join()
            assert [c for c, _ in results.values()] == [0, 0]
            assert 4.5 < max(t for _, t in results.values()) < 5 + SLACK  # the held one: re-sent at 5 s
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        cursor.wait_for(rf"WARNING .*worker 1 pid {victim}: hung: no reply for 5\.\d s")
        wait_workers(m, 2, exclude=(victim,))


def test_garbage_on_a_reply_pipe_kills_and_replaces_the_worker(mounted: tuple[Mount, Path]) -> None:
    m, _ = mounted
    paths = _group(m, "garbage")[:6]
    victim = wait_workers(m, 2)[0]
    before = _pool(m)
    cursor = LogCursor(m)
    os.kill(victim, signal.SIGSTOP)
    readers = Readers(paths).start()
    try:
        assert wait_until(lambda: _pool(m)["workers"]["0"]["inflight"] >= 2, 2.0)
        assert m.proc is not None
        fd = reply_pipe_writer(victim, m.proc.pid)
        try:
            os.write(fd, b"\x00\x00\x00\x05\xc1garbage that is no msgpack")
        finally:
            os.close(fd)
        results = readers.join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)  # the dispatcher killed it already, unless the test failed
    assert [code for code, _ in results.values()] == [0] * len(paths)
    assert all(readers.data[i] == _contents("garbage", i) for i in range(len(paths)))
    assert max(took for _, took in results.values()) < DEADLINE / 2
    cursor.wait_for(rf"WARNING .*worker 0 pid {victim}: sent a malformed (frame|message) .*; killing it")
    cursor.wait_for(rf"WARNING .*worker 0 pid {victim} is gone \(sent a malformed")
    replaced = wait_workers(m, 2, exclude=(victim,))
    after = _pool(m)
    assert after["killed"] == before["killed"] + 1
    assert after["resent"] > before["resent"], (before, after, cursor.lines("WARNING"))
    assert after["workers"]["0"]["pid"] == replaced[0]


def test_worker_that_cannot_start_backs_off_while_the_other_serves(mounted: tuple[Mount, Path]) -> None:
    m, store_dir = mounted
    paths = _group(m, "startup")
    marker = store_dir / "tvixmount-store"
    good = marker.read_text()
    victim = wait_workers(m, 2)[0]
    cursor = LogCursor(m)
    marker.write_text(good.replace("format=2", "format=99"))  # new workers refuse this store
    try:
        os.kill(victim, signal.SIGKILL)
        line = cursor.wait_for(r"WARNING .*worker 0 pid \d+ could not open store local://.*has format 99")
        assert "this tvixmount reads formats 1 and 2" in line
        for i, p in enumerate(paths):  # the other worker serves everything meanwhile
            code, took = attempt(lambda p=p: read_bytes(p))
            assert (code, took < 1.0) == (0, True), (i, code, took)
        cursor.wait_for(r"WARNING .*worker 0 \(last pid \d+\) keeps dying; next start in \d+\.\d s", 15)
        assert 0 not in workers(m) or not _pool(m)["workers"]["0"]["ready"]
    finally:
        marker.write_text(good)
    replaced = wait_workers(m, 2, timeout=25, exclude=(victim,))  # the back-off is at most 10 s
    cursor.wait_for(rf"INFO .*worker 0 restarted as pid {replaced[0]} \(restart \d+\)")
    assert cursor.lines("ERROR") == []


def test_no_call_waits_past_the_deadline_when_no_worker_answers(mounted: tuple[Mount, Path]) -> None:
    """Every worker hangs and no replacement can start: each kind of call fails by its deadline."""
    m, _ = mounted
    paths = _group(m, "deadline")
    other = m.path(OTHER.basename)
    # Opened now, so that only the lookup walks the root: the kernel serialises lookups
    # in one FUSE directory, and dentries may be evicted meanwhile (memory pressure,
    # drop_caches), which would put the other calls behind the hung lookup.
    dir_fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)  # its listing is not fetched by this
    file_fd = os.open(paths[0], os.O_RDONLY | os.O_DIRECT)
    victims = list(wait_workers(m, 2).values())
    cursor = LogCursor(m)
    fork_server = zygote(m)
    os.kill(fork_server, signal.SIGSTOP)  # no replacement until we say so
    try:
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        calls = {
            "lookup": lambda: os.stat(m.path(store_path("never-looked-up").basename)),
            "readdir": lambda: os.listdir(dir_fd),
            "read": lambda: _direct_pread(file_fd),
        }
        outcomes: dict[str, tuple[int, float]] = {}
        threads = [threading.Thread(target=lambda k=k, fn=fn: outcomes.__setitem__(k, attempt(fn)))
                   for k, fn in calls.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * DEADLINE)
        for what, (code, took) in outcomes.items():
            assert code == errno.EIO, (what, code)
            assert took < DEADLINE + SLACK, (what, took)
        for pid in victims:  # both found hung (the second with the re-sent calls' budget) and killed
            cursor.wait_for(rf"WARNING .*worker \d pid {pid}: hung: no reply for .*; killing it")
        cursor.wait_for(r"ERROR .*(timed out after 6\.0 s|: worker \d pid \d+ died)")
    finally:
        os.kill(fork_server, signal.SIGCONT)
    wait_workers(m, 2, exclude=tuple(victims))
    assert _direct_pread(file_fd) == _contents("deadline", 0)
    assert os.listdir(dir_fd) == ["file"]
    os.close(file_fd)
    os.close(dir_fd)
    assert all(read_bytes(p) == _contents("deadline", i) for i, p in enumerate(paths))


def _direct_pread(fd: int) -> bytes:
    """One O_DIRECT read at offset 0 of an open file (one FUSE read request)."""
    import mmap

    with mmap.mmap(-1, 64 * 1024) as buf:
        got = os.preadv(fd, [buf], 0)
        return bytes(buf[:got])
