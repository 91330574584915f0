"""How long a gRPC read may wait for a server that is coming back: the request's own deadline.

A mount worker serves one request at a time, each with a deadline the
pool set (``time.monotonic()``); the pool declares a worker hung when it
is silent for half of a request's budget. A read that meets a daemon
restart should wait for it, but never long enough to be taken for hung.
So the worker says, around each request::

    with request_deadline(deadline):
        handler(...)

(a read: ``call_within(deadline, handler, ...)``, the same in one call),
and every gRPC call made by that thread inside may wait for a
reconnecting channel until ``share`` of the time the request had left on
entry (channel.Endpoint._await_return). The point is fixed on entry,
so the calls of one request share one patience rather than each taking a
fresh share. Outside any scope a client's ``ClientConfig.reconnect_wait``
applies.

This module imports no grpc: a worker of any store may set the scope.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ...deadlines import HANG_FRACTION

T = TypeVar("T")

__all__ = ["PATIENCE_SHARE", "call_within", "patience_until", "request_deadline"]

# A fifth short of the pool's hang fraction (0.4 of the time left), leaving time for the call itself.
PATIENCE_SHARE = 0.8 * HANG_FRACTION

_scope = threading.local()


class request_deadline:  # lower case: used like the function it was, ``with request_deadline(...)``
    """Calls made by this thread inside may wait for a server until ``share`` of the time left.

    Nested scopes: the inner one counts, then the outer one again. A class,
    not a generator: every read a worker serves enters one, and a
    ``contextmanager`` costs several microseconds more per request.
    """

    __slots__ = ("_previous", "_until")

    def __init__(self, deadline: float, share: float = PATIENCE_SHARE) -> None:
        now = time.monotonic()
        self._until = now + max(0.0, deadline - now) * share
        self._previous: float | None = None

    def __enter__(self) -> None:
        self._previous = getattr(_scope, "until", None)
        _scope.until = self._until

    def __exit__(self, *exc: object) -> None:
        _scope.until = self._previous


def call_within(deadline: float, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` inside ``request_deadline(deadline)``, in one Python call, not three.

    For the one call a worker makes for every read: in a mount each Python
    call costs several times what it does in a loop (docs/performance.md
    "Calls in the worker").
    """
    now = time.monotonic()
    previous = getattr(_scope, "until", None)
    _scope.until = now + max(0.0, deadline - now) * PATIENCE_SHARE
    try:
        return fn(*args)
    finally:
        _scope.until = previous


def patience_until(default_wait: float) -> float:
    """The monotonic time until which a failing call of this thread may wait for its server."""
    until = getattr(_scope, "until", None)
    return until if until is not None else time.monotonic() + default_wait
