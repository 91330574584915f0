"""The daemon as an operator runs it: ``python -m tvixmount.server`` in a subprocess.

Start-up lines, loopback default, health, stop signals, read-only mode,
validation of everything it is sent (checked with raw calls that bypass
our client's own checks), status codes of docs/protocol.md, 'Status codes', chunk reads,
large messages, and a client that outlives a daemon restart.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest

from tests.grpc_daemon import Daemon, free_port, scratch_dir
from tests.store_suite import DIR_A, DIR_B, DIR_COMPLICATED, DIR_WITH_KEEP, make_info, pattern, store_path
from tvixmount.castore.directory import Directory, SizeConvention
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode, b3_text
from tvixmount.castore.pathinfo import NarInfo, PathInfo, Signature
from tvixmount.castore.wire import encode_pathinfo, node_to_proto
from tvixmount.errors import InvalidArgument, InvalidData, ReadOnly, Unavailable
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.proto import rpc_directory_pb2 as dir_pb
from tvixmount.proto import rpc_pathinfo_pb2 as pi_pb
from tvixmount.server import health, parse_listen
from tvixmount.store import Store, StoreUrls, open_store
from tvixmount.store.grpc import client as grpc_client
from tvixmount.store.grpc.channel import ClientConfig

FAST = ClientConfig(unary_timeout=5.0, stream_gap=5.0, connect_timeout=2.0)
_ABORTS = 30  # aborted uploads in the abort test: enough to show a race that bites 1 in 10


@pytest.fixture
def root() -> Iterator[Path]:
    path = scratch_dir("tvx-daemon-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(root: Path) -> Iterator[Daemon]:
    d = Daemon(root).start()
    yield d
    assert d.stop() == 0, d.log()
    assert d.problems() == []


def client(d: Daemon) -> Store:
    return client_at(d.url)


def channel(d: Daemon) -> grpc.Channel:
    return grpc.insecure_channel(d.listen if not d.listen.startswith("/") else "unix:" + d.listen)


def raw_status(call, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status a raw call ends with (OK when it succeeds; streams are drained)."""
    try:
        result = call(*args, timeout=5)
        if not isinstance(result, bytes):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def method(ch: grpc.Channel, kind: str, path: str):  # type: ignore[no-untyped-def]
    return getattr(ch, kind)(path, request_serializer=None, response_deserializer=None)


# -- lifecycle ---------------------------------------------------------------------------------


def test_starts_on_loopback_serves_health_and_stops_cleanly_on_sigterm(root: Path) -> None:
    d = Daemon(root, tcp=True).start()
    with channel(d) as ch:
        assert health.check(ch) == health.SERVING
        assert health.check(ch, "tvix.castore.v1.BlobService") == health.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.check(ch, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    log = d.log()
    where = rf"on 127\.0\.0\.1:{d.port} \(loopback only\)"
    assert re.search(rf"serving store local://\S+ \(read-write\) {where}", log)
    assert "got SIGTERM" in log and "stopped; served" in log
    assert "WARNING" not in log


def test_sigint_while_a_client_is_connected_exits_zero(daemon: Daemon) -> None:
    store = client(daemon)
    digest = store.blobs.put(b"hello")
    assert store.blobs.stat(digest) is not None
    assert daemon.stop(signal.SIGINT) == 0
    store.close()


def test_binding_beyond_loopback_warns_unauthenticated(root: Path) -> None:
    port = free_port()
    d = Daemon(root, "--listen-address", f"0.0.0.0:{port}", tcp=True, port=port).start()
    assert d.stop() == 0
    assert re.search(r"WARNING tvixmount.server\[\d+\]: listening on 0\.0\.0\.0:\d+, which is not loopback: "
                     r"the store is served UNAUTHENTICATED", d.log())


def test_bad_listen_address_is_a_usage_error(root: Path) -> None:
    d = Daemon(root, "--listen-address", "::1:8000")  # the later flag wins
    d.launch()
    assert d.proc is not None and d.proc.wait(20) == 2
    assert "write IPv6 addresses in brackets" in d.log()


def test_port_in_use_fails_clearly(root: Path) -> None:
    first = Daemon(root / "one", tcp=True).start()
    second = Daemon(root / "two", tcp=True, port=first.port)
    second.launch()
    assert second.proc is not None and second.proc.wait(20) == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.log()
    assert first.stop() == 0


@pytest.mark.parametrize(
    ("text", "target", "loopback"),
    [
        ("127.0.0.1:8000", "127.0.0.1:8000", True),
        ("[::1]:9", "[::1]:9", True),
        ("localhost:1", "localhost:1", True),
        ("0.0.0.0:8000", "0.0.0.0:8000", False),
        ("[::]:8000", "[::]:8000", False),
        ("store.example:8000", "store.example:8000", False),
        ("/run/tvix.sock", "unix:/run/tvix.sock", True),
        ("unix:///run/tvix.sock", "unix:/run/tvix.sock", True),
        ("@tvix", "unix-abstract:tvix", True),
    ],
)
def test_parse_listen(text: str, target: str, loopback: bool) -> None:
    address = parse_listen(text)
    assert address.target == target
    assert address.is_loopback() is loopback


@pytest.mark.parametrize("text", ["", "8000", ":8000", "::1:8000", "[::1]8000", "host:99999", "host:x",
                                  "unix:relative", "@"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_listen(text)


# -- writes are validated ----------------------------------------------------------------------


def test_invalid_directory_put_is_invalid_argument_and_stores_nothing(daemon: Daemon) -> None:
    unsorted = Directory(files=(FileNode(b"b", DIR_A.digest(), 0), FileNode(b"a", DIR_A.digest(), 0)))
    with channel(daemon) as ch:
        put = method(ch, "stream_unary", "/tvix.castore.v1.DirectoryService/Put")
        # Valid leaves first, then a broken one: nothing of the stream may be stored.
        assert raw_status(put, iter([DIR_WITH_KEEP.encode(), unsorted.encode()])) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert raw_status(put, iter([b"\xff\xff"])) == grpc.StatusCode.INVALID_ARGUMENT
        assert raw_status(put, iter([DIR_COMPLICATED.encode()])) == grpc.StatusCode.INVALID_ARGUMENT  # open
        with pytest.raises(grpc.RpcError) as info:
            put(iter([]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "got no directories" in info.value.details()  # type: ignore[attr-defined]
        assert raw_status(put, iter([DIR_WITH_KEEP.encode(), DIR_COMPLICATED.encode()])) == grpc.StatusCode.OK
    with open_store(StoreUrls.embedded(daemon.store_dir)) as backing:
        assert sorted(backing.directories.iter_digests()) == sorted([DIR_WITH_KEEP.digest(),
                                                                    DIR_COMPLICATED.digest()])


def test_invalid_path_info_put_is_invalid_argument(daemon: Daemon) -> None:
    good = make_info(SymlinkNode(b"", b"/t"), store_path(1))
    not_a_store_path = PathInfo(node=SymlinkNode(b"nope", b"/t"), narinfo=good.narinfo)
    without_narinfo = PathInfo(node=good.node)
    short_signature = PathInfo(node=good.node,
                               narinfo=NarInfo(1, bytes(32), signatures=(Signature("k", b"s"),)))
    with channel(daemon) as ch:
        put = method(ch, "unary_unary", "/tvix.store.v1.PathInfoService/Put")
        for info in (not_a_store_path, without_narinfo, short_signature):
            with pytest.raises(grpc.RpcError) as exc:
                put(encode_pathinfo(info), timeout=5)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert "invalid path info" in exc.value.details()  # type: ignore[attr-defined]
        assert raw_status(put, b"\x0a\xff") == grpc.StatusCode.INVALID_ARGUMENT
        assert raw_status(put, encode_pathinfo(good)) == grpc.StatusCode.OK
    store = client(daemon)
    assert [i.node.name for i in store.path_infos.list()] == [good.node.name]
    store.close()


def test_read_only_refuses_every_put(root: Path) -> None:
    with open_store(StoreUrls.embedded(root / "store", create=True)) as seed:
        digest = seed.blobs.put(b"already there")
        seed.directories.put(DIR_WITH_KEEP)
    d = Daemon(root, "--read-only").start()
    store = client(d)
    try:
        with store.blobs.open_read(digest) as reader:
            assert reader.pread(0, 100) == b"already there"
        assert store.directories.get(DIR_WITH_KEEP.digest()) == DIR_WITH_KEEP
        with pytest.raises(ReadOnly, match="read-only"):
            store.blobs.put(b"new")
        with pytest.raises(ReadOnly):
            store.blobs.put(pattern(3 * 1024 * 1024))  # refused mid-stream, too
        with pytest.raises(ReadOnly):
            store.directories.put(DIR_A)
        with pytest.raises(ReadOnly):
            store.path_infos.put(make_info(SymlinkNode(b"", b"/t"), store_path(2)))
    finally:
        store.close()
        assert d.stop() == 0
    assert "(read-only)" in d.log()


def test_check_dir_sizes(root: Path) -> None:
    d = Daemon(root, "--check-dir-sizes", "doubled").start()
    store = client(d)
    try:
        documented = Directory(directories=(DirectoryNode(b"keep", DIR_WITH_KEEP.digest(), 1),))
        with pytest.raises(InvalidData, match=r"'keep' has wrong size, specified 1, recorded 2"):
            store.directories.put_many([DIR_WITH_KEEP, documented])
        doubled = Directory(directories=(
            DirectoryNode(b"keep", DIR_WITH_KEEP.digest(), DIR_WITH_KEEP.size(SizeConvention.DOUBLED)),))
        assert store.directories.put_many([DIR_WITH_KEEP, doubled]) == doubled.digest()
    finally:
        store.close()
        assert d.stop() == 0


def test_aborted_blob_upload_stores_nothing(daemon: Daemon) -> None:
    # A server learns of a cancel only after the request stream has ended as if
    # the upload were complete, so an abort that merely cancels stores the
    # prefix now and then; many aborts make that show.
    store = client(daemon)
    for extra in range(_ABORTS):
        data = pattern(3 * 1024 * 1024 + 5 + extra)
        writer = store.blobs.open_write()
        writer.write(data)  # three messages sent already
        writer.abort()
        assert store.blobs.stat(blake3.blake3(data).digest()) is None
    data = pattern(3 * 1024 * 1024 + 5)
    assert store.blobs.put(data) == blake3.blake3(data).digest()  # the service still works
    store.close()
    with open_store(StoreUrls.embedded(daemon.store_dir)) as backing:
        assert list(backing.blobs.iter_digests()) == [blake3.blake3(data).digest()]


# -- status codes (docs/protocol.md, 'Status codes') -----------------------------------------------


def test_status_codes(daemon: Daemon) -> None:
    store = client(daemon)
    store.blobs.put(b"Hello World!")
    store.close()
    digest = blake3.blake3(b"Hello World!").digest()
    absent = blake3.blake3(b"absent").digest()
    with channel(daemon) as ch:
        stat = method(ch, "unary_unary", "/tvix.castore.v1.BlobService/Stat")
        read = method(ch, "unary_stream", "/tvix.castore.v1.BlobService/Read")
        get_dir = method(ch, "unary_stream", "/tvix.castore.v1.DirectoryService/Get")
        get_info = method(ch, "unary_unary", "/tvix.store.v1.PathInfoService/Get")
        calc = method(ch, "unary_unary", "/tvix.store.v1.PathInfoService/CalculateNAR")
        codes = grpc.StatusCode
        assert raw_status(stat, blob_pb.StatBlobRequest(digest=absent).SerializeToString()) == codes.NOT_FOUND
        assert raw_status(stat, blob_pb.StatBlobRequest(digest=b"short").SerializeToString()) == \
            codes.INVALID_ARGUMENT
        assert raw_status(read, blob_pb.ReadBlobRequest(digest=absent).SerializeToString()) == codes.NOT_FOUND
        assert raw_status(read, blob_pb.ReadBlobRequest(digest=b"").SerializeToString()) == \
            codes.INVALID_ARGUMENT
        assert raw_status(get_dir, dir_pb.GetDirectoryRequest().SerializeToString()) == codes.INVALID_ARGUMENT
        assert raw_status(get_dir, dir_pb.GetDirectoryRequest(digest=absent).SerializeToString()) == \
            codes.NOT_FOUND
        recursive_absent = dir_pb.GetDirectoryRequest(digest=absent, recursive=True).SerializeToString()
        assert list(get_dir(recursive_absent, timeout=5)) == []  # OK, no message
        assert raw_status(get_info, pi_pb.GetPathInfoRequest().SerializeToString()) == codes.UNIMPLEMENTED
        assert raw_status(get_info, pi_pb.GetPathInfoRequest(by_output_hash=b"x" * 32).SerializeToString()) \
            == codes.INVALID_ARGUMENT
        assert raw_status(get_info, pi_pb.GetPathInfoRequest(by_output_hash=bytes(20)).SerializeToString()) \
            == codes.NOT_FOUND
        named = node_to_proto(FileNode(b"name", digest, 12)).SerializeToString()
        assert raw_status(calc, named) == codes.INVALID_ARGUMENT
        missing = node_to_proto(FileNode(b"", absent, 3)).SerializeToString()
        assert raw_status(calc, missing) == codes.DATA_LOSS
        good = pi_pb.CalculateNARResponse.FromString(calc(node_to_proto(FileNode(b"", digest, 12))
                                                          .SerializeToString(), timeout=5))
        assert (good.nar_size, good.nar_sha256.hex()[:8]) == (128, "03e7f63b")


# -- reads ----------------------------------------------------------------------------------------


def test_chunked_blob_is_read_by_chunks(daemon: Daemon) -> None:
    store = client(daemon)
    data = pattern(5 * 256 * 1024 + 3)
    digest = store.blobs.put(data)
    stat = store.blobs.stat(digest)
    assert stat is not None and len(stat.chunks) == 6  # the embedded store's 256 KiB segments
    with store.blobs.open_read(digest) as reader:
        assert reader.pread(600_000, 10) == data[600_000:600_010]
        assert reader.pread(0, len(data) + 1) == data
    small = store.blobs.put(b"small")
    assert store.blobs.stat(small) is not None and store.blobs.stat(small).size == 5  # type: ignore[union-attr]
    store.close()


def test_large_directory_message(daemon: Daemon) -> None:
    # Long symlink targets make a big message out of few entries (cheap to validate).
    big = Directory(symlinks=tuple(SymlinkNode(b"%05d" % i, b"/%04d" % i + b"t" * 4000) for i in range(1100)))
    assert len(big.encode()) > 4 * 1024 * 1024  # over tonic's and grpc's default limit
    store = client(daemon)
    assert store.directories.put(big) == big.digest()
    assert store.directories.get(big.digest()) == big
    store.close()


def test_added_latency(root: Path) -> None:
    d = Daemon(root, "--added-latency", "0.3").start()
    store = client(d)
    try:
        started = time.monotonic()
        assert store.directories.get(DIR_B.digest()) is None
        assert time.monotonic() - started >= 0.3
    finally:
        store.close()
        assert d.stop() == 0


def test_same_client_works_after_a_daemon_restart(root: Path) -> None:
    first = Daemon(root).start()
    store = client(first)
    data = pattern(3 * 256 * 1024)
    digest = store.blobs.put(data)
    reader = store.blobs.open_read(digest)
    assert reader.pread(0, 10) == data[:10]  # chunk 0 fetched while the first daemon ran
    assert first.stop() == 0
    with pytest.raises(Unavailable):
        store.blobs.stat(digest)
    second = Daemon(root).start()  # same socket path, same store
    try:
        deadline = time.monotonic() + 10
        while True:  # grpc reconnects on its own; allow for its back-off
            try:
                assert store.blobs.stat(digest) is not None
                break
            except Unavailable:
                assert time.monotonic() < deadline, "client did not reconnect"
                time.sleep(0.1)
        # The new daemon has not seen a Stat of this blob's chunks from the
        # old reader: it falls back to the whole blob and still serves it right.
        assert reader.pread(300_000, 400_000) == data[300_000:700_000]
        reader.close()
        assert b3_text(digest) and store.directories.put(DIR_A) == DIR_A.digest()
    finally:
        store.close()
        assert second.stop() == 0


def test_serve_in_process_in_front_of_another_daemon(daemon: Daemon) -> None:
    """serve() over any store: here a second server whose store is the first daemon."""
    from tvixmount.server import serve

    socket_path = daemon.root / "front.sock"
    front = serve(StoreUrls.single(daemon.url), listen=str(socket_path), max_workers=4)
    try:
        assert front.url == f"grpc+unix://{socket_path}"
        store = client_at(front.url)
        data = pattern(600_000, seed=9)
        digest = store.blobs.put(data)
        store.directories.put_many([DIR_WITH_KEEP, DIR_COMPLICATED])
        info = make_info(DirectoryNode(b"", DIR_COMPLICATED.digest(), 4), store_path(3))
        store.path_infos.put(info)
        with store.blobs.open_read(digest) as reader:
            assert reader.pread(0, len(data)) == data
        assert list(store.directories.get_recursive(DIR_COMPLICATED.digest())) == [DIR_COMPLICATED,
                                                                                   DIR_WITH_KEEP]
        assert list(store.path_infos.list()) == [info]
        store.close()
    finally:
        front.stop(1).wait()
    with open_store(StoreUrls.embedded(daemon.store_dir)) as backing:  # it all reached the first daemon
        assert backing.blobs.stat(digest) is not None
        assert backing.path_infos.get(store_path(3).digest) == info


def client_at(url: str) -> Store:
    return Store(grpc_client.open_blob_service(url, FAST), grpc_client.open_directory_service(url, FAST),
                 grpc_client.open_path_info_service(url, FAST))
