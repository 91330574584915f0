"""PathInfo: what a store path holds (tvix.store.v1), as plain values."""

from __future__ import annotations

from dataclasses import dataclass, field

from .nodes import Node


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ContentAddress:
    hash_type: int  # NARInfo.CA.Hash enum value
    digest: bytes


@dataclass(frozen=True, slots=True)
class NarInfo:
    nar_size: int
    nar_sha256: bytes
    signatures: tuple[Signature, ...] = ()
    reference_names: tuple[str, ...] = ()
    deriver: tuple[str, bytes] | None = None  # (name without .drv, 20-byte digest)
    ca: ContentAddress | None = None


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A store path's root node (named ``<hash>-<name>``) and its metadata."""

    node: Node
    references: tuple[bytes, ...] = ()
    narinfo: NarInfo | None = field(default=None)
