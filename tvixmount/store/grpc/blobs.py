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
own retry policy's (grpc_channel.py). Bytes of the right length that hash
wrong are corrupt, not cut short, and are not fetched again. The last
failure is the answer: Unavailable, or IntegrityError.

Writes stream ``Put`` in messages of at most 1 MiB while hashing locally;
commit checks the server's digest against ours (and against
``expected_digest``, before the stream is finished, so a mismatch stores
nothing). Blobs cannot be listed over gRPC.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import blake3
from google.protobuf.message import DecodeError

from ...castore.nodes import DIGEST_LEN, b3_text
from ...errors import IntegrityError, InvalidArgument, InvalidData, NotFound, Timeout, TvixError, Unavailable
from ...proto import rpc_blobstore_pb2 as pb
from .. import records
from ..base import BlobReader, BlobService, BlobStat, BlobWriter, ChunkMeta
from .channel import PUT_MESSAGE, Absent, ClientStream, Endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

STAT = "/tvix.castore.v1.BlobService/Stat"
READ = "/tvix.castore.v1.BlobService/Read"
PUT = "/tvix.castore.v1.BlobService/Put"

EMPTY_DIGEST = blake3.blake3(b"").digest()
MEMORY_COPY = 1024 * 1024  # whole-blob copies up to this size stay in memory
CACHED_CHUNKS = 4  # verified chunks a chunked reader keeps (also what a run passed, for reads out of order)
WHOLE_RUN = 4 * 1024 * 1024  # chunked blobs up to this size are streamed whole on their first read
RUN_SKIP = 1024 * 1024  # an in-order read starting within this many bytes of the start streams the blob
RUN_REACH = 64  # chunks a run is pulled forward to reach a read ahead of it (else: that chunk alone)
RUN_IDLE = 10.0  # seconds a run may go unread before it is cancelled (it holds a server thread)
MAX_RUNS = 8  # runs open at once per service (each holds a server thread); beyond: chunk reads
READAHEAD = 2  # chunks a reader fetches ahead while reads go in order
PREFETCH_THREADS = 4  # per service, shared by its readers
CACHED_COPIES = 4  # verified whole-blob copies a service keeps after stat()
HINTED_WHOLE = 128 * 1024  # blobs up to this size_hint are read whole without a Stat (see the module doc)
_PUT_QUEUE = 4  # messages waiting for grpc to send (bounds a writer's memory)
STREAM_ATTEMPTS = 3  # fetches of one blob or chunk whose stream broke off or came out wrong
RETRY_BACKOFF = 0.1  # seconds before the second attempt, doubling after each


class _BrokenOff(Unavailable):
    """A Read stream failed after some of its data had arrived (fetched again)."""


class _CutShort(IntegrityError):
    """A Read stream ended before all of the blob or chunk had arrived (fetched again)."""


class _WrongChunkList(IntegrityError):
    """The chunks a server listed for a blob do not make up that blob (never served)."""


class LocalCopy:
    """A verified blob, in memory or in an unlinked temp file; read-only once made."""

    def __init__(self, digest: bytes, data: bytes | None, fd: int | None, size: int) -> None:
        self.digest = digest
        self._data = data
        self._file = os.fdopen(fd, "rb", buffering=0) if fd is not None else None
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        if self._data is not None:
            return self._data[offset:end]
        assert self._file is not None
        fd = self._file.fileno()
        parts = []
        while offset < end:
            piece = os.pread(fd, end - offset, offset)
            if not piece:  # our own temp file cannot shrink; guard the loop anyway
                raise InvalidData(f"blob {b3_text(self.digest)}: local copy is truncated at {offset}")
            parts.append(piece)
            offset += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


    def pread_into(self, offset: int, buf: memoryview) -> int:
        """``pread`` straight into ``buf``: one copy (from memory, or the kernel's from the file)."""
        end = min(self.size, offset + len(buf))
        if offset >= end:
            return 0
        if self._data is not None:
            buf[: end - offset] = memoryview(self._data)[offset:end]
            return end - offset
        assert self._file is not None
        fd = self._file.fileno()
        position = offset
        while position < end:
            got = os.preadv(fd, [buf[position - offset : end - offset]], position)
            if not got:
                raise InvalidData(f"blob {b3_text(self.digest)}: local copy is truncated at {position}")
            position += got
        return end - offset


class _Spool:
    """Where a streamed blob goes while it is hashed: memory first, a temp file past a limit."""

    def __init__(self, expected_size: int | None) -> None:
        self._memory: bytearray | None = bytearray()
        self._fd: int | None = None
        self.size = 0
        if expected_size is not None and expected_size > MEMORY_COPY:
            self._to_file()

    def _to_file(self) -> None:
        fd, name = tempfile.mkstemp(prefix="tvixmount-blob-")
        os.unlink(name)  # private, and gone with the last descriptor
        self._fd = fd
        if self._memory:
            self._write(self._memory)
        self._memory = None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def add(self, data: bytes | memoryview) -> None:
        if self._memory is not None and len(self._memory) + len(data) > MEMORY_COPY:
            self._to_file()
        if self._memory is not None:
            self._memory += data
        else:
            self._write(data)
        self.size += len(data)

    def finish(self, digest: bytes) -> LocalCopy:
        if self._memory is not None:
            return LocalCopy(digest, bytes(self._memory), None, self.size)
        fd, self._fd = self._fd, None
        return LocalCopy(digest, None, fd, self.size)

    def discard(self) -> None:
        self._memory = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- readers -----------------------------------------------------------------------------


class WholeBlobReader(BlobReader):
    """Serves ranges of one verified local copy."""

    def __init__(self, copy: LocalCopy) -> None:
        self._copy: LocalCopy | None = copy
        self.size = copy.size

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        if self._copy is None:
            raise InvalidArgument("blob reader is closed")
        return self._copy.pread(offset, length)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        _check_range(offset, len(buf))
        if self._copy is None:
            raise InvalidArgument("blob reader is closed")
        return self._copy.pread_into(offset, buf)

    def close(self) -> None:
        self._copy = None  # the temp file closes with its last reference


class _Run:
    """One ``Read(blob)`` stream cut at the chunk list's boundaries; each chunk verified before it leaves.

    ``pull`` returns the next chunk's bytes once their blake3 matched the
    chunk digest; a view into the received messages where a chunk lies in
    one message, so nothing is copied here.
    """

    def __init__(self, service: GrpcBlobService, digest: bytes, chunks: tuple[ChunkMeta, ...]) -> None:
        self.digest = digest
        self.chunks = chunks
        self.next = 0  # the chunk pull() completes next
        self.what = f"reading blob {b3_text(digest)}"
        request = pb.ReadBlobRequest(digest=digest).SerializeToString()
        gap = min(RUN_IDLE, service.endpoint.config.stream_gap)
        self._messages = service._stream(request, self.what, gap=gap, quiet=True)
        self._server = service.endpoint.server
        self._left: memoryview = memoryview(b"")  # received bytes not yet part of a chunk
        self.received = 0

    def done(self) -> bool:
        return self.next >= len(self.chunks)

    def pull(self) -> bytes | memoryview:
        index = self.next
        chunk = self.chunks[index]
        hasher = blake3.blake3()
        parts: list[memoryview] = []
        have = 0
        while have < chunk.size:
            if not self._left:
                data = next(self._messages, None)
                if data is None:
                    raise _CutShort(f"{self.what}: {self._server} ended the stream after {self.received} "
                                    f"bytes, inside chunk {index} ({b3_text(chunk.digest)})")
                self._left = data if isinstance(data, memoryview) else memoryview(data)
                self.received += len(data)
            piece = self._left[: chunk.size - have]
            self._left = self._left[len(piece):]
            hasher.update(piece)
            parts.append(piece)
            have += len(piece)
        actual = hasher.digest()
        if actual != chunk.digest:
            raise IntegrityError(
                f"{self.what}: chunk {index} ({b3_text(chunk.digest)}, {chunk.size} bytes) from "
                f"{self._server} hashes to {b3_text(actual)}; nothing of it was served"
            )
        self.next += 1
        if self.done():
            self.close()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._left = memoryview(b"")
        self._messages.close()  # cancels the call if it is still running


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
        self._cache: OrderedDict[int, bytes | memoryview] = OrderedDict()
        self._ahead: dict[int, Future[bytes]] = {}  # chunks being fetched ahead of the reads
        self._last = -1  # the chunk fetched last; the next one in order means "sequential"
        self._whole: LocalCopy | None = None
        self._run: _Run | None = None
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
        _check_range(offset, length)
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
            self._whole = self._service.fetch_whole(self._digest, self.size)
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
            self._whole = self._service.fetch_by_chunks(self._digest, self._chunks)
        except _WrongChunkList as exc:
            self._broken = exc  # the chunk list lies: no chunk read could be trusted either
            raise
        except Absent as exc:
            self._run_failed(exc)  # the server serves no whole blob: chunk reads
        except (IntegrityError, _BrokenOff, Timeout) as exc:
            self._run_failed(exc)  # bad, or fetched again and again to no avail: chunk reads decide

    def _wants_run(self, index: int) -> bool:
        """Stream the whole blob: reads in order near its start."""
        return not self._runs_refused and self._in_order and self._starts[index] <= RUN_SKIP

    def _start_run(self) -> _Run:
        self._drop_ahead()  # the run brings those chunks
        self._run = _Run(self._service, self._digest, self._chunks)
        return self._run

    def _from_run(self, run: _Run, index: int) -> bytes | memoryview | None:
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


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise InvalidArgument(f"pread offset {offset} and length {length} must not be negative")


# -- writer ------------------------------------------------------------------------------


class GrpcBlobWriter(BlobWriter):
    """Streams one Put call; the call starts with the first full message."""

    def __init__(self, service: GrpcBlobService, expected_digest: bytes | None) -> None:
        self._service = service
        self._expected = expected_digest
        self._hasher = blake3.blake3()
        self._buffer = bytearray()
        self._queue: queue.Queue[bytes | object | None] = queue.Queue(maxsize=_PUT_QUEUE)
        self._stream: ClientStream | None = None
        self._state = "open"
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._state != "open":
            raise InvalidArgument(f"blob writer is already {self._state}")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self.size += len(view)
        position = 0
        if self._buffer:  # top up what an earlier small write left
            position = min(PUT_MESSAGE - len(self._buffer), len(view))
            self._buffer += view[:position]
            if len(self._buffer) < PUT_MESSAGE:
                return
            self._send(self._buffer)
            self._buffer = bytearray()
        while len(view) - position >= PUT_MESSAGE:  # whole messages straight from the caller's bytes
            self._send(view[position : position + PUT_MESSAGE])
            position += PUT_MESSAGE
        self._buffer += view[position:]

    def _start(self) -> ClientStream:
        if self._stream is None:
            self._stream = self._service.endpoint.client_stream(PUT, self._requests(), "storing a blob")
        return self._stream

    def _requests(self) -> Iterator[bytes]:
        """Consumed by a grpc thread: the queued messages, until the end marker.

        An aborted upload must never look finished to the server: ending the
        iterator half-closes the stream, and a server that saw that before
        the cancel would store the prefix it got. So on abort the iterator
        ends only once the cancelled call is done, when nothing more is sent.
        """
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not isinstance(item, bytes):  # only _ABORTED is not bytes
                stream = self._stream
                deadline = time.monotonic() + _ABORT_WAIT
                while stream is not None and not stream.done() and time.monotonic() < deadline:
                    time.sleep(0.01)
                return
            yield item

    def _send(self, piece: bytes | bytearray | memoryview) -> None:
        stream = self._start()
        message = encode_blob_chunk(piece)
        while True:
            try:
                self._queue.put(message, timeout=0.2)
                return
            except queue.Full:
                if stream.done():  # the call failed (server gone, watchdog): say why
                    self._state = "failed"
                    stream.result()
                    raise InvalidData(
                        f"storing a blob: {self._service.endpoint.server} ended the call early"
                    ) from None

    def commit(self) -> bytes:
        if self._state != "open":
            raise InvalidArgument(f"blob writer is already {self._state}")
        digest = self._hasher.digest()
        if self._expected is not None and digest != self._expected:
            self.abort()
            raise IntegrityError(
                f"blob written as {b3_text(self._expected)} hashes to {b3_text(digest)}; not stored"
            )
        try:
            if self._buffer:
                self._send(bytes(self._buffer))
                self._buffer.clear()
            stream = self._start()
            self._queue.put(None)
            raw = stream.result()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        server = self._service.endpoint.server
        try:
            answered = pb.PutBlobResponse.FromString(raw).digest
        except DecodeError as exc:
            raise InvalidData(
                f"storing blob {b3_text(digest)}: {server} sent a bad response: {exc}"
            ) from None
        if answered != digest:
            shown = b3_text(answered) if len(answered) == DIGEST_LEN else answered.hex() or "nothing"
            raise IntegrityError(
                f"storing blob {b3_text(digest)} ({self.size} bytes): {server} says it stored {shown}"
            )
        log.debug("stored blob %s (%d bytes) on %s", b3_text(digest), self.size, server)
        return digest

    def abort(self) -> None:
        if self._state in ("aborted", "committed"):
            return
        self._state = "aborted"
        self._buffer.clear()
        if self._stream is not None:
            self._stream.cancel()
            # Unblock grpc's thread if it waits in _requests (the queue is then empty).
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_ABORTED)

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open" and getattr(self, "_stream", None) is not None:
            self.abort()


_ABORTED = object()  # the queue's abort marker
_BAD_STREAMS = 1000  # blobs remembered as streaming bad bytes
_ABORT_WAIT = 5.0  # how long the request iterator waits for a cancel to take effect


# -- service -----------------------------------------------------------------------------


class GrpcBlobService(BlobService):
    """Blobs of a tvix-store daemon. Thread-safe; readers are per thread."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._copies: OrderedDict[bytes, LocalCopy] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
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

    def chunks(self, digest: bytes) -> tuple[ChunkMeta, ...] | None:
        """The chunk list Stat reports (maybe empty), or None when the blob is absent."""
        records.check_b3(digest, "blob")
        what = f"stat of blob {b3_text(digest)}"
        try:
            raw = self.endpoint.unary(STAT, pb.StatBlobRequest(digest=digest, send_chunks=True)
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
            except (_BrokenOff, _CutShort) as exc:
                if attempt == STREAM_ATTEMPTS:
                    raise
                delay = RETRY_BACKOFF * 2 ** (attempt - 1)
                log.info("%s: attempt %d of %d failed (%s): trying again in %.1f s", what, attempt,
                         STREAM_ATTEMPTS, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _stream(self, request: bytes, what: str, gap: float | None = None,
                quiet: bool = False) -> Generator[bytes | memoryview, None, None]:
        """The BlobChunk payloads of one Read; Unavailable after the first one is _BrokenOff."""
        arrived = False
        try:
            for raw in self.endpoint.stream(READ, request, what, gap=gap, quiet=quiet):
                arrived = True
                yield _chunk_data(raw, what, self.endpoint.server)
        except Unavailable as exc:
            if arrived and not isinstance(exc, Timeout):
                raise _BrokenOff(str(exc)) from None
            raise

    def fetch_whole(self, digest: bytes, expected_size: int | None) -> LocalCopy:
        """Stream ``Read(digest)`` into a local copy, verified before it is returned."""
        what = f"reading blob {b3_text(digest)}"
        return self._attempts(what, lambda: self._fetch_whole_once(digest, expected_size, what))

    def _fetch_whole_once(self, digest: bytes, expected_size: int | None, what: str) -> LocalCopy:
        started = time.monotonic()
        spool = _Spool(expected_size)
        hasher = blake3.blake3()
        request = pb.ReadBlobRequest(digest=digest).SerializeToString()
        try:
            for data in self._stream(request, what):
                hasher.update(data)
                spool.add(data)
            actual = hasher.digest()
            if actual != digest:
                short = expected_size is None or spool.size < expected_size
                raise (_CutShort if short else IntegrityError)(
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
        run = _Run(self, digest, chunks)
        spool = _Spool(sum(c.size for c in chunks))
        whole = blake3.blake3()
        try:
            while not run.done():
                data = run.pull()
                whole.update(data)
                spool.add(data)
            actual = whole.digest()
            if actual != digest:
                raise _WrongChunkList(
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
        for data in self._stream(request, what):
            received += len(data)
            if received > chunk.size:
                raise IntegrityError(f"{what}: {self.endpoint.server} sent more than its {chunk.size} bytes")
            hasher.update(data)
            parts.append(data)
        if received != chunk.size or hasher.digest() != chunk.digest:
            raise (_CutShort if received < chunk.size else IntegrityError)(
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
        with self._lock:
            self._copies.clear()
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)
        self.endpoint.close()


def encode_blob_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """``BlobChunk{data}`` encoded with one copy (field 1, length-delimited: tag 0x0a).

    The protobuf runtime copies the payload twice (into the message, then
    out); at hundreds of MB/s that shows.
    """
    length = len(data)
    header = bytearray(b"\x0a")
    while True:
        low, length = length & 0x7F, length >> 7
        header.append(low | (0x80 if length else 0))
        if not length:
            break
    return b"".join((header, data))


def _chunk_data(raw: bytes, what: str, server: str) -> bytes | memoryview:
    """The payload of one ``BlobChunk``: a view into ``raw`` when it is just field 1, else decoded.

    The view saves copying every received byte once more (what protobuf's
    decoding does); anything other than a lone field 1 goes to protobuf.
    """
    if raw[:1] == b"\x0a":
        length = shift = 0
        position = 1
        while position < len(raw) and position <= 10:
            byte = raw[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if position + length == len(raw):
                    return memoryview(raw)[position:]
                break
    try:
        return pb.BlobChunk.FromString(raw).data
    except DecodeError as exc:
        raise InvalidData(f"{what}: {server} sent a message that is not a BlobChunk: {exc}") from None
