"""PathInfoService over gRPC (tvix.store.v1.PathInfoService).

Every PathInfo received is validated (docs/protocol.md, 'PathInfo validation') and, for ``get``,
must describe the store path it was asked for: a server answering with
another path's info is InvalidData, never a silently different tree.
``narinfo`` is not required on what we *receive*, so a seed-era daemon
(which stored PathInfos without it) can still be mounted; what we *send*
must carry it, as a current daemon requires.

``calculate_nar`` sends the node with an empty name, which servers of
both eras accept (docs/protocol.md, 'PathInfo service').
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from google.protobuf.message import DecodeError

from ...castore.directory import check_node
from ...castore.nodes import Node
from ...castore.pathinfo import PathInfo, validate_pathinfo
from ...castore.wire import decode_pathinfo, node_to_proto
from ...errors import InvalidArgument, InvalidData
from ...proto import rpc_pathinfo_pb2 as pb
from .. import records
from ..base import PathInfoService
from .channel import Endpoint
from .status import Absent
from .wire import PATH_INFO_CALCULATE_NAR, PATH_INFO_GET, PATH_INFO_LIST, PATH_INFO_PUT

log = logging.getLogger(__name__)

SHA256_LEN = 32


class GrpcPathInfoService(PathInfoService):
    """Path infos of a tvix-store daemon. Thread-safe."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def _decode(self, raw: bytes, what: str) -> PathInfo:
        try:
            return decode_pathinfo(raw, require_narinfo=False)
        except InvalidData as exc:
            raise InvalidData(f"{what}: {self.endpoint.server} sent an invalid path info: {exc}") from None

    def get(self, digest: bytes) -> PathInfo | None:
        records.check_store_path_digest(digest)
        hash_part = records.store_path_text(digest)
        what = f"getting path info {hash_part}"
        request = pb.GetPathInfoRequest(by_output_hash=digest).SerializeToString()
        try:
            raw = self.endpoint.unary(PATH_INFO_GET, request, what)
        except Absent:
            return None
        info = self._decode(raw, what)
        store_path = validate_pathinfo(info, require_narinfo=False)
        if store_path.digest != digest:
            raise InvalidData(f"{what}: {self.endpoint.server} answered with {store_path.basename}")
        return info

    def put(self, info: PathInfo) -> PathInfo:
        digest, data = records.pathinfo_row(info)  # validates, narinfo required
        what = f"storing path info {records.store_path_text(digest)}"
        stored = self._decode(self.endpoint.unary(PATH_INFO_PUT, data, what), what)
        # The server may add signatures, but it must answer for the same path.
        if validate_pathinfo(stored, require_narinfo=False).digest != digest:
            raise InvalidData(f"{what}: {self.endpoint.server} answered with another store path")
        log.debug("stored path info %s on %s", records.store_path_text(digest), self.endpoint.server)
        return stored

    def list(self) -> Iterator[PathInfo]:
        what = "listing path infos"
        stream = self.endpoint.stream(PATH_INFO_LIST, pb.ListPathInfoRequest().SerializeToString(), what)
        try:
            for raw in stream:
                yield self._decode(raw, what)
        finally:
            stream.close()

    def calculate_nar(self, node: Node) -> tuple[int, bytes] | None:
        """(nar_size, nar_sha256) computed by the server; NotFound for missing content."""
        anonymous = dataclasses.replace(node, name=b"")
        problem = check_node(anonymous)
        if problem:
            raise InvalidArgument(f"calculate NAR: invalid node: {problem}")
        what = f"calculating the NAR of {_describe(anonymous)}"
        raw = self.endpoint.unary(PATH_INFO_CALCULATE_NAR, node_to_proto(anonymous).SerializeToString(), what)
        try:
            response = pb.CalculateNARResponse.FromString(raw)
        except DecodeError as exc:
            raise InvalidData(f"{what}: {self.endpoint.server} sent a bad response: {exc}") from None
        if len(response.nar_sha256) != SHA256_LEN:
            raise InvalidData(
                f"{what}: {self.endpoint.server} sent a {len(response.nar_sha256)}-byte nar_sha256"
            )
        return response.nar_size, response.nar_sha256

    def close(self) -> None:
        self.endpoint.close()


def _describe(node: Node) -> str:
    from ...castore.nodes import DirectoryNode, FileNode, b3_text

    if isinstance(node, DirectoryNode):
        return f"directory {b3_text(node.digest)}"
    if isinstance(node, FileNode):
        return f"file {b3_text(node.digest)} ({node.size} bytes)"
    return f"symlink to {node.target!r}"
