"""TvixOperations driven in-process: the FUSE edge without a kernel, a mount, root or /dev/fuse.

The harness does what llfuse.main does around a handler and nothing more:
the calling thread holds llfuse's global lock (handlers that wait for the
store release it with ``llfuse.lock_released``, which works outside
llfuse.main as long as this thread holds the lock), a ``RequestContext``
stands in for the kernel's caller, and generator handlers (readdir) are
iterated as llfuse iterates them, possibly stopping early when the reply
buffer is full. The store behind it is ``memory://`` through a
``LocalFetcher``, so every answer went through the same worker handlers a
pool worker runs.

``RecordingFetcher`` sits between the two: it counts the store requests
by op (a test can say "this lookup cost no request"), notes whether the
calling thread still held llfuse's lock (it never may: a FUSE thread
waiting for a worker with the lock held stops the whole mount), and can
fail an op with a given error.

Note on llfuse 1.5: ``llfuse.lock.acquire(timeout=t)`` truncates ``t`` to
whole seconds, and 0 means "wait forever"; nothing here waits for the lock
with a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import llfuse
import pytest

from tvixmount.castore.nodes import b3_text
from tvixmount.fetcher import Fetcher, LocalFetcher
from tvixmount.fuse_ops import MountOptions, TvixOperations
from tvixmount.store import StoreUrls, open_store
from tvixmount.vfs import Vfs
from workers.handlers import HANDLERS, Context

ROOT = llfuse.ROOT_INODE
CTX = llfuse.RequestContext()
MEMORY = StoreUrls.single("memory://")
# Fetcher methods that ask the store nothing: passed through, not counted.
_PASS_THROUGH = {"stats", "close", "segments"}


def holds_llfuse_lock() -> bool:
    """Whether the calling thread holds llfuse's global lock.

    Only its holder may release the lock, so releasing is the probe: it
    fails for any other thread without waiting, and the holder takes the
    lock straight back.
    """
    try:
        llfuse.lock.release()
    except RuntimeError:
        return False
    llfuse.lock.acquire()
    return True


# A FUSE read asks for its bytes as a reply (``blob_read_reply``): to a test, a blob_read like any other.
_RECORDED_AS = {"blob_read_reply": "blob_read"}


class RecordingFetcher:
    """A Fetcher that counts requests by op, checks the lock at each one, and can fail an op."""

    def __init__(self, inner: Fetcher) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.with_lock_held: list[str] = []  # ops asked while the caller held llfuse's lock
        self.fail: dict[str, Exception] = {}
        self._lock = threading.Lock()  # readahead threads call in concurrently

    def __getattr__(self, op: str) -> Any:
        method = getattr(self._inner, op)
        if op in _PASS_THROUGH or not callable(method):
            return method

        name = _RECORDED_AS.get(op, op)

        def call(*args: Any, **kwargs: Any) -> Any:
            held = holds_llfuse_lock()
            with self._lock:
                self.calls[name] += 1
                if held:
                    self.with_lock_held.append(name)
                error = self.fail.get(name)
            if error is not None:
                raise error
            return method(*args, **kwargs)

        return call

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())


def errno_of(call: Callable[[], object]) -> int | None:
    """The errno ``call`` fails with (a generator is run to its end, as llfuse runs readdir), or None."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except llfuse.FUSEError as exc:
        return int(exc.errno)
    return None


@dataclass(frozen=True, slots=True)
class Dirent:
    name: bytes
    ino: int
    mode: int
    next_offset: int


@dataclass
class Fuse:
    """The operations, their fetcher and their Vfs, with the calls a kernel would make spelled short."""

    ops: TvixOperations
    fetcher: RecordingFetcher
    vfs: Vfs

    def lookup(self, *names: bytes | str) -> llfuse.EntryAttributes:
        """Look up a path component by component from the root, as a path walk does."""
        entry = self.ops.getattr(ROOT, CTX)
        for name in names:
            entry = self.ops.lookup(entry.st_ino, _b(name), CTX)
        return entry

    def readdir(self, ino: int, off: int = 0, limit: int | None = None) -> list[Dirent]:
        """Open ``ino``, read its entries from ``off`` (at most ``limit``: a full reply buffer), close it."""
        fh = self.ops.opendir(ino, CTX)
        try:
            return self.readdir_fh(fh, off, limit)
        finally:
            self.ops.releasedir(fh)

    def readdir_fh(self, fh: int, off: int = 0, limit: int | None = None) -> list[Dirent]:
        out: list[Dirent] = []
        entries = self.ops.readdir(fh, off)
        try:
            for name, attr, next_offset in entries:
                out.append(Dirent(name, attr.st_ino, attr.st_mode, next_offset))
                if limit is not None and len(out) >= limit:
                    break  # llfuse stops iterating when the kernel's buffer is full
        finally:
            entries.close()
        return out

    def walk(self, ino: int, held: dict[int, int], skip: tuple[bytes, ...] = ()) -> None:
        """What find(1) does below ``ino``: list, look up every entry, descend; counts the references."""
        for d in self.readdir(ino):
            entry = self.ops.lookup(ino, d.name, CTX)
            held[entry.st_ino] = held.get(entry.st_ino, 0) + 1
            if entry.st_mode & 0o170000 == 0o040000 and d.name not in skip:
                self.walk(entry.st_ino, held, skip)

    def read_all(self, ino: int, chunk: int = 128 * 1024) -> bytes:
        """Open, read to EOF in kernel-sized requests, release."""
        fh = self.ops.open(ino, 0, CTX)
        try:
            data = bytearray()
            while piece := self.ops.read(fh, len(data), chunk):
                data += piece
            return bytes(data)
        finally:
            self.ops.release(fh)


@contextmanager
def in_process(options: MountOptions | None = None,
               on_first_request: Callable[[], None] | None = None) -> Iterator[Fuse]:
    """TvixOperations over ``memory://`` (filled by the caller), with llfuse's lock held by this thread.

    On exit the operations are closed (background fetches stopped) before
    the lock is released, as mount.run closes them after llfuse.main.
    """
    local = LocalFetcher(HANDLERS, Context(-1, open_store(MEMORY)), wire=True, owns_store=True)
    fetcher = RecordingFetcher(local)
    vfs = Vfs()
    ops = TvixOperations(vfs, fetcher, options or MountOptions(), on_first_request=on_first_request)
    llfuse.lock.acquire()
    try:
        yield Fuse(ops, fetcher, vfs)
    finally:
        ops.close()
        llfuse.lock.release()
        fetcher.close()


def fuse_factory(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., Fuse]]:
    """A fixture's body: ``make(expect_errors=False, on_first_request=None, **MountOptions)``, once per test.

    Background fetches are off unless a test turns them on (they would
    make request counts race). As with real mounts, an ERROR logged by
    tvixmount fails the test unless it said it expects errors.
    """
    with ExitStack() as stack:
        made: list[bool] = []

        def make(expect_errors: bool = False, on_first_request: Callable[[], None] | None = None,
                 **options: Any) -> Fuse:
            assert not made, "one Fuse per test: the test thread holds llfuse's lock"
            made.append(expect_errors)
            settings = {"readahead_files": 0, "tree_ahead": 0, **options}
            return stack.enter_context(in_process(MountOptions(**settings), on_first_request))

        yield make
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith(("tvixmount", "workers"))]
    assert not errors or made == [True], f"unexpected ERROR logged: {errors}"


def wait_released(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (called with llfuse's lock held) and let other threads have the lock in between.

    What a mount's idle FUSE threads do: background fetches that need the
    lock get it while no handler runs.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        with llfuse.lock_released:
            time.sleep(0.01)
    return True


def warnings_naming(caplog: pytest.LogCaptureFixture, digest: bytes) -> list[str]:
    """The WARNING lines that name ``digest`` (a broken object is reported once, not once per access)."""
    text = b3_text(digest)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _b(name: bytes | str) -> bytes:
    return name.encode() if isinstance(name, str) else name
