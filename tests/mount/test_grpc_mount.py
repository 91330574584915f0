"""A real mount of a store served by a real daemon: the build-farm set-up, end to end.

tvixmount's workers open the three gRPC services by URL after they are
forked; the daemon serves an embedded store read-only. A daemon restart
under a live mount must not need a remount.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.grpc_daemon import Daemon, scratch_dir
from tests.mounting import FUSE_MISSING, Mount
from tests.store_suite import make_info, pattern, store_path
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.store import StoreUrls, open_store

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

SMALL = b"hello from the daemon\n"
BIG = pattern(1_500_000, seed=5)  # six 256 KiB chunks in the embedded store
OTHER = pattern(700_000, seed=6)
PATH = store_path(40, "served")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    root = scratch_dir("tvx-mount-")
    with open_store(StoreUrls.embedded(root / "store", create=True)) as store:
        files = [store.blobs.put(data) for data in (SMALL, BIG, OTHER)]
        sub = Directory(files=(FileNode(b"other", files[2], len(OTHER)),))
        top = Directory(
            directories=(DirectoryNode(b"sub", sub.digest(), 1),),
            files=(FileNode(b"big", files[1], len(BIG), True), FileNode(b"small", files[0], len(SMALL))),
            symlinks=(SymlinkNode(b"link", b"small"),),
        )
        store.directories.put_many([sub, top])
        store.path_infos.put(make_info(DirectoryNode(b"", top.digest(), 5), PATH))
    daemon = Daemon(root, "--read-only").start()
    try:
        yield daemon, tmp_path
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_mount_through_a_daemon_and_survive_its_restart(served: tuple[Daemon, Path]) -> None:
    daemon, tmp_path = served
    m = Mount(tmp_path / "mnt", urls=(daemon.url, daemon.url, daemon.url)).start()
    try:
        top = m.path(PATH.basename)
        assert sorted(os.listdir(top)) == ["big", "link", "small", "sub"]
        assert (top / "small").read_bytes() == SMALL
        assert os.readlink(top / "link") == "small"
        assert os.access(top / "big", os.X_OK)
        assert (top / "big").read_bytes() == BIG
        with open(top / "big", "rb") as f:  # random access, served chunk by chunk
            f.seek(1_000_000)
            assert f.read(4096) == BIG[1_000_000:1_004_096]

        assert daemon.stop() == 0
        daemon.start()  # same socket, same store
        deadline = time.monotonic() + 20
        while True:  # the first reads may fail while workers reconnect; then it must work
            try:
                got = (top / "sub" / "other").read_bytes()
                break
            except OSError:
                assert time.monotonic() < deadline, "mount did not recover after the daemon restarted"
                time.sleep(0.2)
        assert got == OTHER
    finally:
        status = m.stop()
    assert status == 0, m.log()[-3000:]


def test_a_blob_cache_serves_a_second_mount_without_reading_blobs_from_the_daemon(
        served: tuple[Daemon, Path]) -> None:
    """--cache-dir end to end: the first mount fills the cache; a second mount with the same cache
    reads the same bytes while the daemon's blob reads are counted and do not move."""
    daemon, tmp_path = served
    cache = tmp_path / "cache"
    urls = (daemon.url, daemon.url, daemon.url)
    cache_args = ("--cache-dir", str(cache), "--cache-size", "64M")
    first = Mount(tmp_path / "mnt1", None, *cache_args, urls=urls).start()
    try:
        top = first.path(PATH.basename)
        assert (top / "big").read_bytes() == BIG
        assert (top / "sub" / "other").read_bytes() == OTHER
    finally:
        assert first.stop() == 0, first.log()[-3000:]
    cached = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size in (len(BIG), len(OTHER))]
    assert len(cached) == 2, sorted(str(p) for p in cache.rglob("*"))

    reads_before = _calls(daemon, "Read")
    assert reads_before >= 1
    second = Mount(tmp_path / "mnt2", None, "--cache-dir", str(cache), urls=urls).start()
    try:
        top = second.path(PATH.basename)
        assert (top / "big").read_bytes() == BIG
        assert (top / "sub" / "other").read_bytes() == OTHER
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert _calls(daemon, "Read") == reads_before




def test_a_blob_cache_for_the_embedded_store_is_refused(tmp_path: Path) -> None:
    argv = [str(tmp_path), "--store-dir", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]
    out = subprocess.run([sys.executable, "-m", "tvixmount.cli", *argv], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "blob cache" in out.stderr and "drop --cache-dir" in out.stderr
    assert not (tmp_path / "c").exists()


def test_small_files_are_read_with_one_read_call_and_no_stat(served: tuple[Daemon, Path]) -> None:
    """The mount passes each FileNode's size down as a hint, so a file of one FUSE read costs the
    daemon one Read call and no Stat (the hint decides only that; the bytes are verified). A
    bigger file keeps its Stat: the chunk list lets a bad chunk cost only the reads touching it.
    No readahead: the open of ``small`` would fetch ``sub/other`` ahead, as a walk reads it next."""
    daemon, tmp_path = served
    m = Mount(tmp_path / "mnt", None, "--readahead-files", "0",
              urls=(daemon.url, daemon.url, daemon.url)).start()
    try:
        top = m.path(PATH.basename)
        stats_before, reads_before = _calls(daemon, "Stat"), _calls(daemon, "Read")
        assert (top / "small").read_bytes() == SMALL
        assert (_calls(daemon, "Stat"), _calls(daemon, "Read")) == (stats_before, reads_before + 1)
        assert (top / "sub" / "other").read_bytes() == OTHER
        assert _calls(daemon, "Stat") == stats_before + 1
    finally:
        assert m.stop() == 0, m.log()[-3000:]


def _calls(daemon: Daemon, method: str) -> int:
    """Calls of a BlobService method the daemon logged (one debug line per call)."""
    return len(re.findall(rf"\b{method} b3:", daemon.log()))
