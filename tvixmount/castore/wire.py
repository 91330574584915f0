"""Conversions between the castore/store dataclasses and their protobuf messages.

The rest of tvixmount only sees dataclasses; this module is the one place
that knows how they map onto ``tvix.castore.v1.Node`` and
``tvix.store.v1.PathInfo``. Decoding tolerates fields a newer peer may add
(the protobuf runtime keeps them aside and we never copy them), and
converts every malformed message into InvalidData instead of a protobuf
exception.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from ..errors import InvalidData
from ..proto import castore_pb2, pathinfo_pb2
from .nodes import DirectoryNode, FileNode, Node, SymlinkNode
from .pathinfo import ContentAddress, NarInfo, PathInfo, Signature, validate_pathinfo


def node_to_proto(node: Node) -> castore_pb2.Node:
    msg = castore_pb2.Node()
    fill_node(msg, node)
    return msg


def fill_node(msg: castore_pb2.Node, node: Node) -> None:
    """Set ``node`` as the member of an existing Node message (e.g. a PathInfo's)."""
    if isinstance(node, DirectoryNode):
        msg.directory.SetInParent()
        msg.directory.name = node.name
        msg.directory.digest = node.digest
        msg.directory.size = node.size
    elif isinstance(node, FileNode):
        msg.file.SetInParent()
        msg.file.name = node.name
        msg.file.digest = node.digest
        msg.file.size = node.size
        msg.file.executable = node.executable
    elif isinstance(node, SymlinkNode):
        msg.symlink.SetInParent()
        msg.symlink.name = node.name
        msg.symlink.target = node.target
    else:
        raise TypeError(f"not a castore node: {node!r}")


def node_from_proto(msg: castore_pb2.Node) -> Node:
    """The node a Node message carries; InvalidData if it carries none."""
    kind = msg.WhichOneof("node")
    if kind == "directory":
        return DirectoryNode(msg.directory.name, msg.directory.digest, msg.directory.size)
    if kind == "file":
        return FileNode(msg.file.name, msg.file.digest, msg.file.size, msg.file.executable)
    if kind == "symlink":
        return SymlinkNode(msg.symlink.name, msg.symlink.target)
    raise InvalidData("node: no node set")


def pathinfo_to_proto(info: PathInfo) -> pathinfo_pb2.PathInfo:
    msg = pathinfo_pb2.PathInfo()
    fill_node(msg.node, info.node)
    msg.references.extend(info.references)
    narinfo = info.narinfo
    if narinfo is not None:
        out = msg.narinfo
        out.SetInParent()
        out.nar_size = narinfo.nar_size
        out.nar_sha256 = narinfo.nar_sha256
        for sig in narinfo.signatures:
            out.signatures.add(name=sig.name, data=sig.data)
        out.reference_names.extend(narinfo.reference_names)
        if narinfo.deriver is not None:
            out.deriver.SetInParent()
            out.deriver.name, out.deriver.digest = narinfo.deriver
        if narinfo.ca is not None:
            out.ca.SetInParent()
            out.ca.type = narinfo.ca.hash_type  # type: ignore[assignment]
            out.ca.digest = narinfo.ca.digest
    return msg


def pathinfo_from_proto(msg: pathinfo_pb2.PathInfo) -> PathInfo:
    """Convert without validating (see ``validate_pathinfo``); a missing node is InvalidData."""
    if not msg.HasField("node"):
        raise InvalidData("path info: no root node")
    node = node_from_proto(msg.node)
    narinfo = None
    if msg.HasField("narinfo"):
        n = msg.narinfo
        narinfo = NarInfo(
            nar_size=n.nar_size,
            nar_sha256=n.nar_sha256,
            signatures=tuple(Signature(s.name, s.data) for s in n.signatures),
            reference_names=tuple(n.reference_names),
            deriver=(n.deriver.name, n.deriver.digest) if n.HasField("deriver") else None,
            ca=ContentAddress(int(n.ca.type), n.ca.digest) if n.HasField("ca") else None,
        )
    return PathInfo(node=node, references=tuple(msg.references), narinfo=narinfo)


def encode_pathinfo(info: PathInfo) -> bytes:
    """The protobuf encoding (deterministic, so equal infos encode equally)."""
    return pathinfo_to_proto(info).SerializeToString(deterministic=True)


def decode_pathinfo(data: bytes, require_narinfo: bool = False) -> PathInfo:
    """Decode and validate an encoded PathInfo.

    ``narinfo`` is optional by default because seed-era stores wrote
    PathInfos without it (docs/protocol.md, 'PathInfo validation'); pass ``require_narinfo=True``
    where a current peer is known.
    """
    msg = pathinfo_pb2.PathInfo()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise InvalidData(f"path info is not a valid protobuf message: {exc}") from None
    info = pathinfo_from_proto(msg)
    validate_pathinfo(info, require_narinfo=require_narinfo)
    return info
