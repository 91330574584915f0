"""Streaming NAR encoder for a castore tree (docs/protocol.md, 'NAR format').

The NAR of a store path is what its nar_sha256 and store path are computed
over, and what ``tvixstore verify`` re-derives. Trees can be larger than
memory, so the encoder walks them with an explicit stack (one Directory per
level, no recursion limit) and passes blob bytes through as the store yields
them; only the small framing tokens are batched into a buffer.

The root node's own name is never part of the NAR: the same tree has the
same NAR under any name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from ..errors import InvalidData
from .directory import Directory, check_node, validate
from .nodes import DirectoryNode, FileNode, Node, b3_text, display_name

MAGIC = b"nix-archive-1"
_FLUSH_AT = 64 * 1024

GetDirectory = Callable[[bytes], Directory]
ReadBlob = Callable[[bytes, int], Iterable[bytes]]


def pad8(n: int) -> int:
    """``n`` rounded up to a multiple of 8."""
    return (n + 7) & ~7


def _string(buf: bytearray, data: bytes) -> None:
    buf += len(data).to_bytes(8, "little")
    buf += data
    buf += bytes(pad8(len(data)) - len(data))


def _where(path: list[bytes]) -> str:
    return "/" + "/".join(display_name(name) for name in path)


def nar_chunks(node: Node, get_directory: GetDirectory, read_blob: ReadBlob) -> Iterator[bytes]:
    """Yield the NAR serialisation of ``node`` piece by piece.

    ``get_directory(digest)`` returns the Directory a DirectoryNode refers
    to (it is validated here again, since an unsorted one would yield an
    invalid NAR); ``read_blob(digest, size)`` yields a file's bytes.
    Raises InvalidData naming the path inside the tree when a node is invalid
    or a blob's length disagrees with its FileNode.size.
    """
    problem = check_node(node)
    if problem:
        raise InvalidData(f"NAR root node: {problem}")
    buf = bytearray()
    _string(buf, MAGIC)
    # One iterator of entries still to emit per open directory; ``path`` holds
    # the names of the entries currently open (empty at the root).
    stack: list[Iterator[Node]] = []
    path: list[bytes] = []
    current: Node | None = node
    while current is not None:
        finished = True  # whether ``current`` is fully emitted (not an opened directory)
        _string(buf, b"(")
        _string(buf, b"type")
        if isinstance(current, DirectoryNode):
            _string(buf, b"directory")
            directory = get_directory(current.digest)
            try:
                validate(directory, f"directory {b3_text(current.digest)}")
            except InvalidData as exc:
                raise InvalidData(f"{exc} (at {_where(path)} in the tree)") from None
            stack.append(directory.entries())
            finished = False
        elif isinstance(current, FileNode):
            _string(buf, b"regular")
            if current.executable:
                _string(buf, b"executable")
                _string(buf, b"")
            _string(buf, b"contents")
            buf += current.size.to_bytes(8, "little")
            yield bytes(buf)
            buf.clear()
            yield from _file_contents(current, read_blob, path)
            buf += bytes(pad8(current.size) - current.size)
            _string(buf, b")")
        else:
            _string(buf, b"symlink")
            _string(buf, b"target")
            _string(buf, current.target)
            _string(buf, b")")
        current = None
        while stack:
            if finished and path:
                _string(buf, b")")  # closes the entry whose node just ended
                path.pop()
            entry = next(stack[-1], None)
            if entry is not None:
                _string(buf, b"entry")
                _string(buf, b"(")
                _string(buf, b"name")
                _string(buf, entry.name)
                _string(buf, b"node")
                path.append(entry.name)
                current = entry
                break
            stack.pop()
            _string(buf, b")")  # closes the directory node itself
            finished = True
        if len(buf) >= _FLUSH_AT:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def _file_contents(node: FileNode, read_blob: ReadBlob, path: list[bytes]) -> Iterator[bytes]:
    total = 0
    for piece in read_blob(node.digest, node.size):
        total += len(piece)
        if total > node.size:
            raise InvalidData(
                f"blob {b3_text(node.digest)} at {_where(path)}: longer than its FileNode.size {node.size}"
            )
        if piece:
            yield piece
    if total != node.size:
        raise InvalidData(
            f"blob {b3_text(node.digest)} at {_where(path)}: {total} bytes, FileNode.size says {node.size}"
        )


def nar_hash(node: Node, get_directory: GetDirectory, read_blob: ReadBlob) -> tuple[int, bytes]:
    """(nar_size, nar_sha256) of the tree, computed by streaming its NAR."""
    sha = hashlib.sha256()
    size = 0
    for chunk in nar_chunks(node, get_directory, read_blob):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.digest()


def nar_size(node: Node, get_directory: GetDirectory) -> int:
    """The NAR length from metadata alone, without reading any blob."""
    total = 24  # the magic string
    pending: list[Node] = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, FileNode):
            total += 88 + pad8(current.size) + (32 if current.executable else 0)
        elif isinstance(current, DirectoryNode):
            total += 72
            for entry in get_directory(current.digest).entries():
                total += 88 + pad8(len(entry.name))
                pending.append(entry)
        else:
            total += 88 + pad8(len(current.target))
    return total
