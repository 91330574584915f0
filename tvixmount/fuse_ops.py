"""llfuse Operations: one short method per FUSE call, and the errno edge.

Every handler runs under llfuse's global lock, which protects the Vfs. A
handler that needs a worker (a path-info look-up, a directory fetch, a blob
read) releases the lock while it waits (``_fetch``) and looks at the Vfs
again after getting it back: another thread may have populated it meanwhile.

Errors become errno here and nowhere else: ``TvixError`` subclasses carry
their errno (errors.py), except that an object a parent *references* and
that turns out missing is EIO, not ENOENT (only an unknown name is ENOENT).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import blake3
import llfuse

from . import attrs as A
from .castore.directory import Directory
from .castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, b3_text, display_name
from .castore.storepath import parse_basename
from .errors import InvalidData, NotFound, TvixError, errno_for
from .fetcher import Fetcher
from .fuse_timing import timed
from .inflight import SingleFlight
from .metrics import FuseMetrics, MountStats
from .readahead import SmallFileReadahead, TreeAhead
from .segcache import REGION, SegmentCacheStats
from .smallblobs import SmallBlobs
from .vfs import Listing, Vfs
from .walkplaces import WalkPlaces

log = logging.getLogger(__name__)
T = TypeVar("T")

XATTR_DIRECTORY = b"user.tvix.castore.directory.digest"
XATTR_BLOB = b"user.tvix.castore.blob.digest"
XATTR_STATS = b"user.tvixmount.stats"
EMPTY_BLOB = blake3.blake3(b"").digest()
# How often a background fetch waiting for llfuse's lock looks whether the mount is closing.
LOCK_POLL_SECONDS = 1


@dataclass(frozen=True, slots=True)
class MountOptions:
    list_root: bool = False
    show_xattr: bool = True
    # Entries fetched ahead when a directory is first listed or looked into.
    prefetch_entries: int = 20_000
    # Small files after an opened one fetched ahead, this many at a time (0: off).
    readahead_files: int = 4
    # Store paths (in root listing order) whose trees are fetched ahead of a walk (0: off).
    tree_ahead: int = 2
    # blob_batch requests of small files in flight at once, ahead of a walk's reads (0: off).
    small_batches: int = 0
    # Bytes of small files fetched in batches and not yet read, at most.
    small_cache: int = 64 << 20


@dataclass(slots=True)
class _RootListing:
    """A root listing buffered per opendir handle, served by index."""

    names: list[tuple[bytes, Node]] | None = None


class TvixOperations(llfuse.Operations):
    def __init__(self, vfs: Vfs, fetcher: Fetcher, options: MountOptions,
                 metrics: FuseMetrics | None = None,
                 on_first_request: Callable[[], None] | None = None) -> None:
        """``on_first_request`` runs in the first lookup, getattr, opendir or statfs, before its reply
        (kernelra.KernelReadahead): any request means the kernel has the INIT reply, and every path
        to a file starts with a lookup."""
        super().__init__()
        self._on_first_request = on_first_request
        self.vfs = vfs
        self.fetcher = fetcher
        self.options = options
        self._flight = SingleFlight()
        self._files: dict[int, FileNode] = {}
        self._dirs: dict[int, int | _RootListing] = {}
        # File and directory handles count apart: a file handle is also the
        # read's worker affinity (fh % workers), so consecutive opens must
        # spread evenly over the workers, whatever directories were opened.
        self._file_fhs = itertools.count(1)
        self._dir_fhs = itertools.count(1)
        self._broken_reported: set[object] = set()  # digests warned about once
        self.metrics = metrics or FuseMetrics()
        self.places = WalkPlaces()  # where each directory was looked up: how walks go on
        self.small = SmallBlobs(fetcher.blob_batch, vfs.listing, in_flight=options.small_batches,
                                capacity=options.small_cache, places=self.places,
                                want_listing=lambda digest: self.tree_ahead.fetch(digest))
        self.readahead = SmallFileReadahead(self._fetch_ahead, depth=options.readahead_files,
                                            min_file=self.small.max_file if self.small.enabled else 0,
                                            listing_of=vfs.listing, places=self.places)
        self.tree_ahead = TreeAhead(self._prefetch_tree, ahead=options.tree_ahead)
        self.segments = fetcher.segments()
        self._closing = False

    # -- helpers ------------------------------------------------------------

    def _fetch(self, what: str, key: Any, fn: Callable[[], T]) -> T:
        """Wait for a worker with llfuse's lock released; convert failures to FUSEError.

        Callers must re-check the Vfs afterwards. ``NotFound`` for a
        referenced object is EIO; callers that want ENOENT check for None.
        """
        try:
            with llfuse.lock_released:
                return self._flight.run(key, fn)
        except TvixError as exc:
            self._fetch_failed(what, key, exc)

    def _fetch_failed(self, what: str, key: Any, exc: TvixError) -> NoReturn:
        """The one log line and the errno of a fetch that failed (``_fetch``, the read path)."""
        if isinstance(exc, NotFound):
            log.error("%s: referenced object is missing: %s", what, exc)
            raise llfuse.FUSEError(errno.EIO) from None
        if isinstance(exc, InvalidData):
            digest = key[1] if isinstance(key, tuple) and len(key) > 1 else None
            # A path info that failed to verify may be fetched again (a binary cache: nothing
            # was stored), and each new failure is worth its line; the same one is said once.
            seen: object = (digest, str(exc)) if key[0] == "pathinfo" else digest
            if seen not in self._broken_reported:
                self._broken_reported.add(seen)
                log.warning("%s: %s", what, exc)
            raise llfuse.FUSEError(errno.EIO) from None
        log.error("%s failed: %s", what, exc)
        raise llfuse.FUSEError(errno_for(exc)) from None

    def _entry(self, node: Node) -> llfuse.EntryAttributes:
        ino = self.vfs.ref(node)
        return self._attributes(ino, node)

    def _attributes(self, ino: int, node: Node) -> llfuse.EntryAttributes:
        listed = None
        if isinstance(node, DirectoryNode):
            listing = self.vfs.listing(node.digest)
            listed = None if listing is None else len(listing.entries)
        return _to_llfuse(A.node_attributes(ino, node, listed))

    def _node(self, ino: int) -> Node:
        node = self.vfs.node(ino)
        if node is None:
            raise llfuse.FUSEError(errno.ENOENT)
        return node

    def _listing(self, ino: int) -> Listing:
        """The listing of directory ``ino``; may wait for a worker (lock released)."""
        node = self._node(ino)
        if not isinstance(node, DirectoryNode):
            raise llfuse.FUSEError(errno.ENOTDIR)
        listing = self.vfs.listing(node.digest)
        self.metrics.cache("listing", listing is not None)
        if listing is None:
            # One request brings the directory and (a bounded part of) what is
            # below it: a walk of a fresh store path then costs one worker
            # round trip, not one per directory.
            what = f"directory {b3_text(node.digest)} (inode {ino})"
            limit = self.options.prefetch_entries
            tree = self._fetch(what, ("dir", node.digest),
                               lambda: self.fetcher.directory_tree(node.digest, limit))
            self._add_listings(tree)
            listing = self.vfs.listing(node.digest) or self.vfs.add_listing(node.digest, tree[0][1])
            self.tree_ahead.on_walk(node.digest, lambda digest: self.vfs.listing(digest) is not None)
        return listing

    def _prefetch_tree(self, digest: bytes) -> None:
        """TreeAhead's fetch, on its own thread: one tree request, then the listings go in under the lock.

        Keyed like ``_listing``'s fetch, so a walk that gets there first
        waits for this request instead of sending its own.
        """
        limit = self.options.prefetch_entries
        failed: Exception | None = None
        try:
            tree = self._flight.run(("dir", digest), lambda: self.fetcher.directory_tree(digest, limit))
        except Exception as exc:  # the walk's own lookup fails and says why; TreeAhead logs this
            tree, failed = [], exc
        # Whole seconds: llfuse 1.5 truncates the timeout to an int, and 0 waits forever.
        while not llfuse.lock.acquire(timeout=LOCK_POLL_SECONDS):
            if self._closing:
                return
        try:
            self._add_listings(tree)
            if failed is not None:
                self.small.on_listed(digest)  # batches waiting at this directory go on past it
        finally:
            llfuse.lock.release()
        if failed is not None:
            raise failed

    def _add_listings(self, tree: list[tuple[bytes, Directory]]) -> None:
        """Cache a fetched tree's listings, then tell the batches (a walk may wait for one). Locked."""
        for digest, directory in tree:
            self.vfs.add_listing(digest, directory)
        for digest, _ in tree:
            self.small.on_listed(digest)

    # -- lookups and attributes ---------------------------------------------

    @timed("lookup")
    def lookup(self, parent: int, name: bytes, ctx: Any = None) -> llfuse.EntryAttributes:
        if self._on_first_request is not None:
            self._first_request()
        if parent == A.ROOT_INODE:
            return self._entry(self._root_lookup(name))
        listing = self._listing(parent)
        child = listing.child(name)
        if child is None:
            raise llfuse.FUSEError(errno.ENOENT)
        entry = self._entry(child)
        if type(child) is FileNode:
            parent_node = self.vfs.node(parent)
            directory = parent_node.digest if type(parent_node) is DirectoryNode else None
            self.readahead.note_lookup(entry.st_ino, listing, name, directory)
            if directory is not None:
                self.small.note_lookup(entry.st_ino, child, directory, listing.index[name])
        elif type(child) is DirectoryNode:
            parent_node = self.vfs.node(parent)
            if type(parent_node) is DirectoryNode:
                self.places.note(child.digest, parent_node.digest, listing.index[name])
        return entry

    def _root_lookup(self, name: bytes) -> Node:
        node = self.vfs.root_entry(name)
        self.metrics.cache("root_name", node is not None)
        if node is not None:
            return node
        try:
            store_path = parse_basename(name)
        except InvalidData:
            raise llfuse.FUSEError(errno.ENOENT) from None
        what = f"store path {display_name(name)}"
        found = self._fetch(what, ("pathinfo", store_path.digest),
                            lambda: self.fetcher.path_info(store_path.digest))
        if found is None or found.name != name:
            # Right hash, wrong name is not found either: the name is the key.
            raise llfuse.FUSEError(errno.ENOENT)
        self.vfs.add_root_entry(name, found)
        return found

    def getattr(self, inode: int, ctx: Any = None) -> llfuse.EntryAttributes:
        if self._on_first_request is not None:
            self._first_request()
        if inode == A.ROOT_INODE:
            return _to_llfuse(A.root_attributes())
        return self._attributes(inode, self._node(inode))

    def _first_request(self) -> None:
        hook, self._on_first_request = self._on_first_request, None  # under llfuse's lock: runs once
        if hook is not None:
            hook()

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.vfs.forget(ino, nlookup)

    def readlink(self, inode: int, ctx: Any = None) -> bytes:
        if inode == A.ROOT_INODE:
            raise llfuse.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if not isinstance(node, SymlinkNode):
            raise llfuse.FUSEError(errno.EINVAL)
        return node.target

    # -- directories --------------------------------------------------------

    def opendir(self, inode: int, ctx: Any = None) -> int:
        if self._on_first_request is not None:
            self._first_request()
        if inode == A.ROOT_INODE:
            if not self.options.list_root:
                raise llfuse.FUSEError(errno.EPERM)
            return self._new_handle(self._dirs, self._dir_fhs, _RootListing())
        if not isinstance(self._node(inode), DirectoryNode):
            raise llfuse.FUSEError(errno.ENOTDIR)
        return self._new_handle(self._dirs, self._dir_fhs, inode)

    @timed("readdir")
    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
        handle = self._dirs.get(fh)
        if handle is None:
            raise llfuse.FUSEError(errno.EIO)
        if isinstance(handle, _RootListing):
            named = self._root_listing(handle)
            for pos in range(off, len(named)):
                name, node = named[pos]
                yield name, self._dirent(node), pos + 1
            return
        # The kernel asks for a buffer's worth per call: start at ``off``, copy nothing
        # (rebuilding the whole list per call made listing N entries cost N squared).
        entries = self._listing(handle).entries
        for pos in range(off, len(entries)):
            node = entries[pos]
            yield node.name, self._dirent(node), pos + 1

    def _dirent(self, node: Node) -> llfuse.EntryAttributes:
        """What a directory entry carries: the kernel takes only inode and type from it."""
        entry = llfuse.EntryAttributes()
        entry.st_ino = self.vfs.ino_for(node)
        entry.st_mode = A.dirent_type(node)
        return entry

    def _root_listing(self, handle: _RootListing) -> list[tuple[bytes, Node]]:
        if handle.names is None:
            nodes = self._fetch("root listing", ("list",), self.fetcher.list_root)
            handle.names = []
            for node in nodes:
                self.vfs.add_root_entry(node.name, node)
                handle.names.append((node.name, node))
            self.tree_ahead.set_order([node.digest for node in nodes if isinstance(node, DirectoryNode)])
        return handle.names

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------

    @timed("open")
    def open(self, inode: int, flags: int, ctx: Any = None) -> int:
        if inode == A.ROOT_INODE:
            raise llfuse.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if not isinstance(node, FileNode):
            raise llfuse.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise llfuse.FUSEError(errno.EROFS)
        if node.size == 0 and node.digest != EMPTY_BLOB:
            log.warning("file %s (inode %d) claims size 0 but not the empty blob's digest",
                        b3_text(node.digest), inode)
            raise llfuse.FUSEError(errno.EIO)
        # The blob is not looked at here: a missing or broken blob fails the
        # first read with EIO, which saves a worker round trip per open.
        self.small.on_open(inode, node)
        self.readahead.on_open(inode, node)
        return self._new_handle(self._files, self._file_fhs, node)

    @timed("read", counts_bytes=True)
    def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        node = self._files.get(fh)
        if node is None:
            raise llfuse.FUSEError(errno.EIO)
        if off >= node.size or size <= 0:
            return b""
        length = min(size, node.size - off)
        if node.size <= self.readahead.max_file:  # big files: no batch or readahead look-up (two locks)
            ahead = self._from_batches(node, off, length) or self._from_readahead(node, off, length)
            if ahead is not None:
                return ahead
        if self.segments is not None:  # verified by a worker before; no round trip
            kept = self.segments.read(node.digest, off, length)
            if kept is not None:
                return kept
            data = self._read_region(fh, node, off, length)
        else:
            data = self._read(fh, node, off, length)
        if len(data) != length:
            log.error("read of %s [%d+%d] (fh %d): store returned %d bytes, wanted %d",
                      b3_text(node.digest), off, length, fh, len(data), length)
            raise llfuse.FUSEError(errno.EIO)
        return data

    def _from_batches(self, node: FileNode, off: int, length: int) -> bytes | None:
        """A small file's bytes from its batch (``_take_or_wait``); a miss is counted there."""
        small = self.small
        if node.size > small.max_file or not small.enabled:  # big files: no lock taken per read
            return None
        data = self._take_or_wait(small, node, off, length)
        if data is None:
            small.missed(node)
        return data

    def _from_readahead(self, node: FileNode, off: int, length: int) -> bytes | None:
        """A file's bytes from the readahead (``_take_or_wait``); a miss is noted there."""
        data = self._take_or_wait(self.readahead, node, off, length)
        if data is None:
            self.readahead.missed(node)
        return data

    @staticmethod
    def _take_or_wait(source: SmallBlobs | SmallFileReadahead, node: FileNode, off: int,
                      length: int) -> bytes | None:
        """The bytes ``source`` fetched ahead, waiting (lock released, at most ``source.wait``) for a
        fetch of them in flight; None: the read asks a worker itself.

        Looked up again even when no fetch is in flight: one may have landed
        between the first look and the question (each takes the source's lock
        on its own), and its bytes would otherwise be fetched a second time.
        """
        data = source.take(node, off, length)
        if data is None:
            if (event := source.waiter(node)) is not None:
                with llfuse.lock_released:
                    event.wait(source.wait)
            data = source.take(node, off, length)
        return data

    def _read(self, fh: int, node: FileNode, off: int, length: int) -> bytes | memoryview:
        """A read that shares no request: two reads share one only in a region (``_read_region``).

        The bytes may be a view of this thread's lane (``Fetcher.blob_read_reply``):
        they go to llfuse's reply and nowhere else. The log line's text is
        made only when the read failed.
        """
        try:
            with llfuse.lock_released:
                return self.fetcher.blob_read_reply(node.digest, off, length, affinity=fh, size=node.size)
        except TvixError as exc:
            self._fetch_failed(self._what_read(fh, node, off, length), ("read", node.digest), exc)

    @staticmethod
    def _what_read(fh: int, node: FileNode, off: int, length: int) -> str:
        return f"read of {b3_text(node.digest)} [{off}+{length}] (fh {fh})"

    def _read_region(self, fh: int, node: FileNode, off: int, length: int) -> bytes | memoryview:
        """A read the arena missed, sharing a worker request with any read of the same region.

        The kernel's readahead sends both halves of a segment at once: the
        second waits for the first's request (whose worker puts the whole
        region into the arena) and then takes its bytes from the arena,
        instead of a second round trip for a segment already verified. The
        first's bytes are its own (a view of its lane, see ``_read``): the
        second never sees them, even when it asked for the same bytes.
        """
        region = off // REGION
        if (off + length - 1) // REGION != region:
            return self._read(fh, node, off, length)
        try:
            with llfuse.lock_released:
                data = self._flight.run(("region", node.digest, region), self.fetcher.blob_read_reply,
                                        node.digest, off, length, fh, node.size, share=False)
        except TvixError as exc:
            self._fetch_failed(self._what_read(fh, node, off, length), ("region", node.digest), exc)
        if data is not None:
            return data  # this thread's own request
        assert self.segments is not None
        kept = self.segments.read(node.digest, off, length)  # llfuse's lock is held again
        return kept if kept is not None else self._read(fh, node, off, length)

    def _fetch_ahead(self, nodes: list[FileNode]) -> list[bytes | None]:
        """Files' whole blobs for readahead, one request (its own thread, llfuse's lock not held).

        Not keyed like a FUSE read: a read arriving while this fetch is in
        flight sends its own request rather than wait for this one, which
        may sit on a worker that has just hung. Readahead may cost a
        duplicate request; it never makes a read slower.
        """
        if len(nodes) > 1:
            return self.fetcher.blob_batch([(node.digest, node.size) for node in nodes])
        node = nodes[0]
        return [self._flight.run(("ahead", node.digest),
                                 lambda: self.fetcher.blob_read(node.digest, 0, node.size, size=node.size))]

    def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    def close(self) -> None:
        """Stop the background fetches (after llfuse.main returned); bounded."""
        self._closing = True
        self.tree_ahead.close()
        self.readahead.close()
        self.small.close()

    @staticmethod
    def _new_handle(table: dict[int, Any], numbers: Iterator[int], value: Any) -> int:
        fh = next(numbers)
        table[fh] = value
        return fh

    # -- extended attributes and statfs -------------------------------------

    def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if not self.options.show_xattr:
            raise llfuse.FUSEError(errno.ENOSYS)
        if inode == A.ROOT_INODE:
            return [XATTR_STATS]
        node = self.vfs.node(inode)
        if isinstance(node, DirectoryNode):
            return [XATTR_DIRECTORY]
        if isinstance(node, FileNode):
            return [XATTR_BLOB]
        return []

    def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not self.options.show_xattr:
            raise llfuse.FUSEError(errno.ENOSYS)
        if inode == A.ROOT_INODE:
            if name == XATTR_STATS:
                return json.dumps(self.stats().as_json(), sort_keys=True).encode()
            raise llfuse.FUSEError(errno.ENODATA)
        node = self.vfs.node(inode)
        if name == XATTR_DIRECTORY and isinstance(node, DirectoryNode):
            return b3_text(node.digest).encode()
        if name == XATTR_BLOB and isinstance(node, FileNode):
            return b3_text(node.digest).encode()
        raise llfuse.FUSEError(errno.ENODATA)

    def statfs(self, ctx: Any = None) -> llfuse.StatvfsData:
        if self._on_first_request is not None:
            self._first_request()
        st = llfuse.StatvfsData()
        st.f_bsize = A.BLKSIZE
        st.f_frsize = 512
        st.f_namemax = 255
        return st

    def stats(self) -> MountStats:
        """Counters for ``getfattr -n user.tvixmount.stats`` on the mount root (and /metrics)."""
        return MountStats(
            fuse=self.metrics.snapshot(),
            vfs=self.vfs.stats(),
            fetcher=self.fetcher.stats(),
            readahead=self.readahead.stats(),
            small_blobs=self.small.stats(),
            tree_ahead=self.tree_ahead.stats(),
            segment_cache=self.segments.stats() if self.segments is not None else SegmentCacheStats(),
            open_files=len(self._files),
            open_dirs=len(self._dirs),
        )


def _to_llfuse(a: A.Attributes) -> llfuse.EntryAttributes:
    entry = llfuse.EntryAttributes()
    entry.st_ino = a.ino
    entry.generation = 0
    entry.entry_timeout = A.FOREVER
    entry.attr_timeout = A.FOREVER
    entry.st_mode = a.mode
    entry.st_nlink = a.nlink
    entry.st_uid = 0
    entry.st_gid = 0
    entry.st_rdev = 0
    entry.st_size = a.size
    entry.st_blksize = A.BLKSIZE
    entry.st_blocks = a.blocks
    entry.st_atime_ns = A.STORE_TIME_NS
    entry.st_mtime_ns = A.STORE_TIME_NS
    entry.st_ctime_ns = A.STORE_TIME_NS
    return entry
