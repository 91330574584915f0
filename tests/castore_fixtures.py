"""Shared helpers for the castore tests: castore trees held in plain dicts.

A tree is described by a nested spec (dict = directory, bytes = file,
``Exe(bytes)`` = executable file, ``Link(target)`` = symlink) and built into
a root node plus the directories and blobs it references, keyed by digest.
The same tree can be built from a real directory on disk (to compare with
``nix-store --dump``) or from the events of the NAR reader (round trips).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from tvixmount.castore.directory import Directory, SizeConvention
from tvixmount.castore.narreader import NarDirectoryEnd, NarDirectoryStart, NarEvent, NarFile, NarSymlink
from tvixmount.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvixmount.errors import NotFound


@dataclass(frozen=True)
class Exe:
    contents: bytes


@dataclass(frozen=True)
class Link:
    target: bytes


@dataclass
class Store:
    """Directories and blobs by digest, with the two callbacks nar.py wants."""

    directories: dict[bytes, Directory] = field(default_factory=dict)
    blobs: dict[bytes, bytes] = field(default_factory=dict)
    convention: SizeConvention = SizeConvention.DOCUMENTED
    piece: int = 5  # read_blob yields pieces this long, to exercise re-framing

    def get_directory(self, digest: bytes) -> Directory:
        try:
            return self.directories[digest]
        except KeyError:
            raise NotFound(f"directory {digest.hex()}") from None

    def read_blob(self, digest: bytes, size: int) -> Iterator[bytes]:
        data = self.blobs[digest]
        for i in range(0, len(data), self.piece):
            yield data[i : i + self.piece]

    def put_blob(self, data: bytes) -> bytes:
        digest = blake3.blake3(data).digest()
        self.blobs[digest] = data
        return digest

    def put_directory(self, directory: Directory) -> DirectoryNode:
        """Store ``directory``; return an unnamed DirectoryNode for it."""
        digest = directory.digest()
        self.directories[digest] = directory
        return DirectoryNode(b"", digest, directory.size(self.convention))

    def build(self, spec: object, name: bytes = b"") -> Node:
        """The node for ``spec``, storing everything it references."""
        if isinstance(spec, dict):
            children = [self.build(child, child_name) for child_name, child in spec.items()]
            node = self.put_directory(Directory.from_entries(children))
            return DirectoryNode(name, node.digest, node.size)
        if isinstance(spec, Link):
            return SymlinkNode(name, spec.target)
        if isinstance(spec, Exe):
            return FileNode(name, self.put_blob(spec.contents), len(spec.contents), True)
        assert isinstance(spec, bytes), spec
        return FileNode(name, self.put_blob(spec), len(spec), False)

    def build_from_disk(self, path: Path, name: bytes = b"") -> Node:
        """The node for a real file tree, as an importer would build it."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return SymlinkNode(name, os.readlink(os.fsencode(path)))
        if stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
            return FileNode(name, self.put_blob(data), len(data), bool(st.st_mode & 0o100))
        children = [self.build_from_disk(path / os.fsdecode(n), n) for n in os.listdir(os.fsencode(path))]
        node = self.put_directory(Directory.from_entries(children))
        return DirectoryNode(name, node.digest, node.size)

    def build_from_nar(self, events: Iterable[NarEvent]) -> Node:
        """The root node of the tree a NAR describes (unnamed), reading each file fully."""
        open_dirs: list[list[Node]] = []
        root: Node | None = None

        def add(node: Node) -> None:
            nonlocal root
            if open_dirs:
                open_dirs[-1].append(node)
            else:
                root = node

        for event in events:
            name = event.path[-1] if event.path else b""
            if isinstance(event, NarDirectoryStart):
                open_dirs.append([])
            elif isinstance(event, NarDirectoryEnd):
                node = self.put_directory(Directory.from_entries(open_dirs.pop()))
                add(DirectoryNode(name, node.digest, node.size))
            elif isinstance(event, NarFile):
                data = bytearray()
                while piece := event.reader.read(7):
                    data += piece
                add(FileNode(name, self.put_blob(bytes(data)), event.size, event.executable))
            elif isinstance(event, NarSymlink):
                add(SymlinkNode(name, event.target))
        assert root is not None
        return root


def make_on_disk(root: Path, spec: object) -> None:
    """Create ``spec`` as a real file tree at ``root``."""
    if isinstance(spec, dict):
        root.mkdir()
        for name, child in spec.items():
            make_on_disk(root / os.fsdecode(name), child)
    elif isinstance(spec, Link):
        os.symlink(spec.target, root)
    elif isinstance(spec, Exe):
        root.write_bytes(spec.contents)
        root.chmod(0o755)
    else:
        assert isinstance(spec, bytes)
        root.write_bytes(spec)
        root.chmod(0o644)
