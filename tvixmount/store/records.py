"""What a backend keeps for a directory or a path info, checked both ways.

Every backend stores bytes (canonical Directory encodings, encoded PathInfo
messages) and runs them through these functions on the way in and out, so
the memory store and the on-disk store accept, refuse and report exactly
the same things, and a corrupted row is reported the same way whatever
holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import blake3

from ..castore import nixbase32
from ..castore.directory import MAX_ENCODED_LEN, Directory, decode_directory, validate
from ..castore.nodes import DIGEST_LEN, b3_text, display_name
from ..castore.pathinfo import PathInfo, validate_pathinfo
from ..castore.wire import decode_pathinfo, encode_pathinfo
from ..errors import InvalidArgument, InvalidData

STORE_PATH_DIGEST_LEN = 20


def check_b3(digest: bytes, what: str) -> None:
    """Refuse a blob/directory digest that is not 32 bytes (a caller bug, not data)."""
    if not isinstance(digest, bytes) or len(digest) != DIGEST_LEN:
        shown = len(digest) if isinstance(digest, bytes) else type(digest).__name__
        raise InvalidArgument(f"{what} digest must be {DIGEST_LEN} bytes, got {shown}")


def check_store_path_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != STORE_PATH_DIGEST_LEN:
        shown = len(digest) if isinstance(digest, bytes) else type(digest).__name__
        raise InvalidArgument(f"store path digest must be {STORE_PATH_DIGEST_LEN} bytes, got {shown}")


def store_path_text(digest: bytes) -> str:
    """The nixbase32 hash part naming a store path digest in messages."""
    if len(digest) == STORE_PATH_DIGEST_LEN:
        return nixbase32.encode(digest)
    return digest.hex()


# -- directories -------------------------------------------------------------


def directory_row(directory: Directory) -> tuple[bytes, bytes]:
    """Validate ``directory``; return (digest, canonical encoding) to store."""
    if not isinstance(directory, Directory):
        raise InvalidArgument(f"expected a Directory, got {type(directory).__name__}")
    data = directory.encode()
    digest = _blake3(data)
    validate(directory, f"directory {b3_text(digest)}")
    if len(data) > MAX_ENCODED_LEN:  # it could never be read back
        raise InvalidData(f"directory {b3_text(digest)} has {len(directory)} entries, {len(data)} bytes "
                          f"encoded, more than the {MAX_ENCODED_LEN} a directory may have")
    return digest, data


def directory_from_row(digest: bytes, data: bytes) -> Directory:
    """Decode a stored row, checking it is valid and hashes to ``digest``."""
    try:
        return decode_directory(data, digest)
    except InvalidData as exc:
        raise InvalidData(f"stored directory {b3_text(digest)} is corrupt: {exc}") from None


def closure_rows(
    directories: Iterable[Directory], is_stored: Callable[[bytes], bool]
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Validate a batch sent leaves first; every child must be earlier or stored.

    Returns the distinct rows to store and the digest of the last directory
    (the root). This is the rule a tvix server applies to one Put stream;
    checking it here keeps every stored tree complete, so a missing
    descendant can only come from damage, never from an importer that
    forgot a directory.
    """
    rows: list[tuple[bytes, bytes]] = []
    batch: set[bytes] = set()
    root: bytes | None = None
    for directory in directories:
        digest, data = directory_row(directory)
        for child in directory.directories:
            if child.digest not in batch and not is_stored(child.digest):
                raise InvalidData(
                    f"directory {b3_text(digest)}: child {display_name(child.name)!r} "
                    f"({b3_text(child.digest)}) is neither stored nor earlier in this batch "
                    "(send directories leaves first)"
                )
        if digest not in batch:
            batch.add(digest)
            rows.append((digest, data))
        root = digest
    return rows, root


# -- path infos --------------------------------------------------------------


def pathinfo_row(info: PathInfo) -> tuple[bytes, bytes]:
    """Validate ``info``; return (store path digest, encoded PathInfo) to store."""
    if not isinstance(info, PathInfo):
        raise InvalidArgument(f"expected a PathInfo, got {type(info).__name__}")
    store_path = validate_pathinfo(info, require_narinfo=True)
    return store_path.digest, encode_pathinfo(info)


def pathinfo_from_row(digest: bytes, data: bytes) -> PathInfo:
    """Decode and validate a stored row; it must belong under ``digest``."""
    what = f"stored path info {store_path_text(digest)}"
    try:
        info = decode_pathinfo(data)
        store_path = validate_pathinfo(info, require_narinfo=True)
    except InvalidData as exc:
        raise InvalidData(f"{what} is corrupt: {exc}") from None
    if store_path.digest != digest:
        raise InvalidData(f"{what} is corrupt: it describes {store_path.basename}")
    return info


def _blake3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()
