"""Bytes on a pipe: msgpack values in length-prefixed frames, and the one error for bad bytes.

Every frame is a 4-byte big-endian length, then that many bytes of one
msgpack value. A length over ``MAX_FRAME`` is garbage, not a big frame.
Bytes travel as bin and stay ``bytes``; a ``RingRef`` travels as a msgpack
ext of 12 bytes. msgpack is imported here and nowhere else in the project.

Both directions use this module: the pool writes requests with ``frame``
(they are small and go out in one atomic write), workers write replies
with ``write_frame`` (a big read result is not copied into a joined
buffer), and both read with ``FrameReader``, which decodes each frame in
place in its buffer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import TvixError

HEADER_LEN = 4
FIXED_MARK = 0xC1  # "never used" in msgpack: a body starting with it is a fixed struct (readwire.py)
MAX_FRAME = 64 << 20  # a whole --list-root listing must fit; anything larger is garbage

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


def preview(obj: Any, limit: int = 80) -> str:
    """A bad value for an error message, cut short: a broken peer may send megabytes."""
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


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

    ``fixed`` decodes the bodies that start with ``FIXED_MARK`` (readwire.py's
    structs) instead of msgpack; without it such a body is undecodable like
    any other garbage.
    """

    def __init__(self, fd: int, size: int = 1 << 20,
                 fixed: Callable[[memoryview], Any] | None = None) -> None:
        self.fd = fd
        self._fixed = fixed
        self._mark = FIXED_MARK if fixed is not None else -1
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
                    if length and buf[body_start] == self._mark:
                        out.append(self._fixed(body))  # type: ignore[misc]  # set with the mark
                    else:
                        out.append(unpack(body))
                self._start = body_start + length
        if self._start == self._end:
            self._start = self._end = 0
        return out
