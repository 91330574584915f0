"""A NAR stream into a blob and a directory service, as a castore tree.

The NAR is read once, front to back (castore/narreader.py parses it and
refuses anything that would not round-trip), file contents go straight into
blob writers, and Directory messages are built as each directory closes.
Nothing here names a store path or writes a PathInfo: the caller checks
the NAR's hash and size (they are the caller's to know) and only then
makes the tree visible.

Who does what: the calling thread parses and hashes; storing a small
file (at most one ``PIECE``, from memory) is handed to ``STORE_THREADS``
threads, since creating and writing a file is mostly system calls that
release the GIL and can overlap with the parse (bounded by
``MAX_IN_FLIGHT`` bytes waiting); a big file is streamed into its writer by
the calling thread, so memory stays flat. A file's digest is known when it
is parsed (blake3 of its bytes), so the tree never waits for a store.

Visibility and durability: all blobs are written in one blob-service batch
where the backend has one (the embedded store then makes them durable with
one syncfs at the end instead of two fsyncs each); directories are stored
after the batch has ended, so a directory is never visible before its
blobs are. A failure leaves unreferenced blobs (and perhaps directories)
behind: content-addressed, harmless, and reused by the next attempt.

This is the store's one NAR ingestion: substitution from a binary cache
(nixhttp/substitute.py) and ``tvixstore import --nar`` (admin/nar_import.py)
both use it; each checks the NAR's hash and size its own way and writes
the PathInfo itself, last.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import blake3

from ..castore.directory import Directory, SizeConvention, validate
from ..castore.nar import nar_size
from ..castore.narreader import NarDirectoryEnd, NarDirectoryStart, NarFile, NarSymlink, read_nar
from ..castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, display_name
from ..errors import InvalidData
from .base import BlobService, DirectoryService

PIECE = 1 << 20  # read size for big files, and the largest file stored from one buffer
STORE_THREADS = 2
MAX_IN_FLIGHT = 32 << 20  # bytes of small files waiting for a store thread, at most


@dataclass(frozen=True, slots=True)
class NarTree:
    """The castore form of one NAR: its root (named ``b""``) and what it held."""

    root: Node
    files: int
    file_bytes: int
    directories: int  # distinct Directory messages
    symlinks: int
    nar_size: int  # the NAR this tree renders to, from its metadata (a guard for the caller)


@dataclass(slots=True)
class _Frame:
    name: bytes
    entries: list[Node] = field(default_factory=list)


def ingest_nar(
    stream: BinaryIO,
    blobs: BlobService,
    directories: DirectoryService,
    convention: SizeConvention = SizeConvention.DOUBLED,
    threads: int = STORE_THREADS,
) -> NarTree:
    """Store the NAR read from ``stream``; InvalidData (with a byte offset) for a malformed one.

    ``stream`` should be buffered: the parser reads the framing in small
    pieces. ``threads`` store small files (0: the calling thread does).
    A failure to store a blob is raised as it was.
    """
    stack: list[_Frame] = []
    built: dict[bytes, Directory] = {}  # digest -> Directory, leaves first
    root: Node | None = None
    files = file_bytes = symlinks = 0

    def finish(node: Node) -> None:
        nonlocal root
        if stack:
            stack[-1].entries.append(node)
        else:
            root = node

    with _batch(blobs), _BlobSink(blobs, threads) as sink:
        for event in read_nar(stream):
            path = event.path
            if isinstance(event, NarFile):
                digest = sink.store(event)
                files += 1
                file_bytes += event.size
                finish(FileNode(path[-1] if path else b"", digest, event.size, event.executable))
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
    rendered = nar_size(root, built.__getitem__)
    if built:
        directories.put_many(built.values())
    return NarTree(root, files, file_bytes, len(built), symlinks, rendered)


class _BlobSink:
    """Stores file contents: small ones on threads from memory, big ones streamed by the caller.

    Leaving the ``with`` waits for every store; the first failure is raised
    then (or at the next ``store``, to stop early). On an exception the
    stores not yet started are cancelled.
    """

    def __init__(self, blobs: BlobService, threads: int) -> None:
        self._blobs = blobs
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nar-blob") if threads > 0 else None
        self._seen: set[bytes] = set()  # blobs of this NAR stored or queued
        self._pending: list[Future[None]] = []
        self._room = threading.Condition()
        self._in_flight = 0
        self._failure: BaseException | None = None

    def store(self, event: NarFile) -> bytes:
        """Store one file's contents (read from the event); return its digest."""
        if self._failure is not None:
            raise self._failure
        if event.size > PIECE:
            with self._blobs.open_write() as writer:
                while piece := event.reader.read(PIECE):
                    writer.write(piece)
                digest = writer.commit()
            self._seen.add(digest)
            return digest
        data = _read_exactly(event.reader, event.size)
        digest = blake3.blake3(data).digest()
        if digest not in self._seen:
            self._seen.add(digest)
            if self._pool is None:
                self._put(data, digest)
                return digest
            with self._room:
                while self._in_flight and self._in_flight + len(data) > MAX_IN_FLIGHT:
                    self._room.wait()
                self._in_flight += len(data)
            self._pending.append(self._pool.submit(self._put, data, digest))
        return digest

    def _put(self, data: bytes, digest: bytes) -> None:
        try:
            with self._blobs.open_write(expected_digest=digest) as writer:
                writer.write(data)
                writer.commit()
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
            raise
        finally:
            with self._room:
                self._in_flight -= len(data)
                self._room.notify()

    def __enter__(self) -> _BlobSink:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        if exc_type is None:
            for future in self._pending:
                future.result()  # the first failure, as it was


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
