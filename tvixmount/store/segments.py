"""Blob files checked piece by piece: the one segment hasher and the one verified segment reader.

The embedded store (embedded/blobs.py) and the blob cache (cache/) keep a
blob the same way: one plain file, and in a sqlite row beside it the
blake3 digest of every ``segment_size`` piece of the file (an "outboard"
list, ``Outboard``). A read hashes only the segments it touches, so a
random 4 KiB read of a 10 GiB blob hashes one segment, not 10 GiB, and
nothing unverified is ever returned. A blob of at most one segment lists
no segment digests: its own digest is its one segment's.

Writing: ``SegmentHasher`` hashes a blob whole and per segment in one
pass. Its first segment costs one hash, not two: the digest of the first
segment is the whole hash as it stands at the segment's end (blake3's
``digest()`` does not end the hasher), so a blob that fits in one segment,
the common small file, is hashed once.

Reading: ``SegmentFile`` serves ranges of an open file from verified
segments and keeps the last ``KEPT_SEGMENTS``, so sequential 128 KiB
reads hash every byte exactly once. A segment that cannot be read whole
or does not match raises ``BadSegment``, carrying the facts; what that
means is the caller's to say (the embedded store fails the read, the
cache drops its copy and reads from the remote store instead).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import blake3

from ..castore.nodes import DIGEST_LEN, b3_text
from ..errors import InvalidArgument

# Why 256 KiB: a FUSE read is at most 128 KiB, so one read touches at most
# two segments and a sequential reader hashes every byte exactly once while
# the reader keeps the last two; a random 4 KiB read costs one 256 KiB
# pread + blake3 (~0.1 ms at ~3 GB/s); the outboard digests stay small
# (32 bytes per 256 KiB = 8 KiB for a 64 MiB blob); and it matches the
# average chunk of tvix's FastCDC chunker, so chunk lists look familiar.
# Measured here (64 MiB blob, page cache, 128 KiB sequential preads / random
# 4 KiB preads): 64 KiB 1.8 GB/s / 37 us, 128 KiB 2.1 GB/s / 71 us,
# 256 KiB 2.3 GB/s / 150 us, 1 MiB 1.7 GB/s / 590 us.
SEGMENT = 256 * 1024
KEPT_SEGMENTS = 2  # verified segments a reader keeps (a FUSE read spans at most two)


@dataclass(frozen=True, slots=True)
class Outboard:
    """What each segment of one blob must hash to."""

    digest: bytes  # blake3 of the whole blob
    size: int
    segment_size: int
    segments: bytes  # DIGEST_LEN bytes per segment; empty when there is at most one

    @property
    def count(self) -> int:
        return -(-self.size // self.segment_size)

    @property
    def expected_len(self) -> int:
        """How many bytes of segment digests a blob of this size lists."""
        return self.count * DIGEST_LEN if self.count > 1 else 0

    def segment_digest(self, index: int) -> bytes:
        """What segment ``index`` must hash to (the blob digest itself for a one-segment blob)."""
        if not self.segments:  # self.count <= 1, for a well-formed outboard, without the property's call
            return self.digest
        return self.segments[DIGEST_LEN * index : DIGEST_LEN * (index + 1)]

    def well_formed(self) -> bool:
        return self.size >= 0 and self.segment_size > 0 and len(self.segments) == self.expected_len


class SegmentHasher:
    """blake3 of a blob as a whole and of each ``segment_size`` piece, fed in order."""

    def __init__(self, segment_size: int) -> None:
        self.segment_size = segment_size
        self.size = 0
        self._whole = blake3.blake3()
        self._segment = blake3.blake3()  # the current segment, from the second one on
        self._filled = 0  # bytes in the current segment (from the second one on)
        self._digests = bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self.size < self.segment_size:  # still in the first segment: the whole hash is its hash
            first = min(len(view), self.segment_size - self.size)
            self._whole.update(view[:first])
            self.size += first
            if self.size == self.segment_size:
                self._digests += self._whole.digest()
            view = view[first:]
            if not view:
                return
        self._whole.update(view)
        self.size += len(view)
        position, total = 0, len(view)
        while position < total:
            take = min(self.segment_size - self._filled, total - position)
            self._segment.update(view[position : position + take])
            self._filled += take
            position += take
            if self._filled == self.segment_size:
                self._digests += self._segment.digest()
                self._segment = blake3.blake3()
                self._filled = 0

    def digest(self) -> bytes:
        """The whole blob's digest so far."""
        return self._whole.digest()

    def segment_digests(self) -> bytes:
        """The digests to list (none for a blob of at most one segment: its digest says it all)."""
        if self.size <= self.segment_size:
            return b""
        if self._filled:
            return bytes(self._digests) + self._segment.digest()
        return bytes(self._digests)


class BadSegment(Exception):
    """Segment ``index`` could not be read whole (``got`` < ``want``, or ``error``) or does not match."""

    def __init__(self, index: int, start: int, want: int, got: int, error: OSError | None = None) -> None:
        super().__init__(f"segment {index} at {start}: {got} of {want} bytes read ({error or 'no error'})")
        self.index = index
        self.start = start
        self.want = want
        self.got = got
        self.error = error

    @property
    def short(self) -> bool:
        return self.error is None and self.got < self.want


class SegmentFile:
    """Verified ranges of one open blob file; owns ``fd``. Not thread-safe, like every reader.

    ``base``: where the blob starts in the file (non-zero for a blob packed
    with others, embedded/packs.py); offsets given to the methods are the blob's.
    """

    def __init__(self, outboard: Outboard, fd: int, base: int = 0) -> None:
        self.outboard = outboard
        self.size = outboard.size
        self._fd = fd
        self._base = base
        self._kept: OrderedDict[int, bytes] = OrderedDict()

    def pread(self, offset: int, length: int) -> bytes:
        """The verified bytes of the range (fewer only at EOF); BadSegment for a bad segment."""
        if offset < 0 or length < 0:
            raise InvalidArgument(f"pread offset {offset} and length {length} must not be negative")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        step = self.outboard.segment_size
        first, last = offset // step, (end - 1) // step
        if first == last:
            base = first * step
            return self.segment(first)[offset - base : end - base]
        parts = []
        for index in range(first, last + 1):
            base = index * step
            segment = self.segment(index)
            parts.append(segment[max(offset - base, 0) : min(end - base, len(segment))])
        return b"".join(parts)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """``pread`` straight into ``buf``: one copy of the verified bytes."""
        if offset < 0:
            raise InvalidArgument(f"pread offset {offset} must not be negative")
        end = min(self.size, offset + len(buf))
        step = self.outboard.segment_size
        done = 0
        while offset + done < end:
            at = offset + done
            index = at // step
            base = index * step
            segment = self.segment(index)
            take = min(end - at, len(segment) - (at - base))
            with memoryview(segment) as view:
                buf[done: done + take] = view[at - base: at - base + take]
            done += take
        return done

    def segment_into(self, index: int, view: memoryview) -> int:
        """Segment ``index`` read straight into ``view`` and matched there; its length.

        For a destination that keeps it (the worker's slot in the shared
        segment arena): the bytes are read and hashed where they stay, with
        no copy, and not kept here. BadSegment as ``segment``; ``view`` then
        holds bytes that must not be used.
        """
        outboard = self.outboard
        if self._fd < 0:
            raise InvalidArgument(f"blob {b3_text(outboard.digest)}: reader is closed")
        start = index * outboard.segment_size
        want = min(outboard.segment_size, outboard.size - start)
        if want > len(view):
            raise InvalidArgument(f"segment {index} of {want} bytes does not fit in {len(view)}")
        target = view[:want]
        got = 0
        try:
            while got < want:
                n = os.preadv(self._fd, [target[got:]], self._base + start + got)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            raise BadSegment(index, start, want, got, exc) from None
        if got < want:
            raise BadSegment(index, start, want, got)
        if blake3.blake3(target).digest() != outboard.segment_digest(index):
            raise BadSegment(index, start, want, want)
        return want

    def segment(self, index: int) -> bytes:
        """Segment ``index``, read whole and matched against its digest (or kept from before)."""
        kept = self._kept.get(index)
        if kept is not None:
            self._kept.move_to_end(index)
            return kept
        outboard = self.outboard
        if self._fd < 0:
            raise InvalidArgument(f"blob {b3_text(outboard.digest)}: reader is closed")
        start = index * outboard.segment_size
        want = min(outboard.segment_size, outboard.size - start)
        try:
            data = os.pread(self._fd, want, self._base + start)
            while len(data) < want:  # only at EOF for a regular file: loop to be sure
                more = os.pread(self._fd, want - len(data), self._base + start + len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise BadSegment(index, start, want, 0, exc) from None
        if len(data) < want:
            raise BadSegment(index, start, want, len(data))
        if blake3.blake3(data).digest() != outboard.segment_digest(index):
            raise BadSegment(index, start, want, want)
        self._kept[index] = data
        if len(self._kept) > KEPT_SEGMENTS:
            self._kept.popitem(last=False)
        return data

    def close(self) -> None:
        self._kept.clear()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
