"""A run: one ``Read`` of a whole chunked blob, handed on chunk by chunk as each verifies.

Also the ways a Read stream can fail that the service treats apart: a
stream that broke off or was cut short is fetched again; a chunk list
that does not make up its blob is never served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import blake3

from ...castore.nodes import b3_text
from ...errors import IntegrityError, Unavailable
from ...proto import rpc_blobstore_pb2 as pb
from ..base import ChunkMeta

if TYPE_CHECKING:
    from .blobs import GrpcBlobService

RUN_IDLE = 10.0  # seconds a run may go unread before it is cancelled (it holds a server thread)


class BrokenOff(Unavailable):
    """A Read stream failed after some of its data had arrived (fetched again)."""


class CutShort(IntegrityError):
    """A Read stream ended before all of the blob or chunk had arrived (fetched again)."""


class WrongChunkList(IntegrityError):
    """The chunks a server listed for a blob do not make up that blob (never served)."""


class Run:
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
        self._messages = service.read_stream(request, self.what, gap=gap, quiet=True)
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
                    raise CutShort(f"{self.what}: {self._server} ended the stream after {self.received} "
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

