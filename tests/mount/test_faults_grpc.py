"""Store faults over gRPC against a real mount: down, dying, slow, flaky, cut short, garbled.

Two set-ups. A real daemon (``python -m tvixmount.server``) that is not
running when the mount starts, is started, then SIGKILLed while the mount
reads, and started again: the mount must answer EIO within a bounded time
while the daemon is away and serve again by itself once it is back. And a
scripted server in this process (tests.faults.ScriptedStore) for faults a
real daemon does not make on request: seconds per call, UNAVAILABLE
intermittently or always, streams that break off or end early, and bytes
that are not the message they should be. Every test checks the reader's
errno and waiting time, the mount's log line, and the recovery.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.faults import (
    GET_INFO,
    READ,
    STAT,
    LogCursor,
    ScriptedStore,
    attempt,
    b3,
    direct_read,
    path_info,
    read_bytes,
    serving,
    stats,
    store_path,
    wait_until,
)
from tests.grpc_daemon import Daemon, scratch_dir
from tests.mounting import FUSE_MISSING, Mount
from tests.store_suite import pattern
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, b3_text
from tvixmount.store import StoreUrls, open_store

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

DEADLINE = 3.0
SLACK = 1.5
CHUNK = 100_000  # how the scripted server chunks its chunked blobs


# -- a real daemon that goes away and comes back --------------------------------------------------

D_SMALL = b"served by a daemon that comes and goes\n"
# Twenty 256 KiB chunks on the daemon: bigger than the client fetches whole (grpc/reader.py WHOLE_RUN),
# so a read at random fetches only its chunk and a later read elsewhere needs the daemon.
D_BIG = pattern(5_000_000, seed=11)
# The same, read only by the test that kills the daemon: a file read in order before (D_BIG) has
# its verified regions in the mount's segment arena, served on without the daemon.
D_BIG2 = pattern(5_000_000, seed=12)
D_TREE = store_path("daemon-tree")
D_LATER = store_path("daemon-later")


@pytest.fixture(scope="module")
def daemon_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Daemon]]:
    root = scratch_dir("tvx-faults-")
    with open_store(StoreUrls.embedded(root / "store", create=True)) as store:
        for data in (D_SMALL, D_BIG, D_BIG2):
            store.blobs.put(data)
        top = Directory(files=tuple(FileNode(name, b3(data), len(data)) for name, data in
                                    ((b"big", D_BIG), (b"big2", D_BIG2), (b"small", D_SMALL))))
        store.directories.put(top)
        store.path_infos.put(path_info(DirectoryNode(D_TREE.basename.encode(), top.digest(), top.size())))
        store.path_infos.put(path_info(FileNode(D_LATER.basename.encode(), b3(D_SMALL), len(D_SMALL))))
    daemon = Daemon(root, "--read-only")  # not started: the mount comes first
    allowed = (r"answered UNAVAILABLE", r"failed: .*(UNAVAILABLE|Connection refused|connect)")
    try:
        with serving(tmp_path_factory.mktemp("daemon") / "mnt", None, "--request-timeout", str(DEADLINE),
                     urls=(daemon.url,) * 3, allowed_errors=allowed) as m:
            yield m, daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _until_served(fn: Callable[[], Any], timeout: float = 15.0) -> tuple[Any, float]:
    """Call ``fn`` until it stops failing with OSError; (its result, seconds it took)."""
    started = time.monotonic()
    while True:
        try:
            return fn(), time.monotonic() - started
        except OSError:
            assert time.monotonic() - started < timeout, "the mount did not recover"
            time.sleep(0.1)


def test_daemon_down_at_start_then_up(daemon_mount: tuple[Mount, Daemon]) -> None:
    m, daemon = daemon_mount
    # waited for, not read once: the line can reach the log file just after the mount answers
    not_answering = r"WARNING .*store .* is not answering: .*UNAVAILABLE.*mounting anyway"
    LogCursor(m, from_start=True).wait_for(not_answering)
    cursor = LogCursor(m)
    top = m.path(D_TREE.basename)
    for _ in range(2):
        code, took = attempt(lambda: os.stat(top))
        assert code == errno.EIO
        assert took < DEADLINE  # a few quick retries, no waiting for a server that is not there
    line = cursor.wait_for(rf"ERROR .*store path {D_TREE.basename} failed: .*{re.escape(daemon.url)}")
    assert "UNAVAILABLE" in line
    daemon.start()
    listing, took = _until_served(lambda: sorted(os.listdir(top)))
    assert listing == ["big", "big2", "small"]
    assert took < 5  # reconnecting backs off to at most 2 s
    assert read_bytes(top / "big") == D_BIG


def test_daemon_killed_mid_read_then_restarted(daemon_mount: tuple[Mount, Daemon]) -> None:
    m, daemon = daemon_mount
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.start()
    big = m.path(D_TREE.basename, "big2")
    _until_served(lambda: os.stat(big))
    cursor = LogCursor(m)
    with open(big, "rb", buffering=0) as f:
        assert os.pread(f.fileno(), 65536, 65536) == D_BIG2[65536:131072]  # not in order: one chunk
        daemon.stop(signal.SIGKILL)  # gone without a goodbye
        code, took = attempt(lambda: direct_read(big, 1_000_000, 65536))
        assert code == errno.EIO and took < DEADLINE
        cursor.wait_for(rf"ERROR .*read of {re.escape(b3_text(b3(D_BIG2)))} .*failed: .*UNAVAILABLE")
        assert attempt(lambda: os.stat(m.path(D_LATER.basename)))[0] == errno.EIO  # every kind of call
        daemon.start()
        data, took = _until_served(lambda: direct_read(big, 1_000_000, 65536))
        assert data == D_BIG2[1_000_000:1_065_536] and took < 5
        assert os.pread(f.fileno(), 100_000, 1_900_000) == D_BIG2[1_900_000:2_000_000]  # the file works on
    data, took = _until_served(lambda: read_bytes(m.path(D_LATER.basename)))  # each channel reconnects
    assert data == D_SMALL and took < 5
    assert stats(m.mountpoint)["fetcher"]["killed"] == 0  # workers were never the problem


# -- a scripted server ------------------------------------------------------------------------------

S_FILES = 12
S_TREE = store_path("scripted-tree")


def _small(i: int) -> bytes:
    return pattern(20_000 + i, seed=100 + i)


def _chunked(i: int) -> bytes:
    return pattern(3 * CHUNK + 1000 + i, seed=200 + i)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, ScriptedStore]]:
    fake = ScriptedStore()
    files = []
    for i in range(S_FILES):
        fake.add_blob(_small(i))
        fake.add_blob(_chunked(i), chunk=CHUNK)
        files.append(FileNode(f"s{i:02d}".encode(), b3(_small(i)), len(_small(i))))
        files.append(FileNode(f"c{i:02d}".encode(), b3(_chunked(i)), len(_chunked(i))))
    top = Directory(files=tuple(sorted(files, key=lambda f: f.name)))
    fake.add_directory(top)
    fake.add_root(DirectoryNode(S_TREE.basename.encode(), top.digest(), 2 * len(files)))
    allowed = (r"answered UNAVAILABLE: scripted", r"timed out after 3\.0 s", r"connection lost mid-stream",
               r": worker \d pid \d+ died")  # the second worker stuck in a slow call, killed as hung
    try:
        # No small-file readahead and no small-file batches: each test scripts the faults of
        # the reads it makes itself, and a fetch ahead would read its files before the faults
        # are set (the batches' own faults: test_smallblobs_mount.py).
        with serving(tmp_path_factory.mktemp("scripted") / "mnt", None, "--request-timeout", str(DEADLINE),
                     "--readahead-files", "0", "--small-batches", "0", urls=(fake.url,) * 3,
                     allowed_errors=allowed) as m:
            names = os.listdir(m.path(S_TREE.basename))
            assert len(names) == 2 * S_FILES
            for name in names:
                os.stat(m.path(S_TREE.basename, name))  # entries cached: the tests fault reads only
            yield m, fake
    finally:
        fake.close()


def _file(m: Mount, name: str) -> Path:
    return m.path(S_TREE.basename, name)


def _for(digests: set[bytes], action: Any) -> Callable[[bytes], Any]:
    return lambda digest: action if digest in digests else None


def _first(count: int, digests: set[bytes], action: Any) -> Callable[[bytes], Any]:
    """The fault for the first ``count`` calls about ``digests``, then none."""
    left = [count]

    def rule(digest: bytes) -> Any:
        if digest in digests and left[0] > 0:
            left[0] -= 1
            return action
        return None

    return rule


def _calls(fake: ScriptedStore, method: str, digest: bytes) -> int:
    return sum(1 for m, d in fake.calls if m == method and d == digest)


def test_slow_server_within_the_deadline_is_only_slow(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    fake.faults["*"] = lambda digest: ("sleep", 0.4)
    try:
        data, took = _until_served(lambda: read_bytes(_file(m, "s00")), timeout=0)
    finally:
        fake.faults.clear()
    # One Read, 0.4 s: a file of one FUSE read is fetched whole, its FileNode's size spares the Stat.
    assert data == _small(0) and took >= 0.4


def test_slow_server_past_the_deadline_is_eio_at_the_deadline(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    digest = b3(_small(1))
    before = stats(m.mountpoint)["fetcher"]
    fake.faults[READ] = _for({digest}, ("sleep", 2 * DEADLINE))
    try:
        code, took = attempt(lambda: direct_read(_file(m, "s01")))
        assert code == errno.EIO
        assert DEADLINE / 2 <= took < DEADLINE + SLACK  # the re-sent call fails too, by its deadline
        cursor.wait_for(r"WARNING .*hung: no reply for 1\.\d s .*blob_read")
        cursor.wait_for(rf"ERROR .*read of {re.escape(b3_text(digest))} .*(timed out after 3\.0 s|died)")
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "s01")) == _small(1)  # the server is fast again: served
    after = wait_until(lambda: (s := stats(m.mountpoint)["fetcher"])["workers"]["0"]["ready"]
                       and s["workers"]["1"]["ready"] and s, 10)
    assert after["timeouts"] + after["lost"] == before["timeouts"] + before["lost"] + 1
    assert after["killed"] >= before["killed"] + 1  # the workers stuck in the slow call were replaced


def test_unavailable_now_and_then_is_retried_unseen(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    digests = {b3(_small(2)), b3(_chunked(2))}
    digests |= {b3(_chunked(2)[i : i + CHUNK]) for i in range(0, len(_chunked(2)), CHUNK)}
    turn = [0]

    def every_other(digest: bytes) -> Any:
        if digest not in digests:
            return None
        turn[0] += 1
        return ("status", grpc.StatusCode.UNAVAILABLE) if turn[0] % 2 else None

    fake.faults[STAT] = fake.faults[READ] = every_other
    try:
        assert read_bytes(_file(m, "s02")) == _small(2)
        assert read_bytes(_file(m, "c02")) == _chunked(2)
    finally:
        fake.faults.clear()
    # Each call answered UNAVAILABLE once, then retried: the small file's one Read (its FileNode's
    # size spares the Stat), the chunked file's Stat and Read (streamed whole in one Read).
    assert turn[0] >= 2 * 3
    assert cursor.lines("ERROR") == [] and cursor.lines("WARNING") == []


def test_unavailable_always_is_eio_quickly_and_recovers(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    digest = b3(_small(3))
    fake.faults[READ] = _for({digest}, ("status", grpc.StatusCode.UNAVAILABLE))
    try:
        code, took = attempt(lambda: direct_read(_file(m, "s03")))
        assert code == errno.EIO and took < DEADLINE / 2
        cursor.wait_for(rf"ERROR .*read of {re.escape(b3_text(digest))} .*answered UNAVAILABLE: scripted")
        assert _calls(fake, READ, digest) == 3  # grpc's retry policy: three attempts, backing off
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "s03")) == _small(3)


@pytest.mark.parametrize(("n", "fault"), [(4, ("drop", 10_000)), (6, ("cut", 5_000))],
                         ids=["breaking off", "truncated"])
def test_a_stream_failing_once_is_retried(scripted: tuple[Mount, ScriptedStore], n: int,
                                          fault: tuple[str, int]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    whole = b3(_small(n))
    chunked = b3(_chunked(n))  # a small chunked blob: one Read of all of it, verified chunk by chunk
    whole_once, chunked_once = _first(1, {whole}, fault), _first(1, {chunked}, fault)
    fake.faults[READ] = lambda digest: whole_once(digest) or chunked_once(digest)
    try:
        assert read_bytes(_file(m, f"s{n:02d}")) == _small(n)
        assert read_bytes(_file(m, f"c{n:02d}")) == _chunked(n)
    finally:
        fake.faults.clear()
    for digest in (whole, chunked):
        cursor.wait_for(rf"INFO .*reading blob {re.escape(b3_text(digest))}.*: trying again in")
    assert cursor.lines("ERROR") == [] and cursor.lines("WARNING") == []


def test_stream_breaking_off_every_time_is_eio_and_recovers(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    whole = b3(_small(5))
    fake.faults[READ] = _for({whole}, ("drop", 10_000))
    try:
        code, took = attempt(lambda: direct_read(_file(m, "s05")))
        assert code == errno.EIO and took < DEADLINE
        cursor.wait_for(rf"ERROR .*read of {re.escape(b3_text(whole))} .*connection lost mid-stream")
        assert _calls(fake, READ, whole) == 3  # bounded: three attempts, then EIO
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "s05")) == _small(5)


def test_truncated_stream_every_time_is_eio_with_one_warning(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    chunked = b3(_chunked(7))
    piece = b3(_chunked(7)[2 * CHUNK : 3 * CHUNK])
    fake.faults[READ] = _for({piece, chunked}, ("cut", 5_000))  # whole-blob streams are cut too
    try:
        with open(_file(m, "c07"), "rb", buffering=0) as f:
            assert os.pread(f.fileno(), 1000, 0) == _chunked(7)[:1000]  # the good chunks are served
        for _ in range(2):
            code, took = attempt(lambda: direct_read(_file(m, "c07"), 2 * CHUNK + 10, 4096))
            assert code == errno.EIO and took < DEADLINE
        cursor.wait_for(rf"WARNING .*{re.escape(b3_text(chunked))}.*reading chunk 2 .*sent 5000 bytes")
        assert len(cursor.lines("WARNING", b3_text(chunked))) == 1
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "c07")) == _chunked(7)


def test_garbage_instead_of_messages_is_eio(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    whole = b3(_small(8))
    fake.faults[READ] = _for({whole}, ("raw", b"\xff\xff\xff garbage"))
    asked = store_path("scripted-garbled")
    fake.faults[GET_INFO] = _for({asked.digest}, ("bytes", b"\xff\xfe not a PathInfo"))
    try:
        assert attempt(lambda: direct_read(_file(m, "s08")))[0] == errno.EIO
        cursor.wait_for(rf"WARNING .*{re.escape(b3_text(whole))}.*not a BlobChunk")
        assert attempt(lambda: os.stat(m.path(asked.basename)))[0] == errno.EIO
        cursor.wait_for(rf"WARNING .*store path {asked.basename}: .*invalid path info")
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "s08")) == _small(8)
