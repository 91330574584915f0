"""What a blob cache is asked to be (directory, size), and the flags that ask for it.

Kept apart from the cache itself (service.py, index.py) so that naming a
cache, in ``StoreUrls`` and on the command line, loads neither sqlite nor
the cache: the mount's dispatcher only passes the config on to the
workers, which open the cache after their fork.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidArgument

DEFAULT_SIZE = 10 << 30


@dataclass(frozen=True, slots=True)
class BlobCacheConfig:
    """Where a blob cache lives and how big it may grow (bytes)."""

    directory: Path
    max_bytes: int = DEFAULT_SIZE

    def describe(self) -> str:
        return f"blob cache {self.directory} ({format_size(self.max_bytes)})"


# -- command line ----------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512K``, ``64M``, ``10G``, ``1T`` (binary units; ``10GiB``/``10GB`` too)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"size {text!r}: expected a number with an optional K, M, G or T suffix")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise InvalidArgument(f"size {text!r} must be more than 0")
    return value


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit.lower()] and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return f"{size} bytes"


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cache_arguments(group: argparse._ActionsContainer) -> None:
    """``--cache-dir`` and ``--cache-size`` (read them back with ``cache_config_from``)."""
    group.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="keep blobs read from a remote (grpc) blob service in DIR, so that they are read "
             "from the network once: shared by the worker processes, kept across remounts, "
             "verified before each use (created if missing; not for a local:// store)")
    group.add_argument(
        "--cache-size", metavar="SIZE", type=_size_argument, default=None,
        help=f"how big the blob cache may grow, in bytes or with a K, M, G or T suffix; least "
             f"recently used blobs are removed beyond it (default {format_size(DEFAULT_SIZE)}; "
             f"needs --cache-dir)")


def cache_config_from(args: argparse.Namespace) -> BlobCacheConfig | None:
    """The cache the parsed ``args`` ask for, or None; InvalidArgument for --cache-size alone."""
    if args.cache_dir is None:
        if args.cache_size is not None:
            raise InvalidArgument("--cache-size needs --cache-dir")
        return None
    size = DEFAULT_SIZE if args.cache_size is None else args.cache_size
    return BlobCacheConfig(Path(os.path.abspath(args.cache_dir)), size)
