"""Directory: validation, canonical encoding and digest.

A Directory's identity is the blake3 digest of its canonical protobuf
encoding (fields in number order, lists sorted by name, defaults omitted,
no unknown fields). Everything that arrives from outside (a store, a gRPC
peer, a file on disk) is decoded with ``decode_directory`` and passes
``validate`` before anything looks at its children.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import blake3
from google.protobuf.message import DecodeError

from ..errors import InvalidData
from ..proto import castore_pb2
from .nodes import DIGEST_LEN, DirectoryNode, FileNode, Node, SymlinkNode, display_name

MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
# Largest canonical encoding accepted, in or out (about 700,000 entries with short
# names): bounds what one directory costs a worker to decode (~0.5 KiB per entry) and
# keeps its reply within a worker frame (protocol.framing.MAX_FRAME). tvix itself sends at
# most 4 MiB per message.
MAX_ENCODED_LEN = 32 << 20
_U64_MAX = (1 << 64) - 1


class SizeConvention(Enum):
    """How ``DirectoryNode.size`` is counted (docs/protocol.md, 'Directory size').

    DOCUMENTED is what the proto comments say: every descendant once.
    DOUBLED is what a current tvix-store computes and checks on Put: every
    entry twice. Reading never checks sizes; writing to a server must match
    the server's convention.
    """

    DOCUMENTED = "documented"
    DOUBLED = "doubled"


@dataclass(frozen=True, slots=True)
class Directory:
    directories: tuple[DirectoryNode, ...] = ()
    files: tuple[FileNode, ...] = ()
    symlinks: tuple[SymlinkNode, ...] = ()

    def __len__(self) -> int:
        return len(self.directories) + len(self.files) + len(self.symlinks)

    def entries(self) -> Iterator[Node]:
        """All children in one list, ascending by raw name bytes (NAR and readdir order)."""
        return heapq.merge(self.directories, self.files, self.symlinks, key=_name)

    def size(self, convention: SizeConvention = SizeConvention.DOCUMENTED) -> int:
        """The value a parent's DirectoryNode.size carries for this directory."""
        per_entry = 1 if convention is SizeConvention.DOCUMENTED else 2
        total = per_entry * len(self) + sum(d.size for d in self.directories)
        if total > _U64_MAX:
            raise InvalidData("directory size overflows u64")
        return total

    def to_proto(self) -> castore_pb2.Directory:
        msg = castore_pb2.Directory()
        for d in self.directories:
            msg.directories.add(name=d.name, digest=d.digest, size=d.size)
        for f in self.files:
            msg.files.add(name=f.name, digest=f.digest, size=f.size, executable=f.executable)
        for s in self.symlinks:
            msg.symlinks.add(name=s.name, target=s.target)
        return msg

    def encode(self) -> bytes:
        """The canonical encoding, identical to what prost emits."""
        return self.to_proto().SerializeToString(deterministic=True)

    def digest(self) -> bytes:
        return blake3.blake3(self.encode()).digest()

    @classmethod
    def from_entries(cls, entries: Iterator[Node] | list[Node]) -> Directory:
        """Build a Directory from nodes in any order (sorted here, not validated)."""
        dirs: list[DirectoryNode] = []
        files: list[FileNode] = []
        links: list[SymlinkNode] = []
        for node in entries:
            if isinstance(node, DirectoryNode):
                dirs.append(node)
            elif isinstance(node, FileNode):
                files.append(node)
            else:
                links.append(node)
        return cls(
            tuple(sorted(dirs, key=_name)),
            tuple(sorted(files, key=_name)),
            tuple(sorted(links, key=_name)),
        )


def _name(node: Node) -> bytes:
    return node.name


def check_name(name: bytes) -> str | None:
    """Why ``name`` is not a valid path component, or None if it is."""
    if not name:
        return "name is empty"
    if name in (b".", b".."):
        return f"name is {name.decode()!r}"
    if b"/" in name:
        return "name contains '/'"
    if b"\0" in name:
        return "name contains a NUL byte"
    if len(name) > MAX_NAME_LEN:
        return f"name is {len(name)} bytes long, more than {MAX_NAME_LEN}"
    return None


def check_node(node: Node) -> str | None:
    """Why ``node`` is invalid apart from its name, or None if it is valid."""
    if isinstance(node, (DirectoryNode, FileNode)):
        if len(node.digest) != DIGEST_LEN:
            return f"digest is {len(node.digest)} bytes, not {DIGEST_LEN}"
        if not 0 <= node.size <= _U64_MAX:
            return f"size {node.size} is not a u64"
        return None
    if not node.target:
        return "symlink target is empty"
    if b"\0" in node.target:
        return "symlink target contains a NUL byte"
    if len(node.target) > MAX_TARGET_LEN:
        return f"symlink target is {len(node.target)} bytes long, more than {MAX_TARGET_LEN}"
    return None


def validate(directory: Directory, what: str | Callable[[], str] = "directory") -> None:
    """Raise InvalidData naming the first rule ``directory`` breaks.

    ``what`` names the directory in the message (usually its b3: digest);
    it may be a function, called only to build a message.
    DirectoryNode.size is deliberately not checked (docs/protocol.md, 'Directory size').

    Every directory a mount lists passes through here, so the loop only
    asks yes/no per entry, with no string built; the first entry that
    fails is explained by ``_explain``, which walks the same rules slowly.
    """
    seen: set[bytes] = set()
    for nodes in (directory.directories, directory.files):
        previous = b""
        for node in nodes:
            name = node.name
            if (name <= previous or name in seen or len(name) > MAX_NAME_LEN or b"/" in name or b"\0" in name
                    or name == b"." or name == b".." or len(node.digest) != DIGEST_LEN
                    or not 0 <= node.size <= _U64_MAX):
                _explain(directory, _named(what))
            seen.add(name)
            previous = name
    previous = b""
    for link in directory.symlinks:
        name, target = link.name, link.target
        if (name <= previous or name in seen or len(name) > MAX_NAME_LEN or b"/" in name or b"\0" in name
                or name == b"." or name == b".." or not target or b"\0" in target
                or len(target) > MAX_TARGET_LEN):
            _explain(directory, _named(what))
        seen.add(name)
        previous = name
    try:
        directory.size()
    except InvalidData:
        raise InvalidData(f"{_named(what)}: descendant count overflows u64") from None


def _named(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _explain(directory: Directory, what: str) -> None:
    """Raise InvalidData for the first broken rule, in docs/protocol.md's 'Directory validation' order."""
    seen: set[bytes] = set()
    groups: tuple[tuple[str, tuple[Node, ...]], ...] = (
        ("directories", directory.directories),
        ("files", directory.files),
        ("symlinks", directory.symlinks),
    )
    for field, nodes in groups:
        previous: bytes | None = None
        for index, node in enumerate(nodes):
            where = f"{what}: {field}[{index}] {display_name(node.name)!r}"
            problem = check_name(node.name) or check_node(node)
            if problem:
                raise InvalidData(f"{where}: {problem}")
            if previous is not None:
                if node.name == previous:
                    raise InvalidData(f"{where}: duplicate name in {field}")
                if node.name < previous:
                    raise InvalidData(f"{where}: wrong sorting, comes after {display_name(previous)!r}")
            if node.name in seen:
                raise InvalidData(f"{where}: name also used by another entry kind")
            seen.add(node.name)
            previous = node.name
    raise AssertionError(f"{what}: the fast check failed but no rule is broken")


def from_proto(msg: castore_pb2.Directory) -> Directory:
    """Convert a decoded message (unknown fields are simply not carried over)."""
    return Directory(
        tuple(DirectoryNode(d.name, d.digest, d.size) for d in msg.directories),
        tuple(FileNode(f.name, f.digest, f.size, f.executable) for f in msg.files),
        tuple(SymlinkNode(s.name, s.target) for s in msg.symlinks),
    )


def decode_directory(data: bytes, expected_digest: bytes | None = None) -> Directory:
    """Decode and validate a Directory; check its digest when one is expected.

    The digest is computed over the re-encoded message, as tvix does, so
    unknown fields sent by a newer peer neither break nor change it.
    """
    return decode_directory_digest(data, expected_digest)[1]


def decode_directory_digest(data: bytes, expected_digest: bytes | None = None) -> tuple[bytes, Directory]:
    """Like decode_directory, and also return the directory's digest.

    The canonical encoding is re-made from the parsed message by the
    protobuf runtime (unknown fields dropped, fields in number order,
    defaults omitted), which is byte-identical to ``Directory.encode()``
    but costs no Python work per entry: directory fetches are a hot path.
    """
    if len(data) > MAX_ENCODED_LEN:
        named = "directory" if expected_digest is None else f"directory {_b3(expected_digest)}"
        raise InvalidData(f"{named} is {len(data)} bytes encoded, more than the {MAX_ENCODED_LEN} a "
                          "directory may have; not decoded")
    msg = castore_pb2.Directory()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidData(f"directory is not a valid protobuf message: {exc}") from None
    directory = from_proto(msg)
    def what() -> str:  # only for a message: a tree fetch decodes thousands of directories
        return "directory" if expected_digest is None else f"directory {_b3(expected_digest)}"

    validate(directory, what)
    msg.DiscardUnknownFields()
    actual = blake3.blake3(msg.SerializeToString(deterministic=True)).digest()
    if expected_digest is not None and actual != expected_digest:
        raise InvalidData(f"{what()}: content hashes to {_b3(actual)}")
    return actual, directory


def _b3(digest: bytes) -> str:
    from .nodes import b3_text

    return b3_text(digest)
