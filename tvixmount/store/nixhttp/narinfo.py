"""The ``.narinfo`` text of a Nix binary cache: parsing, fingerprint, PathInfo.

A narinfo is the only thing that ties a store path to the bytes a cache
serves, so it is parsed strictly: every line is ``Key: value`` and ends in
a newline (as Nix itself requires), the fields we use must be well formed
and appear once, and a problem is InvalidData quoting the offending line.
Fields we do not use (``System``, future ones) are skipped, as Nix does.

What Nix writes, checked against ``nix copy --to file://`` (2.8): store
paths absolute in ``StorePath`` and as basenames in ``References`` (sorted,
space separated, the line is ``References: `` when empty) and ``Deriver``;
hashes as ``sha256:<nixbase32>``; ``CA`` as ``fixed:r:sha256:<nixbase32>``.
Hashes are also accepted in the other forms Nix's own parser takes
(base16, base64, SRI ``sha256-<base64>``), and are normalised, because the
signed fingerprint always spells the NAR hash in nixbase32.

Only the fingerprint ``1;<StorePath>;<NarHash>;<NarSize>;<References>`` is
signed (references as absolute paths, in sorted order, comma separated):
``URL``, ``Compression``, ``FileHash`` and ``FileSize`` are not, so they
only steer the download; every NAR byte is checked against NarHash/NarSize.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from ...castore import nixbase32
from ...castore.nodes import Node
from ...castore.pathinfo import CA_KINDS, ContentAddress, NarInfo, PathInfo, Signature
from ...castore.storepath import InvalidStorePath, StorePath, parse_absolute, parse_basename
from ...errors import InvalidData

MAX_NARINFO_BYTES = 1 << 20  # a narinfo with thousands of references is ~100 KiB
DEFAULT_COMPRESSION = "bzip2"  # what Nix assumes when the line is missing
UNKNOWN_DERIVER = "unknown-deriver"
T = TypeVar("T")
_HASH_LEN = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
_CA_BY_TEXT = {f"{prefix}:{algo}": kind for kind, (prefix, algo) in CA_KINDS.items()}
_REQUIRED = ("StorePath", "URL", "NarHash", "NarSize")
_SINGLE = ("StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
           "References", "Deriver", "CA")


@dataclass(frozen=True, slots=True)
class NarinfoFile:
    """What one ``.narinfo`` says; ``references`` sorted and unique, as Nix holds them."""

    store_path: StorePath
    url: str
    compression: str
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...] = ()
    deriver: StorePath | None = None
    signatures: tuple[Signature, ...] = ()
    ca: ContentAddress | None = None
    file_sha256: bytes | None = None
    file_size: int | None = None


def parse(data: bytes, where: str = "narinfo") -> NarinfoFile:
    """Parse the bytes of a narinfo; InvalidData naming ``where`` and the line on any problem."""
    if len(data) > MAX_NARINFO_BYTES:
        raise InvalidData(f"{where}: {len(data)} bytes, more than {MAX_NARINFO_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidData(f"{where}: not UTF-8 ({exc})") from None
    if not text.endswith("\n"):
        raise InvalidData(f"{where}: does not end with a newline (truncated?)")
    fields: dict[str, tuple[int, str]] = {}
    signatures: list[Signature] = []
    for number, line in enumerate(text[:-1].split("\n"), 1):
        key, sep, value = line.partition(": ")
        if not sep or not key or not key.isalnum():
            raise InvalidData(f"{where}: line {number} {_show(line)} is not 'Key: value'")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
            raise InvalidData(f"{where}: line {number} {_show(line)} contains a control character")
        if key == "Sig":
            signatures.append(_with_line(where, number, line, parse_signature, value))
        elif key in _SINGLE:
            if key in fields:
                raise InvalidData(f"{where}: line {number} {_show(line)} repeats {key} "
                                  f"(first on line {fields[key][0]})")
            fields[key] = (number, value)

    def get(key: str, parse_value: Callable[[str], T]) -> T | None:
        found = fields.get(key)
        if found is None:
            return None
        number, value = found
        return _with_line(where, number, f"{key}: {value}", parse_value, value)

    for key in _REQUIRED:
        if key not in fields:
            raise InvalidData(f"{where}: has no {key} line")
    store_path = get("StorePath", parse_absolute)
    url = get("URL", _url)
    nar_sha256 = get("NarHash", _sha256)
    nar_size = get("NarSize", _nar_size)
    assert store_path is not None and url is not None and nar_sha256 is not None and nar_size is not None
    compression = get("Compression", _compression) or DEFAULT_COMPRESSION
    return NarinfoFile(
        store_path, url, compression, nar_sha256, nar_size,
        references=get("References", _references) or (),
        deriver=get("Deriver", _deriver),
        signatures=tuple(signatures),
        ca=get("CA", parse_ca),
        file_sha256=get("FileHash", _sha256),
        file_size=get("FileSize", _size),
    )


def fingerprint(info: NarinfoFile) -> bytes:
    """The bytes a ``Sig:`` signs (Nix's fingerprint, version 1)."""
    refs = ",".join(ref.absolute for ref in info.references)
    text = f"1;{info.store_path.absolute};sha256:{nixbase32.encode(info.nar_sha256)};{info.nar_size};{refs}"
    return text.encode()


def to_pathinfo(info: NarinfoFile, root: Node) -> PathInfo:
    """The PathInfo to store for ``info`` once its NAR has been ingested as ``root`` (any name)."""
    node = replace(root, name=info.store_path.basename.encode())
    deriver = None
    if info.deriver is not None:
        deriver = (info.deriver.name.removesuffix(".drv"), info.deriver.digest)
    return PathInfo(
        node=node,
        references=tuple(ref.digest for ref in info.references),
        narinfo=NarInfo(
            nar_size=info.nar_size,
            nar_sha256=info.nar_sha256,
            signatures=info.signatures,
            reference_names=tuple(ref.basename for ref in info.references),
            deriver=deriver,
            ca=info.ca,
        ),
    )


# -- field parsers: each raises InvalidData (or ValueError) with the reason -------------


def _with_line(where: str, number: int, line: str, parse_value: Callable[[str], T], value: str) -> T:
    try:
        return parse_value(value)
    except (InvalidData, ValueError) as exc:
        raise InvalidData(f"{where}: line {number} {_show(line)}: {exc}") from None


def _show(line: str) -> str:
    return repr(line if len(line) <= 200 else line[:200] + "...")


def _url(value: str) -> str:
    if not value or value != value.strip() or " " in value:
        raise InvalidData("URL is empty or has spaces")
    scheme = urllib.parse.urlsplit(value).scheme
    if scheme not in ("", "http", "https"):
        raise InvalidData(f"URL scheme {scheme!r} is not http(s) and not relative to the cache")
    return value


def _compression(value: str) -> str:
    if not value or not all(c.isalnum() or c in "-_" for c in value):
        raise InvalidData("compression must be one word")
    return value


def _size(value: str) -> int:
    if not value.isdigit() or not value.isascii() or len(value) > 20:
        raise InvalidData("not a decimal number")
    size = int(value)
    if size >= 1 << 64:
        raise InvalidData("does not fit in 64 bits")
    return size


def _nar_size(value: str) -> int:
    size = _size(value)
    if size == 0:
        raise InvalidData("NarSize is 0 (no NAR is empty)")
    return size


def _sha256(value: str) -> bytes:
    algo, digest = parse_hash(value)
    if algo != "sha256":
        raise InvalidData(f"hash algorithm is {algo}, only sha256 is supported")
    return digest


def parse_hash(value: str) -> tuple[str, bytes]:
    """``algo:<nixbase32|base16|base64>`` or SRI ``algo-<base64>`` -> (algo, digest)."""
    algo, sep, text = value.partition(":")
    sri = False
    if not sep:
        algo, sep, text = value.partition("-")
        sri = True
    if not sep or algo not in _HASH_LEN:
        raise InvalidData(f"hash {value!r} does not start with md5, sha1, sha256 or sha512 and ':' or '-'")
    return algo, decode_digest(text, _HASH_LEN[algo], base64_only=sri)


def decode_digest(text: str, length: int, base64_only: bool = False) -> bytes:
    """A digest of ``length`` bytes written in any of Nix's encodings (told apart by their length)."""
    try:
        if not base64_only and len(text) == 2 * length:
            return bytes.fromhex(text)
        if not base64_only and len(text) == nixbase32.encoded_len(length):
            return nixbase32.decode(text)
        if len(text) == 4 * ((length + 2) // 3):
            digest = base64.b64decode(text, validate=True)
            if len(digest) == length:
                return digest
    except (ValueError, binascii.Error, InvalidData) as exc:
        raise InvalidData(f"digest {text!r} does not decode: {exc}") from None
    raise InvalidData(f"digest {text!r} has the length of no encoding of {length} bytes")


def _references(value: str) -> tuple[StorePath, ...]:
    paths = {parse_basename(word) for word in value.split()}
    return tuple(sorted(paths, key=lambda p: p.basename))


def _deriver(value: str) -> StorePath | None:
    if value == UNKNOWN_DERIVER:
        return None
    path = parse_basename(value)
    if not path.name.endswith(".drv") or path.name == ".drv":
        raise InvalidStorePath(f"deriver {value!r} is not a .drv store path")
    return path


def parse_signature(value: str) -> Signature:
    """``<key name>:<base64 of 64 bytes>`` as Nix writes a ``Sig:`` line."""
    name, sep, data = value.partition(":")
    if not sep or not name:
        raise InvalidData("signature is not '<key name>:<base64>'")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidData(f"signature of {name!r} is not base64: {exc}") from None
    if len(raw) != 64:
        raise InvalidData(f"signature of {name!r} is {len(raw)} bytes, not 64 (ed25519)")
    return Signature(name, raw)


def parse_ca(value: str) -> ContentAddress:
    """``text:sha256:<hash>``, ``fixed:r:<algo>:<hash>`` or ``fixed:<algo>:<hash>``."""
    kind_text, _, hash_text = value.rpartition(":")
    kind = _CA_BY_TEXT.get(kind_text)
    if kind is None:
        raise InvalidData(f"content address kind {kind_text!r} is not one of {', '.join(_CA_BY_TEXT)}")
    algo = CA_KINDS[kind][1]
    return ContentAddress(kind, decode_digest(hash_text, _HASH_LEN[algo]))


def render(info: NarinfoFile) -> str:
    """The narinfo text Nix would write for ``info`` (tests, and serving a store as a cache)."""
    lines = [
        f"StorePath: {info.store_path.absolute}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_sha256 is not None:
        lines.append(f"FileHash: sha256:{nixbase32.encode(info.file_sha256)}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines.append(f"NarHash: sha256:{nixbase32.encode(info.nar_sha256)}")
    lines.append(f"NarSize: {info.nar_size}")
    lines.append("References: " + " ".join(ref.basename for ref in info.references))
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver.basename}")
    lines.extend(f"Sig: {sig.name}:{base64.b64encode(sig.data).decode()}" for sig in info.signatures)
    if info.ca is not None:
        prefix, algo = CA_KINDS[info.ca.hash_type]
        lines.append(f"CA: {prefix}:{algo}:{nixbase32.encode(info.ca.digest)}")
    return "\n".join(lines) + "\n"


__all__ = ["NarinfoFile", "fingerprint", "parse", "parse_ca", "parse_hash",
           "parse_signature", "render", "to_pathinfo"]
