"""Per-method request counters of a running daemon, for its periodic INFO line."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class _Window:
    calls: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    bytes_out: int = 0
    bytes_in: int = 0


class Stats:
    """Counts since the last ``take()`` and since start; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window = _Window()
        self._total = _Window()

    def call(self, method: str) -> None:
        with self._lock:
            self._window.calls[method] += 1
            self._total.calls[method] += 1

    def error(self, method: str) -> None:
        with self._lock:
            self._window.errors[method] += 1
            self._total.errors[method] += 1

    def sent(self, n: int) -> None:
        with self._lock:
            self._window.bytes_out += n
            self._total.bytes_out += n

    def received(self, n: int) -> None:
        with self._lock:
            self._window.bytes_in += n
            self._total.bytes_in += n

    def take(self) -> str | None:
        """A summary of the window since the last take (None when it was idle), and reset it."""
        with self._lock:
            window, self._window = self._window, _Window()
        return _describe(window) if window.calls else None

    def total(self) -> str:
        with self._lock:
            return _describe(self._total) if self._total.calls else "no calls"


def _describe(w: _Window) -> str:
    calls = ", ".join(f"{name} {count}" for name, count in sorted(w.calls.items()))
    errors = sum(w.errors.values())
    return (
        f"{sum(w.calls.values())} calls ({calls}), {errors} failed, "
        f"{w.bytes_out / 1e6:.1f} MB sent, {w.bytes_in / 1e6:.1f} MB received"
    )
