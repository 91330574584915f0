"""Stat attributes of nodes: modes, sizes, times and cache lifetimes.

Everything below the root is immutable and content-addressed, so the kernel
may cache entries and attributes for as long as it likes; only a failed
lookup at the root is not cached (a store path may appear later).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from .castore.nodes import DirectoryNode, FileNode, Node

ROOT_INODE = 1

# Long enough to be "forever" for the kernel; llfuse turns it into a timespec.
FOREVER = 365 * 24 * 3600.0

# Nix's store convention: every time is 1 s after the epoch (0 is treated
# specially by some build tools).
STORE_TIME_NS = 1_000_000_000

# What stat(2) reports as the preferred I/O size. Large, so that cp, cat and
# tar issue reads the size of the kernel's FUSE requests.
BLKSIZE = 128 * 1024

FILE_MODE = stat.S_IFREG | 0o444
EXEC_MODE = stat.S_IFREG | 0o555
DIR_MODE = stat.S_IFDIR | 0o555
LINK_MODE = stat.S_IFLNK | 0o444


@dataclass(frozen=True, slots=True)
class Attributes:
    """The fields of a FUSE entry/attr reply, independent of llfuse."""

    ino: int
    mode: int
    size: int
    nlink: int = 1
    blocks: int = 0


def node_attributes(ino: int, node: Node, listed_entries: int | None = None) -> Attributes:
    """Attributes of a non-root inode.

    A directory reports ``DirectoryNode.size`` until its listing is known
    (``listed_entries``), then its number of direct children, as tvix does.
    nlink is 1 for every kind: "unknown", which keeps find(1) from using the
    subdirectory-count shortcut that a Merkle DAG cannot honour.
    """
    if isinstance(node, FileNode):
        mode = EXEC_MODE if node.executable else FILE_MODE
        return Attributes(ino, mode, node.size, blocks=(node.size + 511) // 512)
    if isinstance(node, DirectoryNode):
        size = node.size if listed_entries is None else listed_entries
        return Attributes(ino, DIR_MODE, size)
    return Attributes(ino, LINK_MODE, len(node.target))


def root_attributes() -> Attributes:
    return Attributes(ROOT_INODE, DIR_MODE, 0)


def dirent_type(node: Node) -> int:
    """The S_IFMT bits readdir reports for ``node``."""
    if isinstance(node, FileNode):
        return stat.S_IFREG
    if isinstance(node, DirectoryNode):
        return stat.S_IFDIR
    return stat.S_IFLNK
