"""Import files, directories and symlinks from the local filesystem into a store.

One pass over the tree does all the work, because reading the data is what
costs: each file is opened once, ``fstat``-ed once (size and mode come from
the open descriptor, so they describe the bytes actually read), read in
1 MiB pieces, and every piece goes both into the NAR hash and into the blob
store. The NAR (docs/protocol.md, 'NAR format') is hashed while walking (written by castore/nar.py's
NarWriter, the one NAR encoder), which is why the walk visits entries in
ascending raw-byte name order, depth first: that is exactly NAR order, so no
second pass over the store is needed to compute nar_size / nar_sha256 (tests
check the result against the NAR of the stored tree and ``nix-store --dump``).

Where time goes, and what runs in parallel: the NAR hash is one sequential
stream and stays on the walking thread. Storing a blob (blake3, a file, a
database look-up) is independent per file, so files up to ``SMALL_FILE`` are
handed to a thread pool with the bytes already in memory (bounded by
``MAX_IN_FLIGHT`` bytes; blobsink.py); bigger files are streamed on the walking thread so
memory stays flat. Blob digests are therefore known only after the walk:
Directory messages are built afterwards, leaves first, from the recorded
shape of the tree.

Durability: each store path's blobs are written in one blob-service batch
where the backend has one (``blob_batch``). The embedded store then skips
the two fsyncs per blob and makes the whole batch durable with one syncfs
at its end; on the 40,000-file tree of tools/gen_tree.py (--seed 1) that
took a first import from ~570-710 to ~1,200-1,450 files/s on a 2-core VM
(interleaved runs; CPU time halved as well, ~44 s to ~20 s).

Visibility: blobs and directories are content-addressed and harmless when
orphaned, so a failed import may leave some behind (a failed batch records
none of its blobs); the PathInfo, the only thing that makes a store path
visible, is written last, after the batch has ended, so only after
everything below it is stored and durable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from ..castore import storepath
from ..castore.directory import Directory, SizeConvention, check_node, validate
from ..castore.nar import NarDigest, NarWriter
from ..castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, display_name
from ..castore.pathinfo import NarInfo, PathInfo
from ..errors import InvalidData
from ..store import Store
from .blobsink import BlobSink
from .progress import Bar, NullBar

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # read size; also the largest file stored from memory by the pool
SMALL_FILE = CHUNK
# Threads storing small files. Outside a batch, stores mostly wait on fsync
# and many threads pay off; in a batch the pool overlaps file creation with
# the walk (measured with batches: -j 2, 4 and 8 within noise of each other).
DEFAULT_WORKERS = 8

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class IngestError(InvalidData):
    """A path that cannot be imported; the message names it and says why."""


# -- the shape of the tree, resolved to castore nodes after the walk -----------


@dataclass(slots=True)
class _PendingFile:
    name: bytes
    size: int
    executable: bool
    digest: Future[bytes]


@dataclass(slots=True)
class _PendingDir:
    name: bytes
    path: bytes  # on disk, for error messages
    children: list[Node | _PendingFile | _PendingDir] = field(default_factory=list)
    node: DirectoryNode | None = None  # set once resolved


@dataclass(frozen=True, slots=True)
class ImportStats:
    files: int
    bytes: int
    directories: int
    symlinks: int


@dataclass(frozen=True, slots=True)
class Imported:
    """What one ``import`` of a path produced (the PathInfo is already stored)."""

    source: bytes
    store_path: storepath.StorePath
    info: PathInfo
    stats: ImportStats


@dataclass(frozen=True, slots=True)
class Tree:
    """A walked path whose blobs are stored: its root node (unnamed), directories and NAR."""

    root: Node
    directories: tuple[Directory, ...]  # leaves first
    nar_size: int
    nar_sha256: bytes
    stats: ImportStats

    def put(self, store: Store, info: PathInfo) -> None:
        """Store the directories, then ``info`` (the PathInfo naming this tree), last."""
        if self.directories:
            store.directories.put_many(list(self.directories))
        store.path_infos.put(info)


def show(path: bytes) -> str:
    """A path for messages: lossless for bytes that are not UTF-8."""
    return display_name(path)


def store_path_name(path: bytes) -> str:
    """The store path name an import of ``path`` gets: its basename, which must be a valid name."""
    base = os.path.basename(os.path.abspath(path))
    if not base:
        raise IngestError(f"{show(path)}: has no name to give the store path")
    try:
        name = base.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError(
            f"{show(path)}: name {show(base)!r} is not valid UTF-8, so it cannot name a store path"
        ) from None
    problem = storepath.check_name(name)
    if problem:
        raise IngestError(f"{show(path)}: {name!r} is not a valid store path name: {problem}")
    return name


def _special_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a named pipe (fifo)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return f"of unsupported type (mode {mode:o})"


def _os_error(path: bytes, exc: OSError) -> IngestError:
    return IngestError(f"{show(path)}: {exc.strerror or exc}")


class Ingester:
    """Imports local paths into one open store; one instance may import many paths."""

    def __init__(
        self,
        store: Store,
        convention: SizeConvention = SizeConvention.DOUBLED,
        workers: int = DEFAULT_WORKERS,
        files_bar: Bar | None = None,
        bytes_bar: Bar | None = None,
    ) -> None:
        self.store = store
        self.convention = convention
        self.workers = workers
        self.files_bar = NullBar() if files_bar is None else files_bar
        self.bytes_bar = NullBar() if bytes_bar is None else bytes_bar

    def import_path(self, path: str | bytes | os.PathLike[str]) -> Imported:
        """Import ``path`` (a directory, regular file or symlink) and put its PathInfo.

        Raises IngestError naming the offending path for anything that
        cannot be imported; store failures propagate as TvixError. On any
        failure no PathInfo is written.
        """
        source = os.fsencode(path)
        name = store_path_name(source)
        tree = self.ingest(source)
        path_ = storepath.from_nar_sha256(name, tree.nar_sha256)
        info = PathInfo(
            node=replace(tree.root, name=path_.basename.encode()),
            references=(),
            narinfo=NarInfo(nar_size=tree.nar_size, nar_sha256=tree.nar_sha256),
        )
        tree.put(self.store, info)
        log.info("imported %s as %s (%d files, NAR %d bytes)", show(source), path_, tree.stats.files,
                 tree.nar_size)
        return Imported(source, path_, info, tree.stats)

    def ingest(self, source: bytes) -> Tree:
        """Store the blobs of ``source`` and return its tree, whose directories are not stored yet.

        The caller decides from the NAR hash whether the tree becomes a store
        path (``Tree.put``) or is dropped (its blobs stay, harmless orphans).
        """
        run = _Run(self, source)
        # Every blob of this path is made durable at the batch's end, before
        # any directory or the PathInfo refers to it (see blob_batch).
        with blob_batch(self.store):
            try:
                root = run.walk()
                run.nar.flush()
                nar_size, nar_sha256 = run.nar_digest.result()
                root_node = run.resolve(root)
            except BaseException:
                run.sink.close(cancel=True)
                raise
            run.sink.close()
        stats = ImportStats(run.files, run.bytes, len(run.directories), run.symlinks)
        return Tree(root_node, tuple(run.directories), nar_size, nar_sha256, stats)


def blob_batch(store: Store) -> contextlib.AbstractContextManager[object]:
    """The blob service's write batch where it has one, else nothing.

    A batch lets a backend make all of one path's blobs durable in one step
    instead of per blob (the embedded store: one syncfs instead of two
    fsyncs per file); the blobs are visible once it ends, so everything that
    refers to them is written after it.
    """
    batch = getattr(store.blobs, "batch", None)
    return contextlib.nullcontext() if batch is None else batch()


class _Run:
    """The state of one import: the walk, its NAR hash and what is waiting to be stored."""

    def __init__(self, ingester: Ingester, source: bytes) -> None:
        self.ing = ingester
        self.source = source
        self.nar_digest = NarDigest()
        self.nar = NarWriter(self.nar_digest.update)
        self.sink = BlobSink(ingester.store, ingester.workers)
        self.directories: list[Directory] = []  # leaves first, each digest once
        self._dir_digests: set[bytes] = set()
        self.files = 0
        self.bytes = 0
        self.symlinks = 0

    # -- walking ---------------------------------------------------------------

    def walk(self) -> Node | _PendingFile | _PendingDir:
        """Walk the tree in NAR order, feeding the NAR hash and the blob sink."""
        try:
            st = os.lstat(self.source)
        except OSError as exc:
            raise _os_error(self.source, exc) from None
        if not stat.S_ISDIR(st.st_mode):
            return self._leaf(self.source, b"", st.st_mode)
        root = _PendingDir(b"", self.source)
        # Each frame: the directory being filled and its entries still to visit.
        stack = [(root, self._list(self.source))]
        self.nar.directory_start()
        while stack:
            current, entries = stack[-1]
            if not entries:
                stack.pop()
                self.nar.directory_end()
                if stack:
                    self.nar.entry_end()  # the entry holding it
                continue
            entry = entries.pop()
            name = entry.name
            self.nar.entry_start(name)
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                raise _os_error(entry.path, exc) from None
            if is_dir:
                child = _PendingDir(name, entry.path)
                current.children.append(child)
                stack.append((child, self._list(entry.path)))
                self.nar.directory_start()
                continue
            current.children.append(self._entry_leaf(entry))
            self.nar.entry_end()
        return root

    def _list(self, path: bytes) -> list[os.DirEntry[bytes]]:
        """Entries of a directory, in reverse name order (popped from the end = ascending)."""
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            raise _os_error(path, exc) from None
        entries.sort(key=_entry_name, reverse=True)
        return entries

    def _entry_leaf(self, entry: os.DirEntry[bytes]) -> Node | _PendingFile:
        try:
            if entry.is_symlink():
                return self._symlink(entry.path, entry.name)
            if entry.is_file(follow_symlinks=False):
                return self._file(entry.path, entry.name)
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as exc:
            raise _os_error(entry.path, exc) from None
        return self._leaf(entry.path, entry.name, mode)

    def _leaf(self, path: bytes, name: bytes, mode: int) -> Node | _PendingFile:
        if stat.S_ISLNK(mode):
            return self._symlink(path, name)
        if stat.S_ISREG(mode):
            return self._file(path, name)
        raise IngestError(f"{show(path)}: is {_special_kind(mode)}; only files, directories and symlinks")

    def _symlink(self, path: bytes, name: bytes) -> SymlinkNode:
        try:
            target = os.readlink(path)
        except OSError as exc:
            raise _os_error(path, exc) from None
        node = SymlinkNode(name, target)
        problem = check_node(node)  # the target only; names were checked by the caller
        if problem:
            raise IngestError(f"{show(path)}: {problem}")
        self.nar.symlink(target)
        self.symlinks += 1
        self.ing.files_bar.update(1)
        return node

    def _file(self, path: bytes, name: bytes) -> _PendingFile:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise _os_error(path, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced since it was listed
                raise IngestError(f"{show(path)}: is {_special_kind(st.st_mode)}; only regular files")
            size = st.st_size
            executable = bool(st.st_mode & stat.S_IXUSR)
            self.nar.file_start(size, executable)
            if size <= SMALL_FILE:
                data = _read_exactly(fd, size, path)
                self.nar.contents(data)
                digest = self.sink.put_small(data)
                self.ing.bytes_bar.update(size)
            else:
                done: Future[bytes] = Future()
                done.set_result(self.sink.stream(lambda write: self._stream(fd, size, path, write)))
                digest = done
            self.nar.file_end()
        except OSError as exc:
            raise _os_error(path, exc) from None
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size
        self.ing.files_bar.update(1)
        return _PendingFile(name, size, executable, digest)

    def _stream(self, fd: int, size: int, path: bytes, write: Callable[[bytes], None]) -> None:
        left = size
        while left:
            piece = os.read(fd, min(CHUNK, left))
            if not piece:
                raise IngestError(
                    f"{show(path)}: file shrank while being read ({size - left} of {size} bytes)"
                )
            self.nar.contents(piece)
            write(piece)
            left -= len(piece)
            self.ing.bytes_bar.update(len(piece))
        if os.read(fd, 1):
            raise IngestError(f"{show(path)}: file grew while being read (more than {size} bytes)")

    # -- resolving -------------------------------------------------------------

    def resolve(self, root: Node | _PendingFile | _PendingDir) -> Node:
        """Turn the recorded tree into castore nodes, storing Directory messages leaves first."""
        if isinstance(root, _PendingFile):
            return self._file_node(root)
        if not isinstance(root, _PendingDir):
            return root
        # Post-order with an explicit stack: a directory is built once all its children are.
        stack: list[tuple[_PendingDir, bool]] = [(root, False)]
        while stack:
            pending, expanded = stack.pop()
            if not expanded:
                stack.append((pending, True))
                stack.extend((c, False) for c in pending.children if isinstance(c, _PendingDir))
                continue
            nodes: list[Node] = []
            for child in pending.children:
                if isinstance(child, _PendingFile):
                    nodes.append(self._file_node(child))
                elif isinstance(child, _PendingDir):
                    assert child.node is not None
                    nodes.append(child.node)
                else:
                    nodes.append(child)
            directory = Directory.from_entries(nodes)
            validate(directory, show(pending.path))
            digest = directory.digest()
            if digest not in self._dir_digests:
                self._dir_digests.add(digest)
                self.directories.append(directory)
            pending.node = DirectoryNode(pending.name, digest, directory.size(self.ing.convention))
            pending.children = []  # let the tree go as it is resolved
        assert root.node is not None
        return root.node

    @staticmethod
    def _file_node(pending: _PendingFile) -> FileNode:
        return FileNode(pending.name, pending.digest.result(), pending.size, pending.executable)


def _entry_name(entry: os.DirEntry[bytes]) -> bytes:
    return entry.name


def _read_exactly(fd: int, size: int, path: bytes) -> bytes:
    """All ``size`` bytes of a small file, and proof that there are no more."""
    data = os.read(fd, size) if size else b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            raise IngestError(f"{show(path)}: file shrank while being read ({len(data)} of {size} bytes)")
        data += more
    if os.read(fd, 1):
        raise IngestError(f"{show(path)}: file grew while being read (more than {size} bytes)")
    return data

