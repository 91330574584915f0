"""What memory:// holds for the in-process FUSE tests: the upstream fixtures and one tree with every damage.

TREE is a store path whose directory has a file of each kind (plain,
executable, empty, big, small ones to read ahead) next to every way a
referenced object can be wrong: a blob that is missing, one that rotted,
a node claiming more bytes than its blob has, a size-0 node that is not
the empty blob, and directories that are missing, break a naming rule or
sit under a digest their content does not hash to. Damage is written
straight into memory://'s tables, as no importer would write it.
"""

from __future__ import annotations

import hashlib

from tests.fs_fixtures import DIRECTORY_WITH_KEEP, Populate, b3, path_info
from tests.fuse_inprocess import MEMORY
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixmount.castore.storepath import StorePath
from tvixmount.store import Store, memory, open_store


def store_path(name: str) -> StorePath:
    return StorePath(hashlib.sha256(name.encode()).digest()[:20], name)


TREE = store_path("fuse-ops-tree")
NAMED = store_path("fuse-ops-named")
FOREIGN = store_path("fuse-ops-foreign")  # add_foreign: its row describes NAMED
ABSENT = store_path("fuse-ops-absent")

TOOL = b"#!/bin/sh\necho hi\n"
BIG = bytes(range(256)) * 1200  # 300 KiB: three kernel-sized reads
SMALLS = [b"small file %d\n" % i * (i + 1) for i in range(6)]
ROTTEN = b"these bytes rot in the store\n"
GONE = b"never stored\n"
ODD_TARGET = b"\xff\xfe not utf-8 \n"
# Directories the store has broken or not at all; the tree refers to each.
SLASHED = Directory(files=(FileNode(b"a/b", b3(TOOL), len(TOOL)),))
OTHER = Directory(symlinks=(SymlinkNode(b"x", b"y"),))
MISMATCH_DIGEST = b3(b"the digest a parent claims for a row holding OTHER")
MISSING = Directory(files=(FileNode(b"late", b3(TOOL), len(TOOL)),))  # not stored
MISSING_DIGEST = MISSING.digest()
BROKEN_DIRS = (b"mismatch", b"missing", b"slashed")


def tree_entries() -> list[Node]:
    return [
        FileNode(b"big", b3(BIG), len(BIG)),
        FileNode(b"empty", b3(b""), 0),
        FileNode(b"gone", b3(GONE), len(GONE)),  # the blob is missing
        FileNode(b"hollow", b3(TOOL), 0),  # size 0 but not the empty blob
        FileNode(b"liar", b3(b"ab"), 10),  # claims more bytes than the blob has
        FileNode(b"plain", b3(TOOL), len(TOOL)),
        FileNode(b"rotten", b3(ROTTEN), len(ROTTEN)),  # stored, then damaged
        FileNode(b"tool", b3(TOOL), len(TOOL), executable=True),
        *(FileNode(b"s%d" % i, b3(data), len(data)) for i, data in enumerate(SMALLS)),
        DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest(), 7),
        DirectoryNode(b"mismatch", MISMATCH_DIGEST, 2),
        DirectoryNode(b"missing", MISSING_DIGEST, 2),
        DirectoryNode(b"slashed", SLASHED.digest(), 2),
        SymlinkNode(b"link", b"big"),
        SymlinkNode(b"odd", ODD_TARGET),
    ]


def populate() -> None:
    """Empty memory://, then store the upstream fixtures, TREE (with its damage) and NAMED."""
    memory.reset()
    with open_store(MEMORY) as store:
        _fill(store)
    tables = memory.tables()
    with tables.lock:  # rows no importer would write
        tables.directories[SLASHED.digest()] = SLASHED.encode()
        tables.directories[MISMATCH_DIGEST] = OTHER.encode()
    rot(True)


def _fill(store: Store) -> None:
    upstream = Populate(store)
    for fill in (upstream.blob_a, upstream.helloworld, upstream.symlink2, upstream.directory_with_keep,
                 upstream.directory_complicated):
        fill()
    for data in (TOOL, BIG, ROTTEN, b"ab", *SMALLS):
        store.blobs.put(data)
    tree = Directory.from_entries(tree_entries())
    store.directories.put(tree)
    store.path_infos.put(path_info(DirectoryNode(TREE.basename.encode(), tree.digest(), 40)))
    store.path_infos.put(path_info(FileNode(NAMED.basename.encode(), b3(TOOL), len(TOOL))))


def add_foreign() -> None:
    """Store NAMED's path info row under FOREIGN's digest too."""
    tables = memory.tables()
    with tables.lock:
        tables.path_infos[FOREIGN.digest] = tables.path_infos[NAMED.digest]


def add_missing() -> None:
    """Store the directory the tree's "missing" refers to: the store repaired."""
    with open_store(MEMORY) as store:
        store.directories.put(MISSING)


def rot(damaged: bool) -> None:
    """Flip one byte of ROTTEN's stored copy (``damaged``), or put the right bytes back."""
    stored = bytearray(ROTTEN)
    if damaged:
        stored[5] ^= 0x20
    tables = memory.tables()
    with tables.lock:
        tables.blobs[b3(ROTTEN)] = bytes(stored)


def separate_store_paths(count: int) -> list[bytes]:
    """Empty memory://, then store ``count`` paths of one directory each ("f<i>"); names in listing order."""
    memory.reset()
    paths = sorted((store_path(f"walked-{i}") for i in range(count)), key=lambda p: p.digest)
    with open_store(MEMORY) as store:
        store.blobs.put(TOOL)
        for i, path in enumerate(paths):
            d = Directory(files=(FileNode(b"f%d" % i, b3(TOOL), len(TOOL)),))
            store.directories.put(d)
            store.path_infos.put(path_info(DirectoryNode(path.basename.encode(), d.digest(), 1)))
    return [p.basename.encode() for p in paths]
