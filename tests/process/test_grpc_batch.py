"""tvixmount's own BlobBatchService: the gRPC client's ``read_many`` against real servers.

Against our daemon (a real process, an embedded store on a unix socket):
a batch is one call and gives every blob verified, a missing or damaged
blob failing alone; a daemon started with ``--no-blob-batch`` (as a
tvix-store, which has no such service) answers UNIMPLEMENTED and the
client falls back to one ``Read`` per blob, saying so once. Against
in-test servers that misbehave on purpose (``FakeServer``): a wrong blob,
a missing blob, a stream that ends early, breaks off, stalls, or breaks the
order each fail the blobs concerned only, within the stream gap.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import grpc
import pytest

from tests.embedded_layout import flip_byte
from tests.grpc_daemon import Daemon, FakeServer, scratch_dir
from tests.store_suite import pattern
from tvixmount.castore.nodes import b3_text
from tvixmount.errors import IntegrityError, InvalidData, NotFound, Timeout, TvixError, Unavailable
from tvixmount.proto import rpc_blobbatch_pb2 as batch_pb
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.store import StoreUrls, open_store
from tvixmount.store.grpc import client as grpc_client
from tvixmount.store.grpc.channel import ClientConfig
from tvixmount.store.grpc.wire import BLOB_BATCH_READ, BLOB_READ

FAST = ClientConfig(unary_timeout=2.0, stream_gap=2.0, connect_timeout=1.0)
Wanted = list[tuple[bytes, int]]


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def _blobs(count: int, seed: int = 1) -> list[bytes]:
    return [pattern(1 + (i * 7919) % 30_000, seed=seed + i) for i in range(count)]


# -- our daemon --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored() -> Iterator[tuple[Path, list[bytes]]]:
    root = scratch_dir("tvx-batch-")
    blobs = [*_blobs(40), b"", pattern(1_500_000, seed=77)]  # an empty one, and one over 1 MiB
    with open_store(StoreUrls.embedded(root / "store", create=True)) as store:
        for data in blobs:
            store.blobs.put(data)
    yield root, blobs
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _daemon(stored: tuple[Path, list[bytes]], name: str, *args: str) -> Daemon:
    """A daemon not yet started: each test's ``with`` starts and stops it."""
    root, _ = stored
    return Daemon(root / name, "--read-only", *args, store_urls=StoreUrls.embedded(root / "store"))


def _calls(d: Daemon, what: str) -> int:
    return d.log().count(what)


def test_a_batch_is_one_call_and_every_blob_comes_verified(stored: tuple[Path, list[bytes]]) -> None:
    _, blobs = stored
    missing = b3(b"not stored")
    wanted: Wanted = [(b3(data), len(data)) for data in blobs]
    wanted += [(missing, 10), (b3(blobs[3]), len(blobs[3]))]
    with _daemon(stored, "d1") as d:
        service = grpc_client.open_blob_service(d.url, FAST)
        got = service.read_many(wanted)
        service.close()
        assert _calls(d, f"batch Read of {len(wanted)} blobs") == 1
        assert _calls(d, "Read b3:") == 0  # no per-blob call
    for data, answer in zip(blobs, got, strict=False):
        assert answer == data
    assert isinstance(got[len(blobs)], NotFound) and b3_text(missing) in str(got[len(blobs)])
    assert got[-1] == blobs[3]  # a digest asked for twice is answered twice


def test_more_blobs_than_one_call_may_name_take_several_calls(stored: tuple[Path, list[bytes]]) -> None:
    _, blobs = stored
    small = blobs[:40]
    wanted: Wanted = [(b3(small[i % 40]), len(small[i % 40])) for i in range(1030)]
    with _daemon(stored, "d5") as d:
        service = grpc_client.open_blob_service(d.url, FAST)
        got = service.read_many(wanted)
        service.close()
        assert _calls(d, "batch Read of 1024 blobs") == 1 and _calls(d, "batch Read of 6 blobs") == 1
    assert got == [small[i % 40] for i in range(1030)]


def test_a_damaged_blob_in_the_store_fails_alone(tmp_path: Path) -> None:
    blobs = _blobs(6, seed=5)
    root = scratch_dir("tvx-batch-bad-")
    with open_store(StoreUrls.embedded(root / "store", create=True)) as store:
        for data in blobs:
            store.blobs.put(data)
    victim = b3(blobs[2])
    flip_byte(root / "store", victim, len(blobs[2]) // 2)  # a file or a range of a pack: the row says
    with Daemon(root, "--read-only") as d:
        service = grpc_client.open_blob_service(d.url, FAST)
        got = service.read_many([(b3(data), len(data)) for data in blobs])
        service.close()
    assert isinstance(got[2], InvalidData) and b3_text(victim) in str(got[2])
    assert [g for i, g in enumerate(got) if i != 2] == [data for i, data in enumerate(blobs) if i != 2]


def test_a_server_without_the_service_gets_one_read_per_blob_and_one_info_line(
        stored: tuple[Path, list[bytes]], caplog: pytest.LogCaptureFixture) -> None:
    _, blobs = stored
    wanted: Wanted = [(b3(data), len(data)) for data in blobs[:10]]
    with _daemon(stored, "d2", "--no-blob-batch") as d, \
            caplog.at_level(logging.INFO, logger="tvixmount.store.grpc.blobs"):
        service = grpc_client.open_blob_service(d.url, FAST)
        assert service.read_many(wanted) == blobs[:10]
        assert service.read_many(wanted[5:]) == blobs[5:10]
        service.close()
        assert _calls(d, "Read b3:") == 15
    lines = [r for r in caplog.records if "has no batch read" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]


def test_the_daemon_refuses_a_batch_that_breaks_the_rules(stored: tuple[Path, list[bytes]]) -> None:
    with _daemon(stored, "d3") as d, grpc.insecure_channel("unix:" + d.listen) as channel:
        read = channel.unary_stream(BLOB_BATCH_READ)
        for request, words in (
            (batch_pb.ReadBlobsRequest(digests=[b"short"]), "digest 0 is 5 bytes"),
            (batch_pb.ReadBlobsRequest(digests=[b"x" * 32] * 1025), "more than 1024"),
            (batch_pb.ReadBlobsRequest(digests=[b"x" * 32] * 2, size_hints=[1]), "1 size hints for 2"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                list(read(request.SerializeToString(), timeout=10))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert words in info.value.details()


def test_blobs_bigger_than_a_message_are_split_and_come_whole(stored: tuple[Path, list[bytes]]) -> None:
    _, blobs = stored
    big = blobs[-1]
    with _daemon(stored, "d4") as d, grpc.insecure_channel("unix:" + d.listen) as channel:
        read = channel.unary_stream(BLOB_BATCH_READ)
        request = batch_pb.ReadBlobsRequest(digests=[b3(big), b3(blobs[0]), b3(big)])  # no hints
        messages = [batch_pb.ReadBlobsResponse.FromString(raw)
                    for raw in read(request.SerializeToString(), timeout=10)]
    assert len(messages) >= 3  # 3 MB in messages of about 1 MiB
    parts: dict[int, bytes] = {0: b"", 1: b"", 2: b""}
    for message in messages:
        for piece in message.pieces:
            parts[piece.index] += piece.data
    assert parts == {0: big, 1: blobs[0], 2: big}


# -- servers that misbehave ------------------------------------------------------------------


def _answer(index: int, data: bytes) -> bytes:
    message = batch_pb.ReadBlobsResponse()
    message.pieces.add(index=index, data=data, last=True)
    return message.SerializeToString()


class Batches:
    """A fake server with the batch service; ``misbehave(i, data)`` decides what goes out for blob i."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.contents = {b3(data): data for data in blobs}
        self.misbehave: Callable[[int, bytes, grpc.ServicerContext], Iterator[bytes]] | None = None

    def batch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        req = batch_pb.ReadBlobsRequest.FromString(request)
        for index, digest in enumerate(req.digests):
            data = self.contents[digest]
            if self.misbehave is not None:
                yield from self.misbehave(index, data, context)
            else:
                yield _answer(index, data)

    def read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield blob_pb.BlobChunk(data=self.contents[blob_pb.ReadBlobRequest.FromString(request).digest])\
            .SerializeToString()

    def server(self) -> FakeServer:
        return FakeServer({BLOB_BATCH_READ: self.batch, BLOB_READ: self.read})


BLOBS = _blobs(5, seed=30)
WANTED: Wanted = [(b3(data), len(data)) for data in BLOBS]


def _read(batches: Batches) -> tuple[list[bytes | TvixError], float, FakeServer]:
    with batches.server() as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        started = time.monotonic()
        got = service.read_many(WANTED)
        took = time.monotonic() - started
        service.close()
    return got, took, server


def _only_blob_2(make: Callable[[int, bytes, grpc.ServicerContext], Iterator[bytes]]) -> Batches:
    def misbehave(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if index == 2:
            yield from make(index, data, context)
        else:
            yield _answer(index, data)

    batches = Batches(BLOBS)
    batches.misbehave = misbehave
    return batches


def test_fake_server_behaving_gives_every_blob() -> None:
    got, _, server = _read(Batches(BLOBS))
    assert got == BLOBS and server.calls == {BLOB_BATCH_READ: 1}


def _wrong(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield _answer(index, data[:-1] + bytes([data[-1] ^ 1]))


def _missing(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    message = batch_pb.ReadBlobsResponse()
    message.pieces.add(index=index, error=batch_pb.BlobError(code=grpc.StatusCode.NOT_FOUND.value[0],
                                                              message="no such blob"))
    yield message.SerializeToString()


def _too_long(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    message = batch_pb.ReadBlobsResponse()
    message.pieces.add(index=index, data=data)
    message.pieces.add(index=index, data=b"more", last=True)
    yield message.SerializeToString()


@pytest.mark.parametrize("make, error, words", [
    (_wrong, IntegrityError, "hashes to"),
    (_missing, NotFound, "no such blob"),
    (_too_long, IntegrityError, "more than the"),
])
def test_a_bad_answer_fails_its_blob_only(make: Callable, error: type[TvixError], words: str) -> None:
    got, _, _ = _read(_only_blob_2(make))
    assert isinstance(got[2], error) and words in str(got[2]) and b3_text(WANTED[2][0]) in str(got[2])
    assert [g for i, g in enumerate(got) if i != 2] == [d for i, d in enumerate(BLOBS) if i != 2]


def test_a_stream_that_ends_early_fails_the_blobs_not_answered() -> None:
    def misbehave(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if index < 2:
            yield _answer(index, data)

    batches = Batches(BLOBS)
    batches.misbehave = misbehave
    got, _, _ = _read(batches)
    assert got[:2] == BLOBS[:2]
    for answer, (digest, _) in zip(got[2:], WANTED[2:], strict=True):
        assert isinstance(answer, InvalidData) and b3_text(digest) in str(answer)
        assert "ended after 2 of 5" in str(answer)


def test_pieces_out_of_order_fail_the_rest() -> None:
    got, _, _ = _read(_only_blob_2(lambda index, data, context: iter([_answer(3, data)])))
    assert got[:2] == BLOBS[:2]
    assert all(isinstance(g, InvalidData) for g in got[2:]) and "blob 3 where blob 2" in str(got[2])


def test_a_stream_broken_off_fails_the_rest_as_unavailable() -> None:
    def abort(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield b""

    got, _, _ = _read(_only_blob_2(abort))
    assert got[:2] == BLOBS[:2]
    assert all(isinstance(g, Unavailable) and "going away" in str(g) for g in got[2:])


def test_a_stalled_stream_is_cancelled_within_the_gap() -> None:
    release = threading.Event()

    def stall(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        release.wait(30)
        yield _answer(index, data)

    try:
        got, took, _ = _read(_only_blob_2(stall))
    finally:
        release.set()
    assert got[:2] == BLOBS[:2]
    assert all(isinstance(g, Timeout) for g in got[2:]), got[2:]
    assert FAST.stream_gap <= took < FAST.stream_gap + 3


def test_a_server_dying_mid_batch_fails_the_rest_and_nothing_hangs() -> None:
    batches = Batches(BLOBS)
    holder: dict[str, FakeServer] = {}

    def die(index: int, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if index < 2:
            yield _answer(index, data)
            return
        holder["server"].server.stop(0)  # the whole server goes, mid-call
        time.sleep(5)
        yield _answer(index, data)

    batches.misbehave = die
    server = holder["server"] = batches.server()
    try:
        service = grpc_client.open_blob_service(server.url, FAST)
        started = time.monotonic()
        got = service.read_many(WANTED)
        took = time.monotonic() - started
        service.close()
    finally:
        server.close()
    assert took < FAST.stream_gap + 3
    assert got[:2] == BLOBS[:2]
    assert all(isinstance(g, Unavailable) for g in got[2:]), got[2:]
    assert re.search("ended after 2 of 5", str(got[2]))


def test_a_server_without_the_service_is_asked_once_per_channel() -> None:
    """As a tvix-store answers: UNIMPLEMENTED (counted here, which grpc's own answer would not be)."""
    batches = Batches(BLOBS)

    def unimplemented(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield b""

    with FakeServer({BLOB_BATCH_READ: unimplemented, BLOB_READ: batches.read}) as server:
        service = grpc_client.open_blob_service(server.url, FAST)
        assert service.read_many(WANTED) == BLOBS
        assert service.read_many(WANTED) == BLOBS
        service.close()
        assert server.calls == {BLOB_BATCH_READ: 1, BLOB_READ: 10}
        other = grpc_client.open_blob_service(server.url, FAST)  # a new channel asks again
        assert other.read_many(WANTED[:2]) == BLOBS[:2]
        other.close()
        assert server.calls == {BLOB_BATCH_READ: 2, BLOB_READ: 12}
