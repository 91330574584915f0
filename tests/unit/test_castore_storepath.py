"""Store paths: parsing, rejections and the text/fixed-output vectors of docs/protocol.md, 'Test vectors'.

The recursive-import ("source") vectors need NAR rendering of castore trees
and live in test_castore_nar.py.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvixmount.castore import nixbase32, storepath
from tvixmount.castore.storepath import InvalidStorePath, StorePath
from tvixmount.errors import InvalidArgument, InvalidData

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_?=."
RECURSIVE_DIGEST = bytes.fromhex("4374173a8cbe88de152b609f96f46e958bcf65762017474eec5a05ec2bd61530")


def test_properties() -> None:
    path = StorePath(bytes(20), "hello-2.12")
    assert path.hash_part == "0" * 32
    assert path.basename == "0" * 32 + "-hello-2.12"
    assert path.absolute == "/nix/store/" + "0" * 32 + "-hello-2.12"
    assert str(path) == path.absolute
    assert storepath.STORE_DIR == "/nix/store"


def test_parse_basename_and_absolute() -> None:
    text = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"
    path = storepath.parse_basename(text)
    assert path.digest.hex() == "8a12321522fd91efbd60ebb2481af88580f61600"
    assert path.name == "net-tools-1.60_p20170221182432"
    assert path.basename == text
    assert storepath.parse_basename(text.encode()) == path
    assert storepath.parse_absolute("/nix/store/" + text) == path
    assert storepath.parse_absolute(("/nix/store/" + text).encode()) == path


@pytest.mark.parametrize(
    "name", ["a", ".gitignore", "-", "a" * 211, "foo+bar-1.0_rc?=x", "..", ".", "0", NAME_CHARS[:100]]
)
def test_valid_names(name: str) -> None:
    assert storepath.check_name(name) is None
    assert storepath.parse_basename("1" * 32 + "-" + name).name == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "name is empty"),
        ("a" * 212, "212 characters long, more than 211"),
        ("a b", "invalid character ' ' at position 1"),
        ("a/b", "invalid character '/'"),
        ("é", "invalid character 'é' at position 0"),
        ("x\0", "invalid character '\\x00'"),
        ("a~", "invalid character '~'"),
        ("a:b", "invalid character ':'"),
    ],
)
def test_invalid_names(name: str, fragment: str) -> None:
    problem = storepath.check_name(name)
    assert problem is not None and fragment in problem
    with pytest.raises(InvalidStorePath, match="store path"):
        StorePath(bytes(20), name)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "0 characters, need at least 34"),
        ("0" * 32 + "-", "33 characters"),
        ("0" * 32, "32 characters"),
        ("0" * 33 + "a", "expected '-' after the 32-character hash part"),
        ("0" * 31 + "e-foo", "bad hash part"),
        ("0" * 31 + "A-foo", "invalid character 'A' at position 31"),
        ("0" * 32 + "-foo bar", "invalid character ' '"),
        ("0" * 32 + "-" + "a" * 212, "more than 211"),
        ("0" * 32 + "-foo/bar", "invalid character '/'"),
        (b"0" * 32 + b"-\xff", "not ASCII"),
    ],
)
def test_parse_basename_rejects(text: str | bytes, fragment: str) -> None:
    with pytest.raises(InvalidStorePath) as info:
        storepath.parse_basename(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, InvalidData)


def test_all_z_hash_part_is_valid() -> None:
    """20 bytes fill 32 characters exactly, so no hash part has stray bits."""
    assert storepath.parse_basename("z" * 32 + "-foo").digest == b"\xff" * 20


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0" * 32 + "-foo", "does not start with '/nix/store/'"),
        ("/nix/store" + "0" * 32 + "-foo", "does not start with"),
        ("/gnu/store/" + "0" * 32 + "-foo", "does not start with"),
        ("/nix/store/" + "0" * 32 + "-foo/bin", "invalid character '/'"),
        ("/nix/store/", "need at least 34"),
    ],
)
def test_parse_absolute_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidStorePath) as info:
        storepath.parse_absolute(text)
    assert fragment in str(info.value)


def test_digest_length_checked() -> None:
    with pytest.raises(InvalidStorePath, match="19 bytes, not 20"):
        StorePath(bytes(19), "foo")


@given(st.binary(min_size=20, max_size=20), st.text(alphabet=NAME_CHARS, min_size=1, max_size=211))
def test_round_trip(digest: bytes, name: str) -> None:
    path = StorePath(digest, name)
    assert len(path.hash_part) == 32
    assert storepath.parse_basename(path.basename) == path
    assert storepath.parse_absolute(path.absolute) == path


def test_text_vectors() -> None:
    foo = storepath.make_text("foo", hashlib.sha256(b"bar").digest())
    assert foo.basename == "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
    contents = b"/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
    baz = storepath.make_text("baz", hashlib.sha256(contents).digest(), [foo])
    assert baz.basename == "5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"
    assert storepath.make_text("baz", hashlib.sha256(contents).digest(), [foo.absolute]) == baz


def test_recursive_sha256_with_reference() -> None:
    digest = nixbase32.decode("1xqkzcb3909fp07qngljr4wcdnrh1gdam1m2n29i6hhrxlmkgkv1")
    ref = "/nix/store/dxwkwjzdaq7ka55pkk252gh32bgpmql4-foo"
    expected = "s89y431zzhmdn3k8r96rvakryddkpv2v-baz"
    assert storepath.make_fixed_output("baz", "sha256", digest, True, [ref]).basename == expected
    assert storepath.from_nar_sha256("baz", digest, [storepath.parse_absolute(ref)]).basename == expected


@pytest.mark.parametrize(
    ("name", "algo", "digest", "recursive", "expected"),
    [
        ("bar", "sha1", bytes.fromhex("0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"), True,
         "mp57d33657rf34lzvlbpfa1gjfv5gmpg-bar"),
        ("foo", "sha256", RECURSIVE_DIGEST, True, "17wgs52s7kcamcyin4ja58njkf91ipq8-foo"),
        ("foo2", "sha256", RECURSIVE_DIGEST, True, "gi0p8vd635vpk1nq029cz3aa3jkhar5k-foo2"),
        ("foo", "sha256", RECURSIVE_DIGEST, False, "q4pkwkxdib797fhk22p0k3g1q32jmxvf-foo"),
        ("foo2", "sha256", RECURSIVE_DIGEST, False, "znw17xlmx9r6gw8izjkqxkl6s28sza4l-foo2"),
        ("foo", "sha1", base64.b64decode("VUCRC+16gU5lcrLYHlPSUyx0Y/Q="), True,
         "p5sammmhpa84ama7ymkbgwwzrilva24x-foo"),
        ("foo", "md5", base64.b64decode("07BzhNET7exJ6qYjitX/AA=="), True,
         "gmmxgpy1jrzs86r5y05wy6wiy2m15xgi-foo"),
        ("valid-name", "sha256", hashlib.sha256(b"").digest(), False,
         "il2rmfbqgs37rshr8w7x64hd4d3b4bsa-valid-name"),
    ],
)
def test_fixed_output_vectors(name: str, algo: str, digest: bytes, recursive: bool, expected: str) -> None:
    assert storepath.make_fixed_output(name, algo, digest, recursive).basename == expected


def test_from_nar_sha256_matches_recursive_fixed_output() -> None:
    path = storepath.from_nar_sha256("foo", RECURSIVE_DIGEST)
    assert path.basename == "17wgs52s7kcamcyin4ja58njkf91ipq8-foo"


def test_make_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match="unknown hash algorithm 'sha3'"):
        storepath.make_fixed_output("foo", "sha3", bytes(32), True)
    with pytest.raises(InvalidArgument, match="sha1 digest is 32 bytes, not 20"):
        storepath.make_fixed_output("foo", "sha1", bytes(32), False)
    with pytest.raises(InvalidArgument, match="may have references"):
        storepath.make_fixed_output("foo", "sha256", bytes(32), False, ["/nix/store/" + "0" * 32 + "-x"])
    with pytest.raises(InvalidArgument, match="31 bytes, not 32"):
        storepath.from_nar_sha256("foo", bytes(31))
    with pytest.raises(InvalidStorePath, match="invalid character ' '"):
        storepath.from_nar_sha256("a b", bytes(32))
    with pytest.raises(InvalidStorePath, match="does not start with"):
        storepath.make_text("foo", bytes(32), ["/tmp/" + "0" * 32 + "-x"])
