"""The embedded store's directory layout, its format marker, and opening it.

::

    <store>/
      tvixmount-store        format marker: "tvixmount-store", format=2, chunk_size=262144
      store.sqlite (-wal, -shm)   blob metadata, directories, path infos (db.py)
      blobs/<2 hex>/<64 hex> one file per blob bigger than 64 KiB, named by its blake3 digest
      packs/<16 hex>         small blobs appended one after another (packs.py)
      tmp/                   blobs being written (same filesystem, so rename is atomic)

The marker is written last when a store is created, so a directory with a
marker always has its tables. Readers never create anything: a missing
store is a clear error telling the operator to import first. Writers pass
``create=True`` (``local:///path?create=1``).

Formats. ``format=1``: every blob is a file under ``blobs/``. ``format=2``:
blobs may also be packed; the blobs table has the ``pack`` and
``pack_offset`` columns (NULL for a blob in its own file). This tvixmount
reads both and creates format 2. A format-1 store stays format 1 until
a writer first packs a blob: that writer adds the columns, then rewrites
the marker to ``format=2`` (durably), and only then appends to a pack
and records the row. A tvixmount from before packs reads only format 1
and refuses a format-2 store at open with "has format 2; this tvixmount
reads format 1", so it never meets a packed row it would take for a
missing file. (One that opened the store while it was still format 1 and
keeps it open, a long-lived mount, answers EIO for blobs packed later:
no wrong bytes, and a remount says why.) Big blobs stay one file each in
every format, so the upgrade rewrites nothing.

All services opened on one directory in one process share one
``StoreHandle`` (one connection pool, one blob-metadata cache, one pack
appender); it is reference-counted and closed with the last service. A
handle belongs to the process that opened it: see db.py on fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InvalidArgument, InvalidData, NotFound, Unavailable
from ..segments import SEGMENT
from .db import Database

if TYPE_CHECKING:
    from .packs import PackAppender

log = logging.getLogger(__name__)

FORMAT_FILE = "tvixmount-store"
FORMAT_MAGIC = "tvixmount-store"
FORMAT_VERSION = 2  # what this tvixmount creates (and upgrades a store to when it packs)
READ_FORMATS = (1, 2)
DB_FILE = "store.sqlite"
BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
PACKS_DIR = "packs"
# New stores; a store keeps the size its marker names (why 256 KiB: segments.py).
DEFAULT_CHUNK_SIZE = SEGMENT
_OUR_NAMES = {
    FORMAT_FILE, BLOBS_DIR, TMP_DIR, PACKS_DIR, DB_FILE, *(DB_FILE + s for s in ("-wal", "-shm", "-journal"))
}
_HINT = "run `tvixstore import` first, or open it for writing with local://<dir>?create=1"


class StoreHandle:
    """One open embedded store: its paths, database and settings."""

    def __init__(self, root: Path, chunk_size: int, version: int) -> None:
        self.root = root
        self.where = str(root)
        self.chunk_size = chunk_size
        self.version = version
        self.blobs_dir = root / BLOBS_DIR
        self.tmp_dir = root / TMP_DIR
        self.packs_dir = f"{root}/{PACKS_DIR}"
        self.db = Database(root / DB_FILE, self.where)
        self.pid = os.getpid()
        self.refs = 0
        self.temp_swept = False
        self.packed_rows = False  # whether the blobs table has the pack columns (set at open)
        self._appender: PackAppender | None = None
        self._appender_lock = threading.Lock()

    def appender(self) -> PackAppender:
        """This process's ``packs.PackAppender`` for the store, made on first use."""
        with self._appender_lock:
            if self._appender is None:
                from .packs import PackAppender  # packs.py imports this module

                self._appender = PackAppender(self.packs_dir, self.db, self.where, self._enable_packs)
            return self._appender

    def _enable_packs(self) -> None:
        """Before the first pack: the columns, then the marker says format 2 (the module doc)."""
        self.db.add_pack_columns()
        self.packed_rows = True
        os.makedirs(self.packs_dir, exist_ok=True)
        if self.version < FORMAT_VERSION:
            log.info("store %s: upgrading to format %d (small blobs in packs)", self.where, FORMAT_VERSION)
            fsync_dir(self.root)
            _write_marker(self.root, self.chunk_size)
            self.version = FORMAT_VERSION

    def refresh_packed_rows(self) -> bool:
        """Whether another process added the pack columns since open (then read them from now on)."""
        if not self.packed_rows and self.db.has_pack_columns():
            self.packed_rows = True
        return self.packed_rows

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
        if self._appender is not None:
            self._appender.close()
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
        version, chunk_size = _read_marker(marker)
    except OSError as exc:
        raise Unavailable(f"store {root}: cannot open: {exc}") from None
    handle = StoreHandle(root, chunk_size, version)
    try:
        handle.db.check_schema()
        handle.packed_rows = handle.db.has_pack_columns()
    except BaseException:
        handle.db.close()
        raise
    log.debug("opened embedded store %s (chunk size %d)", root, chunk_size)
    return handle


def _read_marker(marker: Path) -> tuple[int, int]:
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
    if version not in READ_FORMATS:
        raise InvalidData(
            f"store {marker.parent} has format {version}; this tvixmount reads formats "
            f"{' and '.join(map(str, READ_FORMATS))}"
        )
    if not 4096 <= chunk_size <= 64 * 1024 * 1024 or chunk_size % 4096:
        raise InvalidData(
            f"store marker {marker}: chunk_size {chunk_size} is not a multiple of 4096 in range"
        )
    return version, chunk_size


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
    (root / PACKS_DIR).mkdir(exist_ok=True)
    db = Database(root / DB_FILE, str(root), create=True)
    try:
        db.create_schema()
    finally:
        db.close()
    fsync_dir(blobs)  # makes the 256 new entries durable
    fsync_dir(root)
    _write_marker(root, DEFAULT_CHUNK_SIZE)


def _write_marker(root: Path, chunk_size: int) -> None:
    """Write (or replace) the marker durably, saying this tvixmount's format."""
    text = f"{FORMAT_MAGIC}\nformat={FORMAT_VERSION}\nchunk_size={chunk_size}\n"
    temp = root / f".{FORMAT_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
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
