"""Read-only views of a store for people: ``ls``, ``cat``, ``info`` and ``list``.

These talk to the store services directly (no mount needed), so an operator
can check what an import produced or what a mount should show. Arguments
name a store path as ``<hash>-<name>`` or ``/nix/store/<hash>-<name>``,
optionally followed by ``/sub/path`` inside it. Symlinks inside the tree are
shown, never followed: the tree is what the store holds, and a target may
point anywhere (``/nix/store/...`` of another path, or nowhere).

Output is bytes: names and file contents go to stdout unchanged (they need
not be UTF-8); only ``info`` prints text (JSON, with backslash escapes for
odd names, as pathinfo_to_json renders them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..castore import storepath
from ..castore.directory import Directory
from ..castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, b3_text, display_name
from ..castore.pathinfo import PathInfo, pathinfo_to_json
from ..errors import IntegrityError, InvalidArgument, InvalidData, NotFound
from ..store import Store

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed command-line argument: a store path and the components below it."""

    store_path: storepath.StorePath
    components: tuple[bytes, ...]

    @property
    def text(self) -> str:
        sub = "".join("/" + display_name(c) for c in self.components)
        return self.store_path.absolute + sub


@dataclass(frozen=True, slots=True)
class Resolved:
    target: Target
    info: PathInfo
    node: Node  # the node the argument names (named as in its parent; the root as the basename)


def parse_target(arg: str) -> Target:
    """``<hash>-<name>[/sub/path]`` or ``/nix/store/<hash>-<name>[/sub/path]``.

    Raises InvalidArgument (a usage error) for text that names no store path.
    """
    raw = os.fsencode(arg)
    prefix = storepath.STORE_DIR.encode() + b"/"
    if raw.startswith(prefix):
        raw = raw[len(prefix) :]
    elif raw.startswith(b"/"):
        raise InvalidArgument(f"{arg}: not a store path (expected {storepath.STORE_DIR}/<hash>-<name>[/...])")
    base, _, rest = raw.partition(b"/")
    try:
        parsed = storepath.parse_basename(base)
    except InvalidData as exc:
        raise InvalidArgument(f"{arg}: not a store path: {exc}") from None
    components = tuple(c for c in rest.split(b"/") if c and c != b".")
    if b".." in components:
        raise InvalidArgument(f"{arg}: '..' is not allowed inside a store path argument")
    return Target(parsed, components)


def lookup(store: Store, target: Target) -> Resolved:
    """Find the PathInfo and walk down to the named node (no symlinks followed)."""
    info = store.path_infos.get(target.store_path.digest)
    if info is None or info.node.name != target.store_path.basename.encode():
        raise NotFound(f"{target.store_path.absolute}: not in the store")
    node: Node = info.node
    walked = target.store_path.absolute
    for component in target.components:
        if isinstance(node, SymlinkNode):
            raise InvalidArgument(f"{walked}: is a symlink to {display_name(node.target)}, not followed")
        if not isinstance(node, DirectoryNode):
            raise InvalidArgument(f"{walked}: not a directory")
        directory = get_directory(store, node.digest, walked)
        found = find_entry(directory, component)
        walked += "/" + display_name(component)
        if found is None:
            raise NotFound(f"{walked}: no such file or directory")
        node = found
    return Resolved(target, info, node)


def get_directory(store: Store, digest: bytes, where: str) -> Directory:
    directory = store.directories.get(digest)
    if directory is None:
        raise InvalidData(f"{where}: directory {b3_text(digest)} is missing from the store")
    return directory


def find_entry(directory: Directory, name: bytes) -> Node | None:
    for entry in directory.entries():
        if entry.name == name:
            return entry
    return None


# -- ls -----------------------------------------------------------------------


def mode_string(node: Node) -> str:
    """The permission column of ``ls -l``, as a read-only mount shows these nodes."""
    if isinstance(node, DirectoryNode):
        return "dr-xr-xr-x"
    if isinstance(node, FileNode):
        return "-r-xr-xr-x" if node.executable else "-r--r--r--"
    return "lrwxrwxrwx"


def long_line(node: Node, name: bytes) -> bytes:
    """``mode size digest name[ -> target]``; size is the DirectoryNode.size for directories."""
    if isinstance(node, SymlinkNode):
        size, digest = len(node.target), "-"
    else:
        size, digest = node.size, b3_text(node.digest)
    line = f"{mode_string(node)} {size:>12} {digest:<47} ".encode() + name
    if isinstance(node, SymlinkNode):
        line += b" -> " + node.target
    return line


def ls_lines(store: Store, resolved: Resolved, long: bool) -> Iterator[bytes]:
    """Lines for ``ls``: the entries of a directory, or the one named node itself."""
    node = resolved.node
    if isinstance(node, DirectoryNode):
        directory = get_directory(store, node.digest, resolved.target.text)
        for entry in directory.entries():
            yield long_line(entry, entry.name) if long else entry.name
        return
    name = os.fsencode(resolved.target.text)
    yield long_line(node, name) if long else name


# -- cat ------------------------------------------------------------------------


def cat(store: Store, resolved: Resolved, out: BinaryIO) -> int:
    """Stream a file's verified bytes to ``out``; return the number written."""
    node = resolved.node
    where = resolved.target.text
    if isinstance(node, DirectoryNode):
        raise InvalidArgument(f"{where}: is a directory")
    if isinstance(node, SymlinkNode):
        raise InvalidArgument(f"{where}: is a symlink to {display_name(node.target)}, not followed")
    written = 0
    with store.blobs.open_read(node.digest) as reader:
        while written < node.size:
            piece = reader.pread(written, min(CHUNK, node.size - written))
            if not piece:
                break
            out.write(piece)
            written += len(piece)
        if written != node.size or reader.pread(written, 1):
            raise IntegrityError(
                f"{where}: blob {b3_text(node.digest)} is not {node.size} bytes long as its FileNode says"
            )
    out.flush()
    return written


# -- info, list -------------------------------------------------------------------


def info_json(resolved: Resolved) -> str:
    return json.dumps(pathinfo_to_json(resolved.info), indent=2)


def list_paths(store: Store) -> list[str]:
    """Every store path held, absolute, sorted by name then hash (as a person scans them)."""
    paths = []
    for info in store.path_infos.list():
        paths.append(storepath.STORE_DIR + "/" + display_name(info.node.name))
    paths.sort(key=lambda p: (p[len(storepath.STORE_DIR) + 34 :], p))
    return paths
