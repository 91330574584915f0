"""The embedded store's sqlite database: connections, transactions, errors.

One database file per store holds every small thing (blob metadata with the
per-chunk digests, directories, path infos); blob contents live in files
beside it (blobs.py). Many worker processes read while one import
writes, hence:

* WAL journal, connections and write transactions as ``store/sqlite.py``
  makes them for both on-disk indexes; here a transaction lost to a power
  cut only means a blob file that the next import re-registers.
* A small pool of connections per ``Database``, checked out per operation,
  so one service object can serve several threads; no connection is held
  between the pages of a long listing, so a slow reader never pins the WAL.
* ``busy_timeout`` for the moments two writers meet.
* Fork: connections must never cross a fork (sqlite's locks are per
  process). A ``Database`` remembers its pid and refuses to work in a
  child; open the store after forking. A child never closes what it
  inherited either (see ``Database.abandon``).

Every sqlite error leaves this module as a tvixmount error naming the store
directory: busy/locked and I/O problems are ``Unavailable``, a damaged file
is ``InvalidData``, a read-only file is ``ReadOnly``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from ...errors import InvalidData, ReadOnly, TvixError, Unavailable
from .. import sqlite

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
_MAX_IDLE = 8  # idle connections kept per Database

# A writer taking a pack asks where its last recorded blob ends (packs.py):
# without this index that is a scan of every row, chunk lists included.
# Partial: rows of blobs in their own files do not pay for it.
PACK_INDEX = "CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack, pack_offset) WHERE pack IS NOT NULL;"

# Rowid tables (not WITHOUT ROWID): directory rows and chunk lists can be
# large, and sqlite keeps large values out of the b-tree only in rowid tables.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS blobs (
    digest     BLOB    NOT NULL PRIMARY KEY,  -- blake3 of the whole contents
    size       INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,              -- segment length the chunk digests cover
    chunks     BLOB    NOT NULL,              -- 32-byte blake3 per segment; empty for <= 1 segment
    pack       INTEGER,                       -- packs/<16 hex> holding it; NULL: its own file
    pack_offset INTEGER                       -- where in that pack it starts
);
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB NOT NULL PRIMARY KEY,         -- blake3 of data
    data   BLOB NOT NULL                      -- canonical Directory encoding
);
CREATE TABLE IF NOT EXISTS path_infos (
    digest BLOB NOT NULL PRIMARY KEY,         -- 20-byte store path digest
    data   BLOB NOT NULL                      -- encoded tvix.store.v1.PathInfo
);
{PACK_INDEX}
PRAGMA user_version = {SCHEMA_VERSION};
"""

# sqlite primary result codes (extended codes keep them in the low byte).
_PERM, _BUSY, _LOCKED, _NOMEM, _READONLY = 3, 5, 6, 7, 8
_IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 10, 11, 13, 14, 26


def translate(exc: sqlite3.Error, where: str, what: str) -> TvixError:
    """The tvixmount error for a sqlite failure while doing ``what`` in ``where``."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = f"{what}: store database in {where}: {exc}"
    if code in (_BUSY, _LOCKED):
        return Unavailable(f"{text} (still locked after {BUSY_TIMEOUT_S:.0f}s; another writer?)")
    if code in (_CORRUPT, _NOTADB):
        return InvalidData(f"{text} (the database file is damaged)")
    if code == _READONLY:
        return ReadOnly(f"{text} (no write access for this user)")
    if code in (_IOERR, _FULL, _CANTOPEN, _PERM, _NOMEM):
        return Unavailable(text)
    if isinstance(exc, sqlite3.OperationalError):
        return Unavailable(text)
    return InvalidData(text)


class Database:
    """Connections to one store's sqlite file, usable from several threads."""

    def __init__(self, path: Path, where: str, create: bool = False) -> None:
        self.path = path
        self._create = create
        self.where = where  # the store directory, for messages
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._closed = False
        # A store whose file we may not write is opened read-only, so that
        # a user can mount a store that root imported.
        self._read_only = path.exists() and not os.access(path, os.W_OK)
        _LIVE.add(self)

    # -- connections ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        mode = "ro" if self._read_only else "rwc" if self._create else "rw"
        return sqlite.connect(self.path, mode, BUSY_TIMEOUT_S)

    @contextlib.contextmanager
    def connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """A connection for one operation; sqlite errors become tvixmount errors."""
        if os.getpid() != self._pid:
            raise Unavailable(
                f"{what}: store {self.where} was opened in process {self._pid} and used in "
                f"{os.getpid()}; open store services after fork, not before"
            )
        with self._lock:
            if self._closed:
                raise Unavailable(f"{what}: store {self.where} is closed")
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._connect()
                with self._lock:
                    self._all.append(conn)
            yield conn
        except sqlite3.Error as exc:
            raise translate(exc, self.where, what) from None
        finally:
            if conn is not None:
                self._give_back(conn)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # an exception left a transaction open
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """A write transaction (taken at BEGIN, so it cannot deadlock later)."""
        with self.connection(what) as conn, sqlite.write_transaction(conn):
            yield conn

    # -- convenience ---------------------------------------------------------

    def one(self, what: str, sql: str, params: tuple = ()) -> tuple | None:
        with self.connection(what) as conn:
            return conn.execute(sql, params).fetchone()

    def all(self, what: str, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connection(what) as conn:
            return conn.execute(sql, params).fetchall()

    def pages(self, what: str, table: str, columns: str, page: int = 512) -> Iterator[tuple]:
        """Every row of ``table`` ordered by digest, fetched a page at a time.

        Keyset pagination: each page is its own short read, so rows added
        meanwhile may or may not appear, and nothing is pinned while the
        caller works on a row.
        """
        after = b""
        while True:
            rows = self.all(
                what,
                f"SELECT digest, {columns} FROM {table} WHERE digest > ? ORDER BY digest LIMIT ?",
                (after, page),
            )
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    # -- life cycle ------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the tables (idempotent; several importers may race here)."""
        with self.connection("creating the store schema") as conn:
            # Workers of a mount over a new store all create it at once: switching to WAL is
            # "locked" at once for all but one (no busy handler there), so they try again.
            mode = sqlite.retry_busy(conn, lambda: sqlite.use_wal(conn), BUSY_TIMEOUT_S)
            if mode != "wal":
                raise Unavailable(f"store {self.where}: sqlite refused WAL mode (got {mode})")
            sqlite.retry_busy(conn, lambda: sqlite.apply_schema(conn, _SCHEMA), BUSY_TIMEOUT_S)

    def has_pack_columns(self) -> bool:
        """Whether the blobs table can say where a packed blob is (stores made before packs cannot)."""
        with self.connection("reading the store schema") as conn:
            return _has_pack_columns(conn)

    def add_pack_columns(self) -> None:
        """Give a store made before packs the two columns (idempotent; writers may race here).

        Nullable columns added with ALTER TABLE: rows already there read as
        NULL, i.e. "own file", so old rows need no rewrite, and a tvixmount
        that predates packs can still read the table (the format marker is
        what keeps it away from a store with packs, layout.py).
        """
        with self.transaction("adding the pack columns") as conn:
            if not _has_pack_columns(conn):
                conn.execute("ALTER TABLE blobs ADD COLUMN pack INTEGER")
                conn.execute("ALTER TABLE blobs ADD COLUMN pack_offset INTEGER")
            conn.execute(PACK_INDEX)

    def check_schema(self) -> None:
        row = self.one("opening the store", "PRAGMA user_version")
        version = row[0] if row else 0
        if version != SCHEMA_VERSION:
            raise InvalidData(
                f"store {self.where}: database schema version {version}, this tvixmount reads "
                f"version {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        """Close every connection (those in use are closed when handed back)."""
        if os.getpid() != self._pid:
            self.abandon()
            return
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for conn in idle:
                self._all.remove(conn)
        for conn in idle:
            conn.close()

    def abandon(self) -> None:
        """Forget the connections without closing them (in a forked child).

        Closing an inherited sqlite connection could run a checkpoint or
        release state that belongs to the parent; keeping the objects alive
        for the life of the child is the safe choice. Runs without taking
        the lock: another thread of the parent may have held it at fork.
        """
        self._lock = threading.Lock()
        self._closed = True
        _ABANDONED.extend(self._all)
        self._idle, self._all = [], []


def _has_pack_columns(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "pack_offset" for row in conn.execute("PRAGMA table_info(blobs)"))


# Every Database of this process, so a forked child can abandon them all.
_LIVE: weakref.WeakSet[Database] = weakref.WeakSet()
# Inherited connections kept alive (never closed) in a forked child.
_ABANDONED: list[sqlite3.Connection] = []


def _abandon_inherited() -> None:
    for db in list(_LIVE):
        if db._pid != os.getpid():
            db.abandon()


os.register_at_fork(after_in_child=_abandon_inherited)
