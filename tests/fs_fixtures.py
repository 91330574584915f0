"""The upstream FUSE test fixtures (docs/protocol.md, 'Upstream FUSE test cases'), and how to store them.

Names and contents are tvix's, so that the ported test cases mean what
upstream's mean. Directory sizes follow the doubled convention of a current
tvix-store (docs/protocol.md, 'Directory size'); the mount reports, never checks, them.
"""

from __future__ import annotations

import hashlib

import blake3

from tvixmount.castore.directory import Directory, SizeConvention
from tvixmount.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixmount.castore.pathinfo import NarInfo, PathInfo

BLOB_A = bytes([0x00, 0x01])
BLOB_B = bytes(range(255)) * 4096
HELLOWORLD = b"Hello World!"
EMPTY = b""


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


BLOB_A_NAME = b"00000000000000000000000000000000-test"
BLOB_B_NAME = b"55555555555555555555555555555555-test"
HELLOWORLD_BLOB_NAME = b"66666666666666666666666666666666-test"
SYMLINK_NAME = b"11111111111111111111111111111111-test"
SYMLINK_NAME2 = b"44444444444444444444444444444444-test"
DIRECTORY_WITH_KEEP_NAME = b"22222222222222222222222222222222-test"
DIRECTORY_COMPLICATED_NAME = b"33333333333333333333333333333333-test"

CONVENTION = SizeConvention.DOUBLED
DIRECTORY_WITH_KEEP = Directory(files=(FileNode(b".keep", b3(EMPTY), 0),))
DIRECTORY_COMPLICATED = Directory(
    directories=(DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest(), DIRECTORY_WITH_KEEP.size(CONVENTION)),),
    files=(FileNode(b".keep", b3(EMPTY), 0),),
    symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
)


def path_info(node: Node) -> PathInfo:
    """A PathInfo for a fixture root; NAR fields are placeholders of the right shape."""
    return PathInfo(node=node, narinfo=NarInfo(nar_size=0, nar_sha256=hashlib.sha256(node.name).digest()))


class Populate:
    """Puts fixtures into a Store (tvixmount.store.Store); each method is one upstream helper."""

    def __init__(self, store) -> None:
        self.store = store

    def _root(self, node: Node) -> None:
        self.store.path_infos.put(path_info(node))

    def blob_a(self, with_blob: bool = True) -> None:
        if with_blob:
            self.store.blobs.put(BLOB_A)
        self._root(FileNode(BLOB_A_NAME, b3(BLOB_A), len(BLOB_A)))

    def blob_b(self) -> None:
        self.store.blobs.put(BLOB_B)
        self._root(FileNode(BLOB_B_NAME, b3(BLOB_B), len(BLOB_B)))

    def helloworld(self) -> None:
        self.store.blobs.put(HELLOWORLD)
        self._root(FileNode(HELLOWORLD_BLOB_NAME, b3(HELLOWORLD), len(HELLOWORLD), executable=True))

    def symlink(self) -> None:
        self._root(SymlinkNode(SYMLINK_NAME, BLOB_A_NAME))

    def symlink2(self) -> None:
        self._root(SymlinkNode(SYMLINK_NAME2, b"/nix/store/somewhereelse"))

    def directory_with_keep(self, with_directory: bool = True) -> None:
        if with_directory:
            self.store.blobs.put(EMPTY)
            self.store.directories.put(DIRECTORY_WITH_KEEP)
        self._root(DirectoryNode(DIRECTORY_WITH_KEEP_NAME, DIRECTORY_WITH_KEEP.digest(),
                                 DIRECTORY_WITH_KEEP.size(CONVENTION)))

    def directory_complicated(self) -> None:
        self.store.blobs.put(EMPTY)
        self.store.directories.put_many([DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED])
        self._root(DirectoryNode(DIRECTORY_COMPLICATED_NAME, DIRECTORY_COMPLICATED.digest(),
                                 DIRECTORY_COMPLICATED.size(CONVENTION)))
