"""The gRPC client against servers that misbehave, are slow, or are not there.

Each fault is served by a real gRPC server in this process (``FakeServer``)
that sends exactly the bytes a test wants. What is checked: bad data is
refused with the right error class naming the object, nothing of a bad
blob is ever served, deadlines hold, and no grpc.RpcError escapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest

from tests.grpc_daemon import FakeServer, free_port
from tests.store_suite import pattern
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode, b3_text
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.wire import encode_pathinfo
from tvixmount.errors import (
    IntegrityError,
    InvalidData,
    NotFound,
    ReadOnly,
    Timeout,
    TvixError,
    Unavailable,
)
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.store.grpc import client as grpc_client
from tvixmount.store.grpc import reader as grpc_reader
from tvixmount.store.grpc.channel import ClientConfig
from tvixmount.store.grpc.status import Unimplemented
from tvixmount.store.grpc.wire import ERROR_CODE_KEY

STAT = "/tvix.castore.v1.BlobService/Stat"
READ = "/tvix.castore.v1.BlobService/Read"
PUT_BLOB = "/tvix.castore.v1.BlobService/Put"
GET_DIR = "/tvix.castore.v1.DirectoryService/Get"
GET_INFO = "/tvix.store.v1.PathInfoService/Get"

FAST = ClientConfig(unary_timeout=2.0, stream_gap=2.0, connect_timeout=1.0)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def stat_response(*chunks: tuple[bytes, int]) -> bytes:
    msg = blob_pb.StatBlobResponse()
    for digest, size in chunks:
        msg.chunks.add(digest=digest, size=size)
    return msg.SerializeToString()


def blob_chunks(data: bytes, piece: int = 7000) -> Iterator[bytes]:
    for start in range(0, len(data), piece):
        yield blob_pb.BlobChunk(data=data[start : start + piece]).SerializeToString()


def requested(request: bytes) -> bytes:
    return blob_pb.ReadBlobRequest.FromString(request).digest


class Blobs:
    """A fake blob server: ``contents`` by digest, ``listing`` what Stat says."""

    def __init__(self) -> None:
        self.contents: dict[bytes, bytes] = {}
        self.listing: dict[bytes, list[tuple[bytes, int]]] = {}

    def stat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        digest = blob_pb.StatBlobRequest.FromString(request).digest
        if digest not in self.listing:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        return stat_response(*self.listing[digest])

    def read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        digest = requested(request)
        if digest not in self.contents:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        yield from blob_chunks(self.contents[digest])

    def server(self) -> FakeServer:
        return FakeServer({STAT: self.stat, READ: self.read})


@pytest.fixture
def blobs() -> Blobs:
    return Blobs()


# -- blobs ------------------------------------------------------------------------------------


def test_blob_with_wrong_bytes_is_refused_and_nothing_is_served(blobs: Blobs) -> None:
    data = pattern(300_000)
    digest = b3(data)
    blobs.listing[digest] = [(digest, len(data))]
    blobs.contents[digest] = data[:-1] + b"\0"  # one byte off, same length
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with pytest.raises(IntegrityError, match=re.escape(b3_text(digest))):
            service.open_read(digest)
        # Not cached either: the next open fetches (and refuses) again.
        with pytest.raises(IntegrityError):
            service.open_read(digest)
        assert server.calls[READ] == 2
        service.close()


def test_big_bad_blob_spooled_to_disk_is_refused(blobs: Blobs) -> None:
    data = pattern(3 * 1024 * 1024)
    digest = b3(data)
    blobs.listing[digest] = [(digest, len(data))]
    blobs.contents[digest] = data + b"extra"
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with pytest.raises(IntegrityError, match="nothing of it was served"):
            service.open_read(digest)
        blobs.contents[digest] = data
        with service.open_read(digest) as reader:
            assert reader.size == len(data)
            assert reader.pread(len(data) - 10, 100) == data[-10:]
            assert reader.pread(1_000_000, 2_000_000) == data[1_000_000:3_000_000]
        service.close()


def test_server_without_chunk_list_stat_fetches_once(blobs: Blobs) -> None:
    """A tvix-store lists no chunks for a one-chunk blob: stat learns the size by reading."""
    data = pattern(5000)
    digest = b3(data)
    blobs.listing[digest] = []
    blobs.contents[digest] = data
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        stat = service.stat(digest)
        assert stat is not None and stat.size == 5000
        with service.open_read(digest) as reader:  # reuses the copy stat verified
            assert reader.pread(10, 20) == data[10:30]
        assert server.calls[READ] == 1
        empty = b3(b"")
        blobs.listing[empty] = []
        assert service.stat(empty) is not None and service.stat(empty).size == 0  # type: ignore[union-attr]
        assert server.calls[READ] == 1  # the empty blob's size is known from its digest
        service.close()


def test_chunked_blob_reads_only_covering_chunks_and_verifies_each(blobs: Blobs,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_reader, "WHOLE_RUN", 0)  # random access to a big blob: no whole-blob stream
    parts = [pattern(1000, seed=i) for i in range(4)]
    data = b"".join(parts)
    digest = b3(data)
    blobs.listing[digest] = [(b3(p), len(p)) for p in parts]
    for p in parts:
        blobs.contents[b3(p)] = p
    blobs.contents[b3(parts[2])] = b"x" * 1000  # chunk 2 is damaged on the server
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        assert service.stat(digest) is not None
        with service.open_read(digest) as reader:
            assert reader.size == 4000
            assert reader.pread(1500, 400) == data[1500:1900]
            assert server.calls.get(READ) == 1  # chunk 1 only
            assert reader.pread(500, 1000) == data[500:1500]  # chunk 0 fetched, chunk 1 cached
            assert server.calls[READ] == 2
            with pytest.raises(IntegrityError, match=rf"chunk 2 \({re.escape(b3_text(b3(parts[2])))}\)"):
                reader.pread(1900, 200)
            assert reader.pread(3000, 5000) == data[3000:]  # undamaged chunks still serve
        service.close()


def test_reading_in_order_fetches_ahead_and_checks_what_it_fetched(blobs: Blobs) -> None:
    parts = [pattern(1000, seed=20 + i) for i in range(6)]
    data = b"".join(parts)
    digest = b3(data)
    blobs.listing[digest] = [(b3(p), len(p)) for p in parts]
    for p in parts:
        blobs.contents[b3(p)] = p
    blobs.contents[b3(parts[3])] = b"y" * 1000  # damaged, and fetched ahead before it is read
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(0, 500) == data[:500]
            deadline = time.monotonic() + 5
            while server.calls.get(READ, 0) < 3:  # chunks 1 and 2 come without being asked for
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert reader.pread(500, 2500) == data[500:3000]  # served from what came ahead
            with pytest.raises(IntegrityError, match=r"chunk 3 "):
                reader.pread(3000, 10)
            assert reader.pread(4000, 2000) == data[4000:]
        service.close()


def test_chunk_not_served_falls_back_to_whole_blob(blobs: Blobs) -> None:
    parts = [pattern(700, seed=10 + i) for i in range(3)]
    data = b"".join(parts)
    digest = b3(data)
    blobs.listing[digest] = [(b3(p), len(p)) for p in parts]
    blobs.contents[digest] = data  # but no chunk is served (a restarted daemon)
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with service.open_read(digest) as reader:
            assert reader.pread(650, 100) == data[650:750]
            assert reader.pread(0, 5000) == data
        service.close()


def test_chunk_list_with_bad_digest_length_is_invalid(blobs: Blobs) -> None:
    digest = b3(b"whatever")
    blobs.listing[digest] = [(b"short", 3)]
    with blobs.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with pytest.raises(InvalidData, match="5-byte digest"):
            service.stat(digest)
        service.close()


def test_put_answered_with_another_digest_is_an_integrity_error() -> None:
    def put(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        for _ in requests:
            pass
        return blob_pb.PutBlobResponse(digest=b3(b"something else")).SerializeToString()

    with FakeServer({PUT_BLOB: put}) as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        with pytest.raises(IntegrityError, match="says it stored"):
            service.put(pattern(2_500_000))
        service.close()


# -- directories ---------------------------------------------------------------------------------

EMPTY = Directory()
LEAF = Directory(files=(FileNode(b"f", b3(b""), 0),))
MID = Directory(directories=(DirectoryNode(b"leaf", LEAF.digest(), 1),))
ROOT = Directory(directories=(DirectoryNode(b"a", MID.digest(), 2), DirectoryNode(b"b", LEAF.digest(), 1)))


def directory_server(*messages: bytes) -> FakeServer:
    def get(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from messages

    return FakeServer({GET_DIR: get})


def test_directory_breaking_a_rule_is_invalid() -> None:
    unsorted = Directory(files=(FileNode(b"b", b3(b""), 0), FileNode(b"a", b3(b""), 0)))
    with directory_server(unsorted.encode()) as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        with pytest.raises(InvalidData, match="sorting"):
            service.get(unsorted.digest())
        service.close()


def test_directory_with_another_digest_is_invalid() -> None:
    with directory_server(LEAF.encode()) as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        with pytest.raises(InvalidData, match=re.escape(b3_text(MID.digest()))):
            service.get(MID.digest())
        service.close()


def test_bad_symlink_and_garbage_are_invalid() -> None:
    bad = Directory(symlinks=(SymlinkNode(b"l", b""),))
    with directory_server(bad.encode()) as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        with pytest.raises(InvalidData, match="target is empty"):
            service.get(bad.digest())
        service.close()
    with directory_server(b"\xff\xff\xff") as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        with pytest.raises(InvalidData, match="not a valid protobuf"):
            service.get(LEAF.digest())
        service.close()


@pytest.mark.parametrize(
    ("sent", "error", "match"),
    [
        ([ROOT, MID, LEAF], None, None),
        ([ROOT, LEAF, MID, LEAF], None, None),  # a repeat of a shared subtree is tolerated
        ([ROOT, MID], NotFound, re.escape(b3_text(LEAF.digest()))),  # stream ends early
        ([ROOT, MID, LEAF, EMPTY], InvalidData, "no directory received before it references"),
        ([MID, ROOT, LEAF], InvalidData, "first instead of the root"),
        ([ROOT, LEAF, Directory(files=(FileNode(b"x", b"short", 1),))], InvalidData, "digest is 5 bytes"),
    ],
    ids=["complete", "repeat", "missing", "unexpected", "root-not-first", "invalid"],
)
def test_recursive_get_checks_order_and_completeness(
    sent: list[Directory], error: type[Exception] | None, match: str | None
) -> None:
    with directory_server(*(d.encode() for d in sent)) as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        if error is None:
            got = list(service.get_recursive(ROOT.digest()))
            assert got == [ROOT, MID, LEAF] or got == [ROOT, LEAF, MID]
        else:
            with pytest.raises(error, match=match):
                list(service.get_recursive(ROOT.digest()))
        service.close()


def test_recursive_get_without_messages_is_absent() -> None:
    with directory_server() as server:
        service = grpc_client.open_directory_service(server.url, FAST)
        assert list(service.get_recursive(ROOT.digest())) == []
        assert service.get(ROOT.digest()) is None  # OK and nothing: absent too
        service.close()


# -- path infos ------------------------------------------------------------------------------------


def test_path_info_for_another_store_path_is_invalid() -> None:
    other = PathInfo(
        node=SymlinkNode(b"11111111111111111111111111111111-other", b"/x"),
        narinfo=NarInfo(1, bytes(32)),
    )
    with FakeServer({GET_INFO: lambda request, context: encode_pathinfo(other)}) as server:
        service = grpc_client.open_path_info_service(server.url, FAST)
        with pytest.raises(InvalidData, match="11111111111111111111111111111111-other"):
            service.get(bytes(20))
        service.close()


def test_invalid_path_info_from_server_is_invalid() -> None:
    broken = PathInfo(node=SymlinkNode(b"not-a-store-path", b"/x"), narinfo=NarInfo(1, bytes(32)))
    with FakeServer({GET_INFO: lambda request, context: encode_pathinfo(broken)}) as server:
        service = grpc_client.open_path_info_service(server.url, FAST)
        with pytest.raises(InvalidData, match="not a store path"):
            service.get(bytes(20))
        service.close()


# -- status codes, deadlines, absent servers -----------------------------------------------------


def aborting(code: grpc.StatusCode, trailer: str | None = None):  # type: ignore[no-untyped-def]
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        if trailer:
            context.set_trailing_metadata(((ERROR_CODE_KEY, trailer),))
        context.abort(code, "told to fail")

    return handler


@pytest.mark.parametrize(
    ("code", "trailer", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, None, None),  # absent: stat answers None
        (grpc.StatusCode.UNAVAILABLE, None, Unavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, Timeout),
        (grpc.StatusCode.DATA_LOSS, None, InvalidData),
        (grpc.StatusCode.INVALID_ARGUMENT, None, InvalidData),
        (grpc.StatusCode.PERMISSION_DENIED, None, ReadOnly),
        (grpc.StatusCode.INTERNAL, None, TvixError),
        (grpc.StatusCode.UNIMPLEMENTED, None, Unimplemented),  # a TvixError the batch read falls back on
        (grpc.StatusCode.INTERNAL, "integrity", IntegrityError),  # our daemon's trailer wins
        (grpc.StatusCode.DATA_LOSS, "not_found", NotFound),
    ],
)
def test_status_codes_become_tvix_errors(code: grpc.StatusCode, trailer: str | None,
                                         error: type[TvixError] | None) -> None:
    with FakeServer({STAT: aborting(code, trailer)}) as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        digest = b3(b"any")
        if error is None:
            assert service.stat(digest) is None
        else:
            with pytest.raises(error) as info:
                service.stat(digest)
            assert type(info.value) is error
            assert not isinstance(info.value, grpc.RpcError)
            assert "told to fail" in str(info.value) or error is Timeout
            assert b3_text(digest) in str(info.value)
        service.close()


def test_unary_deadline() -> None:
    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(3)
        return b""

    with FakeServer({STAT: slow}) as server:
        service = grpc_client.open_blob_service(server.url, ClientConfig(unary_timeout=0.3))
        started = time.monotonic()
        with pytest.raises(Timeout, match="did not answer in time"):
            service.stat(b3(b"x"))
        assert time.monotonic() - started < 2
        service.close()


def test_stream_stalling_between_messages_times_out() -> None:
    data = pattern(20_000)
    digest = b3(data)

    def stalling_read(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield blob_pb.BlobChunk(data=data[:10_000]).SerializeToString()
        time.sleep(3)
        yield blob_pb.BlobChunk(data=data[10_000:]).SerializeToString()

    handlers = {STAT: lambda request, context: stat_response((digest, len(data))), READ: stalling_read}
    with FakeServer(handlers) as server:
        service = grpc_client.open_blob_service(server.url, ClientConfig(stream_gap=0.4))
        started = time.monotonic()
        with pytest.raises(Timeout, match="no message"):
            service.open_read(digest)
        assert time.monotonic() - started < 2
        service.close()


def test_slow_but_steady_stream_is_not_cut() -> None:
    data = pattern(50_000)
    digest = b3(data)

    def steady_read(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for piece in blob_chunks(data, 10_000):
            time.sleep(0.15)
            yield piece

    handlers = {STAT: lambda request, context: stat_response((digest, len(data))), READ: steady_read}
    with FakeServer(handlers) as server:
        service = grpc_client.open_blob_service(server.url, ClientConfig(stream_gap=0.4))
        with service.open_read(digest) as reader:  # 0.75 s in all, never 0.4 s between messages
            assert reader.pread(0, len(data)) == data
        service.close()


def test_put_to_a_server_that_stops_reading_times_out() -> None:
    def stuck(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        next(requests)
        time.sleep(4)  # reads no more: flow control stops the client
        return b""

    with FakeServer({PUT_BLOB: stuck}) as server:
        service = grpc_client.open_blob_service(server.url, ClientConfig(stream_gap=0.5))
        started = time.monotonic()
        with pytest.raises(Timeout), service.open_write() as writer:
            for _ in range(32):
                writer.write(pattern(1024 * 1024))
            writer.commit()
        assert time.monotonic() - started < 3
        service.close()


def test_put_answered_too_late_times_out() -> None:
    def slow(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        for _ in requests:
            pass
        time.sleep(3)
        return b""

    with FakeServer({PUT_BLOB: slow}) as server:
        service = grpc_client.open_blob_service(server.url, ClientConfig(unary_timeout=0.5, stream_gap=0.5))
        started = time.monotonic()
        with pytest.raises(Timeout, match="did not answer within"):
            service.put(pattern(3 * 1024 * 1024))
        assert time.monotonic() - started < 2.5
        service.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_server_down_at_start_is_unavailable_quickly(kind: str, tmp_path: Path) -> None:
    url = f"grpc+http://127.0.0.1:{free_port()}" if kind == "tcp" else f"grpc+unix://{tmp_path}/nobody.sock"
    service = grpc_client.open_blob_service(url, FAST)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        service.stat(b3(b"x"))
    assert type(info.value) is Unavailable
    assert url in str(info.value)
    assert time.monotonic() - started < 3  # retried a little, then failed: no hang
    with pytest.raises(Unavailable):
        grpc_client.open_directory_service(url + "?wait-connect=1", ClientConfig(connect_timeout=0.3))
    service.close()


def test_listing_is_refused_clearly() -> None:
    from tvixmount.errors import InvalidArgument

    service = grpc_client.open_blob_service("grpc+http://127.0.0.1:1")
    with pytest.raises(InvalidArgument, match="listing blobs is not possible over gRPC"):
        list(service.iter_digests())
    directories = grpc_client.open_directory_service("grpc+http://127.0.0.1:1")
    with pytest.raises(InvalidArgument, match="listing directories"):
        list(directories.iter_digests())
    service.close()
    directories.close()
