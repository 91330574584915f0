"""Byte sizes as people write them on a command line (``512K``, ``64M``, ``10G``).

One parser for every size flag (``tvixmount --cache-size``, the tools'
``--big-size``), so the same text means the same number everywhere.
Units are binary (K = 1024) whether or not an ``i`` or ``B`` follows, as
in Nix and tvix; sizes are whole, positive numbers of bytes.
"""

from __future__ import annotations

import argparse
import re

from .errors import InvalidArgument

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512K``, ``64M``, ``10G``, ``1T`` (``10GiB`` and ``10GB`` too).

    InvalidArgument for anything else, including zero and fractions.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InvalidArgument(
            f"not a size: {text!r} (expected a number with an optional K, M, G or T suffix)")
    value = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise InvalidArgument(f"size {text!r} must be more than 0")
    return value


def size_argument(text: str) -> int:
    """``parse_size`` as an argparse ``type=``: a bad size is a usage error naming the flag."""
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(size: int) -> str:
    """The shortest exact spelling parse_size reads back (``10G``), else ``N bytes``."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size} bytes"
