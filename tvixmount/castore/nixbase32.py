"""Nix's base-32 text form of digests (store-path hash parts, narinfo hashes).

Not RFC 4648: the alphabet omits e, o, t, u, and the input is read as one
little-endian bit string whose 5-bit groups are written highest group first
(docs/protocol.md, 'nixbase32'). Decoding is strict because a hash part that decodes
"almost" would name a different store path: every character must be in the
alphabet, the length must be one an encoder can produce, and bits past the
last whole byte must be zero.
"""

from __future__ import annotations

from ..errors import InvalidData

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {ch: value for value, ch in enumerate(ALPHABET)}


def encoded_len(n: int) -> int:
    """Characters needed for ``n`` bytes (20 -> 32, 32 -> 52)."""
    return (8 * n + 4) // 5


def encode(data: bytes) -> str:
    """The nixbase32 text of ``data``."""
    length = encoded_len(len(data))
    value = int.from_bytes(data, "little")
    return "".join(ALPHABET[(value >> (5 * group)) & 31] for group in range(length - 1, -1, -1))


def decode(text: str | bytes) -> bytes:
    """The bytes ``text`` encodes; InvalidData if it is not canonical nixbase32."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidData(f"nixbase32 {text!r}: not ASCII") from None
    length = len(text)
    n = length * 5 // 8
    if encoded_len(n) != length:
        raise InvalidData(f"nixbase32 {text!r}: length {length} is not the encoding of any byte count")
    value = 0
    for position, ch in enumerate(text):
        digit = _VALUE.get(ch)
        if digit is None:
            raise InvalidData(f"nixbase32 {text!r}: invalid character {ch!r} at position {position}")
        value = (value << 5) | digit
    if value >> (8 * n):
        raise InvalidData(f"nixbase32 {text!r}: non-zero bits beyond the last of {n} bytes")
    return value.to_bytes(n, "little")
