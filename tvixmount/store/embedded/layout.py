"""The embedded store's directory layout, its format marker, and opening it.

::

    <store>/
      tvixmount-store        format marker: "tvixmount-store", format=1, chunk_size=262144
      store.sqlite (-wal, -shm)   blob metadata, directories, path infos (db.py)
      blobs/<2 hex>/<64 hex> one file per blob, named by its blake3 digest
      tmp/                   blobs being written (same filesystem, so rename is atomic)

The marker is written last when a store is created, so a directory with a
marker always has its tables. Readers never create anything: a missing
store is a clear error telling the operator to import first. Writers pass
``create=True`` (``local:///path?create=1``).

All services opened on one directory in one process share one
``StoreHandle`` (one connection pool, one blob-metadata cache); it is
reference-counted and closed with the last service. A handle belongs to the
process that opened it: see db.py on fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, InvalidData, NotFound, Unavailable
from ..segments import SEGMENT
from .db import Database

log = logging.getLogger(__name__)

FORMAT_FILE = "tvixmount-store"
FORMAT_MAGIC = "tvixmount-store"
FORMAT_VERSION = 1
DB_FILE = "store.sqlite"
BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
# New stores; a store keeps the size its marker names (why 256 KiB: segments.py).
DEFAULT_CHUNK_SIZE = SEGMENT
_OUR_NAMES = {FORMAT_FILE, BLOBS_DIR, TMP_DIR, DB_FILE, *(DB_FILE + s for s in ("-wal", "-shm", "-journal"))}
_HINT = "run `tvixstore import` first, or open it for writing with local://<dir>?create=1"


class StoreHandle:
    """One open embedded store: its paths, database and settings."""

    def __init__(self, root: Path, chunk_size: int) -> None:
        self.root = root
        self.where = str(root)
        self.chunk_size = chunk_size
        self.blobs_dir = root / BLOBS_DIR
        self.tmp_dir = root / TMP_DIR
        self.db = Database(root / DB_FILE, self.where)
        self.pid = os.getpid()
        self.refs = 0
        self.temp_swept = False

    def blob_path(self, digest: bytes) -> str:
        """``blobs/<2 hex>/<64 hex>`` (a str: pathlib costs ~5 us a call, per blob, on hot paths)."""
        text = digest.hex()
        return f"{self.blobs_dir}/{text[:2]}/{text}"

    def retain(self) -> StoreHandle:
        """Take one more reference (for a service built on an open handle)."""
        with _registry_lock:
            if self.refs <= 0:
                raise Unavailable(f"store {self.where} is closed")
            self.refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the last one closes the database."""
        with _registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            if _registry.get(self.root) is self:
                del _registry[self.root]
        self.db.close()


_registry: dict[Path, StoreHandle] = {}
_registry_lock = threading.Lock()


def _forget_inherited() -> None:
    # The child must open its own handles; the inherited ones are abandoned
    # by db.py's own fork hook.
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def acquire(root: Path, create: bool = False) -> StoreHandle:
    """Open (or with ``create`` make) the store at ``root``; share it within the process."""
    root = Path(os.path.abspath(root))
    with _registry_lock:
        handle = _registry.get(root)
        if handle is not None:
            handle.refs += 1
            return handle
    handle = _open(root, create)
    with _registry_lock:
        existing = _registry.get(root)
        if existing is not None:  # another thread won the race
            existing.refs += 1
            winner = existing
        else:
            handle.refs = 1
            _registry[root] = handle
            return handle
    handle.db.close()
    return winner


def _open(root: Path, create: bool) -> StoreHandle:
    try:
        exists = root.is_dir()
        if not exists and root.exists() and not root.is_dir():  # not made by another creator meanwhile
            raise InvalidArgument(f"store directory {root} exists but is not a directory")
        if not exists:
            if not create:
                raise NotFound(f"store directory {root} does not exist; {_HINT}")
            root.mkdir(parents=True, exist_ok=True)
        marker = root / FORMAT_FILE
        if not marker.exists():
            if not create:
                raise NotFound(
                    f"store directory {root} holds no tvixmount store ({FORMAT_FILE} missing); {_HINT}"
                )
            _initialise(root)
        chunk_size = _read_marker(marker)
    except OSError as exc:
        raise Unavailable(f"store {root}: cannot open: {exc}") from None
    handle = StoreHandle(root, chunk_size)
    try:
        handle.db.check_schema()
    except BaseException:
        handle.db.close()
        raise
    log.debug("opened embedded store %s (chunk size %d)", root, chunk_size)
    return handle


def _read_marker(marker: Path) -> int:
    lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != FORMAT_MAGIC:
        raise InvalidData(
            f"store marker {marker} does not start with {FORMAT_MAGIC!r}; not a tvixmount store"
        )
    fields = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    try:
        version = int(fields.get("format", ""))
        chunk_size = int(fields.get("chunk_size", ""))
    except ValueError:
        raise InvalidData(f"store marker {marker} lacks a numeric format= or chunk_size= line") from None
    if version != FORMAT_VERSION:
        raise InvalidData(
            f"store {marker.parent} has format {version}; this tvixmount reads format {FORMAT_VERSION}"
        )
    if not 4096 <= chunk_size <= 64 * 1024 * 1024 or chunk_size % 4096:
        raise InvalidData(
            f"store marker {marker}: chunk_size {chunk_size} is not a multiple of 4096 in range"
        )
    return chunk_size


def _initialise(root: Path) -> None:
    """Make a new store in ``root`` (empty, or left half-made by a crashed create)."""
    leftover_marker = f".{FORMAT_FILE}."
    strangers = sorted(
        name for name in os.listdir(root) if name not in _OUR_NAMES and not name.startswith(leftover_marker)
    )
    if strangers:
        raise InvalidArgument(
            f"refusing to create a store in {root}: it is not empty and not a tvixmount store "
            f"(holds {', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''})"
        )
    log.info("creating embedded store in %s", root)
    blobs = root / BLOBS_DIR
    blobs.mkdir(exist_ok=True)
    for prefix in range(256):
        (blobs / f"{prefix:02x}").mkdir(exist_ok=True)
    (root / TMP_DIR).mkdir(exist_ok=True)
    db = Database(root / DB_FILE, str(root), create=True)
    try:
        db.create_schema()
    finally:
        db.close()
    fsync_dir(blobs)  # makes the 256 new entries durable
    text = f"{FORMAT_MAGIC}\nformat={FORMAT_VERSION}\nchunk_size={DEFAULT_CHUNK_SIZE}\n"
    temp = root / f".{FORMAT_FILE}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, root / FORMAT_FILE)
    fsync_dir(root)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Any:
    """libc's syncfs(2), or None where this libc has none (Python has no os.syncfs)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def sync_filesystem(path: Path) -> bool:
    """syncfs(2) on the filesystem holding ``path``: everything written to it is durable after.

    One call instead of one fsync per file: the kernel writes back and
    flushes the whole filesystem once. Returns False (having done nothing)
    when the libc or the kernel lacks syncfs, so the caller syncs each file
    instead; raises OSError for a failed writeback (reported by Linux >= 5.8).
    """
    if _syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) == 0:
            return True
        err = ctypes.get_errno()
    finally:
        os.close(fd)
    if err == errno.ENOSYS:
        return False
    raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))


def sync_file(path: str | os.PathLike[str]) -> None:
    """fdatasync one existing file (read-only fd: Linux syncs the inode's data all the same)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
