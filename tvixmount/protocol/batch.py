"""The ``blob_batch`` op's request and reply: many small blobs in one worker round trip.

Why its own wire shape: a cold ``tar`` opens and reads tens of thousands of
small files, and each read that goes to a worker costs a round trip
(~60 us of hand-offs before any work, ~1 ms with the disk). The dispatcher
asks for the small files of a directory in batches instead (smallblobs.py),
and for the files of up to 1 MiB it reads ahead in groups (readahead.py);
the worker reads and verifies each against its digest and sends them back
packed in one reply.

Request: ``(digests, sizes)``: the 32-byte digests concatenated (compact,
so a batch of ``MAX_FILES`` stays inside one atomic pipe write) and the
size each FileNode claims. Both are bounded: at most ``MAX_FILES`` blobs
and ``MAX_BYTES`` bytes by their claimed sizes (one blob may take it all).

Reply: one bytes value (so it travels through the worker's shared ring
like a read's bytes): a little-endian u32 count, then one i64 per blob
(its length, or ``FAILED``), then the blobs' bytes back to back. A blob
that failed (missing, corrupt, unreachable) or whose verified length is
not the size asked for is ``FAILED``; the others are unaffected. Its
reader then asks for it alone and gets the real error (EIO for that file
only). The reply's total is bounded by the request's ``MAX_BYTES``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..errors import InvalidArgument
from .framing import ProtocolError

DIGEST = 32
MAX_FILES = 64  # 64 digests + sizes: ~2.5 KiB, inside PIPE_BUF (one atomic request write)
MAX_BYTES = 1 << 20  # a quarter of a worker's ring, so a batch reply rarely falls back inline
FAILED = -1

_COUNT = struct.Struct("<I")


def encode_request(wanted: Sequence[tuple[bytes, int]]) -> tuple[bytes, list[int]]:
    """The op's arguments for (digest, size) pairs."""
    return b"".join(digest for digest, _ in wanted), [size for _, size in wanted]


def decode_request(digests: bytes, sizes: list[int]) -> list[tuple[bytes, int]]:
    """(digest, size) pairs; InvalidArgument for a batch outside the bounds."""
    count = len(sizes)
    if len(digests) != count * DIGEST or not 0 < count <= MAX_FILES:
        raise InvalidArgument(f"blob_batch: {len(digests)} bytes of digests for {count} sizes "
                              f"(1..{MAX_FILES} blobs of {DIGEST} bytes each)")
    if not all(type(s) is int and s >= 0 for s in sizes) or sum(sizes) > MAX_BYTES:
        raise InvalidArgument(f"blob_batch: sizes out of range (each at least 0, "
                              f"together at most {MAX_BYTES})")
    return [(digests[i * DIGEST:(i + 1) * DIGEST], sizes[i]) for i in range(count)]


def reply_length(lengths: Sequence[int]) -> int:
    """Bytes of the reply holding blobs of these lengths (FAILED ones take none)."""
    return _COUNT.size + 8 * len(lengths) + sum(n for n in lengths if n > 0)


def pack_reply_into(buf: memoryview, blobs: Sequence[bytes | None]) -> int:
    """Write the reply for ``blobs`` (None: failed) into ``buf``; return its length."""
    lengths = [FAILED if b is None else len(b) for b in blobs]
    _COUNT.pack_into(buf, 0, len(lengths))
    struct.pack_into(f"<{len(lengths)}q", buf, _COUNT.size, *lengths)
    pos = _COUNT.size + 8 * len(lengths)
    for blob in blobs:
        if blob:
            buf[pos:pos + len(blob)] = blob
            pos += len(blob)
    return pos


def pack_reply(blobs: Sequence[bytes | None]) -> bytes:
    """The reply as bytes (no ring: inline, or in-process)."""
    buf = bytearray(reply_length([-1 if b is None else len(b) for b in blobs]))
    pack_reply_into(memoryview(buf), blobs)
    return bytes(buf)


def decode_reply(wire: object) -> list[bytes | None]:
    """Each blob's bytes, or None where it failed; ProtocolError for a reply that does not add up."""
    if type(wire) is not bytes:
        raise ProtocolError(f"blob_batch: expected bytes, got {type(wire).__name__}")
    try:
        (count,) = _COUNT.unpack_from(wire, 0)
        lengths = struct.unpack_from(f"<{count}q", wire, _COUNT.size) if count <= MAX_FILES else None
    except struct.error:
        lengths = None
    if lengths is None or reply_length(lengths) != len(wire) or any(n < FAILED for n in lengths):
        raise ProtocolError(f"blob_batch: malformed reply of {len(wire)} bytes")
    view = memoryview(wire)
    pos = _COUNT.size + 8 * len(lengths)
    out: list[bytes | None] = []
    for n in lengths:
        if n == FAILED:
            out.append(None)
        else:
            out.append(bytes(view[pos:pos + n]))
            pos += n
    return out
