"""grpc's status codes as tvixmount errors, for the client side of every call.

Every failed call leaves the client through ``translate``, so callers see
only tvixmount error classes (errors.py), each message naming what was
asked for and which server answered. Our daemon puts its error class in
the trailers (``ERROR_CODE_KEY``), so an error keeps its exact class
across the wire; other servers (tvix-store) are mapped by status code
alone. The daemon's side of the same table is ``server.servicers.status_for``.
"""

from __future__ import annotations

import grpc

from ...errors import (
    InvalidData,
    NotFound,
    ReadOnly,
    Timeout,
    TvixError,
    Unavailable,
    from_code,
)
from .wire import ERROR_CODE_KEY


class Absent(NotFound):
    """The server answered NOT_FOUND: the object asked for is not there.

    Kept apart from a NotFound carried in our daemon's error trailer (a
    blob missing below a directory, while rendering a NAR...), which is an
    error even where absence of the requested object is an answer.
    """


class Unimplemented(TvixError):
    """The server does not have the method (UNIMPLEMENTED): a tvix-store asked for our extension."""


_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
}
_INVALID = {
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


def translate(exc: grpc.RpcError, what: str, server: str, timed_out: bool = False) -> TvixError:
    """The tvixmount error for a failed call; ``what`` says what was asked for.

    NOT_FOUND is Absent, a NotFound (callers that treat absence as None catch it).
    With our daemon's error-code trailer the class is the server's own;
    otherwise UNAVAILABLE and friends are Unavailable, DEADLINE_EXCEEDED
    Timeout, DATA_LOSS/INVALID_ARGUMENT InvalidData (the server refused or
    could not produce valid data), PERMISSION_DENIED ReadOnly, and anything
    else a TvixError carrying the server's message.
    """
    code = _status(exc)
    details = _details(exc)
    name = code.name if code is not None else "UNKNOWN"
    if timed_out:
        return Timeout(f"{what}: no message from {server} for too long; stream cancelled")
    message = f"{what}: {server} answered {name}: {details}"
    if code is grpc.StatusCode.NOT_FOUND:
        return Absent(message)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return Unimplemented(message)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"{what}: {server} did not answer in time ({details})")
    if code in _UNAVAILABLE:
        return Unavailable(message)
    tvix_code = trailer_code(exc)
    if tvix_code is not None:
        return from_code(tvix_code, message)
    if code in _INVALID:
        return InvalidData(message)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return ReadOnly(message)
    return TvixError(message)


# grpc core's words for a connection that failed or went away (not a server's answer).
_TRANSPORT_WORDS = ("failed to connect", "socket closed", "connection reset", "connection refused",
                    "broken pipe", "goaway", "stream removed", "connection aborted", "end of tcp stream")


def transport_words(exc: TvixError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in _TRANSPORT_WORDS)


def _status(exc: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return exc.code()  # type: ignore[attr-defined]
    except Exception:  # an RpcError that is not a Call carries no status
        return None


def _details(exc: grpc.RpcError) -> str:
    try:
        return str(exc.details() or "")  # type: ignore[attr-defined]
    except Exception:
        return str(exc)


def trailer_code(exc: grpc.RpcError) -> str | None:
    try:
        trailers = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return None
    for key, value in trailers:
        if key == ERROR_CODE_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None
