"""sqlite as the store's two on-disk indexes use it: connections, WAL, busy moments, write transactions.

The embedded store's database (embedded/db.py) and the blob cache's index
(cache/index.py) are each one sqlite file that every worker process of a
mount opens at once, while an import or a fill writes. Both want the same
things, so both get them here:

* WAL journal: readers never wait for a writer, nor it for them, and
  ``synchronous=NORMAL`` is durable enough with WAL (a power cut can lose
  the last transactions, never corrupt the file).
* Autocommit connections (``isolation_level=None``): a transaction is
  exactly the ``BEGIN``/``COMMIT`` the code says, taken with
  ``write_transaction``. Connections may move between threads; their
  owners lock or pool them.
* Busy moments: every connection waits ``busy_timeout`` for the write
  lock. Switching a new file to WAL takes an exclusive lock for which
  sqlite does not call its busy handler, so processes opening a new file
  together get "database is locked" at once; ``retry_busy`` tries again
  for them.

sqlite errors are left to the caller, which names its file and chooses
the tvixmount error (a damaged cache index is not a damaged store).
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def connect(path: Path, mode: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection to ``path`` opened ``mode`` ("ro", "rw" or "rwc": create)."""
    target = "file:" + urllib.parse.quote(str(path)) + "?mode=" + mode
    conn = sqlite3.connect(
        target,
        uri=True,
        timeout=busy_timeout,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # a pooled connection moves between threads
        cached_statements=64,
    )
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        conn.close()
        raise
    return conn


def use_wal(conn: sqlite3.Connection) -> str:
    """Put the file in WAL mode (it stays so); the journal mode it has now ("wal" unless refused)."""
    row = conn.execute("PRAGMA journal_mode").fetchone()
    if not row or str(row[0]).lower() != "wal":
        row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    return str(row[0]).lower() if row else "unknown"


def apply_schema(conn: sqlite3.Connection, schema: str) -> None:
    """Run ``schema`` (idempotent statements) in one write transaction."""
    conn.executescript("BEGIN IMMEDIATE;" + schema + "COMMIT;")


def retry_busy(conn: sqlite3.Connection, action: Callable[[], T], patience: float) -> T:
    """``action()``, tried again while sqlite answers locked/busy at once, for ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            time.sleep(random.uniform(0.01, 0.05))


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on ``conn``, rolled back on any exception.

    IMMEDIATE takes sqlite's write lock at BEGIN (waiting in the busy
    handler), so a transaction never fails half-way for want of it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
