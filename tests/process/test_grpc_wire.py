"""Wire encodings pinned to bytes, and tolerance of fields a newer server adds.

Golden messages are written out field by field with a ten-line encoder
(tag = field number << 3 | wire type), independent of the protobuf
runtime, from the field numbers in docs/protocol.md ('Castore messages', 'Store messages') and the
canonical Directory encodings of its 'Test vectors'. Decoding them and encoding again must give the
same bytes; the same bytes with unknown fields appended must decode to the
same values, both directly and when a real server sends them.
"""

from __future__ import annotations

from collections.abc import Iterator

import blake3
import pytest

from tests.grpc_daemon import FakeServer
from tvixmount.castore.directory import Directory, decode_directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.wire import decode_pathinfo, encode_pathinfo
from tvixmount.proto import rpc_blobstore_pb2
from tvixmount.store.base import BlobStat, ChunkMeta
from tvixmount.store.grpc import client as grpc_client


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def vfield(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def lfield(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# A field number no version of the protocol uses, as a newer peer might add.
UNKNOWN = vfield(99, 7) + lfield(100, b"future")

EMPTY_B3 = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
HELLO = b"Hello World!"
HELLO_B3 = bytes.fromhex("5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c")

# docs/protocol.md, 'Test vectors': canonical encodings.
WITH_KEEP_HEX = "12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
COMPLICATED_HEX = (
    "0a2a0a046b65657012208b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e180112290a052e6b"
    "6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f32621a1e0a02616112182f6e69782f"
    "73746f72652f736f6d657768657265656c7365"
)
B_HEX = "0a250a01611220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
GOLDEN_DIRECTORIES = {
    "with_keep": (WITH_KEEP_HEX, "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"),
    "complicated": (COMPLICATED_HEX, "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a"),
    "complicated_head": (COMPLICATED_HEX.replace("1801", "1802", 1),
                         "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"),
    "b": (B_HEX, "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc"),
    "empty": ("", EMPTY_B3.hex()),
}


@pytest.mark.parametrize("name", GOLDEN_DIRECTORIES)
def test_directory_golden_bytes(name: str) -> None:
    hex_, digest_hex = GOLDEN_DIRECTORIES[name]
    raw = bytes.fromhex(hex_)
    directory = decode_directory(raw, bytes.fromhex(digest_hex))
    assert directory.encode() == raw
    assert directory.digest().hex() == digest_hex
    # A newer peer's extra fields, top level and inside nodes, change neither.
    assert decode_directory(raw + UNKNOWN, bytes.fromhex(digest_hex)) == directory


def test_complicated_written_by_hand() -> None:
    keep = lfield(1, b"keep") + lfield(2, bytes.fromhex(GOLDEN_DIRECTORIES["with_keep"][1])) + vfield(3, 1)
    dot_keep = lfield(1, b".keep") + lfield(2, EMPTY_B3)
    link = lfield(1, b"aa") + lfield(2, b"/nix/store/somewhereelse")
    assert (lfield(1, keep) + lfield(2, dot_keep) + lfield(3, link)).hex() == COMPLICATED_HEX


STORE_NAME = b"00000000000000000000000000000000-hello"
REF_NAME = "11111111111111111111111111111111-ref"
NAR_SHA = bytes(range(32))


def _golden_pathinfo() -> bytes:
    from tvixmount.castore.storepath import parse_basename

    ref_digest = parse_basename(REF_NAME).digest
    file_node = lfield(1, STORE_NAME) + lfield(2, HELLO_B3) + vfield(3, 12) + vfield(4, 1)
    narinfo = vfield(1, 128) + lfield(2, NAR_SHA) + lfield(4, REF_NAME.encode())
    return lfield(1, lfield(2, file_node)) + lfield(2, ref_digest) + lfield(3, narinfo)


def test_pathinfo_golden_bytes() -> None:
    raw = _golden_pathinfo()
    info = decode_pathinfo(raw, require_narinfo=True)
    assert info.node == FileNode(STORE_NAME, HELLO_B3, 12, True)
    assert info.narinfo is not None and info.narinfo.nar_size == 128
    assert info.narinfo.reference_names == (REF_NAME,)
    assert encode_pathinfo(info) == raw
    assert decode_pathinfo(raw + UNKNOWN, require_narinfo=True) == info


def _golden_stat() -> tuple[bytes, tuple[ChunkMeta, ...]]:
    a, b = blake3.blake3(b"a").digest(), blake3.blake3(b"bc").digest()
    raw = lfield(2, lfield(1, a) + vfield(2, 1)) + lfield(2, lfield(1, b) + vfield(2, 2))
    return raw, (ChunkMeta(a, 1), ChunkMeta(b, 2))


def test_stat_response_golden_bytes() -> None:
    raw, chunks = _golden_stat()
    msg = rpc_blobstore_pb2.StatBlobResponse.FromString(raw)
    assert [(c.digest, c.size) for c in msg.chunks] == [(c.digest, c.size) for c in chunks]
    assert msg.SerializeToString() == raw
    request = rpc_blobstore_pb2.StatBlobRequest(digest=HELLO_B3, send_chunks=True).SerializeToString()
    assert request == lfield(1, HELLO_B3) + vfield(2, 1)


# -- a server that speaks a newer protocol ---------------------------------------------------


@pytest.fixture
def newer_server() -> Iterator[FakeServer]:
    """Answers with every message carrying fields we do not know."""
    stat_raw, _ = _golden_stat()
    with_keep = bytes.fromhex(WITH_KEEP_HEX)
    hello_chunk = lfield(1, HELLO) + UNKNOWN

    def stat(request: bytes, context: object) -> bytes:
        digest = rpc_blobstore_pb2.StatBlobRequest.FromString(request).digest
        if digest == HELLO_B3:  # one chunk, plus a field 1 that this protocol never had
            return lfield(1, b"?") + lfield(2, lfield(1, HELLO_B3) + vfield(2, 12) + UNKNOWN) + UNKNOWN
        return stat_raw + UNKNOWN

    def read(request: bytes, context: object) -> Iterator[bytes]:
        yield hello_chunk

    def get_directory(request: bytes, context: object) -> Iterator[bytes]:
        yield with_keep + UNKNOWN

    def get_pathinfo(request: bytes, context: object) -> bytes:
        return _golden_pathinfo() + UNKNOWN

    def list_pathinfo(request: bytes, context: object) -> Iterator[bytes]:
        yield _golden_pathinfo() + UNKNOWN

    def calculate(request: bytes, context: object) -> bytes:
        return vfield(1, 128) + lfield(2, NAR_SHA) + UNKNOWN

    with FakeServer({
        "/tvix.castore.v1.BlobService/Stat": stat,
        "/tvix.castore.v1.BlobService/Read": read,
        "/tvix.castore.v1.DirectoryService/Get": get_directory,
        "/tvix.store.v1.PathInfoService/Get": get_pathinfo,
        "/tvix.store.v1.PathInfoService/List": list_pathinfo,
        "/tvix.store.v1.PathInfoService/CalculateNAR": calculate,
    }) as server:
        yield server


def test_unknown_fields_from_a_newer_server_are_tolerated(newer_server: FakeServer) -> None:
    from tvixmount.castore.storepath import parse_basename
    from tvixmount.store import StoreUrls, open_store

    with open_store(StoreUrls.single(newer_server.url)) as store:
        _, chunks = _golden_stat()
        assert store.blobs.stat(blake3.blake3(b"abc").digest()) == BlobStat(3, chunks)
        assert store.blobs.stat(HELLO_B3) == BlobStat(12)
        with store.blobs.open_read(HELLO_B3) as reader:
            assert reader.pread(0, 100) == HELLO
        with_keep = Directory(files=(FileNode(b".keep", EMPTY_B3, 0),))
        assert store.directories.get(with_keep.digest()) == with_keep
        info = store.path_infos.get(parse_basename(STORE_NAME).digest)
        assert info == decode_pathinfo(_golden_pathinfo())
        assert list(store.path_infos.list()) == [info]
        assert store.path_infos.calculate_nar(FileNode(b"", HELLO_B3, 12)) == (128, NAR_SHA)


@pytest.mark.parametrize("size", [1, 127, 128, 300, 16383, 16384, 1024 * 1024])
def test_blob_chunk_fast_encoding(size: int) -> None:
    """Our one-copy BlobChunk encoder writes what the protobuf runtime writes."""
    from tvixmount.store.grpc.wire import encode_blob_chunk

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_blob_chunk(data) == rpc_blobstore_pb2.BlobChunk(data=data).SerializeToString()
    assert encode_blob_chunk(memoryview(data)) == lfield(1, data)


def test_client_encodes_requests_canonically() -> None:
    """What the client sends for a put is the canonical encoding, byte for byte."""
    received: list[bytes] = []

    def put(requests: Iterator[bytes], context: object) -> bytes:
        received.extend(requests)
        return lfield(1, blake3.blake3(received[-1]).digest())

    with FakeServer({"/tvix.castore.v1.DirectoryService/Put": put}) as server:
        service = grpc_client.open_directory_service(server.url)
        try:
            keep = Directory(files=(FileNode(b".keep", EMPTY_B3, 0),))
            complicated = Directory(
                directories=(DirectoryNode(b"keep", keep.digest(), 1),),
                files=(FileNode(b".keep", EMPTY_B3, 0),),
                symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
            )
            assert service.put_many([keep, complicated]) == complicated.digest()
        finally:
            service.close()
    assert [r.hex() for r in received] == [WITH_KEEP_HEX, COMPLICATED_HEX]


def test_pathinfo_put_sends_what_validation_accepts() -> None:
    received: list[bytes] = []

    def put(request: bytes, context: object) -> bytes:
        received.append(request)
        return request

    info = PathInfo(
        node=FileNode(STORE_NAME, HELLO_B3, 12, True),
        references=(bytes(20),),
        narinfo=NarInfo(128, NAR_SHA, reference_names=("00000000000000000000000000000000-ref",)),
    )
    with FakeServer({"/tvix.store.v1.PathInfoService/Put": put}) as server:
        service = grpc_client.open_path_info_service(server.url)
        try:
            assert service.put(info) == info
        finally:
            service.close()
    assert received == [encode_pathinfo(info)]
