"""nixbase32: the vectors of docs/protocol.md, 'nixbase32', strict decoding, round trips."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvixmount.castore import nixbase32
from tvixmount.errors import InvalidData

VECTORS = [
    ("", ""),
    ("1f", "0z"),
    ("8a12321522fd91efbd60ebb2481af88580f61600", "00bgd045z0d4icpbc2yyz4gx48ak44la"),
    (
        "b3a24de97a8fdbc835b9833169501030b8977031bcb54b3b3ac13740f846ab30",
        "0c5b8vw40dy178xlpddw65q9gf1h2186jcc3p4swinwggbllv8mk",
    ),
    ("00" * 20, "0" * 32),
    ("2184104208218410420821841042082184104208", "1" * 32),
    ("4208218410420821841042082184104208218410", "2" * 32),
    ("638c31c618638c31c618638c31c618638c31c618", "3" * 32),
    ("8410420821841042082184104208218410420821", "4" * 32),
    ("a594524a29a594524a29a594524a29a594524a29", "5" * 32),
    ("c618638c31c618638c31c618638c31c618638c31", "6" * 32),
]


@pytest.mark.parametrize(("hex_", "text"), VECTORS)
def test_vectors(hex_: str, text: str) -> None:
    assert nixbase32.encode(bytes.fromhex(hex_)) == text
    assert nixbase32.decode(text) == bytes.fromhex(hex_)
    assert nixbase32.decode(text.encode()) == bytes.fromhex(hex_)


def test_output_placeholder() -> None:
    digest = hashlib.sha256(b"nix-output:out").digest()
    assert "/" + nixbase32.encode(digest) == "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"


@pytest.mark.parametrize(("n", "length"), [(0, 0), (1, 2), (2, 4), (5, 8), (20, 32), (32, 52), (64, 103)])
def test_encoded_len(n: int, length: int) -> None:
    assert nixbase32.encoded_len(n) == length
    assert len(nixbase32.encode(bytes(n))) == length


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("zz", "non-zero bits"),
        ("c0", "non-zero bits"),
        ("0", "length 1"),
        ("000", "length 3"),
        ("0" * 33, "length 33"),
        ("0e", "invalid character 'e' at position 1"),
        ("o0", "invalid character 'o' at position 0"),
        ("0t", "invalid character 't'"),
        ("0u", "invalid character 'u'"),
        ("0A", "invalid character 'A'"),
        ("0-", "invalid character '-'"),
        (b"0\xff", "not ASCII"),
    ],
)
def test_rejects(text: str | bytes, fragment: str) -> None:
    with pytest.raises(InvalidData, match="nixbase32") as info:
        nixbase32.decode(text)
    assert fragment in str(info.value)


@given(st.binary(max_size=80))
def test_round_trip(data: bytes) -> None:
    text = nixbase32.encode(data)
    assert len(text) == nixbase32.encoded_len(len(data))
    assert set(text) <= set(nixbase32.ALPHABET)
    assert nixbase32.decode(text) == data


@given(st.text(alphabet=nixbase32.ALPHABET, max_size=60))
def test_decode_is_canonical(text: str) -> None:
    """Every string the decoder accepts is exactly what the encoder produces."""
    try:
        data = nixbase32.decode(text)
    except InvalidData:
        return
    assert nixbase32.encode(data) == text
