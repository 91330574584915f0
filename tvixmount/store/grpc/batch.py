"""Small blobs in one call of tvixmount's own BlobBatchService (not tvix's), each verified.

Why: one ``BlobService/Read`` per small blob cost 400-460 µs of client CPU
and 450-600 µs of daemon CPU, most of it Python gRPC's per-call work, and
a cold walk over small files is one blob per file. ``read_batch`` asks for
a whole batch in one call (server/batch.py) and gets the blobs packed into
few messages.

Nothing from the server is trusted: every blob is checked against its
blake3 digest (a wrong blob is IntegrityError for that blob alone), pieces
must come in request order with each blob answered once, and a blob is
bounded by its expected size. The answer is one entry per blob asked for:
its bytes or its own error. When the stream fails or ends before every
blob was answered, the blobs answered so far keep their bytes and the rest
get the failure (Unavailable when the server went away, Timeout when it
went silent for the stream gap, InvalidData for a stream that broke the
rules). A server without the service answers UNIMPLEMENTED before anything
else, raised as ``Unimplemented`` for the caller to fall back on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import blake3
from google.protobuf.message import DecodeError

from ...castore.nodes import b3_text
from ...errors import IntegrityError, InvalidData, NotFound, TvixError, Unavailable, from_code
from ...proto import rpc_blobbatch_pb2 as batch_pb
from .channel import Endpoint
from .status import Unimplemented
from .wire import BLOB_BATCH_MAX, BLOB_BATCH_READ

log = logging.getLogger(__name__)

_NOT_FOUND = 5  # grpc.StatusCode.NOT_FOUND's number (this module loads no grpc)


def read_batch(endpoint: Endpoint, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
    """Each blob of ``wanted`` (digest, expected size), verified, or its error; Unimplemented: no service.

    More than ``BLOB_BATCH_MAX`` blobs are asked for in several calls, one after another.
    """
    out: list[bytes | TvixError] = []
    for start in range(0, len(wanted), BLOB_BATCH_MAX):
        out += _read_one_call(endpoint, wanted[start : start + BLOB_BATCH_MAX])
    return out


def _read_one_call(endpoint: Endpoint, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | TvixError]:
    request = batch_pb.ReadBlobsRequest(digests=[d for d, _ in wanted], size_hints=[s for _, s in wanted])
    what = f"batch read of {len(wanted)} blobs"
    batch = _Batch(wanted, endpoint.server)
    try:
        for raw in endpoint.stream(BLOB_BATCH_READ, request.SerializeToString(), what):
            batch.take(raw)
    except Unimplemented:
        if batch.started:
            return batch.fail(InvalidData(f"{what}: {endpoint.server} stopped serving it midway"))
        raise
    except TvixError as exc:
        return batch.fail(exc)
    return batch.finish()


class _Batch:
    """The answers of one call so far; pieces checked as they come."""

    def __init__(self, wanted: Sequence[tuple[bytes, int]], server: str) -> None:
        self.wanted = wanted
        self.server = server
        self.answers: list[bytes | TvixError] = []
        self.started = False
        self._parts: list[bytes] = []
        self._received = 0
        self._refused: TvixError | None = None  # the current blob is already failed; skip to its end

    def take(self, raw: bytes) -> None:
        """One response message; InvalidData (for the blobs not answered) when it breaks the rules."""
        self.started = True
        try:
            message = batch_pb.ReadBlobsResponse.FromString(raw)
        except DecodeError as exc:
            raise InvalidData(f"{self.server} sent a message that is not a ReadBlobsResponse: {exc}") \
                from None
        for piece in message.pieces:
            position = len(self.answers)
            if position >= len(self.wanted) or piece.index != position:
                raise InvalidData(f"{self.server} answered blob {piece.index} where blob {position} of "
                                  f"{len(self.wanted)} was due")
            if piece.HasField("error"):
                self._answer(self._error(piece.error, position))
            elif self._refused is not None:
                if piece.last:
                    self._answer(self._refused)
            else:
                self._data(piece.data, piece.last, position)

    def _data(self, data: bytes, last: bool, position: int) -> None:
        digest, size = self.wanted[position]
        self._received += len(data)
        if self._received > size:
            self._parts = []
            self._refused = IntegrityError(
                f"blob {b3_text(digest)} from {self.server}: more than the {size} bytes expected; "
                "nothing of it was served")
            if last:
                self._answer(self._refused)
            return
        self._parts.append(data)
        if not last:
            return
        blob = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        actual = blake3.blake3(blob).digest()
        if actual != digest:
            self._answer(IntegrityError(
                f"blob {b3_text(digest)} from {self.server} hashes to {b3_text(actual)} ({len(blob)} bytes); "
                "nothing of it was served"))
            log.warning("batch read: blob %s from %s hashes to %s; not served", b3_text(digest), self.server,
                        b3_text(actual))
        else:
            self._answer(blob)

    def _error(self, error: batch_pb.BlobError, position: int) -> TvixError:
        text = f"reading blob {b3_text(self.wanted[position][0])}: {self.server} answered: {error.message}"
        if error.code == _NOT_FOUND:
            return NotFound(text)
        return from_code(error.tvix_error_code, text) if error.tvix_error_code else TvixError(text)

    def _answer(self, answer: bytes | TvixError) -> None:
        self.answers.append(answer)
        self._parts = []
        self._received = 0
        self._refused = None

    def fail(self, exc: TvixError) -> list[bytes | TvixError]:
        """The answers so far, and ``exc`` (named for each) for every blob not answered."""
        done = len(self.answers)
        kind = type(exc) if isinstance(exc, Unavailable | InvalidData) else Unavailable
        for digest, _ in self.wanted[done:]:
            self.answers.append(kind(f"blob {b3_text(digest)}: the batch stream ended after {done} of "
                                     f"{len(self.wanted)} blobs: {exc}"))
        return self.answers

    def finish(self) -> list[bytes | TvixError]:
        if len(self.answers) < len(self.wanted):
            return self.fail(InvalidData(f"{self.server} ended the stream without answering them"))
        return self.answers
