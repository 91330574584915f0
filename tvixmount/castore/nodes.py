"""The castore node model: immutable values passed between every layer.

Names and symlink targets stay ``bytes`` end to end (they need not be UTF-8);
decode them only for log lines. A node's ``name`` is its basename inside its
parent; the same node value without its name is its *identity* (see
``identity``), which is what the filesystem shares inodes by.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

DIGEST_LEN = 32  # blake3-256, for blobs and directories


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    """A child directory, by the digest of its Directory message."""

    name: bytes
    digest: bytes
    size: int  # descendant count as reported; never validated (docs/protocol.md, 'Directory size')


@dataclass(frozen=True, slots=True)
class FileNode:
    """A regular file, by the blake3 digest of its contents."""

    name: bytes
    digest: bytes
    size: int
    executable: bool = False


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    """A symbolic link; its target is returned verbatim, never followed."""

    name: bytes
    target: bytes


Node = DirectoryNode | FileNode | SymlinkNode


def identity(node: Node) -> tuple:
    """The key under which equal content shares one inode.

    Files are keyed by (digest, size, executable): an executable and a plain
    copy of the same bytes must not share a mode. Directories by digest,
    symlinks by target. The leading tag keeps the three kinds apart.
    """
    if isinstance(node, FileNode):
        return ("f", node.digest, node.size, node.executable)
    if isinstance(node, DirectoryNode):
        return ("d", node.digest)
    return ("l", node.target)


def b3_text(digest: bytes) -> str:
    """The textual digest form tvix uses in logs and xattrs: ``b3:`` + base64."""
    return "b3:" + base64.b64encode(digest).decode("ascii")


# Names longer than this are shown cut (no valid name is: names have at most 255 bytes).
_SHOWN_MAX = 300


def display_name(name: bytes) -> str:
    """A name for log lines and error messages, lossless for odd bytes.

    An over-long name (invalid anyway) is cut and its length said, so that
    a 1 MiB name in a damaged directory makes a log line, not a megabyte.
    """
    if len(name) > _SHOWN_MAX:
        return name[:64].decode("utf-8", "backslashreplace") + f"...({len(name)} bytes)"
    return name.decode("utf-8", "backslashreplace")
