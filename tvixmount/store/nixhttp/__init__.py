"""A Nix binary cache (``nix+http(s)://``) as a path-info service, substituting lazily.

A lookup of a store path the local store lacks fetches its ``.narinfo``,
checks it (the path, the signature), streams its NAR through
decompression and hash checks into the local blob and directory services,
and only then stores its PathInfo locally; the next lookup is local.

Modules, in the order a substitution uses them:

* ``config``     the ``nix+http(s)://...?trusted-public-keys=...`` URL
* ``http``       requests with connection reuse, retries and deadlines
* ``narinfo``    parsing the narinfo text; fingerprint; PathInfo
* ``signing``    Nix's ed25519 keys and the signature check
* ``decompress`` none, xz, bzip2, gzip, zstd as bounded streams
* ``checks``     FileSize/FileHash of the download, NarSize/NarHash of the NAR
* (``store/naringest.py``: a NAR stream into blobs and directories)
* ``substitute`` one path, in order, verified end to end
* ``service``    the PathInfoService: local first, one download per path

Importing the package (or ``config``) loads no HTTP client, codec or
cryptography: the mount's dispatcher checks a cache URL with ``config``
and never opens it; the workers open it (``open_path_info_service``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..base import BlobService, DirectoryService, PathInfoService
from .config import CacheConfig, parse_url

if TYPE_CHECKING:
    from .service import NixHttpPathInfoService

__all__ = ["CacheConfig", "open_path_info_service", "parse_url"]


def open_path_info_service(
    url: str,
    blobs: BlobService,
    directories: DirectoryService,
    local: PathInfoService,
    lock_dir: Path | None = None,
) -> NixHttpPathInfoService:
    """The service for ``url`` over a local store's three services (``lock_dir``: under its directory)."""
    from .service import NixHttpPathInfoService

    return NixHttpPathInfoService(parse_url(url), blobs, directories, local, lock_dir)
