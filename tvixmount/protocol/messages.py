"""The messages that travel in frames: requests, replies, the worker's hello, and control datagrams.

All are msgpack arrays, shape-checked on arrival; a shape that does not
fit is ProtocolError, and the receiver treats the sender as broken.

* request  ``[id, op, args, deadline]``: ``id`` > 0, unique among the
  sender's calls; ``op`` an op's name (ops.py); ``deadline`` a
  ``time.monotonic()`` value. CLOCK_MONOTONIC is one clock for every
  process on a Linux host, so a worker compares it with its own
  ``time.monotonic()`` and skips work nobody waits for.
* reply    ``[id, OK, result]`` or ``[id, ERR, [code, message]]``; ``code``
  is a ``tvixmount.errors`` class code, rebuilt with ``from_code``.
* hello    ``[0, OK, [worker_id, pid]]``: unsolicited, once, after the worker
  opened its store; ``[0, ERR, [code, message]]`` if it could not (it then
  exits). Id 0 is never a request id.
* control  (pool <-> zygote, one msgpack array per SEQPACKET datagram):
  ``["spawn", worker_id]``; ``["spawned", worker_id, pid]`` carrying the
  fds (request write end, reply read end) as SCM_RIGHTS;
  ``["spawn_failed", worker_id, message]``; ``["exited", worker_id, pid, how]``.

A reply whose result is one big bytes object (a ``blob_read`` without
room in the ring, or from a worker without one: ``python -m workers``,
LocalFetcher) is written without copying the payload
(``encode_reply_parts``: a hand-made msgpack prefix, then the bytes
object, in one ``writev``).
"""

from __future__ import annotations

from typing import Any

from ..errors import TvixError
from .framing import ProtocolError, frame, pack, preview, unpack

OK = 0
ERR = 1
HELLO_ID = 0
_SCATTER_MIN = 4096  # bytes results from this size on are written without a copy


# -- requests and replies ---------------------------------------------------------


def encode_request(req_id: int, op: str, args: tuple[Any, ...] | list[Any], deadline: float) -> bytes:
    return frame(pack([req_id, op, list(args), deadline]))


def decode_request(msg: Any) -> tuple[int, str, list[Any], float]:
    """Shape-check a decoded request: (id, op, args, deadline)."""
    if (
        type(msg) is list and len(msg) == 4
        and type(msg[0]) is int and msg[0] > 0
        and type(msg[1]) is str and type(msg[2]) is list
        and type(msg[3]) in (float, int)
    ):
        return msg[0], msg[1], msg[2], float(msg[3])
    raise ProtocolError(f"malformed request: {preview(msg)}")


def encode_reply(req_id: int, result: Any) -> bytes:
    """A success reply; ``result`` is already in wire form."""
    return pack([req_id, OK, result])


def encode_reply_parts(req_id: int, result: Any) -> tuple[bytes, ...]:
    """A success reply as body parts for ``write_frame``; big bytes results are not copied.

    ``[id, OK, bin]`` is written by hand as msgpack: array marker, id, OK,
    a bin32 header, then the caller's bytes object itself. The receiver
    decodes it like any other reply.
    """
    if type(result) is bytes and len(result) >= _SCATTER_MIN:
        prefix = b"\x93" + pack(req_id) + pack(OK) + b"\xc6" + len(result).to_bytes(4, "big")
        return prefix, result
    return (pack([req_id, OK, result]),)


def encode_error(req_id: int, exc: BaseException) -> bytes:
    """An error reply: TvixErrors keep their code, anything else is a plain TvixError."""
    return pack([req_id, ERR, _error_value(exc)])


def encode_error_value(exc: BaseException, limit: int) -> bytes:
    """An error alone, ``[code, message]``, in at most ``limit`` bytes (the message cut to fit).

    For a read answered on a lane, whose buffer holds the error (readwire.py).
    """
    value = _error_value(exc)
    data = pack(value)
    if len(data) > limit:
        data = pack([value[0], value[1][:max(0, limit // 4 - 16)] + "..."])  # 4 bytes a character at most
    return data


def decode_error_value(data: Any) -> tuple[str, str]:
    """``encode_error_value``'s bytes back as (code, message); ProtocolError if they are not one."""
    value = unpack(data)
    if type(value) is list and len(value) == 2 and type(value[0]) is str and type(value[1]) is str:
        return value[0], value[1]
    raise ProtocolError(f"malformed error: {preview(value)}")


def _error_value(exc: BaseException) -> list[str]:
    code = exc.code if isinstance(exc, TvixError) else TvixError.code
    message = str(exc) if isinstance(exc, TvixError) else f"{type(exc).__name__}: {exc}"
    return [code, message]


def decode_reply(msg: Any) -> tuple[int, bool, Any]:
    """Shape-check a decoded reply: (id, ok, result) or (id, False, (code, message))."""
    if type(msg) is list and len(msg) == 3 and type(msg[0]) is int and msg[0] >= 0:
        if msg[1] == OK:
            return msg[0], True, msg[2]
        if (
            msg[1] == ERR and type(msg[2]) is list and len(msg[2]) == 2
            and type(msg[2][0]) is str and type(msg[2][1]) is str
        ):
            return msg[0], False, (msg[2][0], msg[2][1])
    raise ProtocolError(f"malformed reply: {preview(msg)}")


def encode_hello(worker_id: int, pid: int) -> bytes:
    return encode_reply(HELLO_ID, [worker_id, pid])


def decode_hello(result: Any) -> tuple[int, int]:
    if type(result) is list and len(result) == 2 and all(type(x) is int for x in result):
        return result[0], result[1]
    raise ProtocolError(f"malformed hello: {preview(result)}")


# -- control messages (pool <-> zygote) -------------------------------------------

_CONTROL_SHAPES: dict[str, tuple[type, ...]] = {
    "spawn": (int,),
    "spawned": (int, int),
    "spawn_failed": (int, str),
    "exited": (int, int, str),
}


def encode_control(kind: str, *fields: Any) -> bytes:
    return pack([kind, *fields])


def decode_control(data: bytes) -> tuple[Any, ...]:
    """A control datagram as (kind, *fields), shape-checked."""
    msg = unpack(data)
    if type(msg) is list and msg and type(msg[0]) is str:
        shape = _CONTROL_SHAPES.get(msg[0])
        fields = msg[1:]
        if shape is not None and len(fields) == len(shape) and all(
            type(v) is t for v, t in zip(fields, shape, strict=True)
        ):
            return tuple(msg)
    raise ProtocolError(f"malformed control message: {preview(msg)}")
