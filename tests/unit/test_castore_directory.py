"""Directory: the validation rules with their messages, blob and directory vectors (docs/protocol.md)."""

from __future__ import annotations

import base64

import blake3
import pytest

from tvixmount.castore.directory import (
    Directory,
    SizeConvention,
    decode_directory,
    validate,
)
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode, b3_text
from tvixmount.errors import InvalidData
from tvixmount.proto import castore_pb2

EMPTY = bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
D = EMPTY  # any valid 32-byte digest
U64_MAX = (1 << 64) - 1

BLOBS = [
    (b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
     "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="),
    (b"Hello World!", "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c",
     "b3:XKeBWty0hOmhNsEe/mnB1TAXbVSbXRjQOOtSgLSzRww="),
    (bytes([0, 1]), "7b7015bb92cf0b318037702a6cdd81dee41224f734684c2c122cd6359cb1ee63",
     "b3:e3AVu5LPCzGAN3AqbN2B3uQSJPc0aEwsEizWNZyx7mM="),
    (bytes(range(255)) * 4096, "a82c5154a7a0c262c6fdb929a317585646f8fbcf80326d0a7b8747edaf2d99d2",
     "b3:qCxRVKegwmLG/bkpoxdYVkb4+8+AMm0Ke4dH7a8tmdI="),
    (b"\x01", "48fc721fbbc172e0925fa27af1671de225ba927134802998b10a1568a188652b", None),
]


@pytest.mark.parametrize(("contents", "hex_", "text"), BLOBS, ids=["empty", "hello", "a", "b", "one"])
def test_blob_digests(contents: bytes, hex_: str, text: str | None) -> None:
    digest = blake3.blake3(contents).digest()
    assert digest.hex() == hex_
    if text:
        assert b3_text(digest) == text
        assert len(text) == 47


# -- docs/protocol.md, 'Test vectors', built in both size conventions -----


def fixtures(convention: SizeConvention) -> dict[str, Directory]:
    with_keep = Directory(files=(FileNode(b".keep", EMPTY, 0),))
    a = Directory()
    b = Directory(directories=(DirectoryNode(b"a", a.digest(), a.size(convention)),))
    return {
        "WITH_KEEP": with_keep,
        "COMPLICATED": Directory(
            directories=(DirectoryNode(b"keep", with_keep.digest(), with_keep.size(convention)),),
            files=(FileNode(b".keep", EMPTY, 0),),
            symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
        ),
        "A": a,
        "B": b,
        "C": Directory(
            directories=(
                DirectoryNode(b"a", a.digest(), a.size(convention)),
                DirectoryNode(b"a'", a.digest(), a.size(convention)),
            )
        ),
        "D": Directory(
            directories=(
                DirectoryNode(b"a", a.digest(), a.size(convention)),
                DirectoryNode(b"b", b.digest(), b.size(convention)),
            )
        ),
    }


DOCUMENTED = {
    "WITH_KEEP": (1, "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e",
                  "b3:i1tdZCtka7jtUEsIYsOUE+h+V0kUl9570HWVP3uDgQ4="),
    "COMPLICATED": (4, "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a",
                    "b3:P5UaFa/VhvsxIe9NE9WC6BHODlp/IcBJf9h0kOniNVo="),
    "A": (0, EMPTY.hex(), "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="),
    "B": (1, "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc",
          "b3:hwH0ci2Nrn8sQPoAMzG4Q3o4Jfnhv9OneZjGTMImucw="),
    "C": (2, "78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803",
          "b3:eOsgCuDMldTqlUZV+8+R4oUBOiYTEOFhkn8kAdK8qAM="),
    "D": (3, "99922a5c1801805287a647af73bca0ed7352a5f7f373e54992795bcc4a235213",
          "b3:mZIqXBgBgFKHpkevc7yg7XNSpffzc+VJknlbzEojUhM="),
}
DOUBLED = {
    "WITH_KEEP": (2, DOCUMENTED["WITH_KEEP"][1], DOCUMENTED["WITH_KEEP"][2]),
    "COMPLICATED": (8, "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb",
                    "b3:Qkp/bOCNgF0VtCgGL6rpYpmhZ11wjDo5Jhr+OM3QT+s="),
    "A": DOCUMENTED["A"],
    "B": (2, DOCUMENTED["B"][1], DOCUMENTED["B"][2]),
    "C": (4, DOCUMENTED["C"][1], DOCUMENTED["C"][2]),
    "D": (6, "76cd8b55b37333961c1778ba997e57df92e219926ae5a66c414b810331a77603", None),
}
ENCODINGS = {
    "WITH_KEEP": "12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    "COMPLICATED": "0a2a0a046b65657012208b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e1801"
    "12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    "1a1e0a02616112182f6e69782f73746f72652f736f6d657768657265656c7365",
    "B": "0a250a01611220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    "A": "",
}


@pytest.mark.parametrize(
    ("convention", "table"), [(SizeConvention.DOCUMENTED, DOCUMENTED), (SizeConvention.DOUBLED, DOUBLED)]
)
@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_directory_vectors(convention: SizeConvention, table: dict, name: str) -> None:
    directory = fixtures(convention)[name]
    size, hex_, text = table[name]
    validate(directory)
    assert directory.size(convention) == size
    assert directory.digest().hex() == hex_
    if text:
        assert b3_text(directory.digest()) == text
    assert decode_directory(directory.encode(), directory.digest()) == directory


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_canonical_encodings(name: str) -> None:
    assert fixtures(SizeConvention.DOCUMENTED)[name].encode().hex() == ENCODINGS[name]


def test_complicated_head_encoding_differs_only_in_size() -> None:
    doubled = fixtures(SizeConvention.DOUBLED)["COMPLICATED"].encode().hex()
    documented = ENCODINGS["COMPLICATED"]
    assert doubled == documented.replace("810e1801", "810e1802")
    assert doubled != documented


def test_entries_merge_kinds_in_byte_order() -> None:
    directory = fixtures(SizeConvention.DOCUMENTED)["COMPLICATED"]
    assert [e.name for e in directory.entries()] == [b".keep", b"aa", b"keep"]
    assert len(directory) == 3


def test_lists_are_sorted_independently() -> None:
    validate(Directory(directories=(DirectoryNode(b"b", D, 0), DirectoryNode(b"c", D, 0)),
                       symlinks=(SymlinkNode(b"a", b"x"),)))


def test_odd_bytes_allowed() -> None:
    validate(Directory(files=(FileNode(b"n" * 255, D, 0), FileNode(b"\xff\xfe not utf-8", D, 1)),
                       symlinks=(SymlinkNode(b"l", b"../..\xff/" + b"t" * 4000),)))


# -- docs/protocol.md, 'Directory validation', each rule with its message ---

RULES = [
    (Directory(files=(FileNode(b"", D, 0),)), "files[0] '': name is empty"),
    (Directory(directories=(DirectoryNode(b".", D, 0),)), "directories[0] '.': name is '.'"),
    (Directory(symlinks=(SymlinkNode(b"..", b"x"),)), "symlinks[0] '..': name is '..'"),
    (Directory(files=(FileNode(b"a/b", D, 0),)), "name contains '/'"),
    (Directory(files=(FileNode(b"a\0b", D, 0),)), "name contains a NUL byte"),
    (Directory(files=(FileNode(b"n" * 256, D, 0),)), "name is 256 bytes long, more than 255"),
    (Directory(files=(FileNode(b"a", D, 0), FileNode(b"a", D, 0))), "files[1] 'a': duplicate name in files"),
    (Directory(directories=(DirectoryNode(b"b", D, 0), DirectoryNode(b"a", D, 0))),
     "directories[1] 'a': wrong sorting, comes after 'b'"),
    (Directory(symlinks=(SymlinkNode(b"b", b"x"), SymlinkNode(b"a", b"y"))),
     "symlinks[1] 'a': wrong sorting"),
    (Directory(directories=(DirectoryNode(b"a", D, 0),), symlinks=(SymlinkNode(b"a", b"x"),)),
     "symlinks[0] 'a': name also used by another entry kind"),
    (Directory(directories=(DirectoryNode(b"a", D, 0),), files=(FileNode(b"a", D, 0),)),
     "files[0] 'a': name also used by another entry kind"),
    (Directory(directories=(DirectoryNode(b"d", D[:31], 0),)), "digest is 31 bytes, not 32"),
    (Directory(files=(FileNode(b"f", D + b"x", 0),)), "digest is 33 bytes, not 32"),
    (Directory(files=(FileNode(b"f", b"", 0),)), "digest is 0 bytes, not 32"),
    (Directory(symlinks=(SymlinkNode(b"l", b""),)), "symlink target is empty"),
    (Directory(symlinks=(SymlinkNode(b"l", b"a\0"),)), "symlink target contains a NUL byte"),
    (Directory(symlinks=(SymlinkNode(b"l", b"t" * 4096),)),
     "symlink target is 4096 bytes long, more than 4095"),
    (Directory(directories=(DirectoryNode(b"a", D, U64_MAX), DirectoryNode(b"b", D, 1))),
     "descendant count overflows u64"),
    (Directory(files=(FileNode(b"f", D, 1 << 64),)), "is not a u64"),
]


@pytest.mark.parametrize(("directory", "fragment"), RULES)
def test_validation_rules(directory: Directory, fragment: str) -> None:
    with pytest.raises(InvalidData) as exc:
        validate(directory, "directory b3:test")
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("directory b3:test")


@pytest.mark.parametrize(("directory", "fragment"), RULES[:-1])  # a size > u64 cannot be encoded
def test_decode_applies_rules(directory: Directory, fragment: str) -> None:
    with pytest.raises(InvalidData, match=r"^directory: ") as exc:
        decode_directory(directory.to_proto().SerializeToString())
    assert fragment in str(exc.value)


def test_sizes_are_not_validated() -> None:
    validate(Directory(directories=(DirectoryNode(b"a", D, 12345),)))


def test_decode_checks_expected_digest() -> None:
    data = fixtures(SizeConvention.DOCUMENTED)["B"].encode()
    with pytest.raises(InvalidData, match="content hashes to b3:hwH0"):
        decode_directory(data, EMPTY)


def test_decode_rejects_garbage() -> None:
    with pytest.raises(InvalidData, match="not a valid protobuf message"):
        decode_directory(b"\xff\xff\xff")


def test_unknown_fields_do_not_change_the_digest() -> None:
    """A newer peer's extra fields are dropped before hashing, as tvix does."""
    b = fixtures(SizeConvention.DOCUMENTED)["B"]
    node = castore_pb2.DirectoryNode.FromString(b.to_proto().directories[0].SerializeToString() + b"\x78\x01")
    msg = castore_pb2.Directory()
    msg.directories.append(node)
    data = msg.SerializeToString() + b"\x22\x03abc"  # field 4 at the top level too
    assert data != b.encode()
    assert decode_directory(data, b.digest()) == b


def test_empty_directory_digest_is_blake3_of_nothing() -> None:
    assert Directory().encode() == b""
    assert Directory().digest() == EMPTY
    assert b3_text(EMPTY) == "b3:" + base64.b64encode(EMPTY).decode()
