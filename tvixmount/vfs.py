"""The filesystem's state: inodes by content identity, directory listings, root names.

Pure state, no I/O and no llfuse. Every method runs under llfuse's global
lock (fuse_ops holds it whenever it touches a Vfs), so nothing here locks.

Inode numbers are derived from a node's identity (``castore.nodes.identity``):
the same file content, symlink target or directory digest gets the same inode
wherever it appears, and gets it again after the kernel forgot it. Because the
number is a function of the content, readdir can report an entry's inode
without allocating anything; only a lookup puts an inode into the table, and
the kernel's ``forget`` takes it out again, so the table holds what the
kernel holds and no more.

Directory listings are cached by directory digest in a bounded LRU, apart
from inodes: a directory that is forgotten and looked up again is not
fetched again while its listing is still cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .attrs import ROOT_INODE
from .castore.directory import Directory
from .castore.nodes import Node, identity
from .metrics import gauge

_INO_MASK = (1 << 64) - 1
_FIRST_FREE_INO = ROOT_INODE + 1


@dataclass(slots=True)
class Inode:
    node: Node
    key: tuple
    nlookup: int = 0


@dataclass(frozen=True, slots=True)
class Listing:
    """A fetched directory: children in readdir order and a name index."""

    entries: tuple[Node, ...]
    index: dict[bytes, int]

    @classmethod
    def of(cls, directory: Directory) -> Listing:
        entries = tuple(directory.entries())
        return cls(entries, {node.name: pos for pos, node in enumerate(entries)})

    def child(self, name: bytes) -> Node | None:
        pos = self.index.get(name)
        return None if pos is None else self.entries[pos]


@dataclass(frozen=True, slots=True)
class VfsStats:
    inodes: int = gauge("inodes the kernel holds (looked up and not yet forgotten)")
    listings: int = gauge("directory listings cached")
    listed_entries: int = gauge("entries in the cached directory listings")
    root_names: int = gauge("store path names resolved and remembered")


class Vfs:
    def __init__(self, *, max_listed_entries: int = 2_000_000, max_root_names: int = 200_000) -> None:
        self._inodes: dict[int, Inode] = {}
        self._listings: OrderedDict[bytes, Listing] = OrderedDict()
        self._listed_entries = 0
        self._max_listed_entries = max_listed_entries
        self._root_names: OrderedDict[bytes, Node] = OrderedDict()
        self._max_root_names = max_root_names

    # -- inodes -------------------------------------------------------------

    def ino_for(self, node: Node) -> int:
        """The inode number ``node`` has or would get, without allocating it."""
        key = identity(node)
        ino = _home_slot(key)
        while True:
            held = self._inodes.get(ino)
            if held is None or held.key == key:
                return ino
            ino = _next_slot(ino)  # a 64-bit hash collision: probe on

    def ref(self, node: Node) -> int:
        """Count one more kernel reference (a lookup reply) to ``node``'s inode."""
        ino = self.ino_for(node)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = Inode(node, identity(node))
        inode.nlookup += 1
        return ino

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop ``nlookup`` kernel references; never raises."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.nlookup -= nlookup
        if inode.nlookup <= 0:
            del self._inodes[ino]

    def node(self, ino: int) -> Node | None:
        inode = self._inodes.get(ino)
        return None if inode is None else inode.node

    def __len__(self) -> int:
        return len(self._inodes)

    # -- directory listings -------------------------------------------------

    def listing(self, digest: bytes) -> Listing | None:
        listing = self._listings.get(digest)
        if listing is not None:
            self._listings.move_to_end(digest)
        return listing

    def add_listing(self, digest: bytes, directory: Directory) -> Listing:
        """Cache a fetched (already validated) directory; keeps an earlier copy."""
        existing = self.listing(digest)
        if existing is not None:
            return existing  # someone else populated it while we were fetching
        listing = self._listings[digest] = Listing.of(directory)
        self._listed_entries += len(listing.entries)
        while self._listed_entries > self._max_listed_entries and len(self._listings) > 1:
            _, evicted = self._listings.popitem(last=False)
            self._listed_entries -= len(evicted.entries)
        return listing

    # -- the root's store path names ----------------------------------------

    def root_entry(self, name: bytes) -> Node | None:
        node = self._root_names.get(name)
        if node is not None:
            self._root_names.move_to_end(name)
        return node

    def add_root_entry(self, name: bytes, node: Node) -> None:
        """Remember the node a store path name resolved to, keyed by the full name."""
        self._root_names[name] = node
        self._root_names.move_to_end(name)
        while len(self._root_names) > self._max_root_names:
            self._root_names.popitem(last=False)

    def stats(self) -> VfsStats:
        return VfsStats(inodes=len(self._inodes), listings=len(self._listings),
                        listed_entries=self._listed_entries, root_names=len(self._root_names))


def _home_slot(key: tuple) -> int:
    ino = hash(key) & _INO_MASK
    return ino if ino >= _FIRST_FREE_INO else ino + _FIRST_FREE_INO


def _next_slot(ino: int) -> int:
    ino = (ino + 1) & _INO_MASK
    return ino if ino >= _FIRST_FREE_INO else _FIRST_FREE_INO
