"""CalculateNAR for backends that hold the blobs and directories themselves.

A PathInfoService that lives beside its store's blob and directory
services (memory://, local://) can render a node's NAR itself, as a tvix
daemon does for its ``CalculateNAR`` RPC. Every byte read is verified by
the blob reader on the way.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..castore import nar
from ..castore.directory import Directory
from ..castore.nodes import Node, b3_text
from ..errors import NotFound
from .base import BlobService, DirectoryService

_PIECE = 1024 * 1024


def calculate_nar(node: Node, blobs: BlobService, directories: DirectoryService) -> tuple[int, bytes]:
    """(nar_size, nar_sha256) of ``node``; NotFound if something it references is missing."""

    def get_directory(digest: bytes) -> Directory:
        directory = directories.get(digest)
        if directory is None:
            raise NotFound(f"directory {b3_text(digest)} is missing (while calculating a NAR)")
        return directory

    def read_blob(digest: bytes, size: int) -> Iterator[bytes]:
        with blobs.open_read(digest) as reader:
            offset = 0
            while True:
                piece = reader.pread(offset, _PIECE)
                if not piece:
                    return
                yield piece
                offset += len(piece)

    return nar.nar_hash(node, get_directory, read_blob)
