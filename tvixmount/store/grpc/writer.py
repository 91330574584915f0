"""Storing a blob over gRPC: one ``Put`` client stream, fed as the caller writes.

The bytes go out in messages of ``PUT_MESSAGE`` while they are hashed
here; at most ``_PUT_QUEUE`` messages wait for grpc, so a writer's memory
is bounded however fast the caller writes. Commit checks the server's
digest against ours, and ``expected_digest`` against ours before the
stream is finished, so a mismatch stores nothing.

Abort cannot rely on cancelling alone: a grpc server's request stream
ends the same way for a cancel as for a finished upload, and only later
learns that it was a cancel, so a server may store the prefix it got.
So abort first sends a message every server must reject (a ``BlobChunk``
cut short), waits for the server to fail the call, then cancels; the
stream is never half-closed once aborted.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING

import blake3
from google.protobuf.message import DecodeError

from ...castore.nodes import DIGEST_LEN, b3_text
from ...errors import IntegrityError, InvalidArgument, InvalidData
from ...proto import rpc_blobstore_pb2 as pb
from ..base import BlobWriter
from .channel import ClientStream
from .wire import BLOB_PUT, PUT_MESSAGE, encode_blob_chunk

if TYPE_CHECKING:
    from .blobs import GrpcBlobService

log = logging.getLogger(__name__)

_PUT_QUEUE = 4  # messages waiting for grpc to send (bounds a writer's memory)
_ABORTED = object()  # the queue's abort marker
_ABORT_WAIT = 5.0  # how long abort waits for the server to refuse the upload before cancelling
# A BlobChunk whose data field (1, length-delimited) claims a byte that never comes:
# no protobuf parser accepts it, so the server fails the call instead of storing.
_ABORT_MESSAGE = b"\x0a\x01"


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
            self._stream = self._service.endpoint.client_stream(BLOB_PUT, self._requests(), "storing a blob")
        return self._stream

    def _requests(self) -> Iterator[bytes]:
        """Consumed by a grpc thread: the queued messages, until the end marker.

        Returning half-closes the stream, which a server reads as a finished
        upload; after an abort that must never happen, so the iterator sends
        the refused message and then returns only once the call is over (the
        server refused it, or abort cancelled it), when nothing more is sent.
        """
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not isinstance(item, bytes):  # only _ABORTED is not bytes
                yield _ABORT_MESSAGE
                if self._stream is not None:  # set before abort queues _ABORTED
                    self._stream.wait(None)  # abort cancels after _ABORT_WAIT at most
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
        stream = self._stream
        if stream is None:
            return
        # Drop what is not sent yet (this also unblocks grpc's thread waiting
        # in _requests), then ask for the refusal; cancel ends it either way.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_ABORTED)
        if not stream.wait(_ABORT_WAIT):
            log.debug("aborting an upload to %s: no refusal within %g s; cancelling",
                      self._service.endpoint.server, _ABORT_WAIT)
        stream.cancel()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open" and getattr(self, "_stream", None) is not None:
            self.abort()

