"""BlobService over gRPC (tvix.castore.v1.BlobService): verified reads, streamed writes.

Reading a blob starts with ``Stat(send_chunks=True)``, which tells whether
the blob exists and, from a chunking server, its chunk list:

* more than one chunk, read in order from (near) the start, or a blob of
  at most ``WHOLE_RUN`` bytes: one ``Read(digest)`` streams the whole blob
  (a "run"); the reader cuts the stream at the chunk list's boundaries and
  hands on a chunk only once its blake3 matched the chunk digest, pulling
  the stream only as far as the reads need (grpc's flow control holds the
  server back meanwhile). One call instead of one per chunk: per-call cost
  on both ends was what held sequential reads to a fifth of a plain
  client's speed. A run left idle for ``RUN_IDLE`` seconds is cancelled
  (it holds a server thread), and a service opens at most ``MAX_RUNS``
  (beyond that, chunk reads); a run that breaks off, ends early or carries a chunk that
  hashes wrong (never served; WARNING) is dropped and the chunk path below
  takes over, whose reads are verified on their own. A blob of at most
  ``WHOLE_RUN`` bytes is streamed into a local copy before its first
  read is answered (so a small file is one Stat and one Read); with all of
  its bytes at hand, its digest is checked too, which verifies the chunk
  list itself (a list that does not make up the blob is IntegrityError).
* more than one chunk otherwise (random access): ``pread`` fetches only the
  chunks covering the range (``Read(chunk digest)``), checks each against
  its chunk digest, and keeps the last few verified chunks, fetching ahead
  while reads go in order. If the server no longer serves a chunk
  (NOT_FOUND: a daemon restarted and forgot its chunk index), the reader
  falls back to the whole blob.
* otherwise: ``Read(digest)`` streams the blob once into a private local copy
  (memory up to ``MEMORY_COPY`` bytes, an unlinked temp file beyond),
  hashing while it arrives; the copy is served only after the digest
  matched. A mismatch raises IntegrityError naming the b3: digest and
  nothing is served or kept.

Size: a blob's size is the sum of its chunk sizes. Our daemon always lists
at least one chunk for a non-empty blob, so its blobs' sizes are known from
Stat. A tvix-store lists no chunks for a blob that is one chunk; ``stat``
then has to fetch the blob to learn its size, and keeps that verified copy
for the ``open_read`` that usually follows. Callers that know the size from
a FileNode may pass ``size_hint`` to ``open_read``: a blob of at most
``HINTED_WHOLE`` bytes (one FUSE read: the reader asks for all of it at
once, so a chunk list could not save part of it) is then read with one
``Read`` and no ``Stat`` at all, verified against its digest; the hint only
decides that and where the copy goes, and is never trusted over the bytes.
Bigger blobs keep the Stat: with the chunk list, a bad chunk costs only the
reads that touch it.

What chunk verification covers: each chunk is checked against the digest
the server's Stat listed for it; the chunk list itself cannot be checked
against the blob digest (blake3 chunk digests do not compose), so a server
that lies about a blob's chunk list is trusted as far as that list goes,
as tvix's own client trusts it.

A blob stream that breaks off after data arrived (UNAVAILABLE mid-stream:
the server or the connection went away) or ends early (fewer bytes than
the chunk list says, or, where no size is known, bytes that do not hash
right) is fetched again, ``STREAM_ATTEMPTS`` times in all, backing off,
since a blob never changes; failures before the first message are grpc's
own retry policy's (channel.py). Bytes of the right length that hash
wrong are corrupt, not cut short, and are not fetched again. The last
failure is the answer: Unavailable, or IntegrityError.

Writes stream one ``Put`` (writer.py). Blobs cannot be listed over gRPC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import blake3
from google.protobuf.message import DecodeError

from ...castore.nodes import DIGEST_LEN, b3_text
from ...errors import IntegrityError, InvalidArgument, InvalidData, NotFound, Timeout, TvixError, Unavailable
from ...proto import rpc_blobstore_pb2 as pb
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta
from .batch import read_batch
from .channel import Endpoint
from .copies import LocalCopy, Spool, WholeBlobReader
from .reader import ChunkedBlobReader
from .runs import BrokenOff, CutShort, Run, WrongChunkList
from .status import Absent, Unimplemented
from .wire import BLOB_BATCH_READ, BLOB_READ, BLOB_STAT, blob_chunk_data
from .writer import GrpcBlobWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

EMPTY_DIGEST = blake3.blake3(b"").digest()
MAX_RUNS = 8  # runs open at once per service (each holds a server thread); beyond: chunk reads
PREFETCH_THREADS = 4  # per service, shared by its readers
# Read streams one read_many keeps in flight without the batch service: a small blob's Read is
# mostly round trip and per-call Python on both ends, so several at once keep the daemon's
# threads busy. Measured on loopback (batches of 64 small blobs, 2 CPUs under load): 1 stream
# 1.4-1.9 ms per blob, 4, 8 and 16 streams 0.7-1.4 ms, no clear winner (docs/performance.md).
BATCH_STREAMS = 8
CACHED_COPIES = 4  # verified whole-blob copies a service keeps after stat()
HINTED_WHOLE = 128 * 1024  # blobs up to this size_hint are read whole without a Stat (see the module doc)
STREAM_ATTEMPTS = 3  # fetches of one blob or chunk whose stream broke off or came out wrong
RETRY_BACKOFF = 0.1  # seconds before the second attempt, doubling after each
_BAD_STREAMS = 1000  # blobs remembered as streaming bad bytes


class GrpcBlobService(BlobService):
    """Blobs of a tvix-store daemon. Thread-safe; readers are per thread."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._copies: OrderedDict[bytes, LocalCopy] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._batch_pool: ThreadPoolExecutor | None = None
        self._batch_pid = -1
        # Readers with a run open (weakly: a reader dropped without close() frees its slot).
        self._runs: weakref.WeakValueDictionary[int, ChunkedBlobReader] = weakref.WeakValueDictionary()
        self._bad_streams: OrderedDict[bytes, None] = OrderedDict()  # blobs whose whole stream was bad

    def run_starting(self, reader: ChunkedBlobReader) -> bool:
        """Count a reader's new run; False (no run: chunk reads) when MAX_RUNS are open already.

        Each open run holds a server thread; runs left idle end after
        RUN_IDLE, so a slot frees up soon. Another reader's run is never
        touched from here: readers belong to their threads.
        """
        with self._lock:
            if len(self._runs) >= MAX_RUNS and id(reader) not in self._runs:
                return False
            self._runs[id(reader)] = reader
            return True

    def run_ended(self, reader: ChunkedBlobReader) -> None:
        with self._lock:
            self._runs.pop(id(reader), None)

    def refuse_stream(self, digest: bytes) -> None:
        """The whole-blob stream of ``digest`` carried a bad chunk: read its chunks one by one from now on."""
        with self._lock:
            self._bad_streams[digest] = None
            while len(self._bad_streams) > _BAD_STREAMS:
                self._bad_streams.popitem(last=False)

    def stream_refused(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._bad_streams

    def prefetcher(self) -> ThreadPoolExecutor:
        """The threads readers fetch chunks ahead with (made on first use, in this process)."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="grpc-readahead")
                self._pool_pid = os.getpid()
            return self._pool

    def read_many(self, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
        """Small blobs, each verified against its digest: one batch call, else one ``Read`` each.

        The batch call is tvixmount's own BlobBatchService (batch.py); a
        server without it (a tvix-store) answers UNIMPLEMENTED once per
        channel, and from then on each blob is one ``Read``, ``BATCH_STREAMS``
        in flight.
        """
        if len(wanted) <= 1:
            return super().read_many(wanted)
        if not self.endpoint.lacks(BLOB_BATCH_READ):
            try:
                return read_batch(self.endpoint, wanted)
            except Unimplemented as exc:
                if self.endpoint.lacking(BLOB_BATCH_READ):
                    log.info("%s has no batch read (%s); reading small blobs one call each",
                             self.endpoint.server, str(exc).rsplit(": ", 1)[-1] or "UNIMPLEMENTED")
        with self._lock:
            if self._batch_pool is None or self._batch_pid != os.getpid():
                self._batch_pool = ThreadPoolExecutor(BATCH_STREAMS, thread_name_prefix="grpc-batch")
                self._batch_pid = os.getpid()
            pool = self._batch_pool
        futures = [pool.submit(super(GrpcBlobService, self).read_many, [one]) for one in wanted]
        return [future.result()[0] for future in futures]

    def chunks(self, digest: bytes) -> tuple[ChunkMeta, ...] | None:
        """The chunk list Stat reports (maybe empty), or None when the blob is absent."""
        records.check_b3(digest, "blob")
        what = f"stat of blob {b3_text(digest)}"
        try:
            raw = self.endpoint.unary(BLOB_STAT, pb.StatBlobRequest(digest=digest, send_chunks=True)
                                      .SerializeToString(), what)
        except Absent:
            return None
        try:
            response = pb.StatBlobResponse.FromString(raw)
        except DecodeError as exc:
            raise InvalidData(f"{what}: {self.endpoint.server} sent a bad response: {exc}") from None
        chunks = []
        for index, chunk in enumerate(response.chunks):
            if len(chunk.digest) != DIGEST_LEN or chunk.size == 0:
                raise InvalidData(
                    f"{what}: {self.endpoint.server} listed chunk {index} with a {len(chunk.digest)}-byte "
                    f"digest and size {chunk.size}"
                )
            chunks.append(ChunkMeta(chunk.digest, chunk.size))
        return tuple(chunks)

    def stat(self, digest: bytes) -> BlobStat | None:
        chunks = self.chunks(digest)
        if chunks is None:
            return None
        if chunks:
            return BlobStat(sum(c.size for c in chunks), chunks if len(chunks) > 1 else ())
        if digest == EMPTY_DIGEST:
            return BlobStat(0)
        # A server that lists no chunks does not say the size: fetch (and keep) it.
        copy = self.fetch_whole(digest, None)
        self._keep(copy)
        return BlobStat(copy.size)

    def open_read(self, digest: bytes, size_hint: int | None = None) -> BlobReader:
        """A verified reader; NotFound when absent. ``size_hint``: see the module doc."""
        records.check_b3(digest, "blob")
        if size_hint is not None and 0 < size_hint <= HINTED_WHOLE:
            with self._lock:
                copy = self._copies.pop(digest, None)
            if copy is None:
                try:
                    copy = self.fetch_whole(digest, size_hint)
                except Absent:
                    raise NotFound(f"blob {b3_text(digest)} not found on {self.endpoint.server}") from None
            return WholeBlobReader(copy)
        chunks = self.chunks(digest)
        if chunks is None:
            raise NotFound(f"blob {b3_text(digest)} not found on {self.endpoint.server}")
        if len(chunks) > 1:
            return ChunkedBlobReader(self, digest, chunks)
        with self._lock:
            copy = self._copies.pop(digest, None)
        if copy is None:
            if digest == EMPTY_DIGEST:
                copy = LocalCopy(digest, b"", None, 0)
            else:
                copy = self.fetch_whole(digest, chunks[0].size if chunks else size_hint)
        return WholeBlobReader(copy)

    def _keep(self, copy: LocalCopy) -> None:
        with self._lock:
            self._copies[copy.digest] = copy
            while len(self._copies) > CACHED_COPIES:
                self._copies.popitem(last=False)

    def _attempts(self, what: str, fetch: Callable[[], T]) -> T:
        """``fetch()``, again after a stream that broke off or brought wrong bytes (see module doc)."""
        for attempt in range(1, STREAM_ATTEMPTS + 1):
            try:
                return fetch()
            except (BrokenOff, CutShort) as exc:
                if attempt == STREAM_ATTEMPTS:
                    raise
                delay = RETRY_BACKOFF * 2 ** (attempt - 1)
                log.info("%s: attempt %d of %d failed (%s): trying again in %.1f s", what, attempt,
                         STREAM_ATTEMPTS, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def read_stream(self, request: bytes, what: str, gap: float | None = None,
                quiet: bool = False) -> Generator[bytes | memoryview, None, None]:
        """The BlobChunk payloads of one Read; Unavailable after the first one is BrokenOff."""
        arrived = False
        try:
            for raw in self.endpoint.stream(BLOB_READ, request, what, gap=gap, quiet=quiet):
                arrived = True
                yield blob_chunk_data(raw, what, self.endpoint.server)
        except Unavailable as exc:
            if arrived and not isinstance(exc, Timeout):
                raise BrokenOff(str(exc)) from None
            raise

    def fetch_whole(self, digest: bytes, expected_size: int | None) -> LocalCopy:
        """Stream ``Read(digest)`` into a local copy, verified before it is returned."""
        what = f"reading blob {b3_text(digest)}"
        return self._attempts(what, lambda: self._fetch_whole_once(digest, expected_size, what))

    def _fetch_whole_once(self, digest: bytes, expected_size: int | None, what: str) -> LocalCopy:
        started = time.monotonic()
        spool = Spool(expected_size)
        hasher = blake3.blake3()
        request = pb.ReadBlobRequest(digest=digest).SerializeToString()
        try:
            for data in self.read_stream(request, what):
                hasher.update(data)
                spool.add(data)
            actual = hasher.digest()
            if actual != digest:
                short = expected_size is None or spool.size < expected_size
                raise (CutShort if short else IntegrityError)(
                    f"blob {b3_text(digest)} from {self.endpoint.server} hashes to {b3_text(actual)} "
                    f"({spool.size} bytes); nothing of it was served"
                )
        except BaseException:
            spool.discard()
            raise
        copy = spool.finish(digest)
        log.debug("fetched blob %s (%d bytes) from %s in %.3f s", b3_text(digest), copy.size,
                  self.endpoint.server, time.monotonic() - started)
        return copy

    def fetch_by_chunks(self, digest: bytes, chunks: tuple[ChunkMeta, ...]) -> LocalCopy:
        """Stream ``Read(digest)`` into a local copy, each chunk verified before it is kept."""
        what = f"reading blob {b3_text(digest)}"
        return self._attempts(what, lambda: self._fetch_by_chunks_once(digest, chunks))

    def _fetch_by_chunks_once(self, digest: bytes, chunks: tuple[ChunkMeta, ...]) -> LocalCopy:
        """Also checks the whole blob's digest: with every byte here, the chunk list itself is verified."""
        run = Run(self, digest, chunks)
        spool = Spool(sum(c.size for c in chunks))
        whole = blake3.blake3()
        try:
            while not run.done():
                data = run.pull()
                whole.update(data)
                spool.add(data)
            actual = whole.digest()
            if actual != digest:
                raise WrongChunkList(
                    f"reading blob {b3_text(digest)}: the {len(chunks)} chunks {self.endpoint.server} "
                    f"listed each verify, but together hash to {b3_text(actual)}; nothing of it was served"
                )
        except BaseException:
            run.close()
            spool.discard()
            raise
        return spool.finish(digest)

    def fetch_chunk(self, chunk: ChunkMeta, what: str) -> bytes:
        """One chunk's bytes, checked against its size and digest."""
        return self._attempts(what, lambda: self._fetch_chunk_once(chunk, what))

    def _fetch_chunk_once(self, chunk: ChunkMeta, what: str) -> bytes:
        request = pb.ReadBlobRequest(digest=chunk.digest).SerializeToString()
        parts = []
        received = 0
        hasher = blake3.blake3()
        for data in self.read_stream(request, what):
            received += len(data)
            if received > chunk.size:
                raise IntegrityError(f"{what}: {self.endpoint.server} sent more than its {chunk.size} bytes")
            hasher.update(data)
            parts.append(data)
        if received != chunk.size or hasher.digest() != chunk.digest:
            raise (CutShort if received < chunk.size else IntegrityError)(
                f"{what}: {self.endpoint.server} sent {received} bytes that do not match the chunk "
                f"digest and size {chunk.size}; nothing of it was served"
            )
        return b"".join(parts)

    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        """A streaming writer; with ``expected_digest`` other bytes are refused unsent."""
        if expected_digest is not None:
            records.check_b3(expected_digest, "expected blob")
        return GrpcBlobWriter(self, expected_digest)

    def iter_digests(self) -> Iterator[bytes]:
        raise InvalidArgument(
            f"listing blobs is not possible over gRPC ({self.endpoint.server}): "
            "tvix's BlobService has no List call"
        )

    def close(self) -> None:
        if self._batch_pool is not None and self._batch_pid == os.getpid():
            self._batch_pool.shutdown(wait=False)
        with self._lock:
            self._copies.clear()
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)
        self.endpoint.close()

