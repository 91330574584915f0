"""Random access to a chunked blob over gRPC, every chunk verified before it is served.

Reads in order from (near) the start stream the whole blob as one run
(runs.py) and take its chunks as they verify; a blob of at most
``WHOLE_RUN`` bytes is streamed whole into a local copy on its first read;
other reads fetch just the chunks they cover, one ``Read(chunk digest)``
each, fetching ``READAHEAD`` chunks ahead while reads go in order. Any run
that goes wrong hands over to chunk reads, and a server that stops serving
chunks to the whole blob (blobs.py explains why each of these exists).

While a run streams, the reader offers whole 256 KiB regions
(``segment_size``) and ``RUN_FILL`` of them per read in order: the worker
puts them, verified chunk by chunk, into the shared segment arena ahead of
the reads (workers/segfill.py), so the dispatcher serves most of a
sequential reader's requests without a worker. A reader fetching chunk by
chunk offers regions only when every chunk starts on the regions' grid
(tvixmount's own daemon lists an embedded store's 256 KiB segments): a
region then lies inside one chunk, and the fetch a read makes brings its
whole region anyway, so a random re-read of it is served from the arena.
Chunks off the grid (content-defined ones) offer none: a region would
widen a small read into more fetches.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ...castore.nodes import b3_text
from ...errors import IntegrityError, InvalidArgument, Timeout, TvixError, Unavailable
from ..base import BlobReader, ChunkMeta
from .copies import SEGMENT, WHOLE_FILL, LocalCopy, check_range
from .runs import BrokenOff, Run, WrongChunkList
from .status import Absent

if TYPE_CHECKING:
    from .blobs import GrpcBlobService

log = logging.getLogger(__name__)

CACHED_CHUNKS = 4  # verified chunks a chunked reader keeps (also what a run passed, for reads out of order)
WHOLE_RUN = 4 * 1024 * 1024  # chunked blobs up to this size are streamed whole on their first read
RUN_SKIP = 1024 * 1024  # an in-order read starting within this many bytes of the start streams the blob
RUN_REACH = 64  # chunks a run is pulled forward to reach a read ahead of it (else: that chunk alone)
READAHEAD = 2  # chunks a reader fetches ahead while reads go in order
# While a run streams the blob, the reader hands out whole pieces of this size cheaply
# (``segment_size``; the embedded store's segment, which is the worker arena's region), and a
# read in order is worth RUN_FILL of them at once (workers/segfill.py; docs/performance.md,
# "gRPC: a sequential reader streams": 1 MiB measured better than 256 KiB and 2 MiB).
RUN_SEGMENT = SEGMENT
RUN_FILL = 4


class ChunkedBlobReader(BlobReader):
    """Verified chunks from one streamed Read (runs) or one Read per chunk; falls back to the whole blob."""

    def __init__(self, service: GrpcBlobService, digest: bytes, chunks: tuple[ChunkMeta, ...]) -> None:
        self._service = service
        self._digest = digest
        self._chunks = chunks
        self._starts: list[int] = []
        total = 0
        for chunk in chunks:
            self._starts.append(total)
            total += chunk.size
        self.size = total
        # every region inside one chunk: chunk reads offer regions too (the module's docstring)
        self._chunk_regions = RUN_SEGMENT if all(start % RUN_SEGMENT == 0 for start in self._starts) else None
        self.segment_size = self._chunk_regions
        self._cache: OrderedDict[int, bytes | memoryview] = OrderedDict()
        self._ahead: dict[int, Future[bytes]] = {}  # chunks being fetched ahead of the reads
        self._last = -1  # the chunk fetched last; the next one in order means "sequential"
        self._whole: LocalCopy | None = None
        self._run: Run | None = None
        # The server does not serve the whole blob, or its stream was bad: chunks only.
        self._runs_refused = service.stream_refused(digest)
        self._end = -1  # where the previous read ended
        self._in_order = False  # this read starts where the previous one ended (or at 0)
        self._broken: IntegrityError | None = None  # the blob's chunk list proved wrong: nothing is served
        self._closed = False

    def pread(self, offset: int, length: int) -> bytes:
        parts = self._pieces(offset, length)
        if isinstance(parts, LocalCopy):
            return parts.pread(offset, length)
        if not parts:
            return b""
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """``pread`` into ``buf`` with one copy of the verified chunk bytes."""
        parts = self._pieces(offset, len(buf))
        if isinstance(parts, LocalCopy):
            return parts.pread_into(offset, buf)
        written = 0
        for part in parts:
            buf[written : written + len(part)] = part
            written += len(part)
        return written

    def _pieces(self, offset: int, length: int) -> list[bytes | memoryview] | LocalCopy:
        """Verified slices covering the range, in order; or the local copy that holds the blob."""
        check_range(offset, length)
        if self._closed:
            raise InvalidArgument(f"blob {b3_text(self._digest)}: reader is closed")
        if self._broken is not None:
            raise IntegrityError(str(self._broken))
        end = min(self.size, offset + length)
        if offset >= end:
            return []
        if self._whole is None and self.size <= WHOLE_RUN and not self._runs_refused:
            self._fetch_small()
        if self._whole is not None:
            return self._whole
        self._in_order = offset == 0 or offset == self._end
        self._end = end
        index = bisect.bisect_right(self._starts, offset) - 1
        parts: list[bytes | memoryview] = []
        position = offset
        while position < end:
            data = self._chunk(index)
            if data is None:  # the server stopped serving chunks: whole-blob fallback
                assert self._whole is not None
                return self._whole
            base = self._starts[index]
            parts.append(data[position - base : min(end - base, len(data))])
            position = base + len(data)
            index += 1
        return parts

    def _chunk(self, index: int) -> bytes | memoryview | None:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        run = self._run
        if run is None and self._wants_run(index) and self._service.run_starting(self):
            run = self._start_run()
        if run is not None and run.next <= index <= run.next + RUN_REACH:
            streamed = self._from_run(run, index)
            if streamed is not None:
                return streamed
        try:
            data = self._prefetched(index) or self._fetch(index)
        except Absent:
            chunk = self._chunks[index]
            log.warning("reading chunk %d (%s) of blob %s: %s no longer serves it; fetching the whole blob",
                        index, b3_text(chunk.digest), b3_text(self._digest), self._service.endpoint.server)
            self._drop_ahead()
            self._drop_run()
            self._hold(self._service.fetch_whole(self._digest, self.size))
            self._cache.clear()
            return None
        self._remember(index, data)
        self._read_ahead(index, sequential=index == self._last + 1)
        self._last = index
        return data

    def _remember(self, index: int, data: bytes | memoryview) -> None:
        self._cache[index] = data
        if len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)

    # runs ---------------------------------------------------------------------------------

    def _fetch_small(self) -> None:
        """A blob of at most WHOLE_RUN bytes: one Read into a local copy, verified chunk by chunk."""
        try:
            self._hold(self._service.fetch_by_chunks(self._digest, self._chunks))
        except WrongChunkList as exc:
            self._broken = exc  # the chunk list lies: no chunk read could be trusted either
            raise
        except Absent as exc:
            self._run_failed(exc)  # the server serves no whole blob: chunk reads
        except (IntegrityError, BrokenOff, Timeout) as exc:
            self._run_failed(exc)  # bad, or fetched again and again to no avail: chunk reads decide

    def _hold(self, copy: LocalCopy) -> None:
        """Serve the blob from a verified local copy from now on (WholeBlobReader explains the rest)."""
        self._whole = copy
        self.holds_whole, self.segment_size, self.segments_per_fill = True, SEGMENT, WHOLE_FILL

    def _wants_run(self, index: int) -> bool:
        """Stream the whole blob: reads in order near its start."""
        return not self._runs_refused and self._in_order and self._starts[index] <= RUN_SKIP

    def _start_run(self) -> Run:
        self._drop_ahead()  # the run brings those chunks
        self._run = Run(self._service, self._digest, self._chunks)
        self.segment_size, self.segments_per_fill = RUN_SEGMENT, RUN_FILL
        return self._run

    def _from_run(self, run: Run, index: int) -> bytes | memoryview | None:
        """Chunk ``index`` from the run (caching the ones passed on the way); None: it broke off."""
        try:
            while run.next <= index:
                at = run.next
                self._remember(at, run.pull())
        except IntegrityError as exc:  # cut short, or a chunk that hashes wrong (never served)
            self._run_failed(exc)
            return None
        except Absent as exc:
            self._runs_refused = True
            self._run_failed(exc)
            return None
        except Unavailable as exc:
            if type(exc) is Unavailable:  # the server is away (and was waited for): so are its chunks
                self._drop_run()
                raise
            self._run_failed(exc)  # broke off, or left idle too long (Timeout): chunk by chunk
            return None
        if run.done():
            self._drop_run()
        self._last = index
        return self._cache[index]

    def _run_failed(self, exc: TvixError) -> None:
        """Chunk by chunk from here; and from now on, unless the run was only left idle too long.

        A chunk that hashed wrong in the whole-blob stream was not served;
        its own Read is verified on its own and is the answer (a server
        whose chunks are bad too fails that read with IntegrityError).
        """
        if type(exc) is IntegrityError:
            log.warning("%s; reading its chunks one by one instead", exc)
            self._service.refuse_stream(self._digest)
        else:
            log.debug("streaming blob %s stopped (%s); reading chunk by chunk", b3_text(self._digest), exc)
        self._drop_run()
        if not isinstance(exc, Timeout):
            self._runs_refused = True

    def _drop_run(self) -> None:
        run, self._run = self._run, None
        self.segment_size, self.segments_per_fill = self._chunk_regions, 1
        if run is not None:
            run.close()
            self._service.run_ended(self)

    # chunk by chunk -----------------------------------------------------------------------

    def _prefetched(self, index: int) -> bytes | None:
        """The chunk if a read-ahead fetched it; None to fetch it now.

        A read-ahead that failed is not the answer: it may have run into a
        daemon restart long before this read; the fetch now decides.
        """
        future = self._ahead.pop(index, None)
        if future is None:
            return None
        try:
            return future.result()
        except TvixError as exc:
            log.debug("read-ahead of chunk %d of blob %s failed (%s); fetching it again",
                      index, b3_text(self._digest), exc)
            return None

    def _fetch(self, index: int) -> bytes:
        chunk = self._chunks[index]
        what = f"reading chunk {index} ({b3_text(chunk.digest)}) of blob {b3_text(self._digest)}"
        return self._service.fetch_chunk(chunk, what)

    def _read_ahead(self, index: int, sequential: bool) -> None:
        """After a chunk read in order, start fetching the next READAHEAD chunks.

        Each chunk is a round trip; in order (a file read front to back,
        as FUSE does) the next ones are fetched while these bytes are used.
        A jump elsewhere drops what was fetched ahead for the old place.
        """
        wanted = range(index + 1, min(index + 1 + READAHEAD, len(self._chunks))) if sequential else range(0)
        for stale in [i for i in self._ahead if i not in wanted]:
            self._ahead.pop(stale).cancel()
        for later in wanted:
            if later not in self._ahead and later not in self._cache:
                self._ahead[later] = self._service.prefetcher().submit(self._fetch, later)

    def _drop_ahead(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()

    def close(self) -> None:
        self._closed = True
        self._drop_ahead()
        self._drop_run()
        self._cache.clear()
        self._whole = None
        self.holds_whole = False

