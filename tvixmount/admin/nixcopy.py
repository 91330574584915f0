"""``tvixstore copy``: a Nix closure, from the local /nix/store into the store, as tvix-store copies it.

The closure comes from Nix itself: a derivation with ``__structuredAttrs =
true`` and ``exportReferencesGraph.closure = [ ... ]`` finds, in the JSON file
``$NIX_ATTRS_JSON_FILE`` (``.attrs.json``) of its build, a ``closure`` list
with one object per store path: ``path``, ``narHash`` (``sha256:<nixbase32>``
from older Nix, SRI ``sha256-<base64>`` from newer), ``narSize``,
``references`` (absolute store paths), and sometimes ``deriver``,
``signatures`` and ``ca``. A bare list of such objects (``nix path-info
--json`` before Nix 2.19) is read as well.

Each path keeps its real store path and references, which a plain import
(named after its NAR hash, with no references) could not give it. What is
stored is checked against what Nix says: the tree is read from the path on
disk, and the NAR hash and size computed while reading must be the JSON's, or
the path is an error and nothing names its tree (the blobs already written
stay as harmless orphans; no directory and no PathInfo is stored).

Order: references before referrers (as Nix lists are in no promised order),
so the store never shows a path whose references are missing; a path whose
reference failed is not stored either. A path the store already holds is
skipped, as tvix-store does.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..castore import nixbase32, storepath
from ..castore.pathinfo import CA_KINDS, ContentAddress, NarInfo, PathInfo, Signature
from ..castore.storepath import StorePath
from ..errors import InvalidData
from .ingest import Ingester, IngestError
from .progress import Bar, NullBar

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClosureEntry:
    """One store path of the closure, as the JSON describes it."""

    path: StorePath
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: tuple[str, bytes] | None = None  # (name without .drv, digest), as NarInfo has it
    signatures: tuple[Signature, ...] = ()
    ca: ContentAddress | None = None


@dataclass(slots=True)
class CopyReport:
    """What a copy did: paths stored, already present, and each failure with its reason."""

    copied: list[StorePath] = field(default_factory=list)
    present: list[StorePath] = field(default_factory=list)
    failed: list[tuple[StorePath, str]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def summary(self, elapsed: float) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (f"copied {len(self.copied)} paths ({len(self.present)} already present{failed}): "
                f"{self.files} files, {self.bytes / 1e6:.1f} MB in {elapsed:.2f} s")


# -- reading the JSON ----------------------------------------------------------------


def read_closure(data: bytes, source: str) -> list[ClosureEntry]:
    """The closure in ``data`` (from ``source``, for messages); InvalidData naming what is wrong."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidData(f"{source}: not JSON: {exc}") from None
    if isinstance(document, dict):
        if "closure" not in document:
            raise InvalidData(f"{source}: no 'closure' key (the derivation needs "
                              "exportReferencesGraph.closure = [ ... ] and __structuredAttrs = true)")
        document = document["closure"]
    if not isinstance(document, list):
        raise InvalidData(f"{source}: 'closure' is {type(document).__name__}, not a list of store paths")
    entries = []
    for index, item in enumerate(document):
        try:
            entries.append(_entry(item))
        except (InvalidData, KeyError, TypeError, ValueError) as exc:
            what = repr(exc.args[0]) + " is missing" if isinstance(exc, KeyError) else str(exc)
            raise InvalidData(f"{source}: closure[{index}]: {what}") from None
    return entries


def _entry(item: Any) -> ClosureEntry:
    if not isinstance(item, dict):
        raise InvalidData(f"is {type(item).__name__}, not an object")
    path = storepath.parse_absolute(_string(item, "path"))
    size = item["narSize"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 64:
        raise InvalidData(f"{path}: narSize {size!r} is not a size")
    references = item["references"]
    if not isinstance(references, list):
        raise InvalidData(f"{path}: references is not a list")
    return ClosureEntry(
        path=path,
        nar_sha256=nar_hash(_string(item, "narHash"), path),
        nar_size=size,
        references=tuple(storepath.parse_absolute(ref) for ref in references),
        deriver=_deriver(item.get("deriver"), path),
        signatures=_signatures(item.get("signatures") or [], path),
        ca=_content_address(item.get("ca"), path),
    )


def _string(item: dict[str, Any], key: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise InvalidData(f"{key} is {type(value).__name__}, not a string")
    return value


def sha256_from_text(text: str) -> bytes | None:
    """A sha256 written as hex (64), nixbase32 (52), ``sha256:`` + either, or SRI ``sha256-<base64>``."""
    value = text.strip()
    try:
        if value.startswith("sha256-"):
            digest = base64.b64decode(value[7:], validate=True)
        else:
            value = value.removeprefix("sha256:")
            digest = (bytes.fromhex(value) if len(value) == 64
                      else nixbase32.decode(value) if len(value) == 52 else b"")
    except (ValueError, binascii.Error, InvalidData):
        return None
    return digest if len(digest) == 32 else None


def nar_hash(text: str, path: StorePath) -> bytes:
    digest = sha256_from_text(text)
    if digest is None:
        raise InvalidData(f"{path}: narHash {text!r} is not a sha256 (sha256:<nixbase32> or SRI)")
    return digest


# deriver, signatures and ca are kept when Nix gives them; one that does not
# parse is dropped with a warning: the path is still the path Nix describes.


def _deriver(value: Any, path: StorePath) -> tuple[str, bytes] | None:
    if value is None:
        return None
    try:
        drv = storepath.parse_absolute(value)
        if drv.name.endswith(".drv"):
            return drv.name.removesuffix(".drv"), drv.digest
    except (InvalidData, TypeError):
        pass
    log.warning("%s: deriver %r is not a .drv store path; left out", path, value)
    return None


def _signatures(values: Iterable[Any], path: StorePath) -> tuple[Signature, ...]:
    kept = []
    for value in values:
        name, sep, data = str(value).partition(":")
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            raw = b""
        if sep and name and len(raw) == 64:
            kept.append(Signature(name, raw))
        else:
            log.warning("%s: signature %r is not <key name>:<base64 of 64 bytes>; left out", path, value)
    return tuple(kept)


_CA_TYPES = {kind: number for number, kind in CA_KINDS.items()}  # ("fixed:r", "sha256") -> 0


def _content_address(value: Any, path: StorePath) -> ContentAddress | None:
    if value is None:
        return None
    head, _, digest_text = str(value).rpartition(":")
    method, _, algo = head.rpartition(":")
    number = _CA_TYPES.get((method, algo))
    try:
        digest = nixbase32.decode(digest_text) if number is not None else b""
    except InvalidData:
        digest = b""
    if number is None or not digest:
        log.warning("%s: ca %r is not <method>:<algo>:<nixbase32>; left out", path, value)
        return None
    return ContentAddress(number, digest)


# -- ordering and copying ---------------------------------------------------------------


def references_first(entries: list[ClosureEntry]) -> list[ClosureEntry]:
    """``entries`` with each one after the entries it refers to (a self-reference does not count).

    References to paths outside ``entries`` are left to the store (tvix-store
    does not check them either). Nix allows no other cycle; one is InvalidData.
    """
    by_digest = {entry.path.digest: entry for entry in entries}
    placed: set[bytes] = set()
    visiting: set[bytes] = set()
    ordered: list[ClosureEntry] = []
    for root in sorted(entries, key=lambda e: e.path.basename):
        if root.path.digest in placed:
            continue
        visiting.add(root.path.digest)
        stack = [(root, iter(root.references))]
        while stack:
            entry, refs = stack[-1]
            ref = next(refs, None)
            if ref is None:
                stack.pop()
                visiting.discard(entry.path.digest)
                placed.add(entry.path.digest)
                ordered.append(entry)
                continue
            child = by_digest.get(ref.digest)
            if child is None or ref.digest == entry.path.digest or ref.digest in placed:
                continue
            if ref.digest in visiting:
                raise InvalidData(f"{entry.path}: reference cycle through {ref}")
            visiting.add(ref.digest)
            stack.append((child, iter(child.references)))
    return ordered


class ClosureCopier:
    """Ingests closure entries from their paths on disk into one open store."""

    def __init__(self, ingester: Ingester, bar: Bar | None = None) -> None:
        self.ingester = ingester
        self.store = ingester.store
        self.bar = NullBar() if bar is None else bar

    def copy(self, entries: list[ClosureEntry]) -> CopyReport:
        """Copy every entry (references first); store errors propagate, path errors are reported."""
        report = CopyReport()
        failed: set[bytes] = set()
        for entry in references_first(entries):
            broken = [ref for ref in entry.references if ref.digest in failed]
            if broken:
                reason = f"not copied: its reference {broken[0]} was not copied"
            elif self.store.path_infos.get(entry.path.digest) is not None:
                report.present.append(entry.path)
                self.bar.update()
                continue
            else:
                reason = self._copy_one(entry, report)
            if reason:
                failed.add(entry.path.digest)
                report.failed.append((entry.path, reason))
            self.bar.update()
        return report

    def _copy_one(self, entry: ClosureEntry, report: CopyReport) -> str:
        """Ingest and store one path; "" on success, else why nothing was stored."""
        try:
            tree = self.ingester.ingest(os.fsencode(entry.path.absolute))
        except IngestError as exc:
            return str(exc)
        if (tree.nar_sha256, tree.nar_size) != (entry.nar_sha256, entry.nar_size):
            return (f"its NAR on disk is sha256:{nixbase32.encode(tree.nar_sha256)}, {tree.nar_size} bytes; "
                    f"the closure says sha256:{nixbase32.encode(entry.nar_sha256)}, {entry.nar_size} bytes "
                    "(changed since Nix described it?); not stored")
        info = PathInfo(
            node=replace(tree.root, name=entry.path.basename.encode()),
            references=tuple(ref.digest for ref in entry.references),
            narinfo=NarInfo(
                nar_size=entry.nar_size, nar_sha256=entry.nar_sha256, signatures=entry.signatures,
                reference_names=tuple(ref.basename for ref in entry.references),
                deriver=entry.deriver, ca=entry.ca,
            ),
        )
        tree.put(self.store, info)
        report.copied.append(entry.path)
        report.files += tree.stats.files
        report.bytes += tree.stats.bytes
        log.info("copied %s (%d files, NAR %d bytes, %d references)", entry.path, tree.stats.files,
                 entry.nar_size, len(entry.references))
        return ""
