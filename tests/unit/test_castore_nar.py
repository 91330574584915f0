"""NAR encoder: the NAR test vectors (docs/protocol.md), the recursive-import store paths, nar_size.

Trees are castore trees held in dicts (castore_fixtures.Store); the same
trees are cross-checked against a real ``nix-store --dump`` when Nix works.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.castore_fixtures import Exe, Link, Store
from tvixmount.castore import nar, storepath
from tvixmount.castore.directory import Directory, SizeConvention
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.errors import InvalidData

EMPTY_B3 = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")

COMPLICATED = {b"keep": {b".keep": b""}, b".keep": b"", b"aa": Link(b"/nix/store/somewhereelse")}

NAR_VECTORS = [
    ("hello", b"Hello World!", 128, "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"),
    ("symlink", Link(b"/nix/store/somewhereelse"), 136,
     "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1"),
    ("complicated", COMPLICATED, 840, "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a"),
    ("one-byte", b"\x01", 120, "730850a811259dbf3a68dc2ee87a79aa6cae9f71375edf396f9d7a91fbe9134d"),
    ("empty-dir", {}, 96, "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a"),
    ("empty-file", b"", 112, "77ac62e2629d8e45f624589c0c8bf99e24b3a722349bf1e79bc186008534e246"),
    ("hello-exe", Exe(b"Hello World!"), 160,
     "3b63b97bae149b3e6650437b9077c3d75b130192145792ec94ea3af96a8c567a"),
]

A_DIR = {b"a_file": b""}
IMPORT_FIXTURES = {
    b"a_dir": A_DIR,
    b"a_file": b"",
    b"b_dir": {b"a_dir": {}},
    b"c_dir": {b"symlink_to_a_file": Link(b"../a_dir/a_file")},
    b"d_dir": {b"dangling_symlink": Link(b"a_dir/a_file")},
    b"symlink_to_a_dir": Link(b"a_dir"),
}
# (tree, name, NAR size, store path basename, first 4 bytes of the NAR sha256 or None)
IMPORT_VECTORS = [
    (A_DIR, "a_dir", 280, "8vbqaxapywkvv1hacdja3pi075r14d43-a_dir", "348a6c2b"),
    ({}, "a_dir", 96, "zphlqc93s2iq4xm393l06hzf8hp85r4z-a_dir", None),
    ({b"a_dir": {}}, "b_dir", 264, "8rjx64mm7173xp60rahv7cl3ixfkv3rf-b_dir", "967f886d"),
    ({}, "b_dir", 96, "xzsfzdgrxg93icaamjm8zq1jq6xvf2fz-b_dir", None),
    (IMPORT_FIXTURES[b"c_dir"], "c_dir", 312, "riigfmmzzrq65zqiffcjk5sbqr9c9h09-c_dir", "93955e10"),
    ({}, "c_dir", 96, "y5g1fz04vzjvf422q92qmv532axj5q26-c_dir", None),
    (IMPORT_FIXTURES[b"d_dir"], "d_dir", 304, "f2d1aixwiqy4lbzrd040ala2s4m2z199-d_dir", "e0c501b6"),
    ({}, "d_dir", 96, "7l371xax8kknhpska4wrmyll1mzlhzvl-d_dir", None),
    (IMPORT_FIXTURES, "import_fixtures", 1928, "bqh6kd0x3vps2rzagzpl7qmbbgnx19cp-import_fixtures",
     "3545fb91"),
    ({}, "import_fixtures", 96, "giq6czz24lpjg97xxcxk6rg950lcpib1-import_fixtures", None),
    ({b"test": b""}, "valid-path", 280, "i28jmi4fwym4fw3flkrkp2mdxx50pdy0-valid-path", "8f0a4b7b"),
    ({}, "valid-path", 96, "pwza2ij9gk1fmzhbjnynmfv2mq2sgcap-valid-path", None),
    (b"", "valid-name", 112, "nd5z11x7zjqqz44rkbhc6v7yifdkn659-valid-name", None),
]


def render(store: Store, node) -> bytes:
    return b"".join(nar.nar_chunks(node, store.get_directory, store.read_blob))


@pytest.mark.parametrize("convention", list(SizeConvention))
@pytest.mark.parametrize(("label", "spec", "size", "sha256"), NAR_VECTORS, ids=[v[0] for v in NAR_VECTORS])
def test_nar_vectors(label: str, spec: object, size: int, sha256: str, convention: SizeConvention) -> None:
    store = Store(convention=convention)
    node = store.build(spec)
    data = render(store, node)
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha256
    assert nar.nar_hash(node, store.get_directory, store.read_blob) == (size, bytes.fromhex(sha256))
    assert nar.nar_size(node, store.get_directory) == size


def test_hello_world_bytes() -> None:
    """The exact framing for one file, written out by hand from docs/protocol.md, 'NAR format'."""

    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + bytes(-len(b) % 8)

    expected = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
    expected += s(b"Hello World!") + s(b")")
    store = Store()
    assert render(store, store.build(b"Hello World!")) == expected
    exe = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"executable", b""))
    assert render(store, store.build(Exe(b"Hello World!"))).startswith(exe + s(b"contents")[:8])


@pytest.mark.parametrize(
    ("spec", "name", "size", "expected", "sha_prefix"), IMPORT_VECTORS, ids=[v[3] for v in IMPORT_VECTORS]
)
def test_recursive_import_paths(
    spec: object, name: str, size: int, expected: str, sha_prefix: str | None
) -> None:
    store = Store(convention=SizeConvention.DOUBLED)
    node = store.build(spec, name.encode())
    got_size, sha256 = nar.nar_hash(node, store.get_directory, store.read_blob)
    assert got_size == size == nar.nar_size(node, store.get_directory)
    if sha_prefix:
        assert sha256.hex().startswith(sha_prefix)
    assert storepath.from_nar_sha256(name, sha256).basename == expected


def test_root_name_is_not_part_of_the_nar() -> None:
    store = Store()
    unnamed = store.build(COMPLICATED)
    named = store.build(COMPLICATED, b"some-name")
    assert render(store, unnamed) == render(store, named)


def test_nested_tree_with_executables_and_symlinks() -> None:
    spec = {
        b"bin": {b"tool": Exe(b"#!/bin/sh\necho hi\n"), b"alias": Link(b"tool")},
        b"share": {b"doc": {b"README": b"x" * 1000, b"empty": {}}, b"abs": Link(b"/etc/passwd")},
        b"z": Exe(b""),
        b"\xff\xfebinary-name": b"\x00" * 9,
    }
    store = Store()
    node = store.build(spec)
    data = render(store, node)
    assert len(data) == nar.nar_size(node, store.get_directory)
    # Entries appear in byte order across kinds, executables carry the marker.
    for earlier, later in [(b"bin", b"share"), (b"alias", b"tool"), (b"share", b"z"), (b"z", b"\xff\xfe")]:
        assert data.index(earlier) < data.index(later)
    assert data.count(b"executable") == 2


def test_large_file_is_streamed_not_joined() -> None:
    store = Store(piece=1 << 16)
    contents = bytes(range(255)) * 4096  # BLOB_B, 1044480 bytes
    node = store.build({b"big": contents})
    pieces = list(nar.nar_chunks(node, store.get_directory, store.read_blob))
    assert max(len(p) for p in pieces) <= 1 << 16
    assert sum(map(len, pieces)) == nar.nar_size(node, store.get_directory)


def test_deep_tree_needs_no_recursion() -> None:
    """1500 nested directories: deeper than Python's recursion limit."""
    store = Store()
    node = store.build({b"leaf": b"x"})
    for _ in range(1500):
        node = store.put_directory(Directory(directories=(DirectoryNode(b"d", node.digest, node.size),)))
    data = render(store, node)
    assert len(data) == nar.nar_size(node, store.get_directory)
    assert data.count(b"entry") == 1501


@pytest.mark.parametrize(("actual", "fragment"), [(b"Hello", "5 bytes, FileNode.size says 12"),
                                                  (b"Hello World!!", "longer than its FileNode.size 12")])
def test_blob_length_must_match_size(actual: bytes, fragment: str) -> None:
    store = Store()
    digest = store.put_blob(actual)
    root = store.put_directory(Directory(files=(FileNode(b"f", digest, 12),)))
    with pytest.raises(InvalidData, match="blob b3:") as info:
        render(store, root)
    assert fragment in str(info.value) and " at /f:" in str(info.value)


def test_invalid_directory_is_refused() -> None:
    store = Store()
    bad = Directory(symlinks=(SymlinkNode(b"b", b"x"), SymlinkNode(b"a", b"y")))
    store.directories[b"\x01" * 32] = bad
    root = store.put_directory(Directory(directories=(DirectoryNode(b"sub", b"\x01" * 32, 2),)))
    with pytest.raises(InvalidData, match=r"symlinks\[1\] 'a': wrong sorting.*at /sub in the tree"):
        render(store, root)


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        (FileNode(b"", b"\x00" * 31, 0), "digest is 31 bytes"),
        (DirectoryNode(b"", b"", 0), "digest is 0 bytes"),
        (SymlinkNode(b"", b""), "symlink target is empty"),
        (SymlinkNode(b"", b"a\0b"), "NUL"),
    ],
)
def test_invalid_root_node(node, fragment: str) -> None:
    store = Store()
    with pytest.raises(InvalidData, match="NAR root node") as info:
        render(store, node)
    assert fragment in str(info.value)


def test_pad8() -> None:
    assert [nar.pad8(n) for n in (0, 1, 7, 8, 9, 16)] == [0, 8, 8, 8, 16, 16]
    assert Store().put_blob(b"") == EMPTY_B3


def test_writer_fed_by_hand_writes_the_nar_of_the_tree() -> None:
    """The import walk feeds NarWriter events itself; they must give nar_chunks' bytes."""
    store = Store()
    big = bytes(range(256)) * 512  # 128 KiB: handed out as it is, not copied into the buffer
    node = store.build({b"a": Exe(b"hi"), b"b": {b"big": big}, b"c": Link(b"a")})
    pieces: list[bytes] = []
    digest = nar.NarDigest()
    for out in (pieces.append, digest.update):
        w = nar.NarWriter(out)
        w.directory_start()
        w.entry_start(b"a")
        w.file_start(2, executable=True)
        w.contents(b"hi")
        w.file_end()
        w.entry_end()
        w.entry_start(b"b")
        w.directory_start()
        w.entry_start(b"big")
        w.file_start(len(big), executable=False)
        w.contents(big)
        w.file_end()
        w.entry_end()
        w.directory_end()
        w.entry_end()
        w.entry_start(b"c")
        w.symlink(b"a")
        w.entry_end()
        w.directory_end()
        w.flush()
    expected = render(store, node)
    assert b"".join(pieces) == expected
    assert any(piece is big for piece in pieces)
    assert digest.result() == (len(expected), hashlib.sha256(expected).digest())
