"""``nix+http(s)://`` path-info service URLs: the cache, the keys, the timings.

``nix+https://HOST[:PORT][/PATH]?trusted-public-keys=NAME:BASE64%20NAME:BASE64&negative-ttl=60``

* ``trusted-public-keys``: Nix's notation, keys separated by whitespace
  (``%20`` in a URL, as tvix writes it). Decoded without turning ``+`` into
  a space, because ``+`` is a base64 character: a key pasted from
  ``nix.conf`` works as it is. Without the parameter, signatures are not
  checked (the mount warns once); an empty value trusts nobody.
* ``negative-ttl``: seconds a "not in the cache" answer (404/403) is
  remembered, so a build probing for absent paths does not ask again for
  each probe. Default 60; 0 remembers nothing. Failures are never remembered.
* ``timeout``: seconds one lookup (narinfo and NAR) may take, when the
  caller gives no deadline of its own. Default 300.

The URL carries no secret, but may carry ``user:password@``: logs use
``urls.redact``.
"""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass

from ...errors import InvalidArgument
from ..urls import redact
from .signing import PublicKey, parse_public_keys

SCHEMES = {"nix+http": "http", "nix+https": "https"}
DEFAULT_NEGATIVE_TTL = 60.0
DEFAULT_TIMEOUT = 300.0
_PARAMETERS = ("trusted-public-keys", "negative-ttl", "timeout")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    url: str  # as given, for messages (redact it)
    base_url: str  # http(s)://host[:port][/path], no trailing slash, no query
    trusted_keys: tuple[PublicKey, ...] | None = None
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    timeout: float = DEFAULT_TIMEOUT


def parse_url(url: str) -> CacheConfig:
    """Check a ``nix+http(s)://`` URL; InvalidArgument naming it (redacted) and the problem."""
    shown = redact(url)
    scheme, sep, _ = url.partition("://")
    http_scheme = SCHEMES.get(scheme.lower())
    if not sep or http_scheme is None:
        raise InvalidArgument(f"binary cache URL {shown!r} must start with nix+http:// or nix+https://")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidArgument(f"binary cache URL {shown!r} contains a control character")
    parts = urllib.parse.urlsplit(url)
    if parts.fragment:
        raise InvalidArgument(f"binary cache URL {shown!r} must not have a fragment ('#...')")
    if not parts.netloc or not parts.hostname:
        raise InvalidArgument(f"binary cache URL {shown!r} has no host")
    try:
        parts.port  # noqa: B018 - property that validates the port
    except ValueError as exc:
        raise InvalidArgument(f"binary cache URL {shown!r}: bad port ({exc})") from None
    params = _query(shown, parts.query)
    keys = None
    if "trusted-public-keys" in params:
        try:
            keys = parse_public_keys(params["trusted-public-keys"])
        except InvalidArgument as exc:
            raise InvalidArgument(f"binary cache URL {shown!r}: trusted-public-keys: {exc}") from None
    base = urllib.parse.urlunsplit((http_scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return CacheConfig(
        url=url,
        base_url=base,
        trusted_keys=keys,
        negative_ttl=_seconds(shown, params, "negative-ttl", DEFAULT_NEGATIVE_TTL, zero_ok=True),
        timeout=_seconds(shown, params, "timeout", DEFAULT_TIMEOUT, zero_ok=False),
    )


def _query(shown: str, text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in text.split("&") if text else ():
        key, sep, value = pair.partition("=")
        key = urllib.parse.unquote(key)
        if not sep:
            raise InvalidArgument(f"binary cache URL {shown!r}: parameter {key!r} has no '=VALUE'")
        if key not in _PARAMETERS:
            raise InvalidArgument(
                f"binary cache URL {shown!r}: unknown parameter {key!r} (allowed: {', '.join(_PARAMETERS)})"
            )
        if key in params:
            raise InvalidArgument(f"binary cache URL {shown!r}: parameter {key!r} given twice")
        params[key] = urllib.parse.unquote(value)  # not unquote_plus: '+' is base64
    return params


def _seconds(shown: str, params: dict[str, str], key: str, default: float, zero_ok: bool) -> float:
    text = params.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        need = "a number of seconds >= 0" if zero_ok else "a number of seconds > 0"
        raise InvalidArgument(f"binary cache URL {shown!r}: {key}={text!r} is not {need}")
    return value
