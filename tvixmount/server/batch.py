"""tvixmount's own BlobBatchService (not tvix's): many blobs in one call, few messages.

Why: a cold walk over small files read one blob per ``BlobService/Read``,
and each call cost 450-600 µs of daemon CPU (grpc's per-call machinery in
Python: a thread hand-off, the handler, the stream's end) against tens of
µs for the store's own read. One call for a batch of 64 blobs pays that
once, and the store answers the batch in bulk (``read_many``: the embedded
store's one row query and overlapped file reads).

What a call does, in request order: blobs of at most ``BULK_HINT`` claimed
bytes go to ``read_many`` in groups (``GROUP_BLOBS`` blobs, ``GROUP_BYTES``
claimed), anything else is read through its own reader in ``PIECE`` pieces.
The hints are the client's word: ``read_many`` reads each blob whole, so a
client that claims a big blob is small makes the daemon hold that group's
real bytes for a moment (as many parallel Reads could; the daemon serves a
trusted network, see the package doc). The answers are
packed into messages of about ``MESSAGE`` bytes, sent as each fills, so the
client verifies one group while the next is read. A blob the store cannot
give is one error piece (its status code, message and tvixmount error
code); the call goes on with the next blob. Messages and fields:
protos/tvixmount/castore/protos/rpc_blobbatch.proto, docs/protocol.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import grpc

from ..castore.nodes import DIGEST_LEN, b3_text
from ..errors import IntegrityError, TvixError
from ..proto import rpc_blobbatch_pb2 as batch_pb
from ..store.grpc.wire import BLOB_BATCH_MAX, BLOB_BATCH_SERVICE
from .servicers import RpcStatus, _parse, _Rpc, _streaming, status_for

__all__ = ["BLOB_BATCH_SERVICE", "BlobBatchServicer"]

log = logging.getLogger(__name__)

MESSAGE = 1024 * 1024  # bytes of blob data per response message (about)
PIECE = 256 * 1024  # bytes read at a time from a blob read through its own reader
BULK_HINT = 1024 * 1024  # blobs claimed to be at most this big are read whole, in groups
GROUP_BLOBS = 64
GROUP_BYTES = 2 * 1024 * 1024  # claimed bytes per read_many group


class _Packer:
    """Pieces into ``ReadBlobsResponse`` messages of about MESSAGE bytes each."""

    def __init__(self) -> None:
        self._message = batch_pb.ReadBlobsResponse()
        self._filled = 0

    def data(self, index: int, data: bytes, last: bool) -> Iterator[bytes]:
        """Add ``data`` of blob ``index``, split where a message fills; yield each full message."""
        view = memoryview(data)
        while len(view) > MESSAGE - self._filled:
            take = max(MESSAGE - self._filled, 0)
            if take:
                self._message.pieces.add(index=index, data=bytes(view[:take]))
                view = view[take:]
            yield self._take()
        self._message.pieces.add(index=index, data=data if len(view) == len(data) else bytes(view), last=last)
        self._filled += len(view)
        if self._filled >= MESSAGE:
            yield self._take()

    def error(self, index: int, exc: BaseException) -> None:
        status = status_for(exc)
        self._message.pieces.add(index=index, error=batch_pb.BlobError(
            code=status.code.value[0], message=status.message, tvix_error_code=status.error_code or ""))
        self._filled += len(status.message) + 16

    def flush(self) -> Iterator[bytes]:
        if self._message.pieces:
            yield self._take()

    def _take(self) -> bytes:
        raw = self._message.SerializeToString()
        self._message = batch_pb.ReadBlobsResponse()
        self._filled = 0
        return raw


def _groups(hints: Sequence[int]) -> Iterator[tuple[int, int, bool]]:
    """(start, end, bulk) runs of request positions: bulk ones go to read_many together."""
    start = 0
    while start < len(hints):
        if hints[start] > BULK_HINT:
            yield start, start + 1, False
            start += 1
            continue
        end, claimed = start, 0
        while (end < len(hints) and end - start < GROUP_BLOBS and hints[end] <= BULK_HINT
               and (end == start or claimed + hints[end] <= GROUP_BYTES)):
            claimed += hints[end]
            end += 1
        yield start, end, True
        start = end


class BlobBatchServicer(_Rpc):
    @_streaming("BlobBatchService/Read")
    def read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = _parse(batch_pb.ReadBlobsRequest, request, "ReadBlobsRequest")
        digests = list(req.digests)
        if len(digests) > BLOB_BATCH_MAX:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ReadBlobsRequest: {len(digests)} digests, more than {BLOB_BATCH_MAX}")
        for position, digest in enumerate(digests):
            if len(digest) != DIGEST_LEN:
                raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"ReadBlobsRequest: digest {position} "
                                f"is {len(digest)} bytes, not {DIGEST_LEN}")
        hints = list(req.size_hints)
        if hints and len(hints) != len(digests):
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                            f"ReadBlobsRequest: {len(hints)} size hints for {len(digests)} digests")
        if not hints:
            hints = [BULK_HINT + 1] * len(digests)  # no claim: each through its own reader
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch Read of %d blobs from %s", len(digests), context.peer())
        packer = _Packer()
        for start, end, bulk in _groups(hints):
            if bulk:
                got = self.store.blobs.read_many([(digests[i], hints[i]) for i in range(start, end)])
                for index, one in enumerate(got, start):
                    if isinstance(one, TvixError):
                        self._failed(packer, index, digests[index], one)
                    else:
                        yield from packer.data(index, one, last=True)
            else:
                yield from self._one(packer, start, digests[start])
            if not context.is_active():
                return
        yield from packer.flush()

    def _one(self, packer: _Packer, index: int, digest: bytes) -> Iterator[bytes]:
        """A blob not claimed small: read in pieces, so its size does not decide our memory."""
        try:
            reader = self.store.blobs.open_read(digest)
        except TvixError as exc:
            self._failed(packer, index, digest, exc)
            return
        with reader:
            offset = 0
            while True:
                try:
                    piece = reader.pread(offset, PIECE) if offset < reader.size else b""
                    if not piece and offset < reader.size:
                        raise IntegrityError(
                            f"blob {b3_text(digest)} ends at {offset} bytes, before its size {reader.size}")
                except TvixError as exc:  # pieces sent before are void (the proto's rule)
                    self._failed(packer, index, digest, exc)
                    return
                offset += len(piece)
                yield from packer.data(index, piece, last=offset >= reader.size)
                if offset >= reader.size:
                    return

    def _failed(self, packer: _Packer, index: int, digest: bytes, exc: TvixError) -> None:
        log.debug("batch Read: blob %d (%s): %s", index, b3_text(digest), exc)
        packer.error(index, exc)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(BLOB_BATCH_SERVICE, {
            "Read": grpc.unary_stream_rpc_method_handler(self.read),
        })
