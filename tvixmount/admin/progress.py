"""Progress bars for tvixstore, shown only to a person watching a terminal.

A bar is drawn on stderr only when stderr is a TTY and ``--quiet`` was not
given: output piped into a file or another program stays clean (no carriage
returns in logs), and stdout (store paths, file contents) is never touched.
When disabled, callers get a do-nothing bar with the same methods, so the hot
loops need no ``if`` around each update.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> None: ...


class NullBar:
    """The bar used when nobody is watching: every method is a no-op."""

    __slots__ = ()

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def wanted(quiet: bool, stream: Any = None) -> bool:
    """Whether to draw bars: not quiet, and ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def bar(enabled: bool, desc: str, unit: str = "it", total: int | None = None, unit_scale: bool = False,
        position: int | None = None) -> Bar:
    """A tqdm bar on stderr when ``enabled``, else a NullBar.

    tqdm is imported lazily so that commands that never draw (piped runs,
    ``info``) do not pay for the import.
    """
    if not enabled:
        return NullBar()
    from tqdm import tqdm

    # A terminal that reports a 0x0 size (a fresh pty, some CI consoles)
    # makes tqdm draw nothing at all: fall back to a fixed size there.
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except (OSError, ValueError, AttributeError):
        sized = False
    return tqdm(
        desc=desc,
        unit=unit,
        total=total,
        unit_scale=unit_scale,
        unit_divisor=1024 if unit == "B" else 1000,
        position=position,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=sized,
        ncols=None if sized else 100,
        nrows=None if sized else 24,
        mininterval=0.2,
    )
