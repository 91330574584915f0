"""PathInfo: what a store path holds (tvix.store.v1), as plain values."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from ..errors import InvalidData
from . import nixbase32
from .directory import check_name, check_node
from .nodes import DirectoryNode, FileNode, Node, SymlinkNode, b3_text, display_name
from .storepath import DIGEST_LEN, STORE_DIR, StorePath, parse_basename


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


# -- validation and presentation ----------------------------------------------
#
# A PathInfo is the only link from a store path to its tree, so one that is
# stored or served must be checked as a current tvix checks it (docs/protocol.md,
# 'PathInfo validation'): a bad one would put a tree under the wrong name or carry references
# no client could resolve.

SHA256_LEN = 32
SIGNATURE_LEN = 64

# NARInfo.CA.Hash value -> (Nix's "ca" prefix, digest algorithm)
CA_KINDS: dict[int, tuple[str, str]] = {
    0: ("fixed:r", "sha256"),
    1: ("fixed:r", "sha1"),
    2: ("fixed:r", "sha512"),
    3: ("fixed:r", "md5"),
    4: ("text", "sha256"),
    5: ("fixed", "sha1"),
    6: ("fixed", "md5"),
    7: ("fixed", "sha256"),
    8: ("fixed", "sha512"),
}
_HASH_LEN = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def validate_pathinfo(info: PathInfo, require_narinfo: bool = True) -> StorePath:
    """Raise InvalidData for the first rule ``info`` breaks; return its store path.

    ``require_narinfo=False`` accepts the seed-era form without NAR metadata.
    """
    node = info.node
    if not isinstance(node, (DirectoryNode, FileNode, SymlinkNode)):
        raise InvalidData(f"path info: root node is {type(node).__name__}, not a castore node")
    label = display_name(node.name)
    what = f"path info {label!r}"
    narinfo = info.narinfo
    if narinfo is None and require_narinfo:
        raise InvalidData(f"{what}: narinfo is missing")
    for index, ref in enumerate(info.references):
        if len(ref) != DIGEST_LEN:
            raise InvalidData(f"{what}: references[{index}] is {len(ref)} bytes, not {DIGEST_LEN}")
    if narinfo is not None:
        if len(narinfo.reference_names) != len(info.references):
            counts = f"{len(narinfo.reference_names)} reference_names for {len(info.references)} references"
            raise InvalidData(f"{what}: {counts}")
        for index, (ref_name, ref) in enumerate(zip(narinfo.reference_names, info.references, strict=True)):
            try:
                ref_path = parse_basename(ref_name)
            except InvalidData as exc:
                raise InvalidData(f"{what}: reference_names[{index}]: {exc}") from None
            if ref_path.digest != ref:
                raise InvalidData(
                    f"{what}: reference_names[{index}] {ref_name!r} does not match references[{index}] "
                    f"{nixbase32.encode(ref)}"
                )
    problem = check_name(node.name) or check_node(node)
    if problem:
        raise InvalidData(f"{what}: root node: {problem}")
    try:
        store_path = parse_basename(node.name)
    except InvalidData as exc:
        raise InvalidData(f"{what}: root node name is not a store path: {exc}") from None
    if narinfo is not None:
        if len(narinfo.nar_sha256) != SHA256_LEN:
            raise InvalidData(f"{what}: nar_sha256 is {len(narinfo.nar_sha256)} bytes, not {SHA256_LEN}")
        if not 0 <= narinfo.nar_size < 1 << 64:
            raise InvalidData(f"{what}: nar_size {narinfo.nar_size} is not a u64")
        if narinfo.deriver is not None:
            name, digest = narinfo.deriver
            try:
                StorePath(digest, name)
            except InvalidData as exc:
                raise InvalidData(f"{what}: deriver: {exc}") from None
        for index, sig in enumerate(narinfo.signatures):
            if len(sig.data) != SIGNATURE_LEN:
                raise InvalidData(
                    f"{what}: signatures[{index}] ({sig.name!r}) is {len(sig.data)} bytes, "
                    f"not {SIGNATURE_LEN}"
                )
        if narinfo.ca is not None:
            kind = CA_KINDS.get(narinfo.ca.hash_type)
            if kind is None:
                raise InvalidData(f"{what}: ca has unknown hash type {narinfo.ca.hash_type}")
            expected = _HASH_LEN[kind[1]]
            if len(narinfo.ca.digest) != expected:
                raise InvalidData(
                    f"{what}: ca {kind[0]}:{kind[1]} digest is {len(narinfo.ca.digest)} bytes, not {expected}"
                )
    return store_path


def narinfo_fingerprint(info: PathInfo) -> str:
    """The string a narinfo ``Sig:`` signs: ``1;<path>;sha256:<nixbase32>;<size>;<refs>``."""
    store_path = validate_pathinfo(info)
    assert info.narinfo is not None
    refs = ",".join(f"{STORE_DIR}/{name}" for name in info.narinfo.reference_names)
    return (
        f"1;{store_path.absolute};sha256:{nixbase32.encode(info.narinfo.nar_sha256)};"
        f"{info.narinfo.nar_size};{refs}"
    )


def pathinfo_to_json(info: PathInfo) -> dict:
    """A JSON-ready view for ``tvixstore info``, in the notations Nix users know.

    Store paths are absolute, the NAR hash is ``sha256:<nixbase32>`` (as in
    narinfo files), castore digests are ``b3:`` base64, signatures are
    ``<key name>:<base64>``, ``ca`` is Nix's ``fixed:r:sha256:<nixbase32>``
    form. Names that are not UTF-8 are shown with backslash escapes.
    """
    node = info.node
    out: dict = {"path": _path_text(node.name)}
    out["node"] = _node_json(node)
    narinfo = info.narinfo
    if narinfo is not None:
        out["narHash"] = "sha256:" + nixbase32.encode(narinfo.nar_sha256)
        out["narHashHex"] = narinfo.nar_sha256.hex()
        out["narSize"] = narinfo.nar_size
        out["references"] = [f"{STORE_DIR}/{name}" for name in narinfo.reference_names]
        if narinfo.deriver is not None:
            name, digest = narinfo.deriver
            out["deriver"] = f"{STORE_DIR}/{nixbase32.encode(digest)}-{name}.drv"
        if narinfo.ca is not None:
            prefix, algo = CA_KINDS.get(narinfo.ca.hash_type, (f"unknown-{narinfo.ca.hash_type}", "?"))
            out["ca"] = f"{prefix}:{algo}:{nixbase32.encode(narinfo.ca.digest)}"
        out["signatures"] = [f"{s.name}:{base64.b64encode(s.data).decode()}" for s in narinfo.signatures]
    else:
        # Seed-era info without names: the hash parts are all there is.
        out["references"] = [f"{STORE_DIR}/{nixbase32.encode(ref)}-?" for ref in info.references]
    return out


def _path_text(name: bytes) -> str:
    return f"{STORE_DIR}/{display_name(name)}"


def _node_json(node: Node) -> dict:
    if isinstance(node, DirectoryNode):
        return {"type": "directory", "digest": b3_text(node.digest), "size": node.size}
    if isinstance(node, FileNode):
        return {"type": "regular", "digest": b3_text(node.digest), "size": node.size,
                "executable": node.executable}
    return {"type": "symlink", "target": display_name(node.target)}
