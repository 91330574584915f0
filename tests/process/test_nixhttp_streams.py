"""Decompression, the download/NAR checks and NAR ingestion, on their own.

The compressed inputs come from the stdlib and zstandard compressors (the
real-Nix caches are in test_nixhttp_substitute.py); what is checked here is
the behaviour at the edges: every codec round-trips, one read never
returns more than asked, a cut or trailing garbage is refused, the checks
stop a stream that runs past its announced size, and a NAR of one huge
file goes through with flat memory (in a child process, so the peak RSS
is the pipeline's own).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.castore_fixtures import Exe, Link
from tests.castore_fixtures import Store as SpecStore
from tvixmount.castore import nar
from tvixmount.castore.directory import SizeConvention
from tvixmount.errors import IntegrityError, InvalidData, Unavailable
from tvixmount.store import BlobWriter, StoreUrls, open_store
from tvixmount.store.memory import MemoryBlobService, MemoryDirectoryService
from tvixmount.store.naringest import ingest_nar
from tvixmount.store.nixhttp.checks import FileCheck, NarCheck
from tvixmount.store.nixhttp.decompress import decompressing

DATA = os.urandom(200_000) + bytes(3_000_000) + b"pattern " * 50_000
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda d: d,
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "gzip": gzip.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
}


class Source:
    """A byte source that answers each read with a random-sized part, and records what was asked."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)
        self.largest_ask = 0

    def read(self, n: int) -> bytes:
        self.largest_ask = max(self.largest_ask, n)
        return self._stream.read(max(1, n // 3) if n > 1 else n)


def drain(reader, piece: int = 65536) -> bytes:  # type: ignore[no-untyped-def]
    out = bytearray()
    while data := reader.read(piece):
        assert len(data) <= piece
        out += data
    return bytes(out)


@pytest.mark.parametrize("name", list(COMPRESS))
def test_round_trip_and_concatenated_streams(name: str) -> None:
    packed = COMPRESS[name](DATA)
    assert drain(decompressing(name, Source(packed))) == DATA
    assert drain(decompressing(name, Source(packed + packed))) == DATA + DATA


@pytest.mark.parametrize("name", ["xz", "bzip2", "gzip"])
@pytest.mark.parametrize("damage", ["cut", "garbage", "empty"])
def test_damaged_input_is_invalid(name: str, damage: str) -> None:
    packed = COMPRESS[name](DATA)
    broken = {"cut": packed[: len(packed) // 2], "garbage": packed + b"not a stream", "empty": b""}[damage]
    with pytest.raises(InvalidData, match=name):
        drain(decompressing(name, Source(broken)))


def test_zstd_garbage_is_invalid_and_a_cut_is_short() -> None:
    packed = COMPRESS["zstd"](DATA)
    with pytest.raises(InvalidData, match="zstd data does not decompress"):
        drain(decompressing("zstd", Source(packed + b"garbage")))
    assert len(drain(decompressing("zstd", Source(packed[:-3])))) < len(DATA)  # NarCheck says the rest


def test_unknown_compression_is_named() -> None:
    with pytest.raises(InvalidData, match=r"compression 'br' is not supported \(only none, xz, bzip2"):
        decompressing("br", Source(b""))


@pytest.mark.parametrize("name", list(COMPRESS))
def test_a_bomb_is_read_in_bounded_pieces(name: str) -> None:
    """64 MiB of zeros: each read returns at most what was asked, input is pulled a chunk at a time."""
    zeros = bytes(64 << 20)
    source = Source(COMPRESS[name](zeros))
    reader = decompressing(name, source)
    total = 0
    while data := reader.read(1 << 16):
        assert len(data) <= 1 << 16
        total += len(data)
    assert total == len(zeros)
    assert source.largest_ask <= 1 << 20


# -- the checks ------------------------------------------------------------------------


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def checked(nar_bytes: bytes, served: bytes | None = None, *, nar_size: int | None = None,
            nar_sha: bytes | None = None, file_size: int | None = None,
            file_sha: bytes | None = None) -> tuple[FileCheck, NarCheck, io.BufferedReader]:
    body = nar_bytes if served is None else served
    download = FileCheck(Source(body), file_size, file_sha, "p")
    check = NarCheck(decompressing("none", download), nar_size if nar_size is not None else len(nar_bytes),
                     nar_sha or sha(nar_bytes), "p")
    return download, check, io.BufferedReader(check, 1 << 16)


def test_checks_pass_exact_bytes() -> None:
    download, check, reader = checked(DATA, file_size=len(DATA), file_sha=sha(DATA))
    assert drain(reader) == DATA
    check.finish()
    download.finish()


def test_nar_longer_than_nar_size_stops_one_byte_past_it() -> None:
    download, _, reader = checked(DATA, DATA + b"more" * 100_000)
    with pytest.raises(InvalidData, match="the NAR is longer than its NarSize"):
        drain(reader)
    assert download.count <= len(DATA) + (1 << 16) + 1  # pulled what the reads asked, not the rest


def test_nar_shorter_than_nar_size() -> None:
    _, check, reader = checked(DATA, DATA[:-10])
    drain(reader)
    short = f"the NAR ends after {len(DATA) - 10} bytes, NarSize says {len(DATA)}"
    with pytest.raises(InvalidData, match=short):
        check.finish()


def test_nar_hash_mismatch_is_an_integrity_error() -> None:
    _, check, reader = checked(DATA, nar_sha=sha(b"other"))
    drain(reader)
    with pytest.raises(IntegrityError, match="NarHash says"):
        check.finish()


def test_download_longer_than_file_size_is_refused_as_it_shows() -> None:
    download = FileCheck(Source(DATA), 1000, None, "p")
    with pytest.raises(InvalidData, match="longer than its FileSize 1000"):
        drain(download)
    assert download.count == 1001


def test_file_hash_and_size_mismatches() -> None:
    download = FileCheck(Source(DATA), None, sha(b"x"), "p")
    drain(download)
    with pytest.raises(IntegrityError, match="FileHash says"):
        download.finish()
    download = FileCheck(Source(DATA), len(DATA) + 1, None, "p")
    drain(download)
    with pytest.raises(InvalidData, match=f"is {len(DATA)} bytes, FileSize says {len(DATA) + 1}"):
        download.finish()


# -- ingestion -------------------------------------------------------------------------


TREE = {
    b"a": b"small",
    b"big": Exe(os.urandom((1 << 20) * 2 + 5)),
    b"dup": b"small",
    b"empty": b"",
    b"d": {b"e": {}, b"l": Link(b"../a")},
}


@pytest.mark.parametrize("url", ["memory://", "local"])
def test_ingest_stores_the_tree_the_nar_describes(url: str, tmp_path: Path) -> None:
    spec = SpecStore(convention=SizeConvention.DOUBLED, piece=1 << 20)
    root = spec.build(TREE)
    nar_bytes = b"".join(nar.nar_chunks(root, spec.get_directory, spec.read_blob))
    store_url = url if url == "memory://" else f"local://{tmp_path}/s?create=1"
    with open_store(StoreUrls.single(store_url)) as store:
        tree = ingest_nar(io.BufferedReader(io.BytesIO(nar_bytes)), store.blobs, store.directories)
        assert tree.root == root
        assert (tree.files, tree.symlinks, tree.directories) == (4, 1, 3)

        def read_blob(digest: bytes, size: int):  # type: ignore[no-untyped-def]
            with store.blobs.open_read(digest) as reader:
                yield reader.pread(0, size)

        def get_directory(digest: bytes):  # type: ignore[no-untyped-def]
            found = store.directories.get(digest)
            assert found is not None
            return found

        assert b"".join(nar.nar_chunks(tree.root, get_directory, read_blob)) == nar_bytes


def test_ingest_refuses_a_malformed_nar_and_stores_no_directory(tmp_path: Path) -> None:
    spec = SpecStore(convention=SizeConvention.DOUBLED, piece=1 << 20)
    nar_bytes = b"".join(nar.nar_chunks(spec.build(TREE), spec.get_directory, spec.read_blob))
    with open_store(StoreUrls.single(f"local://{tmp_path}/s?create=1")) as store:
        with pytest.raises(InvalidData, match="NAR at byte"):
            ingest_nar(io.BufferedReader(io.BytesIO(nar_bytes[:-16])), store.blobs, store.directories)
        assert list(store.directories.iter_digests()) == []


class FailingBlobs(MemoryBlobService):
    """The memory blob service, except that the ``fail_at``-th commit is Unavailable."""

    def __init__(self, fail_at: int) -> None:
        self.commits = 0
        self.fail_at = fail_at

    def open_write(self, expected_digest: bytes | None = None) -> BlobWriter:
        writer = super().open_write(expected_digest)
        service = self

        class Writer(BlobWriter):
            def write(self, data: bytes) -> None:
                writer.write(data)

            def commit(self) -> bytes:
                service.commits += 1
                if service.commits == service.fail_at:
                    raise Unavailable("disk went away")
                return writer.commit()

            def abort(self) -> None:
                writer.abort()

        return Writer()


@pytest.mark.parametrize("threads", [0, 2])
def test_a_failed_blob_store_fails_the_ingest(threads: int) -> None:
    spec = SpecStore(convention=SizeConvention.DOUBLED, piece=1 << 20)
    tree = {f"f{i}".encode(): f"contents {i}".encode() for i in range(50)}
    nar_bytes = b"".join(nar.nar_chunks(spec.build(tree), spec.get_directory, spec.read_blob))
    directories = MemoryDirectoryService()
    blobs = FailingBlobs(fail_at=10)
    with pytest.raises(Unavailable, match="disk went away"):
        ingest_nar(io.BufferedReader(io.BytesIO(nar_bytes)), blobs, directories, threads=threads)
    assert blobs.commits >= 10


BOUNDED = textwrap.dedent("""
    import hashlib, io, resource, sys, zstandard
    from tvixmount.store import StoreUrls, open_store
    from tvixmount.store.nixhttp.checks import FileCheck, NarCheck
    from tvixmount.store.nixhttp.decompress import decompressing
    from tvixmount.store.naringest import ingest_nar

    def s(b):
        return len(b).to_bytes(8, "little") + b + bytes(-len(b) % 8)

    size = int(sys.argv[2])
    head = s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
    head += size.to_bytes(8, "little")
    tail = s(b")")
    sha = hashlib.sha256(head)
    zero = bytes(1 << 20)
    for _ in range(size >> 20):
        sha.update(zero)
    sha.update(tail)
    packed = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(packed, closefd=False) as w:
        w.write(head)
        for _ in range(size >> 20):
            w.write(zero)
        w.write(tail)
    packed.seek(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open_store(StoreUrls.single(f"local://{sys.argv[1]}?create=1")) as store:
        download = FileCheck(packed, None, None, "big")
        check = NarCheck(decompressing("zstd", download), len(head) + size + len(tail), sha.digest(), "big")
        tree = ingest_nar(io.BufferedReader(check, 1 << 20), store.blobs, store.directories)
        check.finish()
        download.finish()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(tree.file_bytes, grown)
""")


def test_a_big_nar_goes_through_with_flat_memory(tmp_path: Path) -> None:
    size = 256 << 20
    result = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path / "s"), str(size)],
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 0, result.stderr
    stored, grown_kib = map(int, result.stdout.split())
    assert stored == size
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib} KiB while ingesting {size >> 20} MiB"
