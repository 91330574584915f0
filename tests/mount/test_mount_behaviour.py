"""Real-mount tests beyond upstream's: where tvix is wrong, concurrency, scale, lifecycle."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fs_fixtures import BLOB_A, BLOB_A_NAME, EMPTY, Populate, b3, path_info
from tests.mounting import FUSE_MISSING, Mount, descendants, is_mounted
from tvixmount.castore import nixbase32
from tvixmount.castore.directory import Directory, SizeConvention
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode

pytestmark = pytest.mark.mount


def store_path_name(i: int, name: str = "p") -> bytes:
    digest = random.Random(i).randbytes(20)
    return f"{nixbase32.encode(digest)}-{name}{i}".encode()


def add_tree(store, name: bytes, directory: Directory) -> None:
    size = directory.size(SizeConvention.DOUBLED)
    store.path_infos.put(path_info(DirectoryNode(name, directory.digest(), size)))


def stats(mountpoint: Path) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.tvixmount.stats"))


def test_executable_and_plain_copy_differ(local_store, mount):
    data = b"#!/bin/sh\necho hi\n"
    local_store.blobs.put(data)
    d = Directory(files=(FileNode(b"plain", b3(data), len(data)),
                         FileNode(b"tool", b3(data), len(data), executable=True)))
    local_store.directories.put(d)
    name = store_path_name(1)
    add_tree(local_store, name, d)
    m = mount()
    plain, tool = os.stat(m.path(name, "plain")), os.stat(m.path(name, "tool"))
    assert plain.st_ino != tool.st_ino
    assert (plain.st_mode & 0o777, tool.st_mode & 0o777) == (0o444, 0o555)
    assert m.path(name, "tool").read_bytes() == data


def test_wrong_name_for_known_hash_is_enoent(local_store, mount):
    Populate(local_store).blob_a()
    m = mount()
    with pytest.raises(FileNotFoundError):
        os.stat(m.path(BLOB_A_NAME[:33] + b"other"))
    assert m.path(BLOB_A_NAME).read_bytes() == BLOB_A


def test_root_listing_loses_no_entry(local_store, mount):
    local_store.blobs.put(BLOB_A)
    names = {store_path_name(i, "a-fairly-long-store-path-name-") for i in range(3000)}
    for name in names:
        local_store.path_infos.put(path_info(FileNode(name, b3(BLOB_A), 2)))
    m = mount("-l")
    listed = os.listdir(m.mountpoint)
    assert len(listed) == len(names)
    assert set(map(os.fsencode, listed)) == names


def test_readdir_of_100k_entries(local_store, mount):
    local_store.blobs.put(EMPTY)
    d = Directory(files=tuple(FileNode(b"f%06d" % i, b3(EMPTY), 0) for i in range(100_000)))
    local_store.directories.put(d)
    name = store_path_name(2)
    add_tree(local_store, name, d)
    listed = os.listdir(mount().path(name))
    assert len(listed) == 100_000
    assert sorted(listed) == [f"f{i:06d}" for i in range(100_000)]


def _many_files(store, count: int) -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(7)
    files = {}
    for i in range(count):
        data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70_000, 300_000]))
        store.blobs.put(data)
        files[f"file{i:04d}"] = data
    d = Directory(files=tuple(FileNode(n.encode(), b3(v), len(v)) for n, v in sorted(files.items())))
    store.directories.put(d)
    name = store_path_name(3)
    add_tree(store, name, d)
    return name, files


def _read_all_concurrently(root: Path, files: dict[str, bytes], threads: int) -> list[str]:
    names = list(files)
    wrong: list[str] = []

    def reader(part: list[str]) -> None:
        for n in part:
            try:
                if (root / n).read_bytes() != files[n]:
                    wrong.append(f"{n}: wrong bytes")
            except OSError as exc:
                wrong.append(f"{n}: {exc}")

    pool = [threading.Thread(target=reader, args=(names[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return wrong


def test_16_threads_read_1000_files(local_store, mount):
    name, files = _many_files(local_store, 1000)
    m = mount("--workers", "3")
    assert _read_all_concurrently(m.path(name), files, 16) == []


def test_sigkill_of_a_worker_loses_no_read(local_store, mount):
    name, files = _many_files(local_store, 400)
    m = mount("--workers", "3", expect_errors=True)
    assert m.proc is not None
    time.sleep(0.5)
    assert len(descendants(m.proc.pid)) >= 4  # the fork server and three workers

    def killer() -> None:
        for _ in range(3):
            time.sleep(0.15)
            os.kill(descendants(m.proc.pid)[-1], signal.SIGKILL)  # the newest worker

    k = threading.Thread(target=killer)
    k.start()
    wrong = _read_all_concurrently(m.path(name), files, 8)
    k.join()
    assert wrong == []
    assert stats(m.mountpoint)["fetcher"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_unmount_and_exit_0(local_store, mount, sig):
    Populate(local_store).blob_a()
    m = mount()
    assert m.path(BLOB_A_NAME).read_bytes() == BLOB_A
    assert m.stop(sig) == 0
    assert not is_mounted(m.mountpoint)
    assert not [p for p in descendants(m.proc.pid)]


def test_stop_while_a_file_is_open(local_store, mount):
    """A busy mount is detached, given a grace period, then its connection aborted."""
    Populate(local_store).blob_a()
    m = mount()
    f = open(m.path(BLOB_A_NAME), "rb")  # noqa: SIM115
    assert f.read() == BLOB_A
    started = time.monotonic()
    assert m.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 15
    assert not is_mounted(m.mountpoint)
    assert "aborting the FUSE connection" in m.log()
    with pytest.raises(OSError) as exc:
        f.close()  # the connection is gone
    assert exc.value.errno == errno.ENOTCONN


def test_external_unmount_ends_the_process(local_store, mount):
    m = mount()
    subprocess.run(["fusermount", "-u", str(m.mountpoint)], check=True)
    assert m.proc.wait(20) == 0
    assert "was unmounted; exiting" in m.log()
    assert "stopped by" not in m.log()


def test_forget_shrinks_the_inode_table(local_store, mount):
    subdirs = []
    for i in range(200):
        # distinct symlink targets: distinct identities, so one inode each
        sub = Directory(symlinks=tuple(SymlinkNode(b"l%02d" % j, b"t%d-%d" % (i, j)) for j in range(20)))
        local_store.directories.put(sub)
        subdirs.append(DirectoryNode(b"d%03d" % i, sub.digest(), 40))
    top = Directory(directories=tuple(subdirs))
    local_store.directories.put(top)
    name = store_path_name(4)
    add_tree(local_store, name, top)
    m = mount()
    start = stats(m.mountpoint)["vfs"]["inodes"]
    peaks = []
    for _ in range(3):
        subprocess.run(["find", str(m.path(name))], check=True, capture_output=True)
        # O_PATH descriptors pin every entry's dentry, so the peak is counted before any
        # dentry can be dropped (other processes on a shared machine drop caches too)
        pinned = [os.open(p, os.O_PATH | os.O_NOFOLLOW) for p in m.path(name).rglob("*")]
        try:
            peaks.append(stats(m.mountpoint)["vfs"]["inodes"])
        finally:
            for fd in pinned:
                os.close(fd)
        Path("/proc/sys/vm/drop_caches").write_text("2")
        time.sleep(0.3)
    after = stats(m.mountpoint)["vfs"]["inodes"]
    assert peaks[0] > 4000
    assert after <= start + 50, (start, peaks, after)
    assert max(peaks) <= peaks[0] + 50  # repeated walks do not keep growing


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvixmount.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")
def test_bad_mountpoints_exit_2(tmp_path, local_store, store_dir):
    missing = _run_cli(str(tmp_path / "nope"), "--store-dir", str(store_dir))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    busy = _run_cli(str(full), "--store-dir", str(store_dir))
    assert busy.returncode == 2 and "not empty" in busy.stderr
    with Mount(tmp_path / "mnt", store_dir) as m:
        again = _run_cli(str(m.mountpoint), "--store-dir", str(store_dir))
        assert again.returncode == 2 and "already a mountpoint" in again.stderr


def test_missing_store_is_a_clear_error(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = _run_cli(str(tmp_path / "mnt"), "--store-dir", str(tmp_path / "no-store"))
    # A usage error, found before any worker starts: one line naming the flag.
    assert result.returncode == 2
    assert result.stderr == (f"tvixmount: error: --store-dir: no embedded store in {tmp_path / 'no-store'} "
                             "(fill it with `tvixstore import` first, or give the blob service's address)\n")
    assert not is_mounted(tmp_path / "mnt")


def test_bad_flags_exit_2(tmp_path):
    result = _run_cli(str(tmp_path), "--workers", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_write_operations_are_refused(local_store, mount):
    Populate(local_store).directory_complicated()
    from tests.fs_fixtures import DIRECTORY_COMPLICATED_NAME as D

    m = mount()
    attempts = [
        lambda: os.mkdir(m.path(D, "new")),
        lambda: os.unlink(m.path(D, ".keep")),
        lambda: os.rename(m.path(D, "aa"), m.path(D, "bb")),
        lambda: os.chmod(m.path(D, ".keep"), 0o777),
        lambda: os.symlink("x", m.path(D, "link")),
        lambda: open(m.path(D, ".keep"), "r+b"),  # noqa: SIM115
        lambda: os.truncate(m.path(D, ".keep"), 0),
        lambda: os.setxattr(m.path(D, ".keep"), "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
