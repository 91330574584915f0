"""A sequential reader of a big blob over gRPC: one streamed Read, served from the segment arena.

Against a scripted gRPC server in this process (tests.faults.ScriptedStore),
whose chunks (100,000 bytes) do not line up with the arena's 256 KiB
regions. Checked through a real mount: the blob is streamed once and the
dispatcher serves most reads from verified regions in shared memory; a
chunk that hashes wrong in the stream (and in its own Read) fails only the
reads that touch its bytes, never a read of good bytes beside it in the
same region or in the regions filled with it; a stream that breaks off is
finished by chunk reads, unseen by the reader.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults import READ, LogCursor, ScriptedStore, b3, read_bytes, serving, stats, store_path
from tests.mounting import FUSE_MISSING, Mount
from tests.store_suite import pattern
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, b3_text

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

CHUNK = 100_000
BLOCK = 128 << 10  # one FUSE read
SIZE = 6 * 1024 * 1024 + 12_345  # above the reader's WHOLE_RUN: streamed as a run, not copied whole
TREE = store_path("grpc-seq-tree")
NAMES = ("seq", "bad", "broken", "grid")
GRID = 256 * 1024  # "grid" is listed in chunks of one arena region each, as tvixmount's daemon lists them


def _data(name: str) -> bytes:
    return pattern(SIZE, seed=300 + NAMES.index(name))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, ScriptedStore]]:
    fake = ScriptedStore()
    files = []
    for name in NAMES:
        fake.add_blob(_data(name), chunk=GRID if name == "grid" else CHUNK)
        files.append(FileNode(name.encode(), b3(_data(name)), SIZE))
    top = Directory(files=tuple(sorted(files, key=lambda f: f.name)))
    fake.add_directory(top)
    fake.add_root(DirectoryNode(TREE.basename.encode(), top.digest(), top.size()))
    try:
        with serving(tmp_path_factory.mktemp("grpc-seq") / "mnt", None, "--readahead-files", "0",
                     "--small-batches", "0", urls=(fake.url,) * 3) as m:
            for name in NAMES:
                os.stat(m.path(TREE.basename, name))
            yield m, fake
    finally:
        fake.close()


def _file(m: Mount, name: str) -> Path:
    return m.path(TREE.basename, name)


def _reads(fake: ScriptedStore, digest: bytes) -> int:
    return sum(1 for method, d in fake.calls if method == READ and d == digest)


def _chunk_reads(fake: ScriptedStore, data: bytes) -> int:
    chunks = {b3(data[i: i + CHUNK]) for i in range(0, len(data), CHUNK)}
    return sum(1 for method, d in fake.calls if method == READ and d in chunks)


def _once(digest: bytes, action: Any) -> Callable[[bytes], Any]:
    left = [1]

    def rule(asked: bytes) -> Any:
        if asked == digest and left[0]:
            left[0] -= 1
            return action
        return None

    return rule


def test_a_sequential_read_is_one_stream_served_from_the_arena(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    data = _data("seq")
    before = stats(m.mountpoint)["segment_cache"]
    with open(_file(m, "seq"), "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    after = stats(m.mountpoint)["segment_cache"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    assert hits > 2 * misses, (hits, misses)  # mostly from the arena: no worker round trip
    assert _reads(fake, b3(data)) == 1  # one Read of the whole blob
    # A read the pool gives the other worker (this one silent for a second on a loaded machine)
    # fetches its own chunks; a reader fetching chunk by chunk would make all 63 calls.
    assert _chunk_reads(fake, data) < SIZE // CHUNK // 4


def test_a_bad_chunk_fails_only_the_reads_of_its_bytes(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    data = _data("bad")
    bad = 29  # bytes 2,900,000-2,999,999: region 11 (2,883,584-3,145,727) holds chunks 28-31
    flipped = bytearray(data)
    flipped[bad * CHUNK + 4321] ^= 0x10
    bad_chunk = b3(data[bad * CHUNK: (bad + 1) * CHUNK])
    whole = b3(data)
    served = {whole: bytes(flipped), bad_chunk: bytes(flipped[bad * CHUNK: (bad + 1) * CHUNK])}
    fake.faults[READ] = lambda digest: ("bytes", served[digest]) if digest in served else None
    try:
        failed = []
        fd = os.open(_file(m, "bad"), os.O_RDONLY | os.O_DIRECT)  # one handle: one worker's reader
        try:
            with mmap.mmap(-1, BLOCK) as buf:  # page-aligned, as O_DIRECT wants
                for offset in range(0, SIZE, BLOCK):  # one FUSE request each, in order
                    try:
                        got = os.preadv(fd, [buf], offset)
                        assert buf[:got] == data[offset: offset + BLOCK]
                    except OSError as exc:
                        assert exc.errno == errno.EIO
                        failed.append(offset)
        finally:
            os.close(fd)
        touching = [o for o in range(0, SIZE, BLOCK) if o < (bad + 1) * CHUNK and o + BLOCK > bad * CHUNK]
        assert failed == touching == [22 * BLOCK]  # the read after it, in the same region, is served
        cursor.wait_for(rf"WARNING .*read of {re.escape(b3_text(whole))} \[{22 * BLOCK}\+{BLOCK}\].*"
                        rf"chunk {bad} \({re.escape(b3_text(bad_chunk))}\)")  # names the chunk
        assert cursor.lines("ERROR") == []
    finally:
        fake.faults.clear()
    assert read_bytes(_file(m, "bad")) == data  # the mount works on, and the file is whole again


def test_a_stream_breaking_off_is_finished_by_chunk_reads(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    data = _data("broken")
    fake.faults[READ] = _once(b3(data), ("drop", 2_000_000))
    try:
        assert read_bytes(_file(m, "broken")) == data
    finally:
        fake.faults.clear()
    assert _chunk_reads(fake, data) > 0  # what the stream did not bring came chunk by chunk
    assert cursor.lines("ERROR") == []


def test_random_reads_of_chunks_on_the_region_grid_are_served_again_from_the_arena(
        scripted: tuple[Mount, ScriptedStore]) -> None:
    """O_DIRECT reads out of order, chunk by chunk: each chunk is fetched once, its region kept verified,
    and the reads after the first of a region come from the arena without a worker."""
    m, fake = scripted
    data = _data("grid")
    regions = (17, 3, 11, 20)
    chunks = {b3(data[r * GRID: (r + 1) * GRID]) for r in regions}
    before = stats(m.mountpoint)["segment_cache"]
    fd = os.open(_file(m, "grid"), os.O_RDONLY | os.O_DIRECT)  # every read reaches the mount
    try:
        with mmap.mmap(-1, BLOCK) as buf:
            for _ in range(3):
                for r in regions:
                    for offset in (r * GRID + BLOCK, r * GRID):  # both halves, the second half first
                        assert os.preadv(fd, [buf], offset) == BLOCK
                        assert buf[:] == data[offset: offset + BLOCK]
    finally:
        os.close(fd)
    after = stats(m.mountpoint)["segment_cache"]
    assert sum(1 for method, d in fake.calls if method == READ and d in chunks) == len(regions)
    assert after["hits"] - before["hits"] >= 5 * len(regions)  # of 6 reads per region, 5 from the arena
