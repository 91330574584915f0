"""``tvixstore verify``: re-check every object in a store, report each bad one.

Three passes, each independent of what the store believes about itself:

1. every blob is read in full and its blake3 recomputed here (the store's
   reader checks its own per-chunk digests too; either failing is reported),
   and its length compared with what the store's ``stat`` says;
2. every directory is read (decoding re-hashes and validates it) and its
   references are checked: child directories present, blobs present with
   the size the FileNode claims;
3. every PathInfo is read (and so validated) and its tree walked to make
   sure it is complete, i.e. each directory and blob below the root is
   present and good. With ``nar=True`` the NAR is re-rendered from the store
   and its size and sha256 compared with the PathInfo's.

A store that cannot list its blobs or directories (tvix's gRPC protocol has
no List for them) skips that listing pass; the objects the path infos reach
are then fetched and checked while walking, so a remote store still gets
every reachable object verified.

Every problem is reported once, as one line naming the object, and the run
goes on. A damaged object is reported as itself, and again under each store
path whose tree it breaks (that line says which object), but not under every
directory that points at it. The caller turns "any problem" into exit 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import blake3

from ..castore.directory import Directory
from ..castore.nar import nar_hash
from ..castore.nodes import DirectoryNode, FileNode, Node, b3_text, display_name
from ..castore.pathinfo import PathInfo
from ..errors import InvalidArgument, TvixError
from ..store import Store
from .progress import Bar, NullBar

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# What is known about an object after it was looked at.
_GOOD, _BAD, _MISSING = "good", "damaged", "missing"


@dataclass(frozen=True, slots=True)
class Problem:
    what: str  # "blob b3:...", "directory b3:...", "path /nix/store/..."
    why: str

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


@dataclass(slots=True)
class Report:
    blobs: int = 0
    blob_bytes: int = 0
    directories: int = 0
    path_infos: int = 0
    unlisted: list[str] = field(default_factory=list)  # kinds the store could not list
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "OK" if not self.problems else f"{len(self.problems)} problem(s)"
        note = ""
        if self.unlisted:
            note = f" (the store cannot list {' or '.join(self.unlisted)}: checked those path infos reach)"
        return (
            f"checked {self.blobs} blobs ({self.blob_bytes} bytes), {self.directories} directories, "
            f"{self.path_infos} path infos{note}: {verdict}"
        )


class Verifier:
    """One run of the three passes over ``store``; ``on_problem`` sees each problem as found."""

    def __init__(
        self,
        store: Store,
        on_problem: Callable[[Problem], None] | None = None,
        bar: Callable[[str, int], Bar] | None = None,
        nar: bool = False,
    ) -> None:
        self.store = store
        self.on_problem = on_problem or (lambda p: None)
        self.make_bar = bar or (lambda desc, total: NullBar())
        self.nar = nar
        self.report = Report()
        self.blobs: dict[bytes, str] = {}  # digest -> _GOOD/_BAD/_MISSING
        self.blob_sizes: dict[bytes, int] = {}  # good blobs only
        self.dirs: dict[bytes, str] = {}
        self.good_dirs: dict[bytes, Directory] = {}
        self.blobs_listed = self.dirs_listed = False
        self._settled: dict[bytes, str | None] = {}  # directory digest -> first problem in its tree

    def problem(self, what: str, why: str) -> None:
        if why.startswith(what + " "):  # store errors often name the object themselves
            why = why[len(what) + 1 :]
        p = Problem(what, why)
        self.report.problems.append(p)
        log.debug("problem: %s", p)
        self.on_problem(p)

    def run(self) -> Report:
        self.check_blobs()
        self.check_directories()
        self.check_path_infos()
        return self.report

    def _list(self, kind: str, source: Callable[[], Iterator[bytes]]) -> list[bytes] | None:
        """Every digest the store holds, or None when it cannot list them (a problem if it should)."""
        try:
            return list(source())
        except InvalidArgument as exc:  # the backend has no listing (gRPC)
            log.info("%s", exc)
            self.report.unlisted.append(kind)
            return None
        except TvixError as exc:
            self.problem(f"{kind} listing", str(exc))
            return None

    # -- 1. blobs ---------------------------------------------------------------

    def _check_each(self, kind: str, digests: list[bytes], check: Callable[[bytes, bool], object]) -> None:
        """Check every listed object of one kind, with a progress bar."""
        progress = self.make_bar(kind, len(digests))
        try:
            for digest in digests:
                check(digest, True)
                progress.update(1)
        finally:
            progress.close()

    def check_blobs(self) -> None:
        digests = self._list("blobs", self.store.blobs.iter_digests)
        if digests is None:
            return
        self.blobs_listed = True
        self._check_each("blobs", digests, self._check_blob)

    def _check_blob(self, digest: bytes, listed: bool) -> str:
        """Read and re-hash one blob; record and return its state."""
        what = f"blob {b3_text(digest)}"
        try:
            st = self.store.blobs.stat(digest)
            if st is None:
                if listed:
                    self.problem(what, "listed by the store but stat finds nothing")
                self.blobs[digest] = _MISSING
                return _MISSING
            self.report.blobs += 1
            hasher = blake3.blake3()
            total = 0
            with self.store.blobs.open_read(digest) as reader:
                while True:
                    piece = reader.pread(total, CHUNK)
                    if not piece:
                        break
                    hasher.update(piece)
                    total += len(piece)
        except TvixError as exc:
            self.problem(what, str(exc))
            self.blobs[digest] = _BAD
            return _BAD
        self.report.blob_bytes += total
        actual = hasher.digest()
        if actual != digest:
            self.problem(what, f"contents hash to {b3_text(actual)}")
        elif total != st.size:
            self.problem(what, f"{total} bytes read, but stat says {st.size}")
        else:
            self.blob_sizes[digest] = total
            self.blobs[digest] = _GOOD
            return _GOOD
        self.blobs[digest] = _BAD
        return _BAD

    def _blob_state(self, digest: bytes) -> str:
        state = self.blobs.get(digest)
        if state is None:
            state = _MISSING if self.blobs_listed else self._check_blob(digest, listed=False)
        return state

    # -- 2. directories -----------------------------------------------------------

    def check_directories(self) -> None:
        digests = self._list("directories", self.store.directories.iter_digests)
        if digests is None:
            return
        self.dirs_listed = True
        self._check_each("directories", digests, self._load_dir)
        for digest, directory in self.good_dirs.items():
            for why in self._reference_problems(directory):
                self.problem(f"directory {b3_text(digest)}", why)

    def _load_dir(self, digest: bytes, listed: bool) -> str:
        what = f"directory {b3_text(digest)}"
        try:
            directory = self.store.directories.get(digest)
        except TvixError as exc:
            self.report.directories += 1
            self.problem(what, str(exc))
            self.dirs[digest] = _BAD
            return _BAD
        if directory is None:
            if listed:
                self.problem(what, "listed by the store but cannot be read")
            self.dirs[digest] = _MISSING
            return _MISSING
        self.report.directories += 1
        self.good_dirs[digest] = directory
        self.dirs[digest] = _GOOD
        return _GOOD

    def _dir_state(self, digest: bytes) -> str:
        state = self.dirs.get(digest)
        if state is None:
            state = _MISSING if self.dirs_listed else self._load_dir(digest, listed=False)
        return state

    def _reference_problems(self, directory: Directory) -> Iterator[str]:
        """What this directory itself gets wrong: references to absent objects, wrong file sizes."""
        for child in directory.directories:
            if self._dir_state(child.digest) == _MISSING:
                yield f"entry {display_name(child.name)!r}: directory {b3_text(child.digest)} is missing"
        for file in directory.files:
            state = self._blob_state(file.digest)
            if state != _BAD:  # a damaged blob was reported as itself
                yield from self._file_problems(file, f"entry {display_name(file.name)!r}")

    def _file_problems(self, file: FileNode, where: str) -> Iterator[str]:
        state = self._blob_state(file.digest)
        if state != _GOOD:
            yield f"{where}: blob {b3_text(file.digest)} is {state}"
        elif self.blob_sizes[file.digest] != file.size:
            yield (f"{where}: blob {b3_text(file.digest)} is {self.blob_sizes[file.digest]} bytes, "
                   f"the FileNode says {file.size}")

    # -- 3. path infos ---------------------------------------------------------------

    def check_path_infos(self) -> None:
        try:
            infos = list(self._path_infos())
        except TvixError as exc:
            self.problem("path info listing", str(exc))
            return
        progress = self.make_bar("path infos", len(infos))
        try:
            for info in infos:
                self.report.path_infos += 1
                self._check_path_info(info)
                progress.update(1)
        finally:
            progress.close()

    def _path_infos(self) -> Iterator[PathInfo]:
        yield from self.store.path_infos.list()

    def _check_path_info(self, info: PathInfo) -> None:
        what = f"path /nix/store/{display_name(info.node.name)}"
        why = self._node_problem(info.node)
        if why is not None:
            self.problem(what, f"tree is broken: {why}")
            return
        if self.nar and info.narinfo is not None:
            try:
                size, sha256 = nar_hash(info.node, self.good_dirs.__getitem__, self._read_blob)
            except TvixError as exc:
                self.problem(what, f"NAR cannot be rendered: {exc}")
                return
            if (size, sha256) != (info.narinfo.nar_size, info.narinfo.nar_sha256):
                self.problem(
                    what,
                    f"NAR is {size} bytes with sha256 {sha256.hex()}, the path info says "
                    f"{info.narinfo.nar_size} bytes with sha256 {info.narinfo.nar_sha256.hex()}",
                )

    def _node_problem(self, node: Node) -> str | None:
        """The first reason the tree under ``node`` is not complete and good, or None."""
        if isinstance(node, FileNode):
            return next(self._file_problems(node, "root"), None)
        if not isinstance(node, DirectoryNode):
            return None
        return self._tree_problem(node.digest)

    def _tree_problem(self, root: bytes) -> str | None:
        """Depth first over directories; each digest is settled once for the whole run."""
        stack: list[tuple[bytes, bool]] = [(root, False)]
        while stack:
            digest, expanded = stack.pop()
            if digest in self._settled:
                continue
            state = self._dir_state(digest)
            if state != _GOOD:
                self._settled[digest] = f"directory {b3_text(digest)} is {state}"
                continue
            directory = self.good_dirs[digest]
            if not expanded:
                stack.append((digest, True))
                stack.extend((c.digest, False) for c in directory.directories
                             if c.digest not in self._settled)
                continue
            found: str | None = None
            for file in directory.files:
                where = f"directory {b3_text(digest)} entry {display_name(file.name)!r}"
                found = next(self._file_problems(file, where), None)
                if found:
                    break
            if found is None:
                found = next((self._settled[c.digest] for c in directory.directories
                              if self._settled.get(c.digest)), None)
            self._settled[digest] = found
        return self._settled.get(root)

    def _read_blob(self, digest: bytes, size: int) -> Iterator[bytes]:
        with self.store.blobs.open_read(digest) as reader:
            offset = 0
            while offset < size:
                piece = reader.pread(offset, CHUNK)
                if not piece:
                    break
                yield piece
                offset += len(piece)
