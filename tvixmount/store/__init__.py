"""Store backends behind one interface (base.py), opened by URL.

A store is three services, each opened from its own URL as in tvix
(``--blob-service-addr`` and friends); ``StoreUrls`` carries the three and
``open_store`` opens them together. Supported URLs (urls.py):

* ``memory://``            in-process, shared by every service of the process (unit tests)
* ``local:///abs/dir``     the embedded on-disk store, ``embedded/`` (``?create=1`` makes it)
* ``grpc+http://h:p``, ``grpc+https://h:p``, ``grpc+unix:///socket``
                           a tvix-store daemon, through ``grpc/`` (``tvixmount.store.grpc.client``)
* ``nix+http://h/p``, ``nix+https://h/p``
                           a Nix binary cache as the path-info service (``nixhttp/``): it
                           substitutes into the blob and directory services and keeps the
                           PathInfos in the directory service's store

What lives where::

    __init__.py     StoreUrls, Store, open_store: naming a store, and opening it
    base.py         the three service interfaces and their value types
    urls.py         service URLs; location.py: the default store directory
    records.py      rows checked on the way in and out, the same for every backend
    narcalc.py      CalculateNAR for backends that hold their own blobs
    memory.py       memory://
    segments.py     the segment hasher and verified segment reader  } shared by
    sqlite.py       sqlite connections, WAL, write transactions     } embedded/ and cache/
    embedded/       local://
    grpc/           the gRPC client; its wire.py is shared with tvixmount.server
    cache/          the on-disk blob cache in front of a remote blob service
    nixhttp/        nix+http(s):// binary caches, substituting lazily

Who may import whom: naming a store loads no backend. This module,
base.py, urls.py, location.py and ``cache/config.py`` import neither
sqlite nor grpc nor any backend, so the mount's dispatcher, which only
names the store and hands it to its workers, loads none of them;
``open_store`` imports the backend a URL needs when it opens it. Only
``grpc/`` imports grpc. ``embedded/`` and ``cache/`` do not import each
other: what they share is segments.py and sqlite.py.

Adding a backend: give it a subpackage, and its scheme an entry in
``_OPENERS``, a function ``(StoreUrl, kind) -> service`` where kind is
"blob", "directory" or "path_info", importing the backend inside. The gRPC
module is found by name and must provide ``open_blob_service(url:
StoreUrl)``, ``open_directory_service(url)`` and
``open_path_info_service(url)``, each taking the already validated URL.

A blob cache (``cache/``) is asked for with ``StoreUrls.blob_cache``;
``open_store`` then wraps the blob service in it. It is for remote blob
services (grpc, and memory:// in tests); with a ``local://`` blob service
it is refused when the StoreUrls is made: the blobs are on local disk
already, and a silent no-op would hide a misconfiguration.

Open services in the process that uses them, after any fork.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InvalidArgument
from . import urls
from .base import (
    BlobReader,
    BlobService,
    BlobStat,
    BlobWriter,
    ChunkMeta,
    DirectoryService,
    PathInfoService,
)
from .cache.config import BlobCacheConfig
from .location import default_store_dir
from .urls import StoreUrl

__all__ = [
    "BlobCacheConfig",
    "BlobReader",
    "BlobService",
    "BlobStat",
    "BlobWriter",
    "ChunkMeta",
    "DirectoryService",
    "PathInfoService",
    "Store",
    "StoreUrl",
    "StoreUrls",
    "default_store_dir",
    "describe",
    "open_blob_service",
    "open_directory_service",
    "open_path_info_service",
    "open_store",
    "substitution_lock_dir",
]

GRPC_MODULE = "tvixmount.store.grpc.client"


@dataclass(frozen=True)
class StoreUrls:
    """The three service URLs of one store."""

    blob: str
    directory: str
    path_info: str
    # Wrap the blob service in an on-disk cache (keyword-only: StoreUrls(*three_urls) stays valid).
    blob_cache: BlobCacheConfig | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for kind, url in (("blob", self.blob), ("directory", self.directory)):
            if urls.is_cache(url):
                raise InvalidArgument(
                    f"{urls.redact(url)} is a Nix binary cache: it can only be the path-info service "
                    f"(its NARs are substituted into the {kind} service, which must be a store)")
        if self.blob_cache is not None and urls.parse(self.blob).scheme == urls.LOCAL:
            raise InvalidArgument(
                f"a blob cache ({self.blob_cache.directory}) is for a remote blob service; "
                f"{urls.redact(self.blob)} is on local disk already: drop --cache-dir"
            )

    @classmethod
    def embedded(cls, store_dir: str | os.PathLike[str], create: bool = False) -> StoreUrls:
        """All three services in the embedded store at ``store_dir``."""
        return cls.single(urls.local_url(store_dir, create=create))

    @classmethod
    def single(cls, url: str) -> StoreUrls:
        """All three services at one URL (``memory://``, a daemon, a local store)."""
        return cls(url, url, url)

    @property
    def substitutes(self) -> bool:
        """Whether the path-info service is a binary cache (a lookup may download and ingest a NAR)."""
        return urls.is_cache(self.path_info)

    @classmethod
    def default(cls) -> StoreUrls:
        """The embedded store at ``default_store_dir()``."""
        return cls.embedded(default_store_dir())


@dataclass
class Store:
    """Three open services; closing the store closes them all."""

    blobs: BlobService
    directories: DirectoryService
    path_infos: PathInfoService

    def close(self) -> None:
        first: BaseException | None = None
        for service in (self.path_infos, self.directories, self.blobs):
            try:
                service.close()
            except BaseException as exc:  # close the rest, then report the first failure
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob_service(url: str) -> BlobService:
    return _open(url, "blob")


def open_directory_service(url: str) -> DirectoryService:
    return _open(url, "directory")


def open_path_info_service(url: str) -> PathInfoService:
    return _open(url, "path_info")


def open_store(store_urls: StoreUrls) -> Store:
    """Open all three services; if one fails, close the others and re-raise."""
    opened: list[Any] = []
    try:
        opened.append(open_blob_service(store_urls.blob))
        cache = store_urls.blob_cache
        if cache is not None:
            from .cache.service import CachingBlobService

            opened[0] = CachingBlobService(opened[0], cache.directory, cache.max_bytes)
        opened.append(open_directory_service(store_urls.directory))
        if store_urls.substitutes:
            opened.append(_open_cache(store_urls, opened[0], opened[1]))
        else:
            opened.append(open_path_info_service(store_urls.path_info))
    except BaseException:
        for service in opened:
            service.close()
        raise
    return Store(*opened)


def describe(store_urls: StoreUrls) -> str:
    """One short line naming where the store is, for logs (no credentials)."""
    blob, directory, path_info = (
        urls.redact(u) for u in (store_urls.blob, store_urls.directory, store_urls.path_info)
    )
    cache = "" if store_urls.blob_cache is None else f" through {store_urls.blob_cache.describe()}"
    if blob == directory == path_info:
        return f"store {blob}{cache}"
    return f"blobs {blob}{cache}, directories {directory}, path infos {path_info}"


# -- dispatch -------------------------------------------------------------------


def _open(url: str, kind: str) -> Any:
    parsed = urls.parse(url)
    return _OPENERS[parsed.scheme](parsed, kind)


def _open_cache(store_urls: StoreUrls, blobs: BlobService, directories: DirectoryService) -> PathInfoService:
    """The binary cache's path-info service over this store; PathInfos kept in the directory service's store.

    Processes sharing an embedded store take turns per path through lock
    files in its ``tmp/`` (one download per path however many mounts).
    """
    from . import nixhttp

    local = open_path_info_service(store_urls.directory)
    try:
        return nixhttp.open_path_info_service(store_urls.path_info, blobs, directories, local,
                                              substitution_lock_dir(store_urls.directory))
    except BaseException:
        local.close()
        raise


def substitution_lock_dir(directory_url: str) -> Path | None:
    """Where substitutions into the store at ``directory_url`` take their per-path locks.

    The embedded store's ``tmp/``, so every mount and ``tvixstore
    substitute`` of one store directory share them; none for other stores.
    """
    parsed = urls.parse(directory_url)
    if parsed.scheme != urls.LOCAL:
        return None
    from .embedded.layout import TMP_DIR

    return Path(parsed.path) / TMP_DIR


def _open_cache_alone(url: StoreUrl, kind: str) -> Any:
    raise InvalidArgument(f"{urls.redact(url.text)} is a Nix binary cache: open it with open_store, over "
                          f"the store its NARs are substituted into")


def _open_memory(url: StoreUrl, kind: str) -> Any:
    from . import memory

    classes = {
        "blob": memory.MemoryBlobService,
        "directory": memory.MemoryDirectoryService,
        "path_info": memory.MemoryPathInfoService,
    }
    return classes[kind]()


def _open_local(url: StoreUrl, kind: str) -> Any:
    from .embedded import services

    opener = getattr(services, f"open_{kind}_service")
    return opener(Path(url.path), create=url.flag("create"))


def _grpc_module(url: StoreUrl) -> ModuleType:
    try:
        return importlib.import_module(GRPC_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != GRPC_MODULE:
            raise
        raise InvalidArgument(
            f"store URL {url.text!r}: grpc store support not available (module {GRPC_MODULE} is missing)"
        ) from None


def _open_grpc(url: StoreUrl, kind: str) -> Any:
    opener = getattr(_grpc_module(url), f"open_{kind}_service")
    return opener(url)


_OPENERS: dict[str, Callable[[StoreUrl, str], Any]] = {
    urls.MEMORY: _open_memory,
    urls.LOCAL: _open_local,
    **{scheme: _open_grpc for scheme in urls.GRPC_SCHEMES},
    **{scheme: _open_cache_alone for scheme in urls.NIX_SCHEMES},
}
