"""The FUSE edge's timing decorator: each handler counts, times and classifies itself.

It lives next to fuse_ops because it is the one place outside it that knows
llfuse's ``FUSEError``: the errno a handler answers with is what gets counted.
The counters themselves are metrics.FuseMetrics, which needs no llfuse.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import llfuse

from .metrics import FuseMetrics


def timed(op: str, *, counts_bytes: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a TvixOperations handler: count it, time it, count its errno; ``read`` also its bytes.

    The handler's ``self.metrics`` is a FuseMetrics. A generator handler
    (readdir) is timed until llfuse stops iterating it, which is when its
    reply is complete.
    """

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):
            @functools.wraps(method)
            def generator(self: Any, *args: Any) -> Iterator[Any]:
                metrics: FuseMetrics = self.metrics
                start = time.perf_counter()
                try:
                    yield from method(self, *args)
                except llfuse.FUSEError as exc:
                    metrics.failed(op, exc.errno)
                    raise
                finally:
                    metrics.done(op, time.perf_counter() - start)
            return generator

        @functools.wraps(method)
        def handler(self: Any, *args: Any) -> Any:
            metrics: FuseMetrics = self.metrics
            start = time.perf_counter()
            try:
                result = method(self, *args)
            except llfuse.FUSEError as exc:
                metrics.failed(op, exc.errno)
                raise
            finally:
                metrics.done(op, time.perf_counter() - start)
            if counts_bytes:
                metrics.read_bytes += len(result)
            return result
        return handler

    return wrap
