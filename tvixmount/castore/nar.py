"""The NAR encoder: framing written once, for export, hashing and import (docs/protocol.md, 'NAR format').

A NAR (Nix ARchive) is the serialisation a store path's nar_sha256 and
store path are computed over. It is a sequence of strings, each written as
its length (u64, little endian), its bytes and zero padding to a multiple
of 8. After the magic string ``nix-archive-1`` comes the root node:

    ( type regular [executable ""] contents <size, bytes, padding> )
    ( type symlink target <target> )
    ( type directory entry ( name <name> node <node> ) ... )

with a directory's entries in ascending raw-byte name order. The root's own
name is never part of it, so the same tree has the same NAR under any name.

``NarWriter`` writes that framing from events fed in NAR order; it is the
only code that does. Two walks drive it: ``nar_chunks`` over a castore tree
(``tvixstore verify --nar``, CalculateNAR, tests) and the import walk over
the local filesystem (admin/ingest.py), which hashes the NAR while it reads
each file once. Trees can be larger than memory, so the castore walk keeps
an explicit stack (one Directory per level, no recursion limit) and blob
bytes pass through as the store yields them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from ..errors import InvalidData
from .directory import Directory, check_node, validate
from .nodes import DirectoryNode, FileNode, Node, b3_text, display_name

MAGIC = b"nix-archive-1"
# Framing and small contents are handed out in pieces of about this size:
# one sha256 call per 64 KiB instead of one per token.
_FLUSH_AT = 64 * 1024

GetDirectory = Callable[[bytes], Directory]
ReadBlob = Callable[[bytes, int], Iterable[bytes]]


def pad8(n: int) -> int:
    """``n`` rounded up to a multiple of 8."""
    return (n + 7) & ~7


def _token(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


_MAGIC = _token(MAGIC)
_OPEN = _token(b"(") + _token(b"type")
_DIRECTORY = _OPEN + _token(b"directory")
_ENTRY = _token(b"entry") + _token(b"(") + _token(b"name")
_NODE = _token(b"node")
_CLOSE = _token(b")")
_REGULAR = _OPEN + _token(b"regular")
_EXECUTABLE = _token(b"executable") + _token(b"")
_CONTENTS = _token(b"contents")
_SYMLINK = _OPEN + _token(b"symlink") + _token(b"target")
_ZEROS = bytes(8)

# Bytes each node adds besides its variable part (a name, target or contents
# string of length n adds 8 + pad8(n)), so nar_size needs no blob.
_FILE_FIXED = len(_REGULAR) + len(_CONTENTS) + 8 + len(_CLOSE)
_DIRECTORY_FIXED = len(_DIRECTORY) + len(_CLOSE)
_ENTRY_FIXED = len(_ENTRY) + 8 + len(_NODE) + len(_CLOSE)
_SYMLINK_FIXED = len(_SYMLINK) + 8 + len(_CLOSE)


class NarWriter:
    """The NAR of a tree fed event by event in NAR order, handed to ``out`` in pieces.

    The caller owns the tree's validity (names, their order, a file's length
    matching its ``file_start``); the writer owns the bytes. Framing and
    small content pieces are gathered and handed out about 64 KiB at a time;
    a content piece of 64 KiB or more is handed out as it is, uncopied.
    Call ``flush`` after the root node ends.
    """

    __slots__ = ("_buf", "_out", "_pad")

    def __init__(self, out: Callable[[bytes], object]) -> None:
        self._out = out
        self._buf = bytearray(_MAGIC)
        self._pad = 0

    def flush(self) -> None:
        if self._buf:
            self._out(bytes(self._buf))
            self._buf.clear()

    def _string(self, data: bytes) -> None:
        buf = self._buf
        buf += len(data).to_bytes(8, "little")
        buf += data
        buf += _ZEROS[: -len(data) % 8]

    def _close(self) -> None:
        self._buf += _CLOSE
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def directory_start(self) -> None:
        self._buf += _DIRECTORY

    def directory_end(self) -> None:
        self._close()

    def entry_start(self, name: bytes) -> None:
        """Opens an entry; its node follows, then ``entry_end``."""
        self._buf += _ENTRY
        self._string(name)
        self._buf += _NODE
        if len(self._buf) >= _FLUSH_AT:  # a chain of nested directories closes nothing for long
            self.flush()

    def entry_end(self) -> None:
        self._close()

    def file_start(self, size: int, executable: bool) -> None:
        """Opens a regular file of ``size`` bytes; ``contents`` must then bring exactly that many."""
        buf = self._buf
        buf += _REGULAR
        if executable:
            buf += _EXECUTABLE
        buf += _CONTENTS
        buf += size.to_bytes(8, "little")
        self._pad = -size % 8

    def contents(self, data: bytes) -> None:
        if len(data) >= _FLUSH_AT:
            self.flush()
            self._out(data)
            return
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def file_end(self) -> None:
        self._buf += _ZEROS[: self._pad]
        self._close()

    def symlink(self, target: bytes) -> None:
        self._buf += _SYMLINK
        self._string(target)
        self._close()


class NarDigest:
    """Length and sha256 of the bytes a NarWriter hands out (pass ``update`` as its ``out``)."""

    __slots__ = ("_sha", "_size")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._size = 0

    def update(self, data: bytes) -> None:
        self._sha.update(data)  # releases the GIL for big pieces
        self._size += len(data)

    def result(self) -> tuple[int, bytes]:
        """(nar_size, nar_sha256)."""
        return self._size, self._sha.digest()


# -- a castore tree's NAR ---------------------------------------------------------


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
    ready: list[bytes] = []
    writer = NarWriter(ready.append)
    for _ in _encode(node, get_directory, read_blob, writer):
        if ready:
            yield from ready
            ready.clear()
    writer.flush()
    yield from ready


def nar_hash(node: Node, get_directory: GetDirectory, read_blob: ReadBlob) -> tuple[int, bytes]:
    """(nar_size, nar_sha256) of the tree, computed by streaming its NAR (raises as nar_chunks)."""
    digest = NarDigest()
    writer = NarWriter(digest.update)
    for _ in _encode(node, get_directory, read_blob, writer):
        pass
    writer.flush()
    return digest.result()


def _encode(
    node: Node, get_directory: GetDirectory, read_blob: ReadBlob, writer: NarWriter
) -> Iterator[None]:
    """Feed the tree under ``node`` to ``writer``, pausing (yielding) after each node and blob piece.

    The pauses let nar_chunks hand out what the writer produced so far, so
    memory stays bounded whatever the tree's size.
    """
    problem = check_node(node)
    if problem:
        raise InvalidData(f"NAR root node: {problem}")
    # One iterator of entries still to emit per open directory; ``path`` holds
    # the names of the entries currently open (empty at the root).
    stack: list[Iterator[Node]] = []
    path: list[bytes] = []
    current: Node | None = node
    while current is not None:
        finished = True  # whether ``current`` is fully emitted (not an opened directory)
        if isinstance(current, DirectoryNode):
            writer.directory_start()
            directory = get_directory(current.digest)
            try:
                validate(directory, f"directory {b3_text(current.digest)}")
            except InvalidData as exc:
                raise InvalidData(f"{exc} (at {_where(path)} in the tree)") from None
            stack.append(directory.entries())
            finished = False
        elif isinstance(current, FileNode):
            writer.file_start(current.size, current.executable)
            yield from _file_contents(current, read_blob, path, writer)
            writer.file_end()
        else:
            writer.symlink(current.target)
        current = None
        while stack:
            if finished and path:
                writer.entry_end()  # closes the entry whose node just ended
                path.pop()
            entry = next(stack[-1], None)
            if entry is not None:
                writer.entry_start(entry.name)
                path.append(entry.name)
                current = entry
                break
            stack.pop()
            writer.directory_end()
            finished = True
        yield


def _file_contents(
    node: FileNode, read_blob: ReadBlob, path: list[bytes], writer: NarWriter
) -> Iterator[None]:
    total = 0
    for piece in read_blob(node.digest, node.size):
        total += len(piece)
        if total > node.size:
            raise InvalidData(
                f"blob {b3_text(node.digest)} at {_where(path)}: longer than its FileNode.size {node.size}"
            )
        if piece:
            writer.contents(piece)
            yield
    if total != node.size:
        raise InvalidData(
            f"blob {b3_text(node.digest)} at {_where(path)}: {total} bytes, FileNode.size says {node.size}"
        )


def nar_size(node: Node, get_directory: GetDirectory) -> int:
    """The NAR length from metadata alone, without reading any blob."""
    total = len(_MAGIC)
    pending: list[Node] = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, FileNode):
            total += _FILE_FIXED + pad8(current.size) + (len(_EXECUTABLE) if current.executable else 0)
        elif isinstance(current, DirectoryNode):
            total += _DIRECTORY_FIXED
            for entry in get_directory(current.digest).entries():
                total += _ENTRY_FIXED + pad8(len(entry.name))
                pending.append(entry)
        else:
            total += _SYMLINK_FIXED + pad8(len(current.target))
    return total
