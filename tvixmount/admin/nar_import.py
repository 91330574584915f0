"""Import a NAR stream (``tvixstore import --nar FILE --name NAME``) into a store.

The NAR is read once, front to back, from a file or a pipe: castore/narreader.py
parses it into events in NAR order, file contents are streamed into blob
writers as they arrive (never held whole), and the sha256 and length of the
NAR are computed over exactly the bytes the parser consumed. The parser
refuses anything that would not round-trip (unsorted or duplicate names,
bad padding, trailing bytes), so the castore tree built here renders back to
the very same NAR; as a cheap guard, the NAR length is recomputed from the
tree's metadata and must agree.

As for a directory import, blobs and directories may be left behind by a
failure, but the PathInfo is written last and only on success.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from ..castore import storepath
from ..castore.directory import Directory, SizeConvention, validate
from ..castore.nar import nar_size as nar_size_of
from ..castore.narreader import NarDirectoryEnd, NarDirectoryStart, NarFile, NarSymlink, read_nar
from ..castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, b3_text, display_name
from ..castore.pathinfo import NarInfo, PathInfo
from ..errors import IntegrityError, InvalidArgument, InvalidData
from ..store import Store
from .ingest import CHUNK, Imported, ImportStats
from .progress import Bar, NullBar

log = logging.getLogger(__name__)


class HashingReader:
    """A read-only stream that hashes (sha256) and counts every byte read through it."""

    def __init__(self, stream: BinaryIO, bar: Bar | None = None) -> None:
        self._stream = stream
        self._sha = hashlib.sha256()
        self._bar = NullBar() if bar is None else bar
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._sha.update(data)
            self.count += len(data)
            self._bar.update(len(data))
        return data

    def digest(self) -> bytes:
        return self._sha.digest()


@dataclass(slots=True)
class _Frame:
    name: bytes
    entries: list[Node] = field(default_factory=list)


def _where(path: tuple[bytes, ...]) -> str:
    return "/" + "/".join(display_name(n) for n in path)


def import_nar(
    store: Store,
    stream: BinaryIO,
    name: str,
    convention: SizeConvention = SizeConvention.DOUBLED,
    expected_sha256: bytes | None = None,
    bar: Bar | None = None,
    source: str = "-",
) -> Imported:
    """Read one NAR from ``stream`` into ``store`` as store path ``<hash>-<name>``.

    ``expected_sha256``, when given, must match the NAR's sha256, else
    IntegrityError and no PathInfo. Malformed NARs raise InvalidData with
    the byte offset of the problem.
    """
    problem = storepath.check_name(name)
    if problem:
        raise InvalidArgument(f"--name {name!r} is not a valid store path name: {problem}")
    reader = HashingReader(stream, bar)
    stack: list[_Frame] = []
    directories: list[Directory] = []
    seen: set[bytes] = set()
    root: Node | None = None
    files = total = symlinks = 0

    def finish(node: Node) -> None:
        nonlocal root
        if stack:
            stack[-1].entries.append(node)
        else:
            root = node

    for event in read_nar(reader):  # type: ignore[arg-type]
        path = event.path
        entry_name = path[-1] if path else b""
        if isinstance(event, NarFile):
            with store.blobs.open_write() as writer:
                while piece := event.reader.read(CHUNK):
                    writer.write(piece)
                digest = writer.commit()
            files += 1
            total += event.size
            finish(FileNode(entry_name, digest, event.size, event.executable))
        elif isinstance(event, NarSymlink):
            symlinks += 1
            finish(SymlinkNode(entry_name, event.target))
        elif isinstance(event, NarDirectoryStart):
            stack.append(_Frame(entry_name))
        elif isinstance(event, NarDirectoryEnd):
            frame = stack.pop()
            directory = Directory.from_entries(frame.entries)
            validate(directory, f"NAR directory {_where(path)}")
            digest = directory.digest()
            if digest not in seen:
                seen.add(digest)
                directories.append(directory)
            finish(DirectoryNode(frame.name, digest, directory.size(convention)))
    if root is None:  # read_nar either yields a root or raises; guard the invariant anyway
        raise InvalidData("NAR holds no root node")

    nar_sha256 = reader.digest()
    nar_size = reader.count
    by_digest = {d.digest(): d for d in directories}
    expected_size = nar_size_of(root, by_digest.__getitem__)
    if expected_size != nar_size:
        raise InvalidData(f"NAR is {nar_size} bytes but its tree renders to {expected_size}; not imported")
    if expected_sha256 is not None and expected_sha256 != nar_sha256:
        raise IntegrityError(
            f"NAR sha256 is {nar_sha256.hex()}, expected {expected_sha256.hex()}; not imported"
        )
    if directories:
        store.directories.put_many(directories)
    path_ = storepath.from_nar_sha256(name, nar_sha256)
    info = PathInfo(
        node=replace(root, name=path_.basename.encode()),
        narinfo=NarInfo(nar_size=nar_size, nar_sha256=nar_sha256),
    )
    store.path_infos.put(info)
    log.info("imported NAR %s (%d bytes, root %s) as %s", source, nar_size, _describe(root), path_)
    stats = ImportStats(files, total, len(directories), symlinks)
    return Imported(source.encode(), path_, info, stats)


def _describe(node: Node) -> str:
    if isinstance(node, DirectoryNode):
        return f"directory {b3_text(node.digest)}"
    if isinstance(node, FileNode):
        return f"file {b3_text(node.digest)}"
    return "symlink"
