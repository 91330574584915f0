"""One store path from a binary cache into the local store, verified end to end.

The order is the point (each step runs only when the one before it passed):

1. fetch ``<hash>.narinfo``; "not there" is None (the caller remembers it);
2. the narinfo must describe the path asked for: same hash, and the same
   name when the caller knows it (a lookup by digest alone does not; the
   FUSE edge then compares the name, as for any PathInfo);
3. with trusted keys, a valid signature over the fingerprint, before the
   NAR is requested: nothing untrusted is downloaded or decompressed;
4. the NAR is streamed: download -> FileCheck -> decompression -> NarCheck
   -> NAR parser -> blobs and directories (checks.py says what each check
   refuses, ingest.py how the tree is stored);
5. NarSize and NarHash, then FileSize and FileHash, must match exactly;
6. only then the PathInfo (root node renamed to the store path, References,
   Deriver, signatures, CA) is written: a failure anywhere leaves no
   PathInfo, so the path stays absent and the next lookup tries again.

Errors: a malformed or lying narinfo, a bad signature or a NAR that does
not match is InvalidData (IntegrityError for hash mismatches); an
unreachable server or a broken connection is Unavailable (Timeout when the
deadline ran out). Both are EIO at the FUSE edge, and neither is cached.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from ...castore import nixbase32
from ...castore.directory import SizeConvention
from ...castore.pathinfo import PathInfo
from ...castore.storepath import StorePath
from ...errors import InvalidData
from ..base import BlobService, DirectoryService, PathInfoService
from ..naringest import NarTree, ingest_nar
from ..urls import redact
from . import narinfo as narinfo_text
from .checks import FileCheck, NarCheck
from .decompress import check_compression, decompressing
from .http import HttpClient
from .narinfo import NarinfoFile
from .signing import PublicKey, check_signatures

log = logging.getLogger(__name__)

NAR_BUFFER = 1 << 20


class Progress(Protocol):
    """What a progress display hears about substitutions (all from the substituting thread)."""

    def started(self, info: NarinfoFile) -> None: ...

    def nar_bytes(self, n: int) -> None: ...

    def finished(self, info: NarinfoFile, seconds: float) -> None: ...


class NullProgress:
    __slots__ = ()

    def started(self, info: NarinfoFile) -> None:
        return None

    def nar_bytes(self, n: int) -> None:
        return None

    def finished(self, info: NarinfoFile, seconds: float) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Substituted:
    """What one substitution stored."""

    info: PathInfo
    narinfo: NarinfoFile
    tree: NarTree
    downloaded: int  # bytes of the (compressed) file
    seconds: float


class Substituter:
    """Fetches store paths from one binary cache into one blob, directory and path-info service.

    ``keys`` None means signatures are not checked (the mount says so once
    at start); an empty tuple trusts nobody, so every path is refused.
    Thread-safe as far as its services are; concurrency control (one
    download per path) is the caller's (service.py).
    """

    def __init__(
        self,
        client: HttpClient,
        keys: tuple[PublicKey, ...] | None,
        blobs: BlobService,
        directories: DirectoryService,
        path_infos: PathInfoService,
        convention: SizeConvention = SizeConvention.DOUBLED,
    ) -> None:
        self.client = client
        self.keys = keys
        self.blobs = blobs
        self.directories = directories
        self.path_infos = path_infos
        self.convention = convention

    def narinfo(self, digest: bytes, name: str | None, deadline: float) -> NarinfoFile | None:
        """The cache's narinfo for the path (steps 1-3), or None when the cache does not have it."""
        path = f"{nixbase32.encode(digest)}.narinfo"
        where = redact(self.client.url(path))
        data = self.client.fetch(path, deadline, narinfo_text.MAX_NARINFO_BYTES)
        if data is None:
            return None
        info = narinfo_text.parse(data, where)
        if info.store_path.digest != digest:
            raise InvalidData(f"{where} describes {info.store_path}, another store path")
        if name is not None and info.store_path.name != name:
            raise InvalidData(f"{where} describes {info.store_path}, not "
                              f"{StorePath(digest, name)} (same hash, another name)")
        if self.keys is not None:
            check_signatures(info, self.keys, where)
        return info

    def substitute(self, digest: bytes, name: str | None, deadline: float,
                   progress: Progress | None = None) -> Substituted | None:
        """Fetch, verify and store the path (steps 1-6); None when the cache does not have it."""
        info = self.narinfo(digest, name, deadline)
        if info is None:
            return None
        return self.fetch_nar(info, deadline, progress)

    def fetch_nar(self, info: NarinfoFile, deadline: float, progress: Progress | None = None) -> Substituted:
        """Steps 4-6 for a narinfo that passed ``narinfo``."""
        check_compression(info.compression)
        shown = progress or NullProgress()
        started = time.monotonic()
        shown.started(info)
        what = f"{info.store_path} ({redact(self.client.url(info.url))})"
        with self.client.open(info.url, deadline) as stream:
            download = FileCheck(stream, info.file_size, info.file_sha256, what)
            nar = NarCheck(decompressing(info.compression, download), info.nar_size, info.nar_sha256, what,
                           shown.nar_bytes)
            try:
                tree = ingest_nar(io.BufferedReader(nar, NAR_BUFFER), self.blobs, self.directories,
                                  self.convention)
            except InvalidData as exc:
                if str(exc).startswith(what):
                    raise
                raise type(exc)(f"{what}: {exc}") from None  # the parser's message names no path
            nar.finish()
            download.finish()
        stored = self.path_infos.put(narinfo_text.to_pathinfo(info, tree.root))
        seconds = time.monotonic() - started
        shown.finished(info, seconds)
        log.info("substituted %s: NAR %d bytes (%d downloaded, %s), %d files, in %.2f s",
                 info.store_path, info.nar_size, download.count, info.compression, tree.files, seconds)
        return Substituted(stored, info, tree, download.count, seconds)
