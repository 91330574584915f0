"""``blob_read``'s request and ring reply as fixed structs: the lean wire of the read path.

Why: a read the segment arena missed is the one request a FUSE thread
sends many thousands of times a second, and each msgpack request and
reply cost the dispatcher and the worker a few microseconds of packing,
shape checks and extension hooks each way (docs/performance.md, "The miss
path: lean wire"). Its shape never changes, so it travels as one
``struct`` each way; every other op, and a read's error or inline reply,
stays msgpack (messages.py).

A fixed frame is an ordinary frame (4-byte big-endian length, then the
body) whose body starts with ``MARK``, a byte msgpack never uses, so a
reader tells the two apart by one byte and a reader that knows no fixed
frames (``FrameReader`` without ``fixed``) rejects it as undecodable.

* request: MARK, ``READ``, id (u64, > 0), deadline (f64, monotonic),
  digest (32 bytes), offset, length, size hint (i64 each; -1: no hint),
  lane (u16; ``NO_LANE``: the reply goes on the worker's reply pipe);
* reply:   MARK, ``RING``, id (u64, > 0), ring start (u64), length (u64):
  the verified bytes are in the sender's ring (shmring.py), exactly as a
  msgpack reply ``[id, OK, RingRef(start, length)]`` says;
* lane reply, on the request's lane (lanes.py): MARK, ``LANE``, id (u64,
  > 0), the sender's pid (u32), length (u64): the verified bytes are the
  first ``length`` bytes of the lane's buffer; ``LANE_ERROR`` instead of
  ``LANE``: the read failed, and the buffer holds the error, msgpack
  ``[code, message]`` (messages.encode_error_value). Errors carry the pid
  too, so the dispatcher takes every answer only from the process that
  holds the call.

A body of the wrong length, kind or id is ProtocolError, as for any frame.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import InvalidArgument
from .framing import FIXED_MARK as MARK
from .framing import ProtocolError, RingRef
from .messages import OK

READ = 1
RING = 2
LANE = 3
LANE_ERROR = 4
DIGEST = 32
NO_LANE = 0xFFFF

# The request is packed as a whole frame (its length header first: the pool writes it in one
# os.write); the reply as a body (the worker's write_frame puts the header in front).
_REQUEST_BODY = struct.Struct(">BBQd32sqqqH")
_REQUEST = struct.Struct(">I" + _REQUEST_BODY.format[1:])
_REPLY_BODY = struct.Struct(">BBQQQ")
_LANE_BODY = struct.Struct(">BBQIQ")
_LANE_FRAME = struct.Struct(">I" + _LANE_BODY.format[1:])
REQUEST_BODY = _REQUEST_BODY.size
REPLY_BODY = _REPLY_BODY.size
LANE_BODY = _LANE_BODY.size
LANE_FRAME = _LANE_FRAME.size  # a lane reply with its header: what one read of a lane's pipe takes


class ReadRequest(NamedTuple):
    """A decoded ``blob_read`` request: the op's arguments with the request's id and deadline."""

    req_id: int
    deadline: float
    digest: bytes
    offset: int
    length: int
    size: int
    lane: int = NO_LANE


class LaneReply(NamedTuple):
    """A decoded lane reply: ``length`` bytes in the lane's buffer, written by process ``pid``.

    ``ok``: they are the verified bytes read; otherwise the error (``messages.decode_error_value``).
    """

    req_id: int
    pid: int
    length: int
    ok: bool = True


def encode_request(req_id: int, deadline: float, digest: object, offset: object, length: object,
                   size: object, lane: int = NO_LANE) -> bytes:
    """The whole frame of a ``blob_read`` request; InvalidArgument for arguments that do not fit.

    The same checks as the op's argument types (ops.BLOB_READ): exact
    types (a bool is no offset) and a 32-byte digest, since ``32s`` would
    pad or cut any other length silently.
    """
    if type(digest) is not bytes or not type(offset) is type(length) is type(size) is int:
        raise InvalidArgument(f"op 'blob_read' takes (bytes, int, int, int), got ({type(digest).__name__}, "
                              f"{type(offset).__name__}, {type(length).__name__}, {type(size).__name__})")
    if len(digest) != DIGEST:
        raise InvalidArgument(f"blob digest is {len(digest)} bytes, not {DIGEST}")
    try:
        return _REQUEST.pack(REQUEST_BODY, MARK, READ, req_id, deadline, digest, offset, length, size, lane)
    except struct.error:
        raise InvalidArgument(f"blob_read: offset {offset}, length {length}, size {size} or lane {lane} "
                              "out of range") from None


def encode_ring_reply(req_id: int, ref: RingRef) -> bytes:
    """The body of a read's reply whose bytes are in the ring (for write_frame)."""
    return _REPLY_BODY.pack(MARK, RING, req_id, ref.start, ref.length)


def decode_request(body: memoryview | bytes) -> ReadRequest:
    """A fixed request body (MARK first); ProtocolError for anything else."""
    if len(body) != REQUEST_BODY:
        raise ProtocolError(f"fixed request of {len(body)} bytes, not {REQUEST_BODY}")
    _, kind, req_id, deadline, digest, offset, length, size, lane = _REQUEST_BODY.unpack(body)
    if kind != READ or req_id <= 0:
        raise ProtocolError(f"fixed request of kind {kind} with id {req_id}")
    # ReadRequest(...) without the NamedTuple's __new__, a Python function: one frame less per read
    return tuple.__new__(ReadRequest, (req_id, deadline, digest, offset, length, size, lane))


def decode_reply(body: memoryview | bytes) -> list[object]:
    """A fixed reply body as the msgpack reply it stands for: ``[id, OK, RingRef]``."""
    if len(body) != REPLY_BODY:
        raise ProtocolError(f"fixed reply of {len(body)} bytes, not {REPLY_BODY}")
    _, kind, req_id, start, length = _REPLY_BODY.unpack(body)
    if kind != RING or req_id <= 0:
        raise ProtocolError(f"fixed reply of kind {kind} with id {req_id}")
    return [req_id, OK, RingRef(start, length)]


def encode_lane_reply(req_id: int, pid: int, length: int, ok: bool = True) -> bytes:
    """The body of a read's reply whose bytes (or error) are in its lane's buffer (lanes.py)."""
    return _LANE_BODY.pack(MARK, LANE if ok else LANE_ERROR, req_id, pid, length)


def decode_lane_frame(frame: bytes) -> LaneReply:
    """A whole lane reply frame, header and body, as one read of a lane's pipe returns it.

    A lane carries nothing but these frames, each written at once, so a
    read of ``LANE_FRAME`` bytes takes exactly one; anything else read there
    (a shorter piece, another header, another kind) is ProtocolError.
    """
    if len(frame) != LANE_FRAME:
        raise ProtocolError(f"fixed lane reply frame of {len(frame)} bytes, not {LANE_FRAME}")
    header, mark, kind, req_id, pid, length = _LANE_FRAME.unpack(frame)
    if header != LANE_BODY or mark != MARK or kind not in (LANE, LANE_ERROR) or req_id <= 0 or pid <= 0:
        raise ProtocolError(f"fixed lane reply frame of {header} bytes, kind {kind}, id {req_id}, pid {pid}")
    # LaneReply(...) without the NamedTuple's __new__, a Python function: one frame less per read
    return tuple.__new__(LaneReply, (req_id, pid, length, kind == LANE))
