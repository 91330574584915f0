"""Small blobs packed together: ``packs/<16 hex>``, append-only files of many blobs each.

Why: a blob file per small file makes a cold ``tar`` of a closure open
~20,000 files and an import create as many (docs/performance.md, "Small
blobs in packs"). A blob of at most ``PACKED_MAX`` bytes is instead
appended to a pack, and its row says where: ``(pack, pack_offset)`` beside
its size. The bytes of a pack are never rewritten; nothing but its rows
says what is in it, so bytes without a row are dead weight, never served.

Writers. Each writer process appends to one pack of its own, held with an
exclusive ``flock`` for as long as its store handle is open (``PackAppender``):
two writers never append to one file, so appends need no further locking
between processes, and a pack has one writer at a time. Another writer
that later takes a pack whose writer died (the lock goes with the process)
first cuts it back to the end of its last recorded blob: that reclaims
what a crash left between append and commit. Durability is the store's
usual rule (blobs.py): a row is committed only after its bytes are
durable, by the batch's one ``syncfs`` (or an ``fdatasync`` of the pack).
A writer keeps every pack it appended to locked until its handle closes,
so none of its bytes still waiting for a batch's commit can be cut back.

Readers. ``plan_reads`` turns the wanted blobs of one pack into few
``pread`` calls: blobs placed near each other (an import appends a tree's
small files in the order it walks them, so a directory's files sit
together) are read in one call when the gap between them is small.

Why 64 KiB: it is the mount's small-blob bound (smallblobs.py fetches
blobs of at most 64 KiB ahead in batches), so every blob a batch asks for
is packed and a batch costs an open per pack instead of one per blob; it
is at most one segment (the store's chunk size is at least 4 KiB; a store
with smaller chunks packs only blobs of one chunk), so a packed blob is
verified whole by its own digest; and bigger files are read in 128 KiB
requests anyway, where one open per file is a small part of the cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .db import Database
from .layout import fsync_dir

log = logging.getLogger(__name__)

PACKED_MAX = 64 * 1024
# A writer starts a new pack past this size: bounds what one damaged or lost
# file takes with it, and how much one takeover scans for its recorded end.
PACK_MAX_BYTES = 512 << 20
# Two wanted blobs of one pack are read in one pread when at most this many
# unwanted bytes lie between them, and one pread covers at most READ_SPAN:
# reading 64 KiB more costs less than a second system call and disk seek.
READ_GAP = 64 * 1024
READ_SPAN = 1 << 20


def pack_name(pack: int) -> str:
    return f"{pack:016x}"


def pack_path(packs_dir: str, pack: int) -> str:
    return f"{packs_dir}/{pack_name(pack)}"


def parse_pack_name(name: str) -> int | None:
    if len(name) != 16:
        return None
    try:
        return int(name, 16)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Read:
    """One pread of a pack: ``[start, end)``, and the wanted items it covers (their indexes)."""

    start: int
    end: int
    items: tuple[int, ...]


def plan_reads(ranges: list[tuple[int, int, int]], gap: int = READ_GAP, span: int = READ_SPAN) -> list[Read]:
    """Group ``(offset, size, index)`` ranges of one pack into few reads, in file order."""
    reads: list[Read] = []
    start = end = -1
    items: list[int] = []
    for offset, size, index in sorted(ranges):
        if items and offset - end <= gap and max(end, offset + size) - start <= span:
            end = max(end, offset + size)
            items.append(index)
            continue
        if items:
            reads.append(Read(start, end, tuple(items)))
        start, end, items = offset, offset + size, [index]
    if items:
        reads.append(Read(start, end, tuple(items)))
    return reads


class PackAppender:
    """This process's packs of one store: appends small blobs, one writer per pack.

    ``prepare`` runs once before the first pack is taken (it makes the store
    able to record packed rows and marks its format, layout.py). Thread-safe.
    """

    def __init__(self, packs_dir: str, db: Database, where: str, prepare: Callable[[], None]) -> None:
        self.packs_dir = packs_dir
        self._db = db
        self._where = where
        self._prepare = prepare
        self._lock = threading.Lock()
        self._fd = -1
        self._pack = 0
        self._end = 0
        self._held: list[int] = []  # every pack fd this process appended to, locked until close

    def append(self, data: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Append one blob's bytes (not yet durable: see ``sync``); its (pack, offset)."""
        with self._lock:
            if self._fd < 0 or (self._end and self._end + len(data) > PACK_MAX_BYTES):
                self._next_pack()
            offset = self._end
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            self._end += len(view)
            return self._pack, offset

    def sync(self) -> None:
        """fdatasync every pack appended to (where the filesystem cannot be synced at once)."""
        with self._lock:
            held = list(self._held)
        for fd in held:
            os.fdatasync(fd)

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            self._fd = -1
        for fd in held:
            os.close(fd)

    def _next_pack(self) -> None:
        if not self._held:
            self._prepare()
        for name in sorted(os.listdir(self.packs_dir)):
            pack = parse_pack_name(name)
            if pack is not None and pack != self._pack and self._take(pack):
                return
        while not self._create():
            pass

    def _take(self, pack: int) -> bool:
        """Lock an existing pack that no writer holds and that has room; cut back an unrecorded tail."""
        path = pack_path(self.packs_dir, pack)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        size = os.fstat(fd).st_size
        if size >= PACK_MAX_BYTES:
            os.close(fd)
            return False
        row = self._db.one(f"finding the end of pack {pack_name(pack)}",
                           "SELECT pack_offset + size FROM blobs WHERE pack = ? "
                           "ORDER BY pack_offset DESC LIMIT 1", (pack,))
        end = (row[0] if row else None) or 0
        if size > end:
            log.info("store %s: pack %s: cutting back %d unrecorded bytes a crashed writer left",
                     self._where, pack_name(pack), size - end)
            os.ftruncate(fd, end)
        self._use(fd, pack, end)
        return True

    def _create(self) -> bool:
        pack = secrets.randbits(63)
        path = pack_path(self.packs_dir, pack)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another writer took the empty pack first: it is theirs
            os.close(fd)
            return False
        fsync_dir(self.packs_dir)  # rows will name it: its name must survive a crash
        log.debug("store %s: new pack %s", self._where, pack_name(pack))
        self._use(fd, pack, 0)
        return True

    def _use(self, fd: int, pack: int, end: int) -> None:
        self._fd, self._pack, self._end = fd, pack, end
        self._held.append(fd)


@dataclass(frozen=True, slots=True)
class PackUsage:
    """One pack file: its size and how many of its bytes rows refer to."""

    name: str
    size: int
    blobs: int
    referenced: int

    @property
    def unreferenced(self) -> int:
        return max(self.size - self.referenced, 0)


def pack_usage(packs_dir: str, db: Database, has_columns: bool) -> list[PackUsage]:
    """Every pack file with its recorded bytes (what ``tvixstore verify`` reports as dead weight)."""
    counts: dict[int, tuple[int, int]] = {}
    if has_columns:
        rows = db.all("summing packed blobs",
                      "SELECT pack, COUNT(*), SUM(size) FROM blobs WHERE pack IS NOT NULL GROUP BY pack")
        counts = {int(pack): (int(n), int(total)) for pack, n, total in rows}
    out = []
    with contextlib.suppress(FileNotFoundError), os.scandir(packs_dir) as entries:
        for entry in entries:
            pack = parse_pack_name(entry.name)
            if pack is None:
                continue
            blobs, referenced = counts.get(pack, (0, 0))
            out.append(PackUsage(entry.name, entry.stat().st_size, blobs, referenced))
    return sorted(out, key=lambda u: u.name)
