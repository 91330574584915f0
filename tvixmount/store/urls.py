"""Store service URLs: parsing, validation and the forms we build ourselves.

Every backend is chosen by one URL per service, as in tvix (docs/protocol.md, 'Service URLs').
This module only checks the *shape* of a URL, so a typo fails at start-up
with a message naming the URL, not later inside a worker:

``memory://``
    exactly that (``memory:///`` and ``memory://x`` are invalid); per process.
``local:///abs/path[?create=1]``
    the embedded on-disk store rooted at that directory; ``create=1`` makes
    it when missing (writers), otherwise a missing store is an error.
    The path is percent-decoded, so any byte can be named.
``grpc+http://host[:port]``, ``grpc+https://host[:port]``
    a tvix-store daemon; the path must be empty (no trailing ``/``). With
    no port, 80 for grpc+http and 443 for grpc+https, as tvix-store's client
    takes them (an http URL without a port); gRPC's own resolver would
    pick 443 for both.
``grpc+unix:///abs/socket``
    a daemon on a unix socket; the host must be empty.
    The grpc URLs accept ``?wait-connect=0|1``.
``nix+http://host[:port][/path][?...]``, ``nix+https://...``
    a Nix binary cache, as a path-info service only (its blobs and
    directories go into the store's other two services); the parameters
    and their checks are the cache's own (nixhttp/config.py, loaded here
    lazily: it loads no HTTP client and no cryptography).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument

MEMORY = "memory"
LOCAL = "local"
GRPC_SCHEMES = ("grpc+http", "grpc+https", "grpc+unix")
NIX_SCHEMES = ("nix+http", "nix+https")  # binary caches: path-info services only

_SUPPORTED = ("memory://, local:///abs/path, grpc+http://host:port, grpc+https://host:port, "
              "grpc+unix:///socket, nix+http(s)://host/path (path info only)")
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
_DEFAULT_PORT = {"grpc+http": 80, "grpc+https": 443}
_ALLOWED_QUERY = {
    LOCAL: ("create",),
    "grpc+http": ("wait-connect",),
    "grpc+https": ("wait-connect",),
    "grpc+unix": ("wait-connect",),
}
# What quote() may leave alone in a local path; everything else is %-escaped.
_PATH_SAFE = "/-._~+@:,="


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A validated service URL, split into what the backends need."""

    text: str  # the URL exactly as given
    scheme: str
    host: str  # host:port for grpc+http(s) (the scheme's port filled in) and nix+http(s); else ""
    path: str  # percent-decoded filesystem path for local:// and grpc+unix://; else ""
    query: tuple[tuple[str, str], ...] = ()

    def flag(self, name: str) -> bool:
        """The boolean query parameter ``name`` (absent = False)."""
        for key, value in self.query:
            if key == name:
                return value.lower() in _TRUE
        return False


def parse(url: str) -> StoreUrl:
    """Check ``url`` and split it; raise InvalidArgument naming the URL and the problem."""
    if not isinstance(url, str):
        raise InvalidArgument(f"store URL must be a string, not {type(url).__name__}")
    if not url:
        raise InvalidArgument(f"store URL is empty; use one of {_SUPPORTED}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidArgument(f"store URL {url!r} contains a control character")
    scheme, sep, _rest = url.partition("://")
    if not sep:
        raise InvalidArgument(f"store URL {url!r} has no '<scheme>://'; use one of {_SUPPORTED}")
    scheme = scheme.lower()
    if scheme == MEMORY:
        if url.lower() != "memory://":
            raise InvalidArgument(f"store URL {url!r}: memory:// takes no host, path or query")
        return StoreUrl(url, MEMORY, "", "")
    if scheme in NIX_SCHEMES:
        return _parse_cache(url, scheme)
    if scheme != LOCAL and scheme not in GRPC_SCHEMES:
        raise InvalidArgument(f"store URL {url!r}: unknown scheme {scheme!r}; use one of {_SUPPORTED}")

    parts = urllib.parse.urlsplit(url)
    if parts.fragment:
        raise InvalidArgument(f"store URL {url!r} must not have a fragment ('#...')")
    query = _parse_query(url, scheme, parts.query)
    if scheme in ("grpc+http", "grpc+https"):
        return StoreUrl(url, scheme, _check_host(url, scheme, parts), "", query)
    # local:// and grpc+unix:// name a filesystem path and no host.
    if parts.netloc:
        raise InvalidArgument(
            f"store URL {url!r}: {scheme}:// takes no host (got {parts.netloc!r}); "
            f"write {scheme}:///absolute/path"
        )
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))
    if not path.startswith("/"):
        raise InvalidArgument(f"store URL {url!r}: {scheme}:// needs an absolute path, like {scheme}:///a/b")
    if "\0" in path:
        raise InvalidArgument(f"store URL {url!r}: path contains a NUL byte")
    if scheme == LOCAL and path.rstrip("/") == "":
        raise InvalidArgument(f"store URL {url!r}: refusing to use / as the store directory")
    return StoreUrl(url, scheme, "", path, query)


def _parse_cache(url: str, scheme: str) -> StoreUrl:
    from .nixhttp.config import parse_url

    config = parse_url(url)  # InvalidArgument naming the URL (redacted) and the problem
    parts = urllib.parse.urlsplit(config.base_url)
    return StoreUrl(url, scheme, parts.netloc.rpartition("@")[2], parts.path)  # no user:password


def is_cache(url: str) -> bool:
    """Whether ``url`` (valid) names a Nix binary cache, which substitutes into the other services."""
    return url.partition("://")[0].lower() in NIX_SCHEMES


def unsigned_cache(url: str) -> bool:
    """Whether ``url`` names a binary cache whose narinfo signatures are not checked (no keys given)."""
    if not is_cache(url):
        return False
    from .nixhttp.config import parse_url

    return parse_url(url).trusted_keys is None


def _check_host(url: str, scheme: str, parts: urllib.parse.SplitResult) -> str:
    """``host:port`` to dial: the URL's, with the scheme's port when it names none."""
    if not parts.netloc or parts.hostname is None:
        raise InvalidArgument(f"store URL {url!r}: grpc needs a host, like grpc+http://[::1]:8000")
    if parts.path:
        raise InvalidArgument(f"store URL {url!r}: path must be empty (no trailing '/' after host:port)")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"store URL {url!r}: bad port ({exc})") from None
    if port is None:
        return f"{parts.netloc.removesuffix(':')}:{_DEFAULT_PORT[scheme]}"
    return parts.netloc


def _parse_query(url: str, scheme: str, text: str) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidArgument(f"store URL {url!r}: malformed query {text!r}") from None
    allowed = _ALLOWED_QUERY.get(scheme, ())
    for key, value in pairs:
        if key not in allowed:
            choices = ", ".join(allowed) or "none"
            raise InvalidArgument(f"store URL {url!r}: unknown parameter {key!r} (allowed: {choices})")
        if value.lower() not in _TRUE + _FALSE:
            raise InvalidArgument(f"store URL {url!r}: parameter {key!r} must be 0 or 1, not {value!r}")
    return tuple(pairs)


def local_url(store_dir: str | os.PathLike[str], create: bool = False) -> str:
    """The ``local://`` URL of an embedded store directory (made absolute, %-escaped)."""
    path = os.path.abspath(os.fspath(store_dir))
    text = "local://" + urllib.parse.quote(os.fsencode(path), safe=_PATH_SAFE)
    return text + "?create=1" if create else text


def local_path(url: StoreUrl) -> Path:
    """The store directory a parsed ``local://`` URL names."""
    if url.scheme != LOCAL:
        raise InvalidArgument(f"store URL {url.text!r} is not a local:// URL")
    return Path(url.path)


def redact(url: str) -> str:
    """``url`` without user:password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{tail}"
