"""PathInfo: every rule of docs/protocol.md, 'PathInfo validation', proto round trips, JSON view."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from tvixmount.castore import nixbase32, wire
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.castore.pathinfo import (
    ContentAddress,
    NarInfo,
    PathInfo,
    Signature,
    narinfo_fingerprint,
    pathinfo_to_json,
    validate_pathinfo,
)
from tvixmount.castore.storepath import StorePath
from tvixmount.errors import InvalidData
from tvixmount.proto import castore_pb2, pathinfo_pb2

B3 = bytes(range(32))
ROOT_NAME = b"00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60"
REF = StorePath(bytes.fromhex("2184104208218410420821841042082184104208"), "glibc-2.40")
NAR_SHA = hashlib.sha256(b"nar").digest()


def good(**narinfo_changes) -> PathInfo:
    narinfo = NarInfo(
        nar_size=1234,
        nar_sha256=NAR_SHA,
        signatures=(Signature("cache.example.org-1", b"s" * 64),),
        reference_names=(REF.basename,),
        deriver=("net-tools-1.60", bytes(20)),
        ca=ContentAddress(0, bytes(32)),
    )
    return PathInfo(
        node=DirectoryNode(ROOT_NAME, B3, 3),
        references=(REF.digest,),
        narinfo=dataclasses.replace(narinfo, **narinfo_changes),
    )


def test_valid_returns_store_path() -> None:
    path = validate_pathinfo(good())
    assert path.basename == ROOT_NAME.decode()
    assert path.digest.hex() == "8a12321522fd91efbd60ebb2481af88580f61600"


@pytest.mark.parametrize(
    "node",
    [FileNode(ROOT_NAME, B3, 0, True), SymlinkNode(ROOT_NAME, b"/anywhere"),
     FileNode(b"00bgd045z0d4icpbc2yyz4gx48ak44la-.gitignore", B3, 1)],
)
def test_valid_root_kinds(node) -> None:
    assert validate_pathinfo(dataclasses.replace(good(), node=node)).name == node.name.decode()[33:]


def test_seed_era_without_narinfo() -> None:
    info = PathInfo(node=DirectoryNode(ROOT_NAME, B3, 0), references=(REF.digest,))
    assert validate_pathinfo(info, require_narinfo=False).basename == ROOT_NAME.decode()
    with pytest.raises(InvalidData, match="narinfo is missing"):
        validate_pathinfo(info)


def _replace_node(node):
    return dataclasses.replace(good(), node=node)


@pytest.mark.parametrize(
    ("info", "fragment"),
    [
        (dataclasses.replace(good(), narinfo=None), "narinfo is missing"),
        (dataclasses.replace(good(), references=(bytes(19),)), "references[0] is 19 bytes, not 20"),
        (dataclasses.replace(good(), references=(REF.digest, REF.digest)),
         "1 reference_names for 2 references"),
        (good(reference_names=()), "0 reference_names for 1 references"),
        (good(reference_names=("/nix/store/" + REF.basename,)), "reference_names[0]: store path basename"),
        (good(reference_names=("0" * 32 + "-glibc-2.40",)), "does not match references[0]"),
        (_replace_node(DirectoryNode(ROOT_NAME, B3[:31], 3)), "root node: digest is 31 bytes, not 32"),
        (_replace_node(FileNode(ROOT_NAME, b"", 3)), "root node: digest is 0 bytes"),
        (_replace_node(SymlinkNode(ROOT_NAME, b"")), "root node: symlink target is empty"),
        (_replace_node(SymlinkNode(ROOT_NAME, b"a\0")), "root node: symlink target contains a NUL byte"),
        (_replace_node(SymlinkNode(ROOT_NAME, b"t" * 4096)), "4096 bytes long, more than 4095"),
        (_replace_node(DirectoryNode(b"", B3, 0)), "root node: name is empty"),
        (_replace_node(DirectoryNode(b"a/b", B3, 0)), "root node: name contains '/'"),
        (_replace_node(DirectoryNode(b"net-tools", B3, 0)), "root node name is not a store path"),
        (_replace_node(DirectoryNode(b"0" * 32 + b"-a b", B3, 0)), "invalid character ' '"),
        (_replace_node(DirectoryNode(b"e" * 32 + b"-ab", B3, 0)), "invalid character 'e'"),
        (_replace_node(DirectoryNode(ROOT_NAME + b"\xff", B3, 0)), "not ASCII"),
        (good(nar_sha256=NAR_SHA[:20]), "nar_sha256 is 20 bytes, not 32"),
        (good(nar_sha256=b""), "nar_sha256 is 0 bytes, not 32"),
        (good(deriver=("foo.drv", bytes(19))), "deriver: store path digest is 19 bytes"),
        (good(deriver=("", bytes(20))), "deriver: store path name '': name is empty"),
        (good(deriver=("a b", bytes(20))), "deriver: store path name 'a b'"),
        (good(signatures=(Signature("k", b"s" * 64), Signature("k2", b"s" * 63))),
         "signatures[1] ('k2') is 63 bytes, not 64"),
        (good(ca=ContentAddress(9, bytes(32))), "ca has unknown hash type 9"),
        (good(ca=ContentAddress(-1, bytes(32))), "ca has unknown hash type -1"),
        (good(ca=ContentAddress(0, bytes(20))), "ca fixed:r:sha256 digest is 20 bytes, not 32"),
        (good(ca=ContentAddress(3, bytes(32))), "ca fixed:r:md5 digest is 32 bytes, not 16"),
        (good(ca=ContentAddress(8, bytes(32))), "ca fixed:sha512 digest is 32 bytes, not 64"),
        (good(nar_size=1 << 64), "is not a u64"),
    ],
)
def test_rejects(info: PathInfo, fragment: str) -> None:
    with pytest.raises(InvalidData) as exc:
        validate_pathinfo(info)
    message = str(exc.value)
    assert message.startswith("path info ")
    assert fragment in message, message


@pytest.mark.parametrize(("hash_type", "length"), [(0, 32), (1, 20), (2, 64), (3, 16), (4, 32), (5, 20),
                                                   (6, 16), (7, 32), (8, 64)])
def test_every_ca_type_with_its_length(hash_type: int, length: int) -> None:
    validate_pathinfo(good(ca=ContentAddress(hash_type, bytes(length))))
    with pytest.raises(InvalidData, match="digest is"):
        validate_pathinfo(good(ca=ContentAddress(hash_type, bytes(length + 1))))


def test_no_references_is_valid() -> None:
    info = dataclasses.replace(good(reference_names=()), references=())
    validate_pathinfo(info)


@pytest.mark.parametrize(
    "info",
    [
        good(),
        PathInfo(node=FileNode(ROOT_NAME, B3, 7, True)),
        PathInfo(node=SymlinkNode(ROOT_NAME, b"\xff/x"), references=(REF.digest,)),
        good(signatures=(), deriver=None, ca=None),
        good(ca=ContentAddress(4, bytes(32))),
        dataclasses.replace(good(nar_size=0, reference_names=()), references=()),
    ],
)
def test_proto_round_trip(info: PathInfo) -> None:
    assert wire.pathinfo_from_proto(wire.pathinfo_to_proto(info)) == info
    data = wire.encode_pathinfo(info)
    assert wire.decode_pathinfo(data) == info
    # The generated classes agree on the wire form.
    assert pathinfo_pb2.PathInfo.FromString(data).SerializeToString(deterministic=True) == data


def test_encoding_is_proto_canonical() -> None:
    info = PathInfo(node=SymlinkNode(ROOT_NAME, b"t"))
    # PathInfo.node (1) -> Node.symlink (3) -> name (1), target (2); nothing else.
    inner = b"\x0a" + bytes([len(ROOT_NAME)]) + ROOT_NAME + b"\x12\x01t"
    node = b"\x1a" + bytes([len(inner)]) + inner
    assert wire.encode_pathinfo(info) == b"\x0a" + bytes([len(node)]) + node


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    info = good()
    msg = wire.pathinfo_to_proto(info)
    unknown_varint = b"\x78\x01"  # field 15, varint 1
    unknown_bytes = b"\x7a\x03abc"  # field 15, length-delimited
    node = castore_pb2.DirectoryNode.FromString(msg.node.directory.SerializeToString() + unknown_varint)
    msg.node.directory.CopyFrom(node)
    narinfo = pathinfo_pb2.NARInfo.FromString(msg.narinfo.SerializeToString() + unknown_bytes)
    msg.narinfo.CopyFrom(narinfo)
    data = msg.SerializeToString() + unknown_varint + b"\x22\x00"  # and field 4 at the top level
    assert unknown_varint in data and unknown_bytes in data
    assert wire.decode_pathinfo(data) == info
    # A future node kind (oneof member 4) reads as "no node set".
    with pytest.raises(InvalidData, match="no node set"):
        wire.decode_pathinfo(b"\x0a\x02\x22\x00")


def test_unknown_ca_enum_value_survives_decoding_and_is_rejected() -> None:
    msg = wire.pathinfo_to_proto(good())
    msg.narinfo.ca.type = 42  # type: ignore[assignment]
    info = wire.pathinfo_from_proto(msg)
    assert info.narinfo is not None and info.narinfo.ca == ContentAddress(42, bytes(32))
    with pytest.raises(InvalidData, match="unknown hash type 42"):
        wire.decode_pathinfo(msg.SerializeToString())


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\xff\xff", "not a valid protobuf message"),
        (b"\x0a\x05\x12\x01", "not a valid protobuf message"),
        (b"\x1a\x03\x22\x01\xff", "not a valid protobuf message"),  # reference_names not UTF-8
        (b"", "no root node"),
        (b"\x0a\x00", "no node set"),
        (b"\x12\x01x", "no root node"),
    ],
)
def test_decode_rejects(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidData) as exc:
        wire.decode_pathinfo(data)
    assert fragment in str(exc.value)


def test_decode_validates() -> None:
    bad = wire.encode_pathinfo(good(nar_sha256=b"x"))
    with pytest.raises(InvalidData, match="nar_sha256 is 1 bytes"):
        wire.decode_pathinfo(bad)
    seed = wire.encode_pathinfo(PathInfo(node=DirectoryNode(ROOT_NAME, B3, 0)))
    assert wire.decode_pathinfo(seed).narinfo is None
    with pytest.raises(InvalidData, match="narinfo is missing"):
        wire.decode_pathinfo(seed, require_narinfo=True)


@pytest.mark.parametrize(
    "node",
    [DirectoryNode(b"d", B3, 5), FileNode(b"f", B3, 9, True), FileNode(b"", B3, 0, False),
     SymlinkNode(b"s", b"../t")],
)
def test_node_round_trip(node) -> None:
    msg = wire.node_to_proto(node)
    assert msg.WhichOneof("node") == {DirectoryNode: "directory", FileNode: "file", SymlinkNode: "symlink"}[
        type(node)
    ]
    assert wire.node_from_proto(msg) == node
    assert wire.node_from_proto(castore_pb2.Node.FromString(msg.SerializeToString())) == node


def test_node_without_member() -> None:
    with pytest.raises(InvalidData, match="no node set"):
        wire.node_from_proto(castore_pb2.Node())


def test_fingerprint_vector() -> None:
    refs = [
        "0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0",
        "6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115",
        "j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12",
        "yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n",
    ]
    info = PathInfo(
        node=DirectoryNode(b"syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin", B3, 0),
        references=tuple(nixbase32.decode(r[:32]) for r in refs),
        narinfo=NarInfo(
            nar_size=196040,
            nar_sha256=nixbase32.decode("1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0"),
            reference_names=tuple(refs),
        ),
    )
    assert narinfo_fingerprint(info) == (
        "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;"
        "sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;"
        "/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,"
        "/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,"
        "/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,"
        "/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
    )


def test_json_view() -> None:
    out = pathinfo_to_json(good())
    assert out == {
        "path": "/nix/store/" + ROOT_NAME.decode(),
        "node": {"type": "directory", "digest": "b3:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "size": 3},
        "narHash": "sha256:" + nixbase32.encode(NAR_SHA),
        "narHashHex": NAR_SHA.hex(),
        "narSize": 1234,
        "references": [REF.absolute],
        "deriver": "/nix/store/" + "0" * 32 + "-net-tools-1.60.drv",
        "ca": "fixed:r:sha256:" + "0" * 52,
        "signatures": ["cache.example.org-1:" + "c3Nz" * 21 + "cw=="],
    }
    seed = pathinfo_to_json(PathInfo(node=SymlinkNode(ROOT_NAME, b"\xfft"), references=(REF.digest,)))
    assert seed["node"] == {"type": "symlink", "target": "\\xfft"}
    assert seed["references"] == [f"/nix/store/{REF.hash_part}-?"]
    assert "narHash" not in seed
    text = pathinfo_to_json(good(ca=ContentAddress(4, bytes(32))))["ca"]
    assert text == "text:sha256:" + "0" * 52
