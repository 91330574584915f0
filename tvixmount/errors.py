"""Domain errors and the one table that turns them into errno values.

Code below the FUSE edge raises these; ``fuse_ops`` converts them once with
``errno_for``. Errors cross the worker pipe as their ``code`` (see
protocol/messages.py) and are rebuilt on the dispatcher side with ``from_code``.
"""

from __future__ import annotations

import errno


class TvixError(Exception):
    """Base of every error tvixmount raises on purpose."""

    code = "error"
    errno = errno.EIO


class NotFound(TvixError):
    """An object the caller asked for by name or digest does not exist.

    At the mount root this is ENOENT (an unknown store path is not an
    error); for a blob or directory that a parent references it is EIO,
    which ``fuse_ops`` decides, since only it knows which case it is.
    """

    code = "not_found"
    errno = errno.ENOENT


class InvalidData(TvixError):
    """Bytes that do not decode, break a validation rule or miss their digest."""

    code = "invalid"


class IntegrityError(InvalidData):
    """Data whose blake3 digest is not the one it was asked for by."""

    code = "integrity"


class Unavailable(TvixError):
    """The store could not be reached or did not answer in time."""

    code = "unavailable"


class Timeout(Unavailable):
    """A request ran past its deadline."""

    code = "timeout"


class WorkerLost(Unavailable):
    """The worker serving a request died or was replaced."""

    code = "worker_lost"


class InvalidArgument(TvixError):
    """A caller passed something that can never be valid (bad digest length...)."""

    code = "invalid_argument"
    errno = errno.EINVAL


class ReadOnly(TvixError):
    """A write was attempted on a store opened read-only."""

    code = "read_only"
    errno = errno.EROFS


_BY_CODE: dict[str, type[TvixError]] = {
    cls.code: cls
    for cls in (
        TvixError, NotFound, InvalidData, IntegrityError, Unavailable,
        Timeout, WorkerLost, InvalidArgument, ReadOnly,
    )
}


def from_code(code: str, message: str) -> TvixError:
    """Rebuild an error that crossed a process boundary as (code, message)."""
    return _BY_CODE.get(code, TvixError)(message)


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE reply carries for ``exc``; unknown errors are EIO."""
    if isinstance(exc, TvixError):
        return exc.errno
    return errno.EIO
