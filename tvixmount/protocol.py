"""THE dispatcher<->worker messages: framing, requests, replies, ops, node encodings.

Both sides import this module and nothing else speaks the wire; msgpack is
imported here and nowhere else in the project.

One request, end to end::

    FUSE thread ─ pool.call(op, *args) ─ encode_request ─ frame ─> request pipe ─┐
                                                                                │
    worker:  FrameReader.read ─ decode_request ─ check_args ─ handler(ctx, *args)
                                                      │ result or TvixError
             write_frame(encode_reply | encode_error) ▼ ──────> reply pipe ─────┐
                                                                                │
    collector thread:  FrameReader.read ─ decode_reply ─ completes the waiting call
    FUSE thread:       OPS[op].decode(result) -> castore values (fetcher.py)

Framing: every frame is a 4-byte big-endian length, then that many bytes of
one msgpack value. A length over ``MAX_FRAME`` is garbage, not a big frame.

Messages (all msgpack arrays; bytes travel as bin and stay ``bytes``):

* request  ``[id, op, args, deadline]``: ``id`` > 0, unique among the
  sender's calls; ``deadline`` is a ``time.monotonic()`` value. CLOCK_MONOTONIC
  is one clock for every process on a Linux host, so a worker compares it
  with its own ``time.monotonic()`` and skips work nobody waits for.
* reply    ``[id, OK, result]`` or ``[id, ERR, [code, message]]``; ``code``
  is a ``tvixmount.errors`` class code, rebuilt with ``from_code``.
* hello    ``[0, OK, [worker_id, pid]]``: unsolicited, once, after the worker
  opened its store; ``[0, ERR, [code, message]]`` if it could not (it then
  exits). Id 0 is never a request id.
* control  (pool <-> zygote, one msgpack array per SEQPACKET datagram):
  ``["spawn", worker_id]``; ``["spawned", worker_id, pid]`` carrying the
  fds (request write end, reply read end) as SCM_RIGHTS;
  ``["spawn_failed", worker_id, message]``; ``["exited", worker_id, pid, how]``.

Bulk bytes: a ``blob_read`` reply from a pool worker normally carries a
``RingRef`` (a msgpack ext of 12 bytes) naming where the worker put the
verified bytes in its shared-memory ring (shmring.py); the collector
copies them out before anyone sees the reply, so callers always get bytes.
When the ring has no room, or there is no ring (``python -m workers``,
LocalFetcher), the bytes travel inline, written without copying the
payload (``encode_reply_parts``: a hand-made msgpack prefix, then the
bytes object, in one ``writev``).

Invariants:

* Decoding untrusted bytes raises ``ProtocolError`` and nothing else; the
  dispatcher answers it by killing the sender, never by dying itself.
* Results are plain msgpack types on the wire and castore values on either
  end; ``OPS`` holds the one encoder/decoder pair per op.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .castore.directory import Directory
from .castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from .errors import InvalidArgument, TvixError

HEADER_LEN = 4
MAX_FRAME = 64 << 20  # a whole --list-root listing must fit; anything larger is garbage
OK = 0
ERR = 1
HELLO_ID = 0
MAX_READ = 16 << 20  # largest blob_read length a worker accepts
_SCATTER_MIN = 4096  # bytes results from this size on are written without a copy

_TAG_DIR, _TAG_FILE, _TAG_LINK = 0, 1, 2
_EXT_RING = 1
_RING_REF = struct.Struct(">QI")


class ProtocolError(TvixError):
    """Bytes from the other side that are not a well-formed message.

    Never crosses the wire: the receiver treats the sender as broken.
    """

    code = "protocol"


@dataclass(frozen=True, slots=True)
class RingRef:
    """A reply's bytes are ``length`` bytes at position ``start`` of the sender's ring (shmring.py)."""

    start: int
    length: int


# -- framing ------------------------------------------------------------------


def _ext_default(obj: Any) -> Any:
    if type(obj) is RingRef:
        return msgpack.ExtType(_EXT_RING, _RING_REF.pack(obj.start, obj.length))
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_RING and len(data) == _RING_REF.size:
        return RingRef(*_RING_REF.unpack(data))
    raise ValueError(f"unknown msgpack extension {code} of {len(data)} bytes")


def pack(obj: Any) -> bytes:
    """One msgpack value (bytes as bin, str as str, RingRef as an ext)."""
    return msgpack.packb(obj, use_bin_type=True, default=_ext_default)


def unpack(data: Any) -> Any:
    """Decode exactly one msgpack value from a bytes-like object, or raise ProtocolError."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True, ext_hook=_ext_hook)
    except Exception as exc:  # msgpack raises a zoo: ExtraData, FormatError, ValueError, ...
        raise ProtocolError(f"undecodable msgpack frame ({len(data)} bytes): {type(exc).__name__}: {exc}") \
            from None


def frame(body: bytes) -> bytes:
    """Header and body in one buffer (small messages, written in one syscall)."""
    return len(body).to_bytes(HEADER_LEN, "big") + body


def write_frame(fd: int, *parts: bytes) -> None:
    """Write one frame whose body is ``parts`` joined, to a blocking fd, however many writes it takes.

    The parts go out with one ``writev``, so a big payload is never copied
    into a joined buffer. Raises OSError (BrokenPipeError when the reader is gone).
    """
    size = sum(len(p) for p in parts)
    header = size.to_bytes(HEADER_LEN, "big")
    done = os.writev(fd, (header, *parts))
    if done == HEADER_LEN + size:
        return
    rest = memoryview(b"".join((header, *parts)))[done:]  # rare: the pipe was nearly full
    while rest:
        rest = rest[os.write(fd, rest):]


class FrameReader:
    """Reads frames from one fd into a reused buffer and decodes them.

    ``read()`` does one ``readv`` (so call it when the fd is readable, or on
    a blocking fd) and returns the decoded values of every frame completed
    by it; ``None`` means EOF. Decoding happens while the bytes sit in the
    buffer, so a frame is copied once, into the objects msgpack builds.
    """

    def __init__(self, fd: int, size: int = 1 << 20) -> None:
        self.fd = fd
        self._buf = bytearray(size)
        self._start = 0  # first byte not yet consumed
        self._end = 0  # one past the last byte read

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF means a truncated frame)."""
        return self._end - self._start

    def read(self) -> list[Any] | None:
        self._make_room()
        with memoryview(self._buf) as whole, whole[self._end:] as free:
            n = os.readv(self.fd, [free])
        if n == 0:
            return None
        self._end += n
        return self._decode_ready()

    def _make_room(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
            return
        need = HEADER_LEN
        if self._end - self._start >= HEADER_LEN:
            need += int.from_bytes(self._buf[self._start:self._start + HEADER_LEN], "big")
        if self._start + need <= len(self._buf) and self._end < len(self._buf):
            return
        tail = self._buf[self._start:self._end]
        if need > len(self._buf):
            self._buf = bytearray(max(need, 2 * len(self._buf)))
        self._buf[:len(tail)] = tail
        self._start, self._end = 0, len(tail)

    def _decode_ready(self) -> list[Any]:
        out: list[Any] = []
        buf = self._buf
        with memoryview(buf) as view:
            while self._end - self._start >= HEADER_LEN:
                length = int.from_bytes(buf[self._start:self._start + HEADER_LEN], "big")
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame header announces {length} bytes, more than {MAX_FRAME}")
                body_start = self._start + HEADER_LEN
                if self._end - body_start < length:
                    break
                with view[body_start:body_start + length] as body:
                    out.append(unpack(body))
                self._start = body_start + length
        if self._start == self._end:
            self._start = self._end = 0
        return out


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
    raise ProtocolError(f"malformed request: {_preview(msg)}")


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
    code = exc.code if isinstance(exc, TvixError) else TvixError.code
    message = str(exc) if isinstance(exc, TvixError) else f"{type(exc).__name__}: {exc}"
    return pack([req_id, ERR, [code, message]])


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
    raise ProtocolError(f"malformed reply: {_preview(msg)}")


def encode_hello(worker_id: int, pid: int) -> bytes:
    return encode_reply(HELLO_ID, [worker_id, pid])


def decode_hello(result: Any) -> tuple[int, int]:
    if type(result) is list and len(result) == 2 and all(type(x) is int for x in result):
        return result[0], result[1]
    raise ProtocolError(f"malformed hello: {_preview(result)}")


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
    raise ProtocolError(f"malformed control message: {_preview(msg)}")


# -- castore values on the wire ---------------------------------------------------


def encode_node(node: Node) -> list[Any]:
    """A node as a compact tagged list (the tag keeps the three kinds apart)."""
    if type(node) is FileNode:
        return [_TAG_FILE, node.name, node.digest, node.size, node.executable]
    if type(node) is DirectoryNode:
        return [_TAG_DIR, node.name, node.digest, node.size]
    if type(node) is SymlinkNode:
        return [_TAG_LINK, node.name, node.target]
    raise TypeError(f"not a castore node: {node!r}")


def decode_node(wire: Any) -> Node:
    try:
        tag = wire[0]
        if tag == _TAG_FILE and len(wire) == 5:
            node: Node = FileNode(_b(wire[1]), _b(wire[2]), _u(wire[3]), _bool(wire[4]))
        elif tag == _TAG_DIR and len(wire) == 4:
            node = DirectoryNode(_b(wire[1]), _b(wire[2]), _u(wire[3]))
        elif tag == _TAG_LINK and len(wire) == 3:
            node = SymlinkNode(_b(wire[1]), _b(wire[2]))
        else:
            raise ValueError("unknown tag or length")
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ProtocolError(f"malformed node {_preview(wire)}: {exc}") from None
    return node


def encode_directory(directory: Directory) -> list[Any]:
    """[[dir entries], [file entries], [symlink entries]], each entry untagged."""
    return [
        [[d.name, d.digest, d.size] for d in directory.directories],
        [[f.name, f.digest, f.size, f.executable] for f in directory.files],
        [[s.name, s.target] for s in directory.symlinks],
    ]


def decode_directory(wire: Any) -> Directory:
    """The Directory a worker validated; only the shape is checked here.

    The worker ran ``validate`` and the digest check before encoding; doing
    it again would cost dispatcher CPU for every listing.
    """
    try:
        dirs, files, links = wire
        return Directory(
            tuple(DirectoryNode(_b(n), _b(d), _u(s)) for n, d, s in dirs),
            tuple(FileNode(_b(n), _b(d), _u(s), _bool(x)) for n, d, s, x in files),
            tuple(SymlinkNode(_b(n), _b(t)) for n, t in links),
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed directory {_preview(wire)}: {exc}") from None


def _b(v: Any) -> bytes:
    if type(v) is not bytes:
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    return v


def _u(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise TypeError(f"expected a non-negative int, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise TypeError(f"expected a bool, got {type(v).__name__}")
    return v


# -- ops ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op: its argument types, and how its result crosses the wire."""

    name: str
    arg_types: tuple[type, ...]
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _same(v: Any) -> Any:
    return v


def _optional(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else fn(v)


def _decode_ping(v: Any) -> tuple[int, int]:
    return decode_hello(v)


def _decode_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(v).__name__}")
    return v


def _decode_size(v: Any) -> int | None:
    if v is None or (type(v) is int and v >= 0):
        return v
    raise ProtocolError(f"expected a size or nil, got {_preview(v)}")


def _encode_tree(tree: list[tuple[bytes, Directory]]) -> list[Any]:
    return [[digest, encode_directory(d)] for digest, d in tree]


def _decode_tree(wire: Any) -> list[tuple[bytes, Directory]]:
    try:
        return [(_b(digest), decode_directory(d)) for digest, d in wire]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed directory tree: {exc}") from None


def _decode_nodes(wire: Any) -> list[Node]:
    if type(wire) is not list:
        raise ProtocolError(f"expected a list of nodes, got {_preview(wire)}")
    return [decode_node(w) for w in wire]


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("ping", (), list, _decode_ping),
        OpSpec("path_info", (bytes,), _optional(encode_node), _optional(decode_node)),
        OpSpec("directory", (bytes,), encode_directory, decode_directory),
        OpSpec("directory_tree", (bytes, int), _encode_tree, _decode_tree),
        OpSpec("list_root", (), lambda nodes: [encode_node(n) for n in nodes], _decode_nodes),
        OpSpec("blob_stat", (bytes,), _same, _decode_size),
        OpSpec("blob_read", (bytes, int, int, int), _same, _decode_bytes),  # digest, offset, length, size
    )
}


def check_args(op: str, args: list[Any]) -> OpSpec:
    """The spec of ``op`` if ``args`` fit it; InvalidArgument otherwise (a reply, not a kill)."""
    spec = OPS.get(op)
    if spec is None:
        raise InvalidArgument(f"unknown op {op!r}")
    if len(args) != len(spec.arg_types) or not all(
        type(a) is t for a, t in zip(args, spec.arg_types, strict=True)
    ):
        got = ", ".join(type(a).__name__ for a in args)
        want = ", ".join(t.__name__ for t in spec.arg_types)
        raise InvalidArgument(f"op {op!r} takes ({want}), got ({got})")
    return spec


def _preview(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."
