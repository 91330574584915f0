"""DirectoryService over gRPC (tvix.castore.v1.DirectoryService).

Every Directory that arrives is decoded, validated and hashed before it is
returned (docs/protocol.md, 'Directory validation', 'Directory service').
Unknown fields from a newer server are
dropped by decoding and do not change the digest.

``get`` is a non-recursive Get and reads one message. ``get_recursive``
checks the stream as tvix's client does: the root comes first; every later
directory must be referenced by one received before it (a repeat of one
already received is skipped, so shared subtrees may be sent once or more);
when the stream ends, every referenced directory must have arrived, or
NotFound names the first missing one. A stream that ends OK with no
message means the root is absent.

``put``/``put_many`` send one client stream, leaves first, with sizes as
the caller built them (the server's size convention is the caller's
business, see SizeConvention).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from ...castore.directory import Directory, decode_directory, decode_directory_digest
from ...castore.nodes import b3_text
from ...errors import InvalidArgument, InvalidData, NotFound
from ...proto import rpc_directory_pb2 as pb
from .. import records
from ..base import DirectoryService
from .channel import Endpoint
from .status import Absent
from .wire import DIRECTORY_GET, DIRECTORY_PUT

log = logging.getLogger(__name__)


class GrpcDirectoryService(DirectoryService):
    """Directories of a tvix-store daemon. Thread-safe."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def get(self, digest: bytes) -> Directory | None:
        records.check_b3(digest, "directory")
        what = f"getting directory {b3_text(digest)}"
        request = pb.GetDirectoryRequest(digest=digest, recursive=False).SerializeToString()
        stream = self.endpoint.stream(DIRECTORY_GET, request, what,
                                      timeout=self.endpoint.config.unary_timeout)
        try:
            raw = next(stream, None)
        except Absent:
            return None
        finally:
            stream.close()  # a non-recursive Get answers one message; read no more
        if raw is None:
            return None
        try:
            return decode_directory(raw, digest)
        except InvalidData as exc:
            raise InvalidData(f"{exc} (sent by {self.endpoint.server})") from None

    def get_tree(self, digest: bytes) -> Iterator[tuple[bytes, Directory]]:
        records.check_b3(digest, "directory")
        server = self.endpoint.server
        what = f"getting the tree below directory {b3_text(digest)}"
        request = pb.GetDirectoryRequest(digest=digest, recursive=True).SerializeToString()
        expected = {digest}  # referenced by something received, not received yet
        received: set[bytes] = set()
        count = 0
        stream = self.endpoint.stream(DIRECTORY_GET, request, what)
        try:
            for raw in stream:
                try:
                    got, directory = decode_directory_digest(raw)
                except InvalidData as exc:
                    raise InvalidData(f"{what}: message {count} from {server}: {exc}") from None
                if count == 0 and got != digest:
                    raise InvalidData(f"{what}: {server} sent {b3_text(got)} first instead of the root")
                count += 1
                if got in received:
                    continue
                if got not in expected:
                    raise InvalidData(
                        f"{what}: {server} sent directory {b3_text(got)}, which no directory "
                        "received before it references"
                    )
                expected.discard(got)
                received.add(got)
                for child in directory.directories:
                    if child.digest not in received:
                        expected.add(child.digest)
                yield got, directory
        finally:
            stream.close()
        if count and expected:
            missing = min(expected)
            raise NotFound(
                f"{what}: {server} ended the stream without directory {b3_text(missing)}"
                + (f" and {len(expected) - 1} more" if len(expected) > 1 else "")
            )
        log.debug("got %d directories below %s from %s", len(received), b3_text(digest), server)

    def put(self, directory: Directory) -> bytes:
        root = self.put_many([directory])
        assert root is not None
        return root

    def put_many(self, directories: Iterable[Directory]) -> bytes | None:
        """Validate all, then send them in one stream; the server stores all or nothing."""
        messages: list[bytes] = []
        root: bytes | None = None
        for directory in directories:
            root, data = records.directory_row(directory)
            messages.append(data)
        if root is None:
            return None
        what = f"storing {len(messages)} directories (root {b3_text(root)})"
        raw = self.endpoint.client_stream(DIRECTORY_PUT, iter(messages), what).result()
        try:
            answered = pb.PutDirectoryResponse.FromString(raw).root_digest
        except DecodeError as exc:
            raise InvalidData(f"{what}: {self.endpoint.server} sent a bad response: {exc}") from None
        if answered != root:
            shown = b3_text(answered) if answered else "no digest"
            raise InvalidData(f"{what}: {self.endpoint.server} answered root {shown}")
        log.debug("stored %d directories, root %s, on %s", len(messages), b3_text(root), self.endpoint.server)
        return root

    def iter_digests(self) -> Iterator[bytes]:
        raise InvalidArgument(
            f"listing directories is not possible over gRPC ({self.endpoint.server}): "
            "tvix's DirectoryService has no List call"
        )

    def close(self) -> None:
        self.endpoint.close()

