"""Store paths: parsing ``<hash>-<name>`` and computing content-addressed paths.

A PathInfo is stored and looked up under the 20-byte digest in its root
node's name, so parsing must be exact: anything that is not a store path is
refused with a reason rather than guessed at (docs/protocol.md, 'Store paths'). The ``make_*``
functions compute the paths Nix gives to content-addressed objects; a tree
imported by ``tvixstore import`` gets ``from_nar_sha256``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import InvalidArgument, InvalidData
from . import nixbase32

STORE_DIR = "/nix/store"
DIGEST_LEN = 20
HASH_PART_LEN = nixbase32.encoded_len(DIGEST_LEN)  # 32
MAX_NAME_LEN = 211
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_?=.")
_HASH_LENGTHS = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


class InvalidStorePath(InvalidData):
    """Text that does not parse as a store path, or a digest/name that cannot form one."""


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be the name part of a store path, or None if it can.

    Current tvix rules: 1..211 characters from ``[A-Za-z0-9+-_?=.]``; a
    leading '.' is allowed (older tvix refused it, Nix accepts it).
    """
    if not name:
        return "name is empty"
    if len(name) > MAX_NAME_LEN:
        return f"name is {len(name)} characters long, more than {MAX_NAME_LEN}"
    for position, ch in enumerate(name):
        if ch not in _NAME_CHARS:
            return f"name has invalid character {ch!r} at position {position}"
    return None


@dataclass(frozen=True, slots=True)
class StorePath:
    """A parsed store path; constructing one checks the digest length and the name."""

    digest: bytes
    name: str

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_LEN:
            raise InvalidStorePath(
                f"store path digest is {len(self.digest)} bytes, not {DIGEST_LEN} (name {self.name!r})"
            )
        problem = check_name(self.name)
        if problem:
            raise InvalidStorePath(f"store path name {self.name!r}: {problem}")

    @property
    def hash_part(self) -> str:
        return nixbase32.encode(self.digest)

    @property
    def basename(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @property
    def absolute(self) -> str:
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.absolute


def _text(s: str | bytes, what: str) -> str:
    if isinstance(s, str):
        return s
    try:
        return s.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidStorePath(f"{what} {s!r}: not ASCII") from None


def parse_basename(s: str | bytes) -> StorePath:
    """Parse ``<32 nixbase32 chars>-<name>`` (no directory prefix)."""
    text = _text(s, "store path basename")
    if len(text) < HASH_PART_LEN + 2:
        raise InvalidStorePath(
            f"store path basename {text!r}: {len(text)} characters, need at least {HASH_PART_LEN + 2}"
        )
    if text[HASH_PART_LEN] != "-":
        raise InvalidStorePath(
            f"store path basename {text!r}: expected '-' after the {HASH_PART_LEN}-character hash part"
        )
    try:
        digest = nixbase32.decode(text[:HASH_PART_LEN])
    except InvalidData as exc:
        raise InvalidStorePath(f"store path basename {text!r}: bad hash part: {exc}") from None
    name = text[HASH_PART_LEN + 1 :]
    problem = check_name(name)
    if problem:
        raise InvalidStorePath(f"store path basename {text!r}: {problem}")
    return StorePath(digest, name)


def parse_absolute(s: str | bytes) -> StorePath:
    """Parse ``/nix/store/<hash>-<name>``; nothing may follow the basename."""
    text = _text(s, "store path")
    prefix = STORE_DIR + "/"
    if not text.startswith(prefix):
        raise InvalidStorePath(f"store path {text!r}: does not start with {prefix!r}")
    return parse_basename(text[len(prefix) :])


def _fold(digest: bytes) -> bytes:
    """Compress a sha256 to the 20 bytes of a store path by XOR-folding."""
    out = bytearray(DIGEST_LEN)
    for i, byte in enumerate(digest):
        out[i % DIGEST_LEN] ^= byte
    return bytes(out)


def _make(kind: str, inner_sha256: bytes, name: str, store_dir: str) -> StorePath:
    problem = check_name(name)
    if problem:
        raise InvalidStorePath(f"store path name {name!r}: {problem}")
    fingerprint = f"{kind}:sha256:{inner_sha256.hex()}:{store_dir}:{name}"
    return StorePath(_fold(hashlib.sha256(fingerprint.encode()).digest()), name)


def _references(references: Iterable[StorePath | str], store_dir: str) -> str:
    """``:ref1:ref2...`` over absolute paths in sorted order, as Nix's ordered set prints them."""
    paths = []
    for ref in references:
        if isinstance(ref, str):
            prefix = store_dir + "/"
            if not ref.startswith(prefix):
                raise InvalidStorePath(f"reference {ref!r}: does not start with {prefix!r}")
            ref = parse_basename(ref[len(prefix) :])
        paths.append(f"{store_dir}/{ref.basename}")
    return "".join(":" + p for p in sorted(paths))


def from_nar_sha256(
    name: str,
    nar_sha256: bytes,
    references: Iterable[StorePath | str] = (),
    self_reference: bool = False,
    store_dir: str = STORE_DIR,
) -> StorePath:
    """The path of a recursive (NAR, sha256) import, e.g. ``tvixstore import``.

    ``store_dir`` exists only so tests can compare with a Nix that runs on a
    scratch store directory; the result always renders under ``/nix/store``.
    """
    if len(nar_sha256) != 32:
        raise InvalidArgument(f"NAR sha256 is {len(nar_sha256)} bytes, not 32")
    kind = "source" + _references(references, store_dir) + (":self" if self_reference else "")
    return _make(kind, nar_sha256, name, store_dir)


def make_text(
    name: str,
    contents_sha256: bytes,
    references: Iterable[StorePath | str] = (),
    store_dir: str = STORE_DIR,
) -> StorePath:
    """The path of a text object (``builtins.toFile``, a .drv)."""
    if len(contents_sha256) != 32:
        raise InvalidArgument(f"text sha256 is {len(contents_sha256)} bytes, not 32")
    return _make("text" + _references(references, store_dir), contents_sha256, name, store_dir)


def make_fixed_output(
    name: str,
    algo: str,
    digest: bytes,
    recursive: bool,
    references: Iterable[StorePath | str] = (),
    store_dir: str = STORE_DIR,
) -> StorePath:
    """The path of a fixed-output object (``algo`` one of md5, sha1, sha256, sha512).

    Recursive sha256 is the "source" kind; everything else hashes a
    ``fixed:out:`` descriptor and may not have references.
    """
    expected = _HASH_LENGTHS.get(algo)
    if expected is None:
        raise InvalidArgument(f"unknown hash algorithm {algo!r}")
    if len(digest) != expected:
        raise InvalidArgument(f"{algo} digest is {len(digest)} bytes, not {expected}")
    if recursive and algo == "sha256":
        return from_nar_sha256(name, digest, references, store_dir=store_dir)
    refs = list(references)
    if refs:
        raise InvalidArgument("only recursive sha256 fixed-output paths may have references")
    descriptor = f"fixed:out:{'r:' if recursive else ''}{algo}:{digest.hex()}:"
    return _make("output:out", hashlib.sha256(descriptor.encode()).digest(), name, store_dir)
