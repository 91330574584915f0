"""Import a NAR stream (``tvixstore import --nar FILE --name NAME``) into a store.

The NAR is read once, front to back, from a file or a pipe, by the store's
one NAR ingestion (store/naringest.py, which substitution from a binary
cache uses too): file contents are streamed into blob writers as they
arrive (never held whole), and the sha256 and length of the NAR are
computed over every byte read (the parser refuses trailing bytes, so
that is exactly the NAR). The parser
refuses anything that would not round-trip (unsorted or duplicate names,
bad padding, trailing bytes), so the castore tree built here renders back to
the very same NAR; as a cheap guard, the NAR length is recomputed from the
tree's metadata and must agree.

As for a directory import, blobs and directories may be left behind by a
failure, but the PathInfo is written last and only on success.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import replace
from typing import BinaryIO

from ..castore import storepath
from ..castore.directory import SizeConvention
from ..castore.nodes import DirectoryNode, FileNode, Node, b3_text
from ..castore.pathinfo import NarInfo, PathInfo
from ..errors import IntegrityError, InvalidArgument, InvalidData
from ..store import Store
from ..store.naringest import ingest_nar
from .ingest import Imported, ImportStats
from .progress import Bar, NullBar

log = logging.getLogger(__name__)

NAR_BUFFER = 1 << 20


class HashingReader(io.RawIOBase):
    """A raw stream that hashes (sha256) and counts every byte read through it (buffer it)."""

    def __init__(self, stream: BinaryIO, bar: Bar | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._sha = hashlib.sha256()
        self._bar = NullBar() if bar is None else bar
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        if n:
            memoryview(buffer)[:n] = data
            self._sha.update(data)
            self.count += n
            self._bar.update(n)
        return n

    def digest(self) -> bytes:
        return self._sha.digest()


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
    tree = ingest_nar(io.BufferedReader(reader, NAR_BUFFER), store.blobs, store.directories,
                      convention)
    nar_sha256 = reader.digest()
    nar_size = reader.count
    if tree.nar_size != nar_size:
        raise InvalidData(f"NAR is {nar_size} bytes but its tree renders to {tree.nar_size}; not imported")
    if expected_sha256 is not None and expected_sha256 != nar_sha256:
        raise IntegrityError(
            f"NAR sha256 is {nar_sha256.hex()}, expected {expected_sha256.hex()}; not imported"
        )
    root = tree.root
    path_ = storepath.from_nar_sha256(name, nar_sha256)
    info = PathInfo(
        node=replace(root, name=path_.basename.encode()),
        narinfo=NarInfo(nar_size=nar_size, nar_sha256=nar_sha256),
    )
    store.path_infos.put(info)
    log.info("imported NAR %s (%d bytes, root %s) as %s", source, nar_size, _describe(root), path_)
    stats = ImportStats(tree.files, tree.file_bytes, tree.directories, tree.symlinks)
    return Imported(source.encode(), path_, info, stats)


def _describe(node: Node) -> str:
    if isinstance(node, DirectoryNode):
        return f"directory {b3_text(node.digest)}"
    if isinstance(node, FileNode):
        return f"file {b3_text(node.digest)}"
    return "symlink"
