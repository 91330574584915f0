"""A worker's half of the verified-segment arena (tvixmount/segcache.py): what it puts there.

A read of a blob bigger than one FUSE read puts every 256 KiB region it
touches into the arena, so the dispatcher serves the rest of the region
(the other half of a sequential reader's segment, an O_DIRECT re-read)
without asking a worker again, and the read itself is then copied out of
the arena. Where the store's segments are the arena's regions (the
embedded store), the segment is read and hashed right in the slot
(``BlobReader.segment_into``): no extra copy of 256 KiB per miss. Else the
region comes from the verifying reader (``pread_into``). Either way every
byte in a slot was checked against the blob's digest before the slot is
marked valid, and a segment that fails leaves the slot empty.

Small blobs stay out: a file read in one FUSE request is read once (the
page cache keeps it), and its slot would evict a big file's region.
"""

from __future__ import annotations

from functools import partial

from tvixmount.segcache import REGION, SegmentWriter
from tvixmount.store import BlobReader

ONE_FUSE_READ = 128 << 10  # libfuse 2's largest read: a blob this small is read in one request


def keep_regions(writer: SegmentWriter, reader: BlobReader, digest: bytes, offset: int, length: int) -> bool:
    """Put the regions of ``[offset, offset + length)`` that no slot holds yet; False for a small blob.

    Errors (a bad segment) go to the caller; nothing of them is kept.
    """
    size = reader.size
    if size <= ONE_FUSE_READ or length <= 0:
        return False
    for index in range(offset // REGION, (min(offset + length, size) - 1) // REGION + 1):
        if not writer.has(digest, index):
            writer.put(digest, index, partial(_fill, reader, index * REGION))
    return True


def read_kept(writer: SegmentWriter, reader: BlobReader, digest: bytes, offset: int, dest: memoryview) -> int:
    """``reader.pread_into`` for regions just kept: from the arena, the reader only if a slot moved on."""
    length = min(len(dest), reader.size - offset)
    if length > 0 and writer.read_into(digest, offset, dest[:length]):
        return length
    return reader.pread_into(offset, dest)


def _fill(reader: BlobReader, base: int, view: memoryview) -> int:
    got = reader.segment_into(base, view)
    return reader.pread_into(base, view) if got is None else got
