"""The store contract, as tests every backend must pass.

A backend's test module subclasses the ``*Tests`` classes below and
provides a ``harness`` fixture yielding a ``Harness``: an open Store plus
the few backend-specific hooks a test needs to damage stored data on
purpose. Nothing here knows which backend it is testing.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvixmount.castore import nixbase32
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, b3_text
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.storepath import StorePath
from tvixmount.errors import IntegrityError, InvalidArgument, InvalidData, NotFound
from tvixmount.store import Store

CHUNK = 256 * 1024  # the embedded store's segment size; sizes around it matter
BLOB_SIZES = {
    "empty": 0,
    "one-byte": 1,
    "small": 1000,
    "chunk-1": CHUNK - 1,
    "chunk": CHUNK,
    "chunk+1": CHUNK + 1,
    "two-chunks": 2 * CHUNK,
    "multi-chunk": 3 * CHUNK + 12345,
}


@dataclass
class Harness:
    """An open store and the hooks to damage what it holds."""

    store: Store
    corrupt_directory: Callable[[bytes, bytes], None]  # (digest, new row bytes)
    corrupt_path_info: Callable[[bytes, bytes], None]  # (store path digest, new row bytes)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every offset (so misplaced reads show)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def read_all(store: Store, digest: bytes, piece: int = 128 * 1024) -> bytes:
    with store.blobs.open_read(digest) as reader:
        parts = []
        offset = 0
        while True:
            data = reader.pread(offset, piece)
            if not data:
                return b"".join(parts)
            parts.append(data)
            offset += len(data)


# -- fixtures for directories and path infos -----------------------------------------

EMPTY_B3 = b3(b"")
DIR_A = Directory()
DIR_B = Directory(directories=(DirectoryNode(b"a", DIR_A.digest(), 0),))
# Shares DIR_A twice: once directly, once below DIR_B.
DIR_D = Directory(
    directories=(DirectoryNode(b"a", DIR_A.digest(), 0), DirectoryNode(b"b", DIR_B.digest(), 1))
)
DIR_WITH_KEEP = Directory(files=(FileNode(b".keep", EMPTY_B3, 0),))
DIR_COMPLICATED = Directory(
    directories=(DirectoryNode(b"keep", DIR_WITH_KEEP.digest(), 1),),
    files=(FileNode(b".keep", EMPTY_B3, 0),),
    symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
)


def store_path(seed: int, name: str = "test") -> StorePath:
    return StorePath(hashlib.sha256(b"sp%d" % seed).digest()[:20], name)


def make_info(node: Node, path: StorePath, references: tuple[StorePath, ...] = ()) -> PathInfo:
    """A valid PathInfo for ``node`` named ``path`` (placeholder NAR hash of the right shape)."""
    named: Node
    if isinstance(node, DirectoryNode):
        named = DirectoryNode(path.basename.encode(), node.digest, node.size)
    elif isinstance(node, FileNode):
        named = FileNode(path.basename.encode(), node.digest, node.size, node.executable)
    else:
        named = SymlinkNode(path.basename.encode(), node.target)
    return PathInfo(
        node=named,
        references=tuple(r.digest for r in references),
        narinfo=NarInfo(
            nar_size=120,
            nar_sha256=hashlib.sha256(path.basename.encode()).digest(),
            reference_names=tuple(r.basename for r in references),
        ),
    )


# -- blobs --------------------------------------------------------------------------


class BlobTests:
    @pytest.mark.parametrize("size", BLOB_SIZES.values(), ids=BLOB_SIZES.keys())
    def test_put_stat_read(self, harness: Harness, size: int) -> None:
        data = pattern(size)
        blobs = harness.store.blobs
        assert blobs.stat(b3(data)) is None
        digest = blobs.put(data)
        assert digest == b3(data)
        stat = blobs.stat(digest)
        assert stat is not None and stat.size == size
        if stat.chunks:  # a backend may report segments; if so they must add up
            assert sum(c.size for c in stat.chunks) == size
            offset = 0
            for chunk in stat.chunks:
                assert chunk.digest == b3(data[offset : offset + chunk.size])
                offset += chunk.size
        assert read_all(harness.store, digest) == data
        with blobs.open_read(digest) as reader:
            assert reader.size == size
            assert reader.pread(0, size + 10) == data
        assert digest in set(blobs.iter_digests())

    def test_golden_digests(self, harness: Harness) -> None:
        blobs = harness.store.blobs
        hello = blobs.put(b"Hello World!")
        assert hello.hex() == "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"
        blob_b = bytes(range(255)) * 4096
        assert blobs.put(blob_b).hex() == "a82c5154a7a0c262c6fdb929a317585646f8fbcf80326d0a7b8747edaf2d99d2"
        assert read_all(harness.store, b3(blob_b)) == blob_b

    def test_streamed_write_in_odd_pieces(self, harness: Harness) -> None:
        data = pattern(2 * CHUNK + 77, seed=3)
        with harness.store.blobs.open_write() as writer:
            for start in range(0, len(data), 100_003):
                writer.write(data[start : start + 100_003])
            digest = writer.commit()
        assert digest == b3(data)
        assert read_all(harness.store, digest, piece=65536) == data

    def test_pread_past_eof_is_empty(self, harness: Harness) -> None:
        data = pattern(CHUNK + 5)
        digest = harness.store.blobs.put(data)
        with harness.store.blobs.open_read(digest) as reader:
            assert reader.pread(len(data), 10) == b""
            assert reader.pread(len(data) + 1000, 10) == b""
            assert reader.pread(len(data) - 3, 10) == data[-3:]
            assert reader.pread(5, 0) == b""
            with pytest.raises(InvalidArgument):
                reader.pread(-1, 10)

    def test_absent_blob(self, harness: Harness) -> None:
        missing = b3(b"never stored")
        assert harness.store.blobs.stat(missing) is None
        with pytest.raises(NotFound, match=re.escape(b3_text(missing))):
            harness.store.blobs.open_read(missing)

    def test_bad_digest_length_is_invalid_argument(self, harness: Harness) -> None:
        with pytest.raises(InvalidArgument):
            harness.store.blobs.stat(b"short")
        with pytest.raises(InvalidArgument):
            harness.store.blobs.open_read(b"x" * 20)

    def test_idempotent_put(self, harness: Harness) -> None:
        data = pattern(CHUNK + 9, seed=7)
        first = harness.store.blobs.put(data)
        second = harness.store.blobs.put(data)
        assert first == second
        assert list(harness.store.blobs.iter_digests()).count(first) == 1

    def test_aborted_writer_leaves_nothing(self, harness: Harness) -> None:
        data = pattern(CHUNK + 1, seed=11)
        with pytest.raises(RuntimeError), harness.store.blobs.open_write() as writer:
            writer.write(data)
            raise RuntimeError("importer gave up")
        assert harness.store.blobs.stat(b3(data)) is None
        writer2 = harness.store.blobs.open_write()
        writer2.write(data)
        writer2.abort()
        writer2.abort()  # safe twice
        assert harness.store.blobs.stat(b3(data)) is None
        assert list(harness.store.blobs.iter_digests()) == []

    def test_expected_digest_mismatch_stores_nothing(self, harness: Harness) -> None:
        wrong = b3(b"something else")
        writer = harness.store.blobs.open_write(expected_digest=wrong)  # type: ignore[call-arg]
        writer.write(b"actual bytes")
        with pytest.raises(IntegrityError, match="hashes to"):
            writer.commit()
        assert harness.store.blobs.stat(b3(b"actual bytes")) is None
        assert list(harness.store.blobs.iter_digests()) == []

    def test_writer_is_single_use(self, harness: Harness) -> None:
        writer = harness.store.blobs.open_write()
        writer.write(b"x")
        writer.commit()
        with pytest.raises(InvalidArgument):
            writer.write(b"y")

    # Each backend's subclass runs this same method (differing executors): the
    # examples do not depend on the backend, so sharing them is harmless.
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(data=st.data())
    def test_random_access(self, harness: Harness, data: st.DataObject) -> None:
        blob = _random_access_blob()
        digest = harness.store.blobs.put(blob)  # idempotent after the first example
        with harness.store.blobs.open_read(digest) as reader:
            for _ in range(4):  # several reads per reader exercise its segment cache
                offset = data.draw(st.integers(0, len(blob) + 10), label="offset")
                length = data.draw(st.integers(0, 2 * CHUNK + 10), label="length")
                assert reader.pread(offset, length) == blob[offset : offset + length]

    def test_sequential_and_backwards_reads(self, harness: Harness) -> None:
        blob = _random_access_blob()
        digest = harness.store.blobs.put(blob)
        with harness.store.blobs.open_read(digest) as reader:
            step = 128 * 1024
            for offset in range(0, len(blob), step):
                assert reader.pread(offset, step) == blob[offset : offset + step]
            for offset in reversed(range(0, len(blob), 4096 * 7)):
                assert reader.pread(offset, 4096) == blob[offset : offset + 4096]

    def test_threads_share_one_service(self, harness: Harness) -> None:
        blobs = harness.store.blobs
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for i in range(5):
                    data = pattern(CHUNK // 2 + i * 1000, seed=seed * 100 + i)
                    digest = blobs.put(data)
                    assert read_all(harness.store, digest) == data
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(set(blobs.iter_digests())) == 20


_BLOB_CACHE: list[bytes] = []


def _random_access_blob() -> bytes:
    if not _BLOB_CACHE:
        _BLOB_CACHE.append(pattern(3 * CHUNK + 4097, seed=42))
    return _BLOB_CACHE[0]


# -- directories ------------------------------------------------------------------


class DirectoryTests:
    def test_put_get(self, harness: Harness) -> None:
        dirs = harness.store.directories
        digest = dirs.put(DIR_WITH_KEEP)
        assert digest.hex() == "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"
        assert dirs.get(digest) == DIR_WITH_KEEP
        assert dirs.get(b3(b"absent")) is None
        assert dirs.put(DIR_WITH_KEEP) == digest  # idempotent
        assert list(dirs.iter_digests()) == [digest]

    def test_empty_directory_digest(self, harness: Harness) -> None:
        assert harness.store.directories.put(DIR_A) == EMPTY_B3
        assert harness.store.directories.get(EMPTY_B3) == DIR_A

    def test_invalid_directory_rejected(self, harness: Harness) -> None:
        unsorted = Directory(files=(FileNode(b"b", EMPTY_B3, 0), FileNode(b"a", EMPTY_B3, 0)))
        with pytest.raises(InvalidData, match="sorting"):
            harness.store.directories.put(unsorted)
        clash = Directory(
            directories=(DirectoryNode(b"x", EMPTY_B3, 0),), files=(FileNode(b"x", EMPTY_B3, 0),)
        )
        with pytest.raises(InvalidData):
            harness.store.directories.put(clash)
        with pytest.raises(InvalidData, match="NUL"):
            harness.store.directories.put(Directory(symlinks=(SymlinkNode(b"l", b"a\0b"),)))
        assert list(harness.store.directories.iter_digests()) == []

    def test_bad_digest_length(self, harness: Harness) -> None:
        with pytest.raises(InvalidArgument):
            harness.store.directories.get(b"\0" * 31)

    def test_put_many_and_recursive_with_shared_subtrees(self, harness: Harness) -> None:
        dirs = harness.store.directories
        root = dirs.put_many([DIR_A, DIR_B, DIR_D])
        assert root == DIR_D.digest()
        got = list(dirs.get_recursive(DIR_D.digest()))
        assert got[0] == DIR_D
        assert sorted(d.digest() for d in got) == sorted({DIR_A.digest(), DIR_B.digest(), DIR_D.digest()})
        assert len(got) == 3  # DIR_A once although referenced twice
        # Every directory after the root is referenced by one sent before it.
        for index, directory in enumerate(got[1:], start=1):
            assert any(directory.digest() in {c.digest for c in p.directories} for p in got[:index])

    def test_recursive_absent_root_yields_nothing(self, harness: Harness) -> None:
        assert list(harness.store.directories.get_recursive(b3(b"nope"))) == []

    def test_recursive_missing_descendant(self, harness: Harness) -> None:
        dirs = harness.store.directories
        dirs.put(DIR_COMPLICATED)  # single put does not check the closure; its child is absent
        with pytest.raises(NotFound, match=re.escape(b3_text(DIR_WITH_KEEP.digest()))):
            list(dirs.get_recursive(DIR_COMPLICATED.digest()))

    def test_put_many_refuses_an_open_closure(self, harness: Harness) -> None:
        dirs = harness.store.directories
        with pytest.raises(InvalidData, match="leaves first"):
            dirs.put_many([DIR_D, DIR_B, DIR_A])  # root first
        assert list(dirs.iter_digests()) == []  # all or nothing
        dirs.put_many([DIR_WITH_KEEP])
        assert dirs.put_many([DIR_COMPLICATED]) == DIR_COMPLICATED.digest()  # child already stored

    def test_put_many_big_tree(self, harness: Harness) -> None:
        leaves = [Directory(files=(FileNode(b"f%d" % i, EMPTY_B3, 0),)) for i in range(600)]
        root = Directory.from_entries(
            [DirectoryNode(b"d%04d" % i, d.digest(), 1) for i, d in enumerate(leaves)]
        )
        assert harness.store.directories.put_many([*leaves, root]) == root.digest()
        got = list(harness.store.directories.get_recursive(root.digest()))
        assert len(got) == 601 and got[0] == root
        assert {d.digest() for d in got[1:]} == {d.digest() for d in leaves}

    def test_corrupted_row_is_invalid_data(self, harness: Harness) -> None:
        digest = harness.store.directories.put(DIR_COMPLICATED)
        harness.corrupt_directory(digest, DIR_WITH_KEEP.encode())  # valid, but another digest
        with pytest.raises(InvalidData, match=re.escape(b3_text(digest))):
            harness.store.directories.get(digest)
        harness.corrupt_directory(digest, b"\xff\xff\xff")  # not protobuf
        with pytest.raises(InvalidData, match=re.escape(b3_text(digest))):
            harness.store.directories.get(digest)


# -- path infos --------------------------------------------------------------------


class PathInfoTests:
    def test_put_get_list(self, harness: Harness) -> None:
        infos = harness.store.path_infos
        p1, p2 = store_path(1, "one"), store_path(2, "two")
        i1 = make_info(FileNode(b"", b3(b"x"), 1), p1)
        i2 = make_info(DirectoryNode(b"", DIR_A.digest(), 0), p2, references=(p1,))
        assert infos.put(i1) == i1
        infos.put(i2)
        assert infos.get(p1.digest) == i1
        assert infos.get(p2.digest) == i2
        assert infos.get(store_path(3).digest) is None
        listed = list(infos.list())
        assert sorted(listed, key=lambda i: i.node.name) == sorted([i1, i2], key=lambda i: i.node.name)

    def test_put_overwrites(self, harness: Harness) -> None:
        path = store_path(5)
        first = make_info(SymlinkNode(b"", b"/a"), path)
        second = make_info(SymlinkNode(b"", b"/b"), path)
        harness.store.path_infos.put(first)
        harness.store.path_infos.put(second)
        assert harness.store.path_infos.get(path.digest) == second
        assert len(list(harness.store.path_infos.list())) == 1

    def test_invalid_pathinfo_rejected(self, harness: Harness) -> None:
        infos = harness.store.path_infos
        path = store_path(6)
        good = make_info(FileNode(b"", b3(b"x"), 1), path)
        not_a_store_path = PathInfo(node=FileNode(b"hello", b3(b"x"), 1), narinfo=good.narinfo)
        with pytest.raises(InvalidData):
            infos.put(not_a_store_path)
        without_narinfo = PathInfo(node=good.node)
        with pytest.raises(InvalidData):
            infos.put(without_narinfo)
        assert good.narinfo is not None
        short_ref = PathInfo(
            node=good.node,
            references=(b"\0" * 19,),
            narinfo=NarInfo(good.narinfo.nar_size, good.narinfo.nar_sha256, reference_names=(path.basename,)),
        )
        with pytest.raises(InvalidData):
            infos.put(short_ref)
        assert list(infos.list()) == []

    def test_bad_digest_length(self, harness: Harness) -> None:
        with pytest.raises(InvalidArgument):
            harness.store.path_infos.get(b"\0" * 32)

    def test_corrupted_row_is_invalid_data(self, harness: Harness) -> None:
        path, other = store_path(7), store_path(8)
        harness.store.path_infos.put(make_info(SymlinkNode(b"", b"/t"), path))
        hash_part = nixbase32.encode(path.digest)
        harness.corrupt_path_info(path.digest, b"\x0a\xff")
        with pytest.raises(InvalidData, match=hash_part):
            harness.store.path_infos.get(path.digest)
        with pytest.raises(InvalidData, match=hash_part):
            list(harness.store.path_infos.list())
        # A well-formed info of another store path, stored under the wrong key.
        from tvixmount.castore.wire import encode_pathinfo

        harness.corrupt_path_info(path.digest, encode_pathinfo(make_info(SymlinkNode(b"", b"/t"), other)))
        with pytest.raises(InvalidData, match=hash_part):
            harness.store.path_infos.get(path.digest)

    def test_calculate_nar_golden(self, harness: Harness) -> None:
        store = harness.store
        hello = store.blobs.put(b"Hello World!")
        file_nar = store.path_infos.calculate_nar(FileNode(b"", hello, 12))
        hello_sha = "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"
        assert file_nar == (128, bytes.fromhex(hello_sha))
        store.blobs.put(b"")
        store.directories.put_many([DIR_WITH_KEEP, DIR_COMPLICATED])
        tree_nar = store.path_infos.calculate_nar(DirectoryNode(b"", DIR_COMPLICATED.digest(), 4))
        assert tree_nar is not None
        assert tree_nar[0] == 840
        assert tree_nar[1].hex() == "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a"

    def test_calculate_nar_missing_blob(self, harness: Harness) -> None:
        with pytest.raises(NotFound):
            harness.store.path_infos.calculate_nar(FileNode(b"", b3(b"absent"), 6))
