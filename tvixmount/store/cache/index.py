"""The blob cache's directory and its index, shared by every worker process.

Layout of a cache directory (nothing outside these names is ever touched)::

    index.sqlite3           one row per cached blob: size, segment digests, last use
    blobs/<2 hex>/<64 hex>  the blob's bytes, complete
    tmp/                    fills in progress, and files on their way out

Why an index and not just files with their mtime/atime: a cached blob is
only useful if it can be checked piece by piece on read, so every blob
needs its per-segment digests kept somewhere (a sidecar per blob doubles
the files and the renames); eviction needs the total size and the oldest
entries without walking a directory of 100 000 files in every process;
and atime is unreliable (``noatime``/``relatime`` mounts). sqlite in WAL
mode gives several processes one agreed view: readers never wait, writers
take turns (``busy_timeout``), and the running totals are kept by triggers
in the same transactions as the rows.

The one invariant: **a row exists only while its file is in place.**
Both sides change the final names only while holding sqlite's write lock
(``BEGIN IMMEDIATE``): a commit renames its temp file in and inserts the
row in one transaction; eviction and drops delete rows and rename the
files away into ``tmp/`` in one transaction, and unlink them after it.
So a fill never meets an eviction half way. A crash between a rename and
the COMMIT leaves a file without a row: invisible, and replaced by the
next fill of that blob. A row whose file has gone anyway (someone cleaned
the directory) is a miss, and the row is dropped when that is noticed.

Nothing is fsynced: a file torn by a power cut fails verification on use
(service.py) and is dropped, which is what a cache can afford.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...castore.nodes import b3_text
from ...errors import InvalidArgument, InvalidData, Unavailable
from .. import sqlite
from ..segments import SEGMENT, Outboard

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0  # writers only; a cache that waits longer than this is not worth waiting for
STALE_TEMP_S = 3600.0  # temp files older than this belong to a dead process
EVICT_BATCH = 256  # rows removed per write transaction (bounds how long other writers wait)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries (
    digest    BLOB    NOT NULL PRIMARY KEY,  -- blake3 of the whole blob
    size      INTEGER NOT NULL,
    segments  BLOB    NOT NULL,              -- 32-byte blake3 per SEGMENT; empty for <= 1 segment
    last_used REAL    NOT NULL               -- unix time, refreshed at most every touch interval
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used);
CREATE TABLE IF NOT EXISTS totals (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached blob as the index records it."""

    digest: bytes
    size: int
    segments: bytes  # DIGEST_LEN bytes per SEGMENT-long piece; empty when there is at most one
    last_used: float

    @property
    def outboard(self) -> Outboard:
        return Outboard(self.digest, self.size, SEGMENT, self.segments)

    def well_formed(self) -> bool:
        return self.size > 0 and self.outboard.well_formed()


class CacheIndex:
    """One process's handle on a cache directory; thread-safe, never shared across a fork."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(os.path.abspath(directory))
        self.blobs_dir = self.directory / "blobs"
        self.tmp_dir = self.directory / "tmp"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._prepare_directory()
        self._conn = self._connect()
        self._sweep_temp()

    # -- set-up --------------------------------------------------------------

    def _prepare_directory(self) -> None:
        """Create what is missing and prove we can write there, or say clearly why not."""
        where = f"blob cache directory {self.directory}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.blobs_dir.mkdir(exist_ok=True)
            self.tmp_dir.mkdir(exist_ok=True)
        except FileExistsError:
            raise InvalidArgument(f"{where}: a path component exists and is not a directory") from None
        except OSError as exc:
            raise InvalidArgument(f"{where}: cannot create it: {exc.strerror}") from None
        if not self.directory.is_dir():
            raise InvalidArgument(f"{where}: not a directory")
        try:  # os.access says yes to root even on a read-only filesystem: really write
            fd, path = self._temp_file("probe")
            os.close(fd)
            os.unlink(path)
        except OSError as exc:
            raise InvalidArgument(f"{where}: not writable: {exc.strerror}") from None

    def _connect(self) -> sqlite3.Connection:
        """Open the index, making it WAL with its schema on first use.

        Every worker of a mount opens the index at the same moment, and the
        losers of the switch to WAL are told "locked" at once: they wait a
        moment and look again (``sqlite.retry_busy``; WAL, once set, is kept
        in the file, and the schema statements are idempotent).
        """
        path = self.directory / INDEX_FILE
        try:
            conn = sqlite.connect(path, "rwc", BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise InvalidArgument(f"blob cache index {path}: cannot open it: {exc}") from None
        try:
            sqlite.retry_busy(conn, lambda: self._set_up(conn, path), BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            conn.close()
            raise InvalidArgument(
                f"blob cache index {path}: {exc} (a damaged cache can be deleted; it refills)"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _set_up(conn: sqlite3.Connection, path: Path) -> None:
        mode = sqlite.use_wal(conn)
        if mode != "wal":
            raise InvalidArgument(f"blob cache index {path}: sqlite refused WAL mode (got {mode})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise InvalidArgument(
                f"blob cache index {path} has schema version {version}, this tvixmount knows "
                f"{SCHEMA_VERSION}; point --cache-dir elsewhere or delete that directory"
            )
        sqlite.apply_schema(conn, _SCHEMA)

    def _sweep_temp(self) -> None:
        """Remove temp files a crashed process left (old enough that no fill still writes them)."""
        cutoff = time.time() - STALE_TEMP_S
        with contextlib.suppress(OSError), os.scandir(self.tmp_dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    # -- paths ---------------------------------------------------------------

    def path_for(self, digest: bytes) -> Path:
        text = digest.hex()
        return self.blobs_dir / text[:2] / text

    def _temp_file(self, label: str) -> tuple[int, Path]:
        path = self.tmp_dir / f"{label}-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    def new_temp(self, digest: bytes) -> tuple[int, Path]:
        """A fresh private temp file for filling ``digest`` (OSError if the disk says no)."""
        return self._temp_file("fill-" + digest.hex()[:16])

    # -- sqlite --------------------------------------------------------------

    @contextlib.contextmanager
    def _db(self, what: str) -> Iterator[sqlite3.Connection]:
        if os.getpid() != self._pid:
            raise Unavailable(f"{what}: blob cache {self.directory} was opened in process {self._pid}, "
                              f"used in {os.getpid()}; open it after fork")
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise Unavailable(f"{what}: blob cache index in {self.directory}: {exc}") from None

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding sqlite's write lock from BEGIN to COMMIT."""
        with self._db(what) as conn, sqlite.write_transaction(conn):
            yield conn

    def lookup(self, digest: bytes) -> Entry | None:
        with self._db(f"looking up blob {b3_text(digest)}") as conn:
            row = conn.execute("SELECT size, segments, last_used FROM entries WHERE digest = ?",
                               (digest,)).fetchone()
        if row is None:
            return None
        entry = Entry(digest, int(row[0]), bytes(row[1]), float(row[2]))
        if not entry.well_formed():
            raise InvalidData(f"blob cache entry {b3_text(digest)} is damaged: size {entry.size}, "
                              f"{len(entry.segments)} bytes of segment digests")
        return entry

    def touch(self, digest: bytes, now: float) -> None:
        with self._db(f"marking blob {b3_text(digest)} used") as conn:
            conn.execute("UPDATE entries SET last_used = ? WHERE digest = ?", (now, digest))

    def totals(self) -> tuple[int, int]:
        """(entries, bytes) held, as all processes see them."""
        with self._db("reading blob cache totals") as conn:
            entries, size = conn.execute("SELECT entries, bytes FROM totals WHERE id = 0").fetchone()
        return int(entries), int(size)

    def commit(self, entry: Entry, temp: Path) -> tuple[bool, int]:
        """Move a complete fill into place and record it: (stored, total bytes now).

        ``stored`` is False when another process cached the blob first; the
        temp file is then removed and its copy stays.
        """
        final = self.path_for(entry.digest)
        final.parent.mkdir(exist_ok=True)
        with self._write(f"caching blob {b3_text(entry.digest)}") as conn:
            present = conn.execute("SELECT 1 FROM entries WHERE digest = ?", (entry.digest,)).fetchone()
            if present is None:
                os.rename(temp, final)
                conn.execute("INSERT INTO entries (digest, size, segments, last_used) VALUES (?, ?, ?, ?)",
                             (entry.digest, entry.size, entry.segments, entry.last_used))
            total = int(conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])
        if present is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return present is None, total

    def drop(self, digest: bytes, opened: os.stat_result | None) -> None:
        """Forget a broken entry and its file.

        With ``opened`` (the fstat of the file found broken), only that file
        goes: if another process has meanwhile replaced it with a fresh
        fill, the fresh one and its row stay.
        """
        final = self.path_for(digest)
        doomed: Path | None = None
        with self._write(f"dropping cached blob {b3_text(digest)}") as conn:
            try:
                now = os.stat(final)
            except FileNotFoundError:
                now = None
            if opened is not None and now is not None and (now.st_ino, now.st_dev) != (
                    opened.st_ino, opened.st_dev):
                return
            conn.execute("DELETE FROM entries WHERE digest = ?", (digest,))
            if now is not None:
                doomed = self._move_away(final, "drop")
        _unlink_quietly(doomed)

    def evict(self, limit: int, target: int) -> tuple[int, int]:
        """If over ``limit`` bytes, remove least recently used entries down to ``target``.

        Returns (entries removed, bytes removed). Readers that already opened
        an evicted file keep reading it (the file is renamed, then
        unlinked; open descriptors keep its bytes).
        """
        removed = removed_bytes = 0
        while True:
            doomed: list[Path] = []
            with self._write("evicting from the blob cache") as conn:
                total = int(conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()[0])
                if total <= (limit if removed == 0 else target):
                    return removed, removed_bytes
                rows = conn.execute("SELECT digest, size FROM entries ORDER BY last_used LIMIT ?",
                                    (EVICT_BATCH,)).fetchall()
                victims = []
                for digest, size in rows:
                    if total <= target:
                        break
                    victims.append(bytes(digest))
                    total -= int(size)
                    removed_bytes += int(size)
                conn.executemany("DELETE FROM entries WHERE digest = ?", [(d,) for d in victims])
                for digest in victims:
                    moved = self._move_away(self.path_for(digest), "evict")
                    if moved is not None:
                        doomed.append(moved)
                removed += len(victims)
            for path in doomed:
                _unlink_quietly(path)
            if not rows or total <= target:
                return removed, removed_bytes

    def _move_away(self, final: Path, label: str) -> Path | None:
        """Rename a final file into tmp/ (inside a write transaction); None if it is gone."""
        away = self.tmp_dir / f"{label}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            os.rename(final, away)
        except FileNotFoundError:
            return None
        return away

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child never closes what its parent holds
        with self._lock:
            self._conn.close()


def _unlink_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("removing %s from the blob cache failed: %s", path, exc)
