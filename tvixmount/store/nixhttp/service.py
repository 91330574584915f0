"""A path-info service backed by a binary cache, substituting lazily into a local store.

::

    get(digest) --> local path infos --hit--> PathInfo
                     | miss
                     v
                negative cache --fresh "not there"--> None
                     |
                     v
                single-flight per path (threads of this process share one attempt)
                     v
                file lock per path under ``lock_dir`` (processes and mounts
                sharing the store directory take turns)
                     v
                local path infos again (someone may have substituted it meanwhile)
                     v
                Substituter: narinfo, signature, NAR, checks, PathInfo

Invariants: a PathInfo is in the local store only when its NAR verified
(substitute.py); "not there" answers are remembered for ``negative_ttl``
seconds, failures never; the lock is advisory and only saves work: two
writers of the same verified PathInfo would write the same bytes.

``get`` blocks for as long as a substitution takes (bounded by the
deadline); callers on a FUSE thread release llfuse's lock around it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ...castore import nixbase32
from ...castore.nodes import Node
from ...castore.pathinfo import PathInfo
from ...castore.storepath import StorePath
from ...errors import InvalidData, Timeout, Unavailable
from ...inflight import SingleFlight
from ..base import BlobService, DirectoryService, PathInfoService
from ..records import check_store_path_digest
from ..urls import redact
from .config import CacheConfig
from .http import HttpClient, HttpConfig
from .narinfo import NarinfoFile
from .substitute import Progress, Substituted, Substituter

log = logging.getLogger(__name__)

NEGATIVE_MAX = 100_000  # remembered "not there" answers at most (a few MiB)
_LOCK_POLL = (0.005, 0.2)  # first and longest pause between tries of a held file lock


class NixHttpPathInfoService(PathInfoService):
    """Path infos from ``local``, and from the cache for paths ``local`` lacks.

    Substituted trees go into ``blobs`` and ``directories`` (the local
    store's), their PathInfos into ``local``. The service owns ``local``
    and its HTTP client (``close`` closes them), not the blob and
    directory services, which the store closes.
    """

    def __init__(
        self,
        config: CacheConfig,
        blobs: BlobService,
        directories: DirectoryService,
        local: PathInfoService,
        lock_dir: Path | None = None,
        http: HttpConfig | None = None,
    ) -> None:
        self.config = config
        self.local = local
        self.client = HttpClient(config.base_url, http)
        self.substituter = Substituter(self.client, config.trusted_keys, blobs, directories, local)
        self.lock_dir = lock_dir
        self._flight = SingleFlight()
        self._absent: dict[bytes, float] = {}  # digest -> monotonic time until which it is "not there"
        self._absent_lock = threading.Lock()

    # -- PathInfoService ----------------------------------------------------------

    def get(self, digest: bytes) -> PathInfo | None:
        """The local PathInfo, else the one substituted now, else None (may take up to ``timeout``)."""
        return self.fetch(digest, time.monotonic() + self.config.timeout)

    def get_present(self, digest: bytes) -> PathInfo | None:
        """The local PathInfo only: no request to the cache."""
        check_store_path_digest(digest)
        return self.local.get(digest)

    def fetch(self, digest: bytes, deadline: float) -> PathInfo | None:
        """The local PathInfo, else the one substituted before ``deadline`` (and ``timeout``), else None."""
        check_store_path_digest(digest)
        info = self.local.get(digest)
        if info is not None:
            return info
        return self._substitute(digest, None, min(deadline, time.monotonic() + self.config.timeout), None)

    def put(self, info: PathInfo) -> PathInfo:
        return self.local.put(info)

    def list(self) -> Iterator[PathInfo]:
        """What was substituted (or put) so far: a cache cannot be listed."""
        return self.local.list()

    def calculate_nar(self, node: Node) -> tuple[int, bytes] | None:
        return self.local.calculate_nar(node)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.local.close()

    # -- for tvixstore substitute ----------------------------------------------------

    def substitute(self, store_path: StorePath, deadline: float | None = None,
                   progress: Progress | None = None) -> PathInfo | None:
        """The path's PathInfo, substituting it when it is not local; None when the cache lacks it.

        Checks the name as well as the hash. Blocks until done or ``deadline``.
        """
        if deadline is None:
            deadline = time.monotonic() + self.config.timeout
        info = self.local.get(store_path.digest)
        if info is None:
            info = self._substitute(store_path.digest, store_path.name, deadline, progress)
        if info is not None and info.node.name != store_path.basename.encode():
            raise InvalidData(f"{store_path} is stored as {info.node.name.decode(errors='replace')}")
        return info

    def narinfo(self, store_path: StorePath, deadline: float | None = None) -> NarinfoFile | None:
        """The cache's checked narinfo (for ``--dry-run`` and closures); downloads no NAR."""
        if deadline is None:
            deadline = time.monotonic() + self.config.timeout
        if self._known_absent(store_path.digest):
            return None
        found = self.substituter.narinfo(store_path.digest, store_path.name, deadline)
        if found is None:
            self._remember_absent(store_path.digest)
        return found

    # -- the way to the substituter ------------------------------------------------------

    def _substitute(self, digest: bytes, name: str | None, deadline: float,
                    progress: Progress | None) -> PathInfo | None:
        if self._known_absent(digest):
            return None
        return self._flight.run((digest, name), lambda: self._locked(digest, name, deadline, progress))

    def _locked(self, digest: bytes, name: str | None, deadline: float,
                progress: Progress | None) -> PathInfo | None:
        with self._file_lock(digest, deadline):
            info = self.local.get(digest)
            if info is not None:
                log.debug("%s was substituted meanwhile", nixbase32.encode(digest))
                return info
            done: Substituted | None = self.substituter.substitute(digest, name, deadline, progress)
            if done is None:
                self._remember_absent(digest)
                log.debug("%s is not in %s", nixbase32.encode(digest), redact(self.config.base_url))
                return None
            return done.info

    @contextlib.contextmanager
    def _file_lock(self, digest: bytes, deadline: float) -> Iterator[None]:
        """Hold ``<lock_dir>/<hash>.lock`` (nothing without a lock_dir); Timeout past the deadline.

        The file is removed by the holder after a success: anyone who opened
        it meanwhile finds the PathInfo once they hold it. After a failure it
        stays for the next attempt.
        """
        if self.lock_dir is None:
            yield
            return
        path = self.lock_dir / f"{nixbase32.encode(digest)}.lock"
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Unavailable(f"substitution lock {path}: {exc.strerror or exc}") from None
        try:
            pause = _LOCK_POLL[0]
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise Unavailable(f"substitution lock {path}: {exc.strerror or exc}") from None
                if time.monotonic() + pause >= deadline:
                    raise Timeout(f"{nixbase32.encode(digest)}: another process was still substituting it "
                                  f"(lock {path}) when the deadline came")
                time.sleep(pause)
                pause = min(pause * 2, _LOCK_POLL[1])
            yield
            if self.local.get(digest) is not None:
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a newer file of the same name
                        os.unlink(path)
        finally:
            os.close(fd)  # closing releases the lock

    # -- negative cache ---------------------------------------------------------------

    def _known_absent(self, digest: bytes) -> bool:
        with self._absent_lock:
            until = self._absent.get(digest)
            if until is None:
                return False
            if time.monotonic() < until:
                return True
            del self._absent[digest]
            return False

    def _remember_absent(self, digest: bytes) -> None:
        ttl = self.config.negative_ttl
        if ttl <= 0:
            return
        now = time.monotonic()
        with self._absent_lock:
            if len(self._absent) >= NEGATIVE_MAX:
                self._absent = {d: t for d, t in self._absent.items() if t > now}
                if len(self._absent) >= NEGATIVE_MAX:
                    self._absent.clear()
            self._absent[digest] = now + ttl
