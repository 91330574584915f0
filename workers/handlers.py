"""One small function per op: ask the store, check what it answered, return castore values.

Each registers against its op (``@handles(ops.PATH_INFO)``), which declares
its arguments and result type (tvixmount.protocol.ops). Handlers run in a
worker process (workers/loop.py) or in-process (tvixmount.fetcher.LocalFetcher,
given ``HANDLERS``); they take a ``Context`` and the op's arguments and
return domain values, which the op encodes for the wire.
They raise only ``tvixmount.errors`` classes. They never import llfuse or
the vfs: a worker holds no filesystem state, only a store and caches.

Every result is checked before it leaves: directories and path infos are
validated (the store contract promises it; a path info is also checked
against the digest it was asked for, since that link is what makes a root
lookup correct), and blob bytes come from the store's verifying reader.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from tvixmount.castore import nixbase32
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DIGEST_LEN, Node, b3_text
from tvixmount.castore.pathinfo import PathInfo, validate_pathinfo
from tvixmount.castore.storepath import DIGEST_LEN as STORE_DIGEST_LEN
from tvixmount.errors import IntegrityError, InvalidArgument, InvalidData, NotFound, TvixError
from tvixmount.protocol import batch, ops
from tvixmount.protocol.framing import RingRef
from tvixmount.protocol.ops import MAX_READ, Handlers
from tvixmount.shmring import RingWriter
from tvixmount.store import BlobReader, Store
from tvixmount.store.grpc.deadline import patience_until

from .segfill import FillAhead, keep_regions, read_kept

log = logging.getLogger(__name__)

READER_CACHE_SIZE = 64
RING_MIN = 4096  # smaller reads are cheaper inline than through the ring
HELD_DEFAULT_WAIT = 300.0  # a held lookup outside a request's scope (in-process fetchers) waits this long


class ReaderCache:
    """Open BlobReaders by digest, least recently used evicted first.

    Consecutive reads of one file (the pool routes them to one worker by
    affinity) reuse the reader and whatever verified chunks it caches.
    Not thread-safe; a worker is single-threaded.
    """

    def __init__(self, open_reader: Callable[[bytes, int | None], BlobReader],
                 capacity: int = READER_CACHE_SIZE) -> None:
        self._open = open_reader
        self._capacity = capacity
        self._readers: OrderedDict[bytes, BlobReader] = OrderedDict()
        self.opened = 0

    def get(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        reader = self._readers.get(digest)
        if reader is not None:
            self._readers.move_to_end(digest)
            return reader
        reader = self._open(digest, size_hint)
        self.opened += 1
        self._readers[digest] = reader
        while len(self._readers) > self._capacity:
            _, old = self._readers.popitem(last=False)
            _close_quietly(old)
        return reader

    def drop(self, digest: bytes) -> None:
        reader = self._readers.pop(digest, None)
        if reader is not None:
            _close_quietly(reader)

    def clear(self) -> None:
        while self._readers:
            _close_quietly(self._readers.popitem()[1])

    def __len__(self) -> int:
        return len(self._readers)


def _close_quietly(reader: BlobReader) -> None:
    try:
        reader.close()
    except Exception as exc:  # a failing close must not fail the read that evicted it
        log.debug("closing a blob reader failed: %s", exc)


@dataclass
class Context:
    """What a handler may use: the worker's identity, its store, its caches, its ring."""

    worker_id: int
    store: Store
    ring: RingWriter | None = None  # a pool worker's shared-memory ring for read replies
    readers: ReaderCache = field(init=False)
    fill_ahead: FillAhead | None = field(init=False)  # regions verified ahead of in-order reads
    # While the loop answers a read of a lane (tvixmount/lanes.py): that lane's buffer, where the
    # read's bytes go instead of the ring.
    lane_buffer: memoryview | None = field(init=False, default=None)
    pid: int = field(init=False)  # this process's, made after the fork: lane replies name it

    def __post_init__(self) -> None:
        self.pid = os.getpid()
        self.readers = ReaderCache(self.store.blobs.open_read)
        segments = self.ring.segments if self.ring is not None else None
        self.fill_ahead = FillAhead(segments) if segments is not None else None

    def reserve(self, length: int) -> tuple[int, memoryview] | None:
        """Room for a reply's ``length`` bytes: the lane's buffer (a read on a lane), else the ring's; None:
        go inline."""
        if self.lane_buffer is not None:
            return (0, self.lane_buffer[:length]) if length <= len(self.lane_buffer) else None
        ring = self.ring
        return ring.reserve(length) if ring is not None and length >= RING_MIN else None

    def commit(self, start: int, length: int) -> None:
        """The reserved bytes are written (a lane's buffer needs no bookkeeping)."""
        if self.lane_buffer is None:
            assert self.ring is not None
            self.ring.commit(start, length)

    def close(self) -> None:
        self.readers.clear()
        self.store.close()


# -- handlers -------------------------------------------------------------------------

HANDLERS: Handlers[Context] = Handlers()
handles = HANDLERS.handles


@handles(ops.PING)
def ping(ctx: Context) -> tuple[int, int]:
    """Who answers: (worker id, pid)."""
    return ctx.worker_id, os.getpid()


@handles(ops.PATH_INFO)
def path_info(ctx: Context, digest20: bytes) -> Node | None:
    """The root node stored under a store path digest, or None.

    The node's name must be a store path basename whose digest is the one
    asked for; anything else is InvalidData (EIO at the edge), never a
    silently different path.
    """
    _check_len(digest20, STORE_DIGEST_LEN, "store path digest")
    info = ctx.store.path_infos.get_present(digest20)  # a binary cache: only what was substituted
    if info is None:
        return None
    return _checked_root(info, digest20)


@handles(ops.DIRECTORY_TREE)
def directory_tree(ctx: Context, digest: bytes, max_entries: int) -> list[tuple[bytes, Directory]]:
    """The directory and what is below it, parents first, each once (for prefetch).

    Stops after the directory that brings the total past ``max_entries``
    (the root always comes): DirectoryNode.size cannot be trusted to bound
    a tree, so the reply is bounded here, and the dispatcher fetches the
    rest lazily. A descendant that is missing or broken also ends the
    prefetch, not the request: it fails on its own when it is asked for
    (EIO for that directory only), and what came before it is good.
    """
    _check_len(digest, DIGEST_LEN, "directory digest")
    tree: list[tuple[bytes, Directory]] = []
    entries = 0
    try:
        for found_digest, found in ctx.store.directories.get_tree(digest):
            tree.append((found_digest, found))
            entries += len(found)
            if entries >= max_entries:
                break
    except TvixError as exc:
        if not tree:
            raise  # the directory asked for is what is broken
        log.debug("prefetch below directory %s stopped after %d directories: %s", b3_text(digest), len(tree),
                  exc)
    if not tree:
        raise NotFound(f"directory {b3_text(digest)} not found")
    return tree


@handles(ops.LIST_ROOT)
def list_root(ctx: Context) -> list[Node]:
    """Every root node in the store's listing order (for --list-root)."""
    nodes = []
    for info in ctx.store.path_infos.list():
        nodes.append(_checked_root(info, None))
    return nodes


@handles(ops.BLOB_READ)
def blob_read(ctx: Context, digest: bytes, offset: int, length: int, size: int) -> bytes | RingRef:
    """``length`` verified bytes from ``offset`` (fewer only at EOF, none past it).

    ``size`` is the file's size as its FileNode says, or -1: a hint for the
    store (see BlobService.open_read), never trusted over the blob itself.

    In a pool worker the bytes go into the worker's shared-memory ring, or
    the buffer of the lane the read came on, and the reply names them (a
    RingRef; the dispatcher turns it back into bytes); inline bytes when
    there is neither, or no room.
    """
    if len(digest) != DIGEST_LEN:  # _check_len's test first: this runs for every read a worker answers
        _check_len(digest, DIGEST_LEN, "blob digest")
    if offset < 0 or length < 0 or length > MAX_READ:
        raise InvalidArgument(
            f"blob {b3_text(digest)}: read of {length} bytes at {offset} is out of range "
            f"(at most {MAX_READ} bytes, no negative values)"
        )
    reader = ctx.readers.get(digest, size if size >= 0 else None)
    if offset >= reader.size or length == 0:
        return b""
    length = min(length, reader.size - offset)
    ring = ctx.ring
    segments = ring.segments if ring is not None else None
    room = ctx.reserve(length)
    try:
        if segments is not None and keep_regions(segments, reader, digest, offset, length, ctx.fill_ahead):
            fill = partial(read_kept, segments, reader, digest, offset)  # the regions are in the arena now
        elif room is None:
            return reader.pread(offset, length)
        else:
            fill = partial(reader.pread_into, offset)
        if room is None:
            out = bytearray(length)
            with memoryview(out) as view:
                got = fill(view)
            return bytes(out[:got])
        start, view = room
        with view:
            got = fill(view)
        ctx.commit(start, got)
        return RingRef(start, got)
    except IntegrityError:
        ctx.readers.drop(digest)  # nothing of a broken blob stays cached
        raise


@handles(ops.BLOB_BATCH)
def blob_batch(ctx: Context, digests: bytes, sizes: list[int]) -> bytes | RingRef:
    """Small blobs whole, each verified against its digest, packed in one reply (protocol/batch.py).

    A blob that fails, or whose verified length is not the size asked for,
    is marked failed on its own; its reader asks for it alone and gets the
    real error. The reply goes through the ring when there is room.
    """
    wanted = batch.decode_request(digests, sizes)
    blobs: list[bytes | None] = []
    for (digest, size), got in zip(wanted, ctx.store.blobs.read_many(wanted), strict=True):
        if isinstance(got, TvixError) or len(got) != size:
            log.debug("batch read of blob %s failed: %s", b3_text(digest),
                      got if isinstance(got, TvixError) else f"{len(got)} bytes, not {size}")
            blobs.append(None)
        else:
            blobs.append(got)
    length = batch.reply_length([-1 if b is None else len(b) for b in blobs])
    room = ctx.reserve(length)
    if room is None:
        return batch.pack_reply(blobs)
    start, view = room
    with view:
        batch.pack_reply_into(view, blobs)
    ctx.commit(start, length)
    return RingRef(start, length)


@handles(ops.HELD_PATH_INFO)
def held_path_info(ctx: Context, digest20: bytes) -> Node | None:
    """``path_info``, substituting the path first when the service can (a binary cache).

    The substitution stops at the request's patience (``patience_until``:
    a share of the time the request had left), so the worker answers before
    the pool would take it for hung; a failure stores no PathInfo.
    """
    _check_len(digest20, STORE_DIGEST_LEN, "store path digest")
    info = ctx.store.path_infos.fetch(digest20, patience_until(HELD_DEFAULT_WAIT))
    if info is None:
        return None
    return _checked_root(info, digest20)


HANDLERS.check_complete()


# -- checks ---------------------------------------------------------------------------


def _check_len(digest: bytes, length: int, what: str) -> None:
    if len(digest) != length:
        raise InvalidArgument(f"{what} is {len(digest)} bytes, not {length}")


def _checked_root(info: PathInfo, digest20: bytes | None) -> Node:
    store_path = validate_pathinfo(info, require_narinfo=False)
    if digest20 is not None and store_path.digest != digest20:
        raise InvalidData(
            f"path info looked up as {nixbase32.encode(digest20)} describes {store_path.basename}"
        )
    return info.node
