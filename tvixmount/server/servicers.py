"""The three tvix services over any Store, validating everything they are sent.

One call, end to end::

    grpc thread -> _Rpc wrapper (latency, DEBUG line, counters)
                -> handler(request bytes | request iterator, context)
                   -> decode + validate -> Store (memory, local, even another daemon)
                <- response bytes / stream of message bytes
                   or RpcStatus / TvixError -> one context.abort(code, message)
                      with the tvixmount error code in the trailers

Handlers take and return raw bytes and decode them here, so a malformed
message is INVALID_ARGUMENT naming the rule it breaks rather than a grpc
deserialisation failure. Status codes follow docs/protocol.md, 'Status codes' (a current
tvix-store), with one deliberate difference: a Directory Put that breaks a
rule is INVALID_ARGUMENT (as seed-era servers answered), not INTERNAL.

Blob chunks: Stat reports the store's chunk list when it has more than one
chunk, and remembers each chunk's place (``ChunkIndex``, bounded) so that
``Read(chunk digest)`` can be served from the blob; a non-empty blob with
no finer chunking is reported as one chunk (itself), so clients learn its
size from Stat. A chunk not in the index (evicted, or the daemon restarted)
is NOT_FOUND, and our client then reads the whole blob instead.

Writes: Directory Put collects the whole stream, checks every directory
and every reference (to one sent earlier or already stored), then stores
all at once with ``put_many``; nothing is stored from an invalid stream.
Blob Put streams into the store's writer as messages arrive (bounded
memory) and aborts it when the stream fails or is cancelled.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import blake3
import grpc
from google.protobuf.message import DecodeError, Message

from ..castore import nixbase32
from ..castore.directory import Directory, SizeConvention, check_node, decode_directory
from ..castore.nodes import DIGEST_LEN, b3_text, display_name
from ..castore.pathinfo import validate_pathinfo
from ..castore.storepath import DIGEST_LEN as STORE_PATH_DIGEST_LEN
from ..castore.wire import encode_pathinfo, node_from_proto, pathinfo_from_proto
from ..errors import (
    IntegrityError,
    InvalidArgument,
    InvalidData,
    NotFound,
    ReadOnly,
    TvixError,
    Unavailable,
)
from ..proto import castore_pb2, pathinfo_pb2
from ..proto import rpc_blobstore_pb2 as blob_pb
from ..proto import rpc_directory_pb2 as dir_pb
from ..proto import rpc_pathinfo_pb2 as pi_pb
from ..store import Store
from ..store.base import ChunkMeta
from ..store.grpc.wire import (
    BLOB_SERVICE,
    DIRECTORY_SERVICE,
    ERROR_CODE_KEY,
    PATH_INFO_SERVICE,
    encode_blob_chunk,
)
from ..store.narcalc import calculate_nar
from .stats import Stats

log = logging.getLogger(__name__)

SERVICES = (BLOB_SERVICE, DIRECTORY_SERVICE, PATH_INFO_SERVICE)

# Bytes per Read message. Measured (256 MiB blob, loopback TCP, 2 cores shared
# by client and daemon): 64 KiB ~190-250 MB/s, 256 KiB ~340-600, 1 MiB ~200-400.
READ_MESSAGE = 256 * 1024
CHUNK_INDEX_SIZE = 200_000  # chunk locations remembered (~40 MB at most)

M = TypeVar("M", bound=Message)


class RpcStatus(Exception):
    """End the call with ``code``; ``error_code`` (a tvixmount error code) goes in the trailers."""

    def __init__(self, code: grpc.StatusCode, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_code = error_code


def status_for(exc: BaseException) -> RpcStatus:
    """The status a store error answers with (handlers override it per docs/protocol.md, 'Status codes')."""
    if isinstance(exc, RpcStatus):
        return exc
    message = str(exc)
    if isinstance(exc, NotFound):
        return RpcStatus(grpc.StatusCode.NOT_FOUND, message, exc.code)
    if isinstance(exc, InvalidArgument):
        return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, message, exc.code)
    if isinstance(exc, InvalidData):  # stored data is damaged: a storage error
        return RpcStatus(grpc.StatusCode.DATA_LOSS, message, exc.code)
    if isinstance(exc, Unavailable):
        return RpcStatus(grpc.StatusCode.UNAVAILABLE, message, exc.code)
    if isinstance(exc, ReadOnly):
        return RpcStatus(grpc.StatusCode.PERMISSION_DENIED, message, exc.code)
    if isinstance(exc, TvixError):
        return RpcStatus(grpc.StatusCode.INTERNAL, message, exc.code)
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "error")


def _parse(cls: type[M], raw: bytes, what: str) -> M:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: not a valid message: {exc}") from None


def _digest(raw: bytes, length: int, what: str) -> bytes:
    if len(raw) != length:
        raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: digest is {len(raw)} bytes, not {length}")
    return raw


@dataclass(frozen=True, slots=True)
class Options:
    """How the daemon serves: shared by the three servicers."""

    read_only: bool = False
    added_latency: float = 0.0
    check_dir_sizes: SizeConvention | None = None


class _Rpc:
    """What every handler shares: latency, logging, counters, error translation."""

    def __init__(self, store: Store, options: Options, stats: Stats) -> None:
        self.store = store
        self.options = options
        self.stats = stats

    def _begin(self, method: str, context: grpc.ServicerContext) -> None:
        self.stats.call(method)
        if self.options.added_latency > 0:
            time.sleep(self.options.added_latency)

    def _abort(self, method: str, context: grpc.ServicerContext, exc: BaseException) -> None:
        status = status_for(exc)
        if not context.is_active():
            log.debug("%s: client went away (%s)", method, status.message)
            return
        self.stats.error(method)
        if status.code is grpc.StatusCode.INTERNAL and not isinstance(exc, TvixError | RpcStatus):
            log.exception("%s failed", method)
        elif status.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                             grpc.StatusCode.PERMISSION_DENIED):
            log.debug("%s: %s: %s", method, status.code.name, status.message)
        else:
            log.warning("%s: %s: %s", method, status.code.name, status.message)
        if status.error_code:
            context.set_trailing_metadata(((ERROR_CODE_KEY, status.error_code),))
        context.abort(status.code, status.message)

    def _writable(self) -> None:
        if self.options.read_only:
            raise RpcStatus(grpc.StatusCode.PERMISSION_DENIED, "this store is served read-only",
                            ReadOnly.code)


def _unary(method: str) -> Callable[[Callable[..., bytes]], Callable[..., bytes]]:
    def wrap(fn: Callable[..., bytes]) -> Callable[..., bytes]:
        @functools.wraps(fn)
        def handler(self: _Rpc, request: Any, context: grpc.ServicerContext) -> bytes:
            self._begin(method, context)
            try:
                return fn(self, request, context)
            except Exception as exc:
                self._abort(method, context, exc)
                return b""  # only reached when the client is gone: nobody reads this

        return handler

    return wrap


def _streaming(method: str) -> Callable[[Callable[..., Iterator[bytes]]], Callable[..., Iterator[bytes]]]:
    def wrap(fn: Callable[..., Iterator[bytes]]) -> Callable[..., Iterator[bytes]]:
        @functools.wraps(fn)
        def handler(self: _Rpc, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self._begin(method, context)
            try:
                for message in fn(self, request, context):
                    self.stats.sent(len(message))
                    yield message
            except Exception as exc:
                self._abort(method, context, exc)

        return handler

    return wrap


# -- blobs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    blob: bytes
    offset: int
    size: int


class ChunkIndex:
    """Where recently stat'ed chunks live inside their blobs (LRU, thread-safe)."""

    def __init__(self, capacity: int = CHUNK_INDEX_SIZE) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._places: OrderedDict[bytes, ChunkLocation] = OrderedDict()

    def remember(self, blob: bytes, chunks: tuple[ChunkMeta, ...]) -> None:
        with self._lock:
            offset = 0
            for chunk in chunks:
                self._places[chunk.digest] = ChunkLocation(blob, offset, chunk.size)
                self._places.move_to_end(chunk.digest)
                offset += chunk.size
            while len(self._places) > self._capacity:
                self._places.popitem(last=False)

    def get(self, digest: bytes) -> ChunkLocation | None:
        with self._lock:
            return self._places.get(digest)


class BlobServicer(_Rpc):
    def __init__(self, store: Store, options: Options, stats: Stats,
                 chunks: ChunkIndex | None = None) -> None:
        super().__init__(store, options, stats)
        self.chunks = chunks or ChunkIndex()

    @_unary("BlobService/Stat")
    def stat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = _parse(blob_pb.StatBlobRequest, request, "StatBlobRequest")
        digest = _digest(req.digest, DIGEST_LEN, "stat")
        if log.isEnabledFor(logging.DEBUG):  # the digest's text and the peer cost per call; skip when unused
            log.debug("Stat %s from %s", b3_text(digest), context.peer())
        found = self.store.blobs.stat(digest)
        response = blob_pb.StatBlobResponse()
        if found is None:
            place = self.chunks.get(digest)
            if place is None:
                raise RpcStatus(grpc.StatusCode.NOT_FOUND, f"blob {b3_text(digest)} not found", NotFound.code)
            response.chunks.add(digest=digest, size=place.size)
        elif len(found.chunks) > 1:
            self.chunks.remember(digest, found.chunks)
            for chunk in found.chunks:
                response.chunks.add(digest=chunk.digest, size=chunk.size)
        elif found.size > 0:
            response.chunks.add(digest=digest, size=found.size)
        return response.SerializeToString()

    @_streaming("BlobService/Read")
    def read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = _parse(blob_pb.ReadBlobRequest, request, "ReadBlobRequest")
        digest = _digest(req.digest, DIGEST_LEN, "read")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Read %s from %s", b3_text(digest), context.peer())
        try:
            reader = self.store.blobs.open_read(digest)
        except NotFound:
            place = self.chunks.get(digest)
            if place is None:
                raise
            yield from self._read_chunk(digest, place)
            return
        with reader:
            offset = 0
            while offset < reader.size:
                piece = reader.pread(offset, READ_MESSAGE)
                if not piece:
                    raise IntegrityError(
                        f"blob {b3_text(digest)} ends at {offset} bytes, before its size {reader.size}"
                    )
                offset += len(piece)
                yield encode_blob_chunk(piece)

    def _read_chunk(self, digest: bytes, place: ChunkLocation) -> Iterator[bytes]:
        with self.store.blobs.open_read(place.blob) as reader:
            data = reader.pread(place.offset, place.size)
        if len(data) != place.size or blake3.blake3(data).digest() != digest:
            raise IntegrityError(
                f"chunk {b3_text(digest)} of blob {b3_text(place.blob)} (at {place.offset}, "
                f"{place.size} bytes) does not match its digest"
            )
        for start in range(0, len(data), READ_MESSAGE):
            yield encode_blob_chunk(memoryview(data)[start : start + READ_MESSAGE])

    @_unary("BlobService/Put")
    def put(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._writable()
        writer = self.store.blobs.open_write()
        size = 0
        try:
            for raw in requests:
                data = _parse(blob_pb.BlobChunk, raw, "BlobChunk").data
                writer.write(data)
                size += len(data)
                self.stats.received(len(raw))
            # A cancel ends ``requests`` like a finished stream and shows here only
            # once grpc has processed it, maybe a moment later: this check catches
            # most, not all. Our client aborts in-band instead (docs/protocol.md, Put).
            if not context.is_active():
                raise Unavailable("blob upload cancelled by the client; nothing stored")
            digest = writer.commit()
        except BaseException:
            writer.abort()
            raise
        log.debug("stored blob %s (%d bytes) from %s", b3_text(digest), size, context.peer())
        return blob_pb.PutBlobResponse(digest=digest).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(BLOB_SERVICE, {
            "Stat": grpc.unary_unary_rpc_method_handler(self.stat),
            "Read": grpc.unary_stream_rpc_method_handler(self.read),
            "Put": grpc.stream_unary_rpc_method_handler(self.put),
        })


# -- directories ------------------------------------------------------------------------------


class DirectoryServicer(_Rpc):
    @_streaming("DirectoryService/Get")
    def get(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = _parse(dir_pb.GetDirectoryRequest, request, "GetDirectoryRequest")
        if req.WhichOneof("by_what") is None:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, "GetDirectoryRequest: by_what is not set")
        digest = _digest(req.digest, DIGEST_LEN, "get directory")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Get directory %s%s from %s", b3_text(digest), " (recursive)" if req.recursive else "",
                      context.peer())
        if not req.recursive:
            found = self.store.directories.get(digest)
            if found is None:
                raise RpcStatus(grpc.StatusCode.NOT_FOUND, f"directory {b3_text(digest)} not found",
                                NotFound.code)
            yield found.encode()
            return
        # Absent root: OK and no message. A missing descendant: INTERNAL after a partial stream
        # (docs/protocol.md, 'Directory service').
        try:
            for directory in self.store.directories.get_recursive(digest):
                yield directory.encode()
        except NotFound as exc:
            raise RpcStatus(grpc.StatusCode.INTERNAL, str(exc), exc.code) from None

    @_unary("DirectoryService/Put")
    def put(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._writable()
        batch: dict[bytes, Directory] = {}
        ordered: list[Directory] = []
        root = b""
        for index, raw in enumerate(requests):
            self.stats.received(len(raw))
            try:
                directory = decode_directory(raw)
            except InvalidData as exc:
                raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"directory #{index}: {exc}",
                                InvalidData.code) from None
            root = directory.digest()
            self._check_children(index, root, directory, batch)
            if root not in batch:
                batch[root] = directory
                ordered.append(directory)
        if not ordered:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, "got no directories", InvalidData.code)
        try:
            self.store.directories.put_many(ordered)
        except InvalidData as exc:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.code) from None
        # The root is the last directory sent, even when it repeats an earlier one.
        log.debug("stored %d directories, root %s, from %s", len(ordered), b3_text(root), context.peer())
        return dir_pb.PutDirectoryResponse(root_digest=root).SerializeToString()

    def _check_children(self, index: int, digest: bytes, directory: Directory,
                        batch: dict[bytes, Directory]) -> None:
        """Each child must come earlier in the stream or be stored; sizes as configured."""
        convention = self.options.check_dir_sizes
        for child in directory.directories:
            known = batch.get(child.digest)
            if known is None:
                known = self.store.directories.get(child.digest)
            if known is None:
                raise RpcStatus(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"directory #{index} ({b3_text(digest)}): child {display_name(child.name)!r} "
                    f"({b3_text(child.digest)}) was neither sent before it nor is stored "
                    "(send directories leaves first)",
                    InvalidData.code,
                )
            if convention is not None:
                recorded = known.size(convention)
                if child.size != recorded:
                    raise RpcStatus(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"directory #{index} ({b3_text(digest)}): {display_name(child.name)!r} has "
                        f"wrong size, specified {child.size}, recorded {recorded} ({convention.value} sizes)",
                        InvalidData.code,
                    )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(DIRECTORY_SERVICE, {
            "Get": grpc.unary_stream_rpc_method_handler(self.get),
            "Put": grpc.stream_unary_rpc_method_handler(self.put),
        })


# -- path infos -------------------------------------------------------------------------------


class PathInfoServicer(_Rpc):
    @_unary("PathInfoService/Get")
    def get(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        req = _parse(pi_pb.GetPathInfoRequest, request, "GetPathInfoRequest")
        if req.WhichOneof("by_what") is None:
            raise RpcStatus(grpc.StatusCode.UNIMPLEMENTED, "GetPathInfoRequest: by_what is not set")
        digest = _digest(req.by_output_hash, STORE_PATH_DIGEST_LEN, "get path info")
        log.debug("Get path info %s from %s", nixbase32.encode(digest), context.peer())
        info = self.store.path_infos.get(digest)
        if info is None:
            raise RpcStatus(grpc.StatusCode.NOT_FOUND, f"path info {nixbase32.encode(digest)} not found",
                            NotFound.code)
        return encode_pathinfo(info)

    @_unary("PathInfoService/Put")
    def put(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._writable()
        msg = _parse(pathinfo_pb2.PathInfo, request, "PathInfo")
        try:
            info = pathinfo_from_proto(msg)
            validate_pathinfo(info, require_narinfo=True)
        except InvalidData as exc:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"invalid path info: {exc}",
                            InvalidData.code) from None
        stored = self.store.path_infos.put(info)
        log.debug("stored path info %s from %s", display_name(info.node.name), context.peer())
        return encode_pathinfo(stored)

    @_unary("PathInfoService/CalculateNAR")
    def calculate_nar(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        msg = _parse(castore_pb2.Node, request, "Node")
        try:
            node = node_from_proto(msg)
        except InvalidData as exc:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"invalid root node: {exc}") from None
        if node.name:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, "invalid root node: its name must be empty")
        problem = check_node(node)
        if problem:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, f"invalid root node: {problem}")
        log.debug("CalculateNAR of %s from %s", type(node).__name__, context.peer())
        try:
            result = self.store.path_infos.calculate_nar(node)
            if result is None:  # a path info backend that cannot: render from our own services
                result = calculate_nar(node, self.store.blobs, self.store.directories)
        except NotFound as exc:
            raise RpcStatus(grpc.StatusCode.DATA_LOSS, f"storage error: failed rendering nar: {exc}",
                            exc.code) from None
        size, sha256 = result
        return pi_pb.CalculateNARResponse(nar_size=size, nar_sha256=sha256).SerializeToString()

    @_streaming("PathInfoService/List")
    def list(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        _parse(pi_pb.ListPathInfoRequest, request, "ListPathInfoRequest")
        log.debug("List path infos from %s", context.peer())
        try:
            for info in self.store.path_infos.list():
                yield encode_pathinfo(info)
        except TvixError as exc:
            raise RpcStatus(grpc.StatusCode.INTERNAL, str(exc), exc.code) from None

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(PATH_INFO_SERVICE, {
            "Get": grpc.unary_unary_rpc_method_handler(self.get),
            "Put": grpc.unary_unary_rpc_method_handler(self.put),
            "CalculateNAR": grpc.unary_unary_rpc_method_handler(self.calculate_nar),
            "List": grpc.unary_stream_rpc_method_handler(self.list),
        })


def handlers(store: Store, options: Options, stats: Stats) -> list[grpc.GenericRpcHandler]:
    """The generic handlers of the three services over ``store``."""
    return [
        BlobServicer(store, options, stats).handler(),
        DirectoryServicer(store, options, stats).handler(),
        PathInfoServicer(store, options, stats).handler(),
    ]
