"""A NAR stream into a blob and a directory service, as a castore tree.

The NAR is read once, front to back (castore/narreader.py parses it and
refuses anything that would not round-trip), file contents go straight into
blob writers, and Directory messages are built as each directory closes.
Nothing here names a store path or writes a PathInfo: the caller checks
the NAR's hash and size (they are the caller's to know) and only then
makes the tree visible.

Visibility and durability: all blobs are written in one blob-service batch
where the backend has one (the embedded store then makes them durable with
one syncfs at the end instead of two fsyncs each); directories are stored
after the batch has ended, so a directory is never visible before its
blobs are. A failure leaves unreferenced blobs (and perhaps directories)
behind: content-addressed, harmless, and reused by the next attempt.

This is the store's NAR ingestion; ``tvixstore import --nar``
(admin/nar_import.py) has its own loop and could use this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import blake3

from ...castore.directory import Directory, SizeConvention, validate
from ...castore.narreader import NarDirectoryEnd, NarDirectoryStart, NarFile, NarSymlink, read_nar
from ...castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, display_name
from ...errors import InvalidData
from ..base import BlobService, DirectoryService

PIECE = 1 << 20  # read size for big files, and the largest file stored from one buffer


@dataclass(frozen=True, slots=True)
class NarTree:
    """The castore form of one NAR: its root (named ``b""``) and what it held."""

    root: Node
    files: int
    file_bytes: int
    directories: int  # distinct Directory messages
    symlinks: int


@dataclass(slots=True)
class _Frame:
    name: bytes
    entries: list[Node] = field(default_factory=list)


def ingest_nar(
    stream: BinaryIO,
    blobs: BlobService,
    directories: DirectoryService,
    convention: SizeConvention = SizeConvention.DOUBLED,
    on_file: Callable[[int], None] | None = None,
) -> NarTree:
    """Store the NAR read from ``stream``; InvalidData (with a byte offset) for a malformed one.

    ``stream`` should be buffered: the parser reads the framing in small
    pieces. ``on_file(size)`` is called after each file is stored.
    """
    stack: list[_Frame] = []
    built: dict[bytes, Directory] = {}  # digest -> Directory, leaves first
    root: Node | None = None
    files = file_bytes = symlinks = 0
    seen: set[bytes] = set()  # blobs this NAR already stored

    def finish(node: Node) -> None:
        nonlocal root
        if stack:
            stack[-1].entries.append(node)
        else:
            root = node

    with _batch(blobs):
        for event in read_nar(stream):
            path = event.path
            if isinstance(event, NarFile):
                digest = _store_file(blobs, event, seen)
                files += 1
                file_bytes += event.size
                finish(FileNode(path[-1] if path else b"", digest, event.size, event.executable))
                if on_file is not None:
                    on_file(event.size)
            elif isinstance(event, NarSymlink):
                symlinks += 1
                finish(SymlinkNode(path[-1] if path else b"", event.target))
            elif isinstance(event, NarDirectoryStart):
                stack.append(_Frame(path[-1] if path else b""))
            elif isinstance(event, NarDirectoryEnd):
                frame = stack.pop()
                directory = Directory.from_entries(frame.entries)
                validate(directory, _where(path))
                digest = directory.digest()
                built.setdefault(digest, directory)
                finish(DirectoryNode(frame.name, digest, directory.size(convention)))
    if root is None:  # read_nar yields a root or raises; guard the invariant anyway
        raise InvalidData("NAR holds no root node")
    if built:
        directories.put_many(built.values())
    return NarTree(root, files, file_bytes, len(built), symlinks)


def _store_file(blobs: BlobService, event: NarFile, seen: set[bytes]) -> bytes:
    """Store one file's contents; a small one is hashed first and skipped when this NAR has it."""
    size = event.size
    reader = event.reader
    if size <= PIECE:
        data = _read_exactly(reader, size)
        digest = blake3.blake3(data).digest()
        if digest not in seen:
            with blobs.open_write(expected_digest=digest) as writer:
                writer.write(data)
                writer.commit()
            seen.add(digest)
        return digest
    with blobs.open_write() as writer:
        while piece := reader.read(PIECE):
            writer.write(piece)
        digest = writer.commit()
    seen.add(digest)
    return digest


def _read_exactly(reader: BinaryIO, size: int) -> bytes:
    data = reader.read(size) if size else b""
    while len(data) < size:  # the file reader hands out what one read of the input gave
        more = reader.read(size - len(data))
        if not more:  # the parser raises on a cut first; guard the invariant anyway
            raise InvalidData(f"NAR file ends after {len(data)} of {size} bytes")
        data += more
    return data


def _where(path: tuple[bytes, ...]) -> Callable[[], str]:
    """A directory's place for a message, built only if validation fails."""
    return lambda: "NAR directory /" + "/".join(display_name(n) for n in path)


def _batch(blobs: BlobService) -> contextlib.AbstractContextManager[object]:
    batch = getattr(blobs, "batch", None)
    return contextlib.nullcontext() if batch is None else batch()
