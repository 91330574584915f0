"""The one segment hasher and verified segment reader (tvixmount/store/segments.py) on their own.

The embedded store and the blob cache run their own suites over these; here
the edges: blobs ending on, just before and just after a segment boundary,
fed in pieces of every size, and files that lie.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from tests.store_suite import pattern
from tvixmount.errors import InvalidArgument
from tvixmount.store.segments import BadSegment, Outboard, SegmentFile, SegmentHasher

SEG = 4096


def naive(data: bytes, segment_size: int) -> tuple[bytes, bytes]:
    """(whole digest, listed segment digests) the slow, obvious way."""
    pieces = [data[i : i + segment_size] for i in range(0, len(data), segment_size)]
    listed = b"".join(blake3.blake3(p).digest() for p in pieces) if len(pieces) > 1 else b""
    return blake3.blake3(data).digest(), listed


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 2 * SEG + 7, 5 * SEG - 1])
@pytest.mark.parametrize("split", ["whole", "bytes of 1000", "random"])
def test_hasher_agrees_with_hashing_each_segment(size: int, split: str) -> None:
    data = pattern(size, seed=size)
    hasher = SegmentHasher(SEG)
    if split == "whole":
        hasher.update(data)
    else:
        rng = random.Random(size)
        position = 0
        while position < size:
            step = 1000 if split == "bytes of 1000" else rng.randint(1, 3 * SEG)
            hasher.update(memoryview(data)[position : position + step])
            position += step
    assert (hasher.digest(), hasher.segment_digests()) == naive(data, SEG)
    assert hasher.size == size


def _file(tmp_path: Path, data: bytes) -> tuple[Outboard, int]:
    digest, listed = naive(data, SEG)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return Outboard(digest, len(data), SEG, listed), os.open(path, os.O_RDONLY)


def test_reads_of_every_range_shape_match_the_bytes(tmp_path: Path) -> None:
    data = pattern(3 * SEG + 100)
    outboard, fd = _file(tmp_path, data)
    segments = SegmentFile(outboard, fd)
    for offset, length in [(0, 10), (SEG - 5, 10), (0, len(data) + 50), (2 * SEG, SEG), (len(data), 5)]:
        assert segments.pread(offset, length) == data[offset : offset + length]
        buf = bytearray(length)
        got = segments.pread_into(offset, memoryview(buf))
        assert bytes(buf[:got]) == data[offset : offset + length]
    segments.close()
    with pytest.raises(InvalidArgument, match="closed"):
        segments.pread(0, 1)


def test_a_flipped_byte_is_a_bad_segment_naming_it(tmp_path: Path) -> None:
    data = pattern(3 * SEG)
    outboard, fd = _file(tmp_path, data)
    with open(tmp_path / "blob", "r+b") as f:
        f.seek(SEG + 3)
        f.write(bytes([data[SEG + 3] ^ 1]))
    segments = SegmentFile(outboard, fd)
    assert segments.pread(0, SEG) == data[:SEG]  # the segments around it still serve
    with pytest.raises(BadSegment) as info:
        segments.pread(SEG - 1, 2)
    assert (info.value.index, info.value.start, info.value.short, info.value.error) == (1, SEG, False, None)
    segments.close()


def test_a_truncated_file_is_a_short_segment(tmp_path: Path) -> None:
    data = pattern(2 * SEG + 10)
    outboard, fd = _file(tmp_path, data)
    os.truncate(tmp_path / "blob", 2 * SEG + 4)
    segments = SegmentFile(outboard, fd)
    with pytest.raises(BadSegment) as info:
        segments.pread(2 * SEG, 1)
    assert (info.value.index, info.value.got, info.value.want, info.value.short) == (2, 4, 10, True)
    segments.close()


def test_one_segment_blob_is_checked_against_its_own_digest(tmp_path: Path) -> None:
    data = pattern(SEG)
    outboard, fd = _file(tmp_path, data)
    assert outboard.segments == b"" and outboard.well_formed()
    wrong = Outboard(blake3.blake3(b"other").digest(), len(data), SEG, b"")
    with pytest.raises(BadSegment):
        SegmentFile(wrong, fd).pread(0, 1)
    assert not Outboard(outboard.digest, 2 * SEG, SEG, b"").well_formed()  # two segments need a list


def test_segment_into_checks_a_one_segment_blob_against_the_blob_digest(tmp_path: Path) -> None:
    data = pattern(SEG - 1000)  # bigger than a FUSE read, one segment: no list, its digest is the blob's
    outboard, fd = _file(tmp_path, data)
    assert outboard.segments == b""
    slot = bytearray(SEG)
    wrong = SegmentFile(Outboard(bytes(32), len(data), SEG, b""), os.dup(fd))
    right = SegmentFile(outboard, fd)
    assert right.segment_into(0, memoryview(slot)) == len(data)
    assert bytes(slot[: len(data)]) == data
    with pytest.raises(BadSegment) as info:
        wrong.segment_into(0, memoryview(slot))
    assert (info.value.index, info.value.short) == (0, False)
    right.close()
    wrong.close()


def test_segment_into_reads_and_checks_in_place(tmp_path: Path) -> None:
    data = pattern(3 * SEG + 100)
    outboard, fd = _file(tmp_path, data)
    with open(tmp_path / "blob", "r+b") as f:
        f.seek(SEG + 3)
        f.write(bytes([data[SEG + 3] ^ 1]))
    segments = SegmentFile(outboard, fd)
    slot = bytearray(SEG)
    assert segments.segment_into(0, memoryview(slot)) == SEG and bytes(slot) == data[:SEG]
    assert segments.segment_into(3, memoryview(slot)) == 100 and bytes(slot[:100]) == data[3 * SEG:]
    with pytest.raises(BadSegment) as info:
        segments.segment_into(1, memoryview(slot))
    assert (info.value.index, info.value.short) == (1, False)
    os.truncate(tmp_path / "blob", 2 * SEG + 7)
    with pytest.raises(BadSegment) as info:
        segments.segment_into(2, memoryview(slot))
    assert (info.value.got, info.value.want, info.value.short) == (7, SEG, True)
    with pytest.raises(InvalidArgument, match="does not fit"):
        segments.segment_into(0, memoryview(bytearray(SEG - 1)))
    segments.close()
