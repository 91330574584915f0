"""``tvixstore sync``: store paths and their closure from one store into another.

(tvix-store's ``copy`` is something else, a Nix closure from /nix/store:
admin/nixcopy.py.)

The target must never show a store path whose tree it does not hold, so
everything goes in dependency order:

* paths: the closure of the requested paths (their references, recursively,
  as each PathInfo lists them) is copied references first, so a referrer
  appears only after what it refers to;
* within a path: its blobs first (inside the target's write batch where it
  has one, so they are durable before anything names them), then its
  directories leaves first in one ``put_many``, then the PathInfo last.

What is skipped: a path whose PathInfo the target already holds with the
same root node (a complete tree is behind every PathInfo, so nothing below
it is looked at), and each blob the target already has (one ``stat``).
Directories are sent as they are, sizes included: their digests, and so
every parent's, depend on them. Blobs are read through the source's
verifying reader and written with their expected digest, so the target
re-checks every byte.

The closure is resolved before anything is copied: a requested path or a
reference missing from the source is an error naming it, and nothing is
written for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..castore import nixbase32, storepath
from ..castore.directory import Directory
from ..castore.nodes import DIGEST_LEN, DirectoryNode, FileNode, b3_text
from ..castore.pathinfo import PathInfo
from ..errors import InvalidData, NotFound, Unavailable
from ..store import Store
from .ingest import blob_batch
from .progress import Bar, NullBar

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read from the source blob
# Blobs copied at once: hides disk reads of the source and round trips to a
# remote store (the 40,000-file store into a new embedded one, 2-core VM:
# -j 1 44 s, -j 8 23 s).
DEFAULT_JOBS = 8


@dataclass(slots=True)
class CopyStats:
    paths: int = 0  # store paths copied
    present: int = 0  # store paths the target already had
    blobs: int = 0  # blobs copied
    blobs_skipped: int = 0  # blobs the target already had
    bytes: int = 0  # blob bytes copied
    directories: int = 0  # directories sent to the target

    def summary(self, elapsed: float) -> str:
        return (
            f"copied {self.paths} paths ({self.present} already present): {self.blobs} blobs copied, "
            f"{self.blobs_skipped} skipped, {self.bytes} bytes, {self.directories} directories "
            f"in {elapsed:.2f} s"
        )


def path_of(info: PathInfo) -> storepath.StorePath:
    """The store path a (validated) PathInfo is stored under."""
    return storepath.parse_basename(info.node.name)


@dataclass(slots=True)
class _Frame:
    info: PathInfo
    refs: list[tuple[bytes, str]] = field(default_factory=list)  # (digest, name) still to visit


class Closure:
    """Resolves store paths to their PathInfos and references in the source store."""

    def __init__(self, source: Store) -> None:
        self.source = source
        self._known: dict[bytes, PathInfo] = {}  # path infos already fetched

    def every_path(self) -> list[storepath.StorePath]:
        """Every store path the source lists (for ``--all``)."""
        paths = []
        for info in self.source.path_infos.list():
            path = path_of(info)
            self._known[path.digest] = info
            paths.append(path)
        return paths

    def resolve(self, roots: Iterable[storepath.StorePath]) -> list[PathInfo]:
        """The PathInfos of ``roots`` and everything they reference, references first.

        Raises NotFound naming the first requested path, or the first
        reference (and who refers to it), that the source does not hold.
        """
        order: list[PathInfo] = []
        done: set[bytes] = set()
        for root in roots:
            if root.digest in done:
                continue
            info = self._source_info(root.digest, root.absolute, None)
            if path_of(info) != root:  # same digest, other name: not the path asked for
                raise NotFound(f"{root}: not in the source store")
            stack = [self._frame(info)]
            visiting = {root.digest}
            while stack:
                top = stack[-1]
                if top.refs:
                    digest, name = top.refs.pop()
                    if digest in done or digest in visiting:  # a self-reference (or a cycle)
                        continue
                    visiting.add(digest)
                    stack.append(self._frame(self._source_info(digest, name, top.info)))
                    continue
                stack.pop()
                digest = path_of(top.info).digest
                visiting.discard(digest)
                done.add(digest)
                order.append(top.info)
        return order

    @staticmethod
    def _frame(info: PathInfo) -> _Frame:
        names = info.narinfo.reference_names if info.narinfo is not None else ()
        refs = []
        for index, digest in enumerate(info.references):
            name = names[index] if len(names) == len(info.references) else nixbase32.encode(digest)
            refs.append((digest, f"{storepath.STORE_DIR}/{name}"))
        refs.reverse()  # popped from the end: visited in the order the PathInfo lists them
        return _Frame(info, refs)

    def _source_info(self, digest: bytes, name: str, referrer: PathInfo | None) -> PathInfo:
        info = self._known.get(digest)
        if info is None:
            info = self.source.path_infos.get(digest)
        if info is None:
            if referrer is None:
                raise NotFound(f"{name}: not in the source store")
            raise NotFound(f"{name} (referenced by {path_of(referrer).absolute}): not in the source store")
        self._known[digest] = info
        return info


class Copier:
    """Copies store paths from ``source`` to ``target``; one instance may copy many."""

    def __init__(
        self,
        source: Store,
        target: Store,
        jobs: int = DEFAULT_JOBS,
        paths_bar: Bar | None = None,
        bytes_bar: Bar | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.jobs = max(jobs, 1)
        self.paths_bar = NullBar() if paths_bar is None else paths_bar
        self.bytes_bar = NullBar() if bytes_bar is None else bytes_bar
        self.stats = CopyStats()
        self._pool: ThreadPoolExecutor | None = None  # while copy() runs with jobs > 1

    def check_target(self, target_name: str) -> None:
        """One cheap request per service, so that an unreachable target is one error naming it."""
        try:
            self.target.path_infos.get(bytes(storepath.DIGEST_LEN))
            self.target.directories.get(bytes(DIGEST_LEN))
            self.target.blobs.stat(bytes(DIGEST_LEN))
        except Unavailable as exc:
            raise Unavailable(f"target {target_name}: {exc}") from None

    # -- copying -------------------------------------------------------------------

    def copy(self, infos: list[PathInfo]) -> CopyStats:
        """Copy each of ``infos`` in the order given (a closure, references first)."""
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="copy") as pool:
            self._pool = pool if self.jobs > 1 else None
            try:
                for info in infos:
                    self.copy_path(info)
                    self.paths_bar.update(1)
            finally:
                self._pool = None
        return self.stats

    def copy_path(self, info: PathInfo) -> None:
        path = path_of(info)
        existing = self.target.path_infos.get(path.digest)
        if existing is not None and existing.node == info.node:
            log.debug("%s: already in the target", path)
            self.stats.present += 1
            return
        directories = self._directories(info, path)
        blobs = _blobs(info, directories)
        with blob_batch(self.target):
            self._copy_blobs(blobs, path)
        if directories:
            self.target.directories.put_many(directories)
            self.stats.directories += len(directories)
        self.target.path_infos.put(info)
        self.stats.paths += 1
        log.info("copied %s (%d blobs, %d directories)", path, len(blobs), len(directories))

    def _directories(self, info: PathInfo, path: storepath.StorePath) -> list[Directory]:
        """The path's directories from the source, leaves first (empty for a file or symlink)."""
        if not isinstance(info.node, DirectoryNode):
            return []
        try:
            found = list(self.source.directories.get_recursive(info.node.digest))
        except NotFound as exc:
            raise NotFound(f"{path}: {exc}") from None
        if not found:
            raise NotFound(f"{path}: directory {b3_text(info.node.digest)} is not in the source store")
        return leaves_first(found)

    def _copy_blobs(self, blobs: list[tuple[bytes, int]], path: storepath.StorePath) -> None:
        pool = self._pool
        if pool is None or len(blobs) <= 1:
            for digest, size in blobs:
                self._count(self._copy_blob(digest, size, path))
            return
        futures = [pool.submit(self._copy_blob, digest, size, path) for digest, size in blobs]
        try:
            for future in futures:
                self._count(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)  # none may still write into the batch that is about to be dropped
            raise

    def _count(self, copied: int | None) -> None:
        if copied is None:
            self.stats.blobs_skipped += 1
        else:
            self.stats.blobs += 1
            self.stats.bytes += copied

    def _copy_blob(self, digest: bytes, size: int, path: storepath.StorePath) -> int | None:
        """Copy one blob unless the target has it; the bytes copied, or None when skipped."""
        if self.target.blobs.stat(digest) is not None:
            return None
        try:
            reader = self.source.blobs.open_read(digest)
        except NotFound:
            raise NotFound(f"{path}: blob {b3_text(digest)}: not in the source store") from None
        with reader, self.target.blobs.open_write(expected_digest=digest) as writer:
            if reader.size != size:
                raise InvalidData(f"{path}: blob {b3_text(digest)}: the source holds {reader.size} bytes, "
                                  f"the tree says {size}")
            offset = 0
            while offset < size:
                piece = reader.pread(offset, min(CHUNK, size - offset))
                if not piece:
                    raise InvalidData(f"{path}: blob {b3_text(digest)}: source blob ended at {offset} "
                                      f"of {size} bytes")
                writer.write(piece)
                offset += len(piece)
                self.bytes_bar.update(len(piece))
            writer.commit()
        return size


def leaves_first(directories: list[Directory]) -> list[Directory]:
    """A closure reordered so that every directory comes after all its children.

    Reversing the parents-first order of ``get_recursive`` is not enough: a
    directory shared by two parents on different levels can come out before
    one of them. Post-order over the digests is.
    """
    by_digest = {d.digest(): d for d in directories}
    order: list[Directory] = []
    done: set[bytes] = set()
    for start in by_digest:
        if start in done:
            continue
        stack: list[tuple[bytes, Iterator[bytes]]] = [(start, _children(by_digest[start]))]
        done.add(start)
        while stack:
            digest, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                order.append(by_digest[digest])
            elif child not in done and child in by_digest:
                done.add(child)
                stack.append((child, _children(by_digest[child])))
    return order


def _children(directory: Directory) -> Iterator[bytes]:
    return (node.digest for node in directory.directories)


def _blobs(info: PathInfo, directories: list[Directory]) -> list[tuple[bytes, int]]:
    """Every distinct (digest, size) of the path's files, in a stable order."""
    if isinstance(info.node, FileNode):
        return [(info.node.digest, info.node.size)]
    seen: dict[bytes, int] = {}
    for directory in directories:
        for file in directory.files:
            seen.setdefault(file.digest, file.size)
    return list(seen.items())
