"""A worker's half of the verified-segment arena (tvixmount/segcache.py): what it puts there.

A read of a blob bigger than one FUSE read puts every 256 KiB region it
touches into the arena, so the dispatcher serves the rest of the region
(the other half of a sequential reader's segment, an O_DIRECT re-read)
without asking a worker again. The bytes come from the store's verifying
reader (``BlobReader.pread_into``): the segment is hashed once, for the
read and the slot alike (SegmentFile keeps the last two segments), and a
segment that fails verification raises before the slot is marked valid.

Small blobs stay out: a file read in one FUSE request is read once (the
page cache keeps it), and its slot would evict a big file's region.
"""

from __future__ import annotations

from functools import partial

from tvixmount.segcache import REGION, SegmentWriter
from tvixmount.store import BlobReader

ONE_FUSE_READ = 128 << 10  # libfuse 2's largest read: a blob this small is read in one request


def keep_regions(writer: SegmentWriter, reader: BlobReader, digest: bytes, offset: int, length: int) -> None:
    """Put the regions of ``[offset, offset + length)`` that no slot holds yet; errors go to the caller."""
    size = reader.size
    if size <= ONE_FUSE_READ or length <= 0:
        return
    for index in range(offset // REGION, (min(offset + length, size) - 1) // REGION + 1):
        if not writer.has(digest, index):
            writer.put(digest, index, partial(_fill, reader, index * REGION))


def _fill(reader: BlobReader, base: int, view: memoryview) -> int:
    return reader.pread_into(base, view)
