"""Every op a worker answers, each declared once: its name, its arguments, and its result ``R``.

Everything about an op hangs off its one ``Op[R]`` object::

    PATH_INFO: Op[Node | None]                         declared here
      dispatcher  WorkerPool.call(PATH_INFO, digest20) -> Node | None   (under the Fetcher methods)
      worker      @handles(PATH_INFO)
                  def path_info(ctx, digest20) -> Node | None          (workers/handlers.py)
      wire        ["path_info", [digest20]] in the request; PATH_INFO.encode(node) in the reply,
                  PATH_INFO.decode on arrival

Only the name crosses the wire, and both ends find the same object by it
(``OPS``). A request naming no op, or with arguments that are not exactly
the declared types, is answered with InvalidArgument: an error reply, not
a killed worker, since the request came from our own dispatcher.

Results are plain msgpack types on the wire and ``R`` at either end: nodes
as tagged lists, directories as three lists of untagged entries. The worker
validated what it encodes (workers/handlers.py), and validating again would
cost dispatcher CPU for every listing, so the decoders here check shapes
only; a shape that does not fit is ProtocolError, and the dispatcher kills
the worker that sent it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from ..castore.directory import Directory
from ..castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from ..errors import InvalidArgument
from . import readwire
from .framing import ProtocolError, RingRef, preview
from .messages import decode_hello

R = TypeVar("R")
C = TypeVar("C")
P = ParamSpec("P")
# A handler of an op whose result is R, taking a context C first: it returns R, or a RingRef
# when it put the bytes of R in its ring.
Handler = Callable[Concatenate[C, P], R | RingRef]

MAX_READ = 16 << 20  # largest blob_read length a worker accepts

_TAG_DIR, _TAG_FILE, _TAG_LINK = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Op(Generic[R]):
    """One op: its wire name, its argument types, and how its result ``R`` crosses the wire."""

    name: str
    arg_types: tuple[type, ...]
    encode: Callable[[R], Any]
    decode: Callable[[Any], R]
    # The whole request frame as a fixed struct, (id, deadline, *args) -> bytes, for an op sent so
    # often that msgpack's cost shows (readwire.py); None: a msgpack request (messages.py).
    fixed: Callable[..., bytes] | None = None

    def check_args(self, args: Sequence[Any]) -> None:
        """InvalidArgument unless ``args`` are exactly the declared types (a bool is no offset)."""
        if len(args) != len(self.arg_types) or not all(
            type(a) is t for a, t in zip(args, self.arg_types, strict=True)
        ):
            got = ", ".join(type(a).__name__ for a in args)
            want = ", ".join(t.__name__ for t in self.arg_types)
            raise InvalidArgument(f"op {self.name!r} takes ({want}), got ({got})")


# -- castore values on the wire ---------------------------------------------------


def encode_node(node: Node) -> list[Any]:
    """A node as a compact tagged list (the tag keeps the three kinds apart)."""
    if type(node) is FileNode:
        return [_TAG_FILE, node.name, node.digest, node.size, node.executable]
    if type(node) is DirectoryNode:
        return [_TAG_DIR, node.name, node.digest, node.size]
    if type(node) is SymlinkNode:
        return [_TAG_LINK, node.name, node.target]
    raise TypeError(f"not a castore node: {node!r}")


def decode_node(wire: Any) -> Node:
    try:
        tag = wire[0]
        if tag == _TAG_FILE and len(wire) == 5:
            node: Node = FileNode(_b(wire[1]), _b(wire[2]), _u(wire[3]), _bool(wire[4]))
        elif tag == _TAG_DIR and len(wire) == 4:
            node = DirectoryNode(_b(wire[1]), _b(wire[2]), _u(wire[3]))
        elif tag == _TAG_LINK and len(wire) == 3:
            node = SymlinkNode(_b(wire[1]), _b(wire[2]))
        else:
            raise ValueError("unknown tag or length")
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ProtocolError(f"malformed node {preview(wire)}: {exc}") from None
    return node


def encode_directory(directory: Directory) -> list[Any]:
    """[[dir entries], [file entries], [symlink entries]], each entry untagged."""
    return [
        [[d.name, d.digest, d.size] for d in directory.directories],
        [[f.name, f.digest, f.size, f.executable] for f in directory.files],
        [[s.name, s.target] for s in directory.symlinks],
    ]


def decode_directory(wire: Any) -> Directory:
    """The Directory a worker validated (and checked against its digest); only the shape is checked here."""
    try:
        dirs, files, links = wire
        return Directory(
            tuple(DirectoryNode(_b(n), _b(d), _u(s)) for n, d, s in dirs),
            tuple(FileNode(_b(n), _b(d), _u(s), _bool(x)) for n, d, s, x in files),
            tuple(SymlinkNode(_b(n), _b(t)) for n, t in links),
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed directory {preview(wire)}: {exc}") from None


def _b(v: Any) -> bytes:
    if type(v) is not bytes:
        raise TypeError(f"expected bytes, got {type(v).__name__}")
    return v


def _u(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise TypeError(f"expected a non-negative int, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise TypeError(f"expected a bool, got {type(v).__name__}")
    return v


# -- result codecs ------------------------------------------------------------------


def _same(v: Any) -> Any:
    return v


def _encode_root(node: Node | None) -> list[Any] | None:
    return None if node is None else encode_node(node)


def _decode_root(wire: Any) -> Node | None:
    return None if wire is None else decode_node(wire)


def _encode_ping(who: tuple[int, int]) -> list[int]:
    return list(who)


def _decode_bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(v).__name__}")
    return v


def _encode_tree(tree: list[tuple[bytes, Directory]]) -> list[Any]:
    return [[digest, encode_directory(d)] for digest, d in tree]


def _decode_tree(wire: Any) -> list[tuple[bytes, Directory]]:
    try:
        return [(_b(digest), decode_directory(d)) for digest, d in wire]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed directory tree: {exc}") from None


def _encode_nodes(nodes: list[Node]) -> list[Any]:
    return [encode_node(n) for n in nodes]


def _decode_nodes(wire: Any) -> list[Node]:
    if type(wire) is not list:
        raise ProtocolError(f"expected a list of nodes, got {preview(wire)}")
    return [decode_node(w) for w in wire]


# -- the ops ------------------------------------------------------------------------

# Who answers: (worker id, pid).
PING: Op[tuple[int, int]] = Op("ping", (), _encode_ping, decode_hello)
# The root node stored under a 20-byte store path digest, or None.
PATH_INFO: Op[Node | None] = Op("path_info", (bytes,), _encode_root, _decode_root)
# (digest, max_entries): a directory and what is below it, parents first, bounded.
DIRECTORY_TREE: Op[list[tuple[bytes, Directory]]] = Op("directory_tree", (bytes, int), _encode_tree,
                                                       _decode_tree)
# Every root node, in the store's order.
LIST_ROOT: Op[list[Node]] = Op("list_root", (), _encode_nodes, _decode_nodes)
# (digest, offset, length, size hint or -1): verified bytes, short only at EOF.
# Its request travels as a fixed struct, and its ring reply too (readwire.py).
BLOB_READ: Op[bytes] = Op("blob_read", (bytes, int, int, int), _same, _decode_bytes, readwire.encode_request)

# The root node under a store path digest, fetched into the store first when the path-info
# service substitutes (a binary cache): sent with the long --substitute-timeout, only after
# PATH_INFO (what the store holds now) said None.
HELD_PATH_INFO: Op[Node | None] = Op("held_path_info", (bytes,), _encode_root, _decode_root)

# (digests concatenated, claimed sizes): many small blobs whole, verified, packed in one reply
# (protocol/batch.py: batch.decode_reply unpacks it into bytes, or None for each that failed).
BLOB_BATCH: Op[bytes] = Op("blob_batch", (bytes, list), _same, _decode_bytes)

OPS: dict[str, Op[Any]] = {op.name: op for op in (PING, PATH_INFO, DIRECTORY_TREE, LIST_ROOT, BLOB_READ,
                                                  HELD_PATH_INFO, BLOB_BATCH)}


# -- who answers them -----------------------------------------------------------------


class Handlers(Generic[C]):
    """The function answering each op, for handlers that take a context ``C`` first.

    A worker fills one table at import (``@table.handles(ops.BLOB_READ)``);
    its loop finds a request's op and handler by name (``find``), and
    LocalFetcher runs them in-process (``run``). A handler returns ``R``,
    or a RingRef when it put the bytes of ``R`` in its ring (the collector
    puts those bytes in the reply before anyone decodes it).
    """

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[Op[Any], Callable[..., Any]]] = {}

    def handles(self, op: Op[R]) -> Callable[[Handler[C, P, R]], Handler[C, P, R]]:
        """Register the decorated function as the handler of ``op``; one handler per op."""
        if OPS.get(op.name) is not op:
            raise ValueError(f"{op.name!r} is not an op of this protocol")

        def register(handler: Handler[C, P, R]) -> Handler[C, P, R]:
            if op.name in self._by_name:
                raise ValueError(f"op {op.name!r} already has a handler")
            self._by_name[op.name] = (op, handler)
            return handler

        return register

    def check_complete(self) -> None:
        """Raise unless every op has a handler (a worker that cannot answer an op is a bug)."""
        missing = sorted(set(OPS) - set(self._by_name))
        if missing:
            raise RuntimeError(f"no handler for op {', '.join(missing)}")

    def handler(self, op: Op[Any]) -> Callable[..., Any]:
        """The handler of ``op`` (for a request whose arguments a fixed struct typed already)."""
        return self._by_name[op.name][1]

    def items(self) -> list[tuple[Op[Any], Callable[..., Any]]]:
        return list(self._by_name.values())

    def find(self, name: str, args: Sequence[Any]) -> tuple[Op[Any], Callable[..., Any]]:
        """The op called ``name`` and its handler, if ``args`` fit it; InvalidArgument otherwise."""
        entry = self._by_name.get(name)
        if entry is None:
            raise InvalidArgument(f"unknown op {name!r}")
        entry[0].check_args(args)
        return entry

    def run(self, ctx: C, op: Op[R], *args: Any) -> R:
        """Answer ``op`` in this process, where there is no ring: the result is the value itself."""
        _, handler = self.find(op.name, args)
        result = handler(ctx, *args)
        if type(result) is RingRef:
            raise ProtocolError(f"{op.name}: a ring reference from a handler that has no ring")
        return result
