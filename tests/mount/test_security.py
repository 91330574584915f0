"""Security properties of a real mount and of the daemon.

* The mount is ro,nosuid,nodev (the kernel's mount options say so) and
  options that would undo that are refused; other users are kept out
  unless ``--allow-other`` was given.
* No path traversal: a stored directory naming an entry with '/', '..',
  '.', NUL or an empty name is EIO as a whole, so no such name ever
  reaches the kernel; a root name is a store path or nothing.
* Symlink targets are handed out verbatim (absolute, '..'-laden, 4095
  bytes) and never followed by the filesystem itself: following is the
  kernel's business, and O_NOFOLLOW sees a link.
* The gRPC daemon binds to loopback by default and says so in its log
  (refusing writes under --read-only is tests/process/test_grpc_daemon.py's
  test_read_only_refuses_every_put).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults import LogCursor, attempt, b3, path_info, read_bytes, serving, store_path
from tests.mounting import FUSE_MISSING, Mount
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.store import StoreUrls, open_store


def mounts(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that mounts: selected by ``-m mount``, skipped where FUSE is missing.

    Not the whole module: the option and daemon checks below mount nothing.
    """
    return pytest.mark.mount(pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")(test))


REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
TOOL = b"#!/bin/sh\necho hi\n"
TREE = store_path("security-tree")
# Entries a directory may not have: each one alone in a directory of its own.
BAD_NAMES = {"slash": b"a/b", "dotdot": b"..", "dot": b".", "nul": b"a\0b", "empty": b"",
             "leading-slash": b"/etc"}
TARGETS = {"absolute": b"/etc/passwd", "escape": b"../../../../../../etc/shadow", "self": b".",
           "long": b"/" + b"x" * 4094, "odd": b"\xff\xfe not utf-8 \n"}


def _world_readable_dir(prefix: str) -> Path:
    """A directory other users can traverse (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def store_dir() -> Iterator[Path]:
    base = _world_readable_dir("tvx-sec-")
    root = base / "store"
    with open_store(StoreUrls.embedded(root, create=True)) as store:
        store.blobs.put(TOOL)
        bad_dirs = []
        for label, name in BAD_NAMES.items():
            data = Directory(files=(FileNode(name, b3(TOOL), len(TOOL)),)).encode()
            bad_dirs.append((label.encode(), data))
        links = Directory(symlinks=tuple(SymlinkNode(k.encode(), v) for k, v in sorted(TARGETS.items())))
        store.directories.put(links)
        nul_target = Directory(symlinks=(SymlinkNode(b"l", b"a\0b"),)).encode()
        bad_dirs.append((b"nul-target", nul_target))
    db = sqlite3.connect(root / "store.sqlite")  # rows no importer would write
    try:
        rows = [(b3(d), d) for _, d in bad_dirs]
        db.executemany("INSERT INTO directories (digest, data) VALUES (?, ?)", rows)
        db.commit()
    finally:
        db.close()
    with open_store(StoreUrls.embedded(root)) as store:
        top = Directory(
            directories=tuple(sorted([DirectoryNode(label, b3(d), 2) for label, d in bad_dirs]
                                     + [DirectoryNode(b"links", links.digest(), 10)], key=lambda n: n.name)),
            files=(FileNode(b"plain", b3(TOOL), len(TOOL)), FileNode(b"tool", b3(TOOL), len(TOOL), True)),
        )
        store.directories.put(top)
        store.path_infos.put(path_info(DirectoryNode(TREE.basename.encode(), top.digest(), 40)))
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def default_mount(store_dir: Path) -> Iterator[Mount]:
    with serving(store_dir.parent / "mnt", store_dir) as m:
        yield m


def _mount_options(mountpoint: Path) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                return set(fields[5].split(",")), set(fields[sep + 3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def _as_nobody(*code: str) -> subprocess.CompletedProcess:
    """Run Python code as user nobody (the system's python: nobody cannot reach the venv)."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    return subprocess.run([python, "-c", "\n".join(code)], capture_output=True, text=True, timeout=30,
                          user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")


# -- mount options -------------------------------------------------------------------------------


@mounts
def test_mounted_ro_nosuid_nodev_and_private_by_default(default_mount: Mount) -> None:
    per_mount, superblock = _mount_options(default_mount.mountpoint)
    assert {"ro", "nosuid", "nodev"} <= per_mount
    assert "allow_other" not in superblock
    top = default_mount.path(TREE.basename)
    mode = os.stat(top / "tool").st_mode
    assert stat.S_IMODE(mode) == 0o555 and not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert stat.S_IMODE(os.stat(top / "plain").st_mode) == 0o444
    assert attempt(lambda: open(top / "plain", "r+b"))[0] == errno.EROFS  # noqa: SIM115
    seen = _as_nobody(f"import os; os.stat({str(top / 'plain')!r})")
    assert seen.returncode != 0 and "Permission denied" in seen.stderr  # other users are kept out


@mounts
def test_allow_other_only_on_request(store_dir: Path) -> None:
    with serving(store_dir.parent / "mnt-shared", store_dir, "--allow-other") as m:
        per_mount, superblock = _mount_options(m.mountpoint)
        assert {"ro", "nosuid", "nodev"} <= per_mount and "allow_other" in superblock
        plain = m.path(TREE.basename, "plain")
        seen = _as_nobody(f"import sys; sys.stdout.buffer.write(open({str(plain)!r}, 'rb').read())")
        assert (seen.returncode, seen.stdout) == (0, TOOL.decode())
        denied = _as_nobody(f"import os; os.listxattr({str(m.mountpoint)!r}); open({str(plain)!r}, 'r+b')")
        assert denied.returncode != 0 and ("Read-only file system" in denied.stderr
                                           or "Permission denied" in denied.stderr)


@pytest.mark.parametrize("option", ["rw", "suid", "dev", "ro,suid"])
def test_options_undoing_ro_nosuid_nodev_are_refused(tmp_path: Path, option: str) -> None:
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([sys.executable, "-m", "tvixmount.cli", str(tmp_path / "mnt"), "--store-dir",
                           str(tmp_path / "none"), "-o", option], capture_output=True, text=True, timeout=30,
                          cwd=REPO)
    assert done.returncode == 2 and "always ro,nosuid,nodev" in done.stderr


# -- names and targets ---------------------------------------------------------------------------


@mounts
@pytest.mark.parametrize("label", [*BAD_NAMES, "nul-target"])
def test_a_directory_with_a_forbidden_name_or_target_is_eio_as_a_whole(default_mount: Mount,
                                                                       label: str) -> None:
    m = default_mount
    cursor = LogCursor(m)
    where = m.path(TREE.basename, label)
    assert attempt(lambda: os.listdir(where))[0] == errno.EIO
    assert attempt(lambda: os.stat(where / "b"))[0] == errno.EIO
    line = cursor.wait_for(r"WARNING .*directory b3:")
    assert re.search(r"name is empty|name is '\.\.?'|contains '/'|contains a NUL byte", line), line
    assert sorted(os.listdir(m.path(TREE.basename))) == sorted([*BAD_NAMES, "nul-target", "links", "plain",
                                                                "tool"])


@mounts
def test_root_names_are_store_paths_or_nothing(default_mount: Mount) -> None:
    m = default_mount
    for name in ("..", ".", "etc", TREE.basename + "/..", TREE.hash_part, "x" * 255):
        assert attempt(lambda name=name: os.stat(m.path(name, "plain")))[0] == errno.ENOENT, name
    assert os.path.realpath(m.path(TREE.basename, "..")) == str(m.mountpoint)  # the kernel's '..', not ours
    assert read_bytes(m.path(TREE.basename, "..", TREE.basename, "plain")) == TOOL


@mounts
def test_symlink_targets_are_verbatim_and_never_followed_by_the_filesystem(default_mount: Mount) -> None:
    links = default_mount.path(TREE.basename, "links")
    assert sorted(os.listdir(links)) == sorted(TARGETS)
    for name, target in TARGETS.items():
        assert os.readlink(os.fsencode(links / name)) == target
        assert stat.S_ISLNK(os.lstat(links / name).st_mode)
        assert os.lstat(links / name).st_size == len(target)
        assert attempt(lambda name=name: os.open(links / name, os.O_RDONLY | os.O_NOFOLLOW))[0] == errno.ELOOP
    # Following is the kernel's, relative to where the link is seen: an absolute
    # target leaves the mount, an escaping one climbs out of it, as on any filesystem.
    assert os.path.realpath(links / "absolute") == "/etc/passwd"
    assert os.path.realpath(links / "self") == str(links)


# -- the daemon ---------------------------------------------------------------------------------


def test_daemon_listens_on_loopback_by_default_and_says_so(tmp_path: Path) -> None:
    """Both loopback addresses, tvix-store's port, no wildcard; in a private network namespace,
    so port 8000 is free whatever else runs here."""
    from tests.netns import MISSING, NetNs

    if MISSING:
        pytest.skip(MISSING)
    log = tmp_path / "daemon.log"
    with NetNs() as ns, open(log, "wb") as out:
        argv = ns.wrap([sys.executable, "-m", "tvixmount.server", "--store-dir", str(tmp_path / "s")])
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while "loopback only" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            listening = ns.listening()
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
    text = log.read_text()
    assert re.search(r"INFO tvixmount\.server(\[\d+\])?: serving .* on \[::1\]:8000 and 127\.0\.0\.1:8000 "
                     r"\(loopback only\)", text), text
    assert "WARNING" not in text
    assert listening == {("::1", 8000), ("127.0.0.1", 8000)}
