"""Integrity against a real mount: no byte reaches a reader unverified.

Faults are injected into the stores themselves: bytes flipped in the
embedded store's blob files (a one-segment blob and one segment of a
chunked blob), directory rows that break a rule or sit under the wrong
digest, and a scripted gRPC server that sends wrong bytes for a whole blob
or for one chunk, invalid directories and path infos for another store
path. For each: the errno the reader sees (EIO, ENOENT for a root name
that does not match), exactly one WARNING naming the digest, nothing of
the bad object cached (once the store is repaired the same path reads the
right bytes), and the rest of the mount unaffected.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded_layout import stored_at
from tests.faults import (
    GET_DIR,
    GET_INFO,
    READ,
    LogCursor,
    ScriptedStore,
    attempt,
    b3,
    path_info,
    read_bytes,
    serving,
    store_path,
)
from tests.mounting import FUSE_MISSING, Mount
from tests.store_suite import pattern
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode, b3_text
from tvixmount.castore.wire import encode_pathinfo
from tvixmount.store import StoreUrls, open_store

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

SEGMENT = 256 * 1024  # the embedded store's verification segment
GOOD = b"good bytes\n"
SMALL = pattern(1000, seed=1)  # one segment: checked against the blob digest itself
BIG = pattern(4 * SEGMENT + 500, seed=2)  # five segments, each with its own digest
FINE = Directory(files=(FileNode(b"inner", b3(GOOD), len(GOOD)),))
# A directory breaking a rule: encodable, hashable, but a name with '/'.
SLASHED = Directory(files=(FileNode(b"a/b", b3(GOOD), len(GOOD)),))
OTHER = Directory(symlinks=(SymlinkNode(b"x", b"y"),))
MISMATCH_DIGEST = b3(b"the digest a parent claims for a row holding OTHER")
MISSING_DIGEST = b3(b"a directory the store does not have")

TREE = store_path("integrity-tree")
NAMED = store_path("integrity-named")
FOREIGN = store_path("integrity-foreign")  # its row describes another store path


def _populate_embedded(store_dir: Path) -> None:
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        for data in (GOOD, SMALL, BIG):
            store.blobs.put(data)
        store.directories.put(FINE)
    db = sqlite3.connect(store_dir / "store.sqlite")
    try:
        insert = "INSERT INTO directories (digest, data) VALUES (?, ?)"
        db.execute(insert, (SLASHED.digest(), SLASHED.encode()))
        db.execute(insert, (MISMATCH_DIGEST, OTHER.encode()))
        db.commit()
    finally:
        db.close()
    tree = Directory(
        directories=(DirectoryNode(b"broken", SLASHED.digest(), 2), DirectoryNode(b"fine", FINE.digest(), 2),
                     DirectoryNode(b"mismatch", MISMATCH_DIGEST, 2),
                     DirectoryNode(b"missing", MISSING_DIGEST, 2)),
        files=(FileNode(b"big", b3(BIG), len(BIG)), FileNode(b"good", b3(GOOD), len(GOOD)),
               FileNode(b"small", b3(SMALL), len(SMALL))),
    )
    with open_store(StoreUrls.embedded(store_dir)) as store:
        store.directories.put(tree)
        store.path_infos.put(path_info(DirectoryNode(TREE.basename.encode(), tree.digest(), 12)))
        store.path_infos.put(path_info(FileNode(NAMED.basename.encode(), b3(GOOD), len(GOOD))))
        # A path info stored under FOREIGN's digest that describes NAMED.
        row = encode_pathinfo(path_info(FileNode(NAMED.basename.encode(), b3(GOOD), len(GOOD))))
    db = sqlite3.connect(store_dir / "store.sqlite")
    try:
        db.execute("INSERT INTO path_infos (digest, data) VALUES (?, ?)", (FOREIGN.digest, row))
        db.commit()
    finally:
        db.close()


def _blob_file(store_dir: Path, data: bytes) -> Path:
    hex_ = b3(data).hex()
    return store_dir / "blobs" / hex_[:2] / hex_


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    base = tmp_path_factory.mktemp("integrity")
    store_dir = base / "store"
    _populate_embedded(store_dir)
    missing = rf"directory {re.escape(b3_text(MISSING_DIGEST))} .*referenced object is missing"
    with serving(base / "mnt", store_dir, "--request-timeout", "3", allowed_errors=(missing,)) as m:
        yield m, store_dir


def _warnings_naming(cursor: LogCursor, digest: bytes) -> list[str]:
    return cursor.lines("WARNING", b3_text(digest))


# -- embedded store ------------------------------------------------------------------------------


def test_flipped_byte_in_a_one_segment_blob(embedded: tuple[Mount, Path]) -> None:
    m, store_dir = embedded
    cursor = LogCursor(m)
    target = m.path(TREE.basename, "small")
    blob_file, at, _ = stored_at(store_dir, b3(SMALL))  # packed (store/embedded/packs.py)
    assert blob_file.parent.name == "packs"
    _flip(blob_file, at + 500)
    try:
        for _ in range(3):  # every read fails, and the failure is logged once
            code, _ = attempt(lambda: read_bytes(target))
            assert code == errno.EIO
        line = cursor.wait_for(rf"WARNING .*{re.escape(b3_text(b3(SMALL)))}.*does not match its digest")
        assert "read of" in line
        assert len(_warnings_naming(cursor, b3(SMALL))) == 1
        assert read_bytes(m.path(TREE.basename, "good")) == GOOD  # the rest is served
    finally:
        _flip(blob_file, at + 500)  # repaired
    assert read_bytes(target) == SMALL  # nothing of the broken blob was kept


def test_flipped_byte_in_one_segment_of_a_chunked_blob(embedded: tuple[Mount, Path]) -> None:
    m, store_dir = embedded
    cursor = LogCursor(m)
    target = m.path(TREE.basename, "big")
    blob_file = _blob_file(store_dir, BIG)
    bad = 3 * SEGMENT + 77
    _flip(blob_file, bad)
    try:
        assert attempt(lambda: read_bytes(target))[0] == errno.EIO
        with open(target, "rb", buffering=0) as f:
            assert os.pread(f.fileno(), 4096, 0) == BIG[:4096]  # a verified segment is served
            with pytest.raises(OSError) as info:
                os.pread(f.fileno(), 4096, bad - bad % 4096)  # not a short read: the page is bad
            assert info.value.errno == errno.EIO
        cursor.wait_for(rf"WARNING .*{re.escape(b3_text(b3(BIG)))} chunk 3 .*does not match its digest")
        assert len(_warnings_naming(cursor, b3(BIG))) == 1
    finally:
        _flip(blob_file, bad)
    assert read_bytes(target) == BIG


def test_directory_breaking_a_rule_fails_only_itself(embedded: tuple[Mount, Path]) -> None:
    m, _ = embedded
    cursor = LogCursor(m)
    top = m.path(TREE.basename)
    assert sorted(os.listdir(top)) == ["big", "broken", "fine", "good", "mismatch", "missing", "small"]
    for _ in range(2):
        assert attempt(lambda: os.listdir(top / "broken"))[0] == errno.EIO
        assert attempt(lambda: os.stat(top / "broken" / "a"))[0] == errno.EIO
    line = cursor.wait_for(rf"WARNING .*directory {re.escape(b3_text(SLASHED.digest()))}")
    assert "contains '/'" in line
    assert len(_warnings_naming(cursor, SLASHED.digest())) == 1
    assert os.listdir(top / "fine") == ["inner"]
    assert read_bytes(top / "fine" / "inner") == GOOD


def test_directory_not_matching_its_parents_digest(embedded: tuple[Mount, Path]) -> None:
    m, _ = embedded
    cursor = LogCursor(m)
    top = m.path(TREE.basename)
    assert attempt(lambda: os.listdir(top / "mismatch"))[0] == errno.EIO
    assert attempt(lambda: os.stat(top / "mismatch" / "x"))[0] == errno.EIO  # OTHER's entry is not served
    line = cursor.wait_for(rf"WARNING .*directory {re.escape(b3_text(MISMATCH_DIGEST))}")
    assert f"content hashes to {b3_text(OTHER.digest())}" in line
    assert len(_warnings_naming(cursor, MISMATCH_DIGEST)) == 1
    assert os.listdir(top / "fine") == ["inner"]


def test_missing_directory_fails_only_itself(embedded: tuple[Mount, Path]) -> None:
    m, _ = embedded
    cursor = LogCursor(m)
    top = m.path(TREE.basename)
    assert attempt(lambda: os.listdir(top / "missing"))[0] == errno.EIO
    cursor.wait_for(rf"ERROR .*directory {re.escape(b3_text(MISSING_DIGEST))} .*referenced object is missing")
    assert "missing" in os.listdir(top)
    assert read_bytes(top / "good") == GOOD


def test_root_node_name_not_matching_the_store_path(embedded: tuple[Mount, Path]) -> None:
    m, _ = embedded
    cursor = LogCursor(m)
    wrong_name = f"{NAMED.hash_part}-another-name"
    assert attempt(lambda: os.stat(m.path(wrong_name)))[0] == errno.ENOENT
    assert read_bytes(m.path(NAMED.basename)) == GOOD  # the right name works
    assert attempt(lambda: os.stat(m.path(wrong_name)))[0] == errno.ENOENT  # and the wrong one still not
    # A row under one store path's digest describing another path is damage: EIO, with a warning.
    assert attempt(lambda: os.stat(m.path(FOREIGN.basename)))[0] == errno.EIO
    cursor.wait_for(rf"WARNING .*store path {FOREIGN.basename}: .*describes {NAMED.basename}")
    assert cursor.lines("WARNING", "another-name") == []


# -- over gRPC -----------------------------------------------------------------------------------

G_WHOLE = pattern(300_000, seed=3)  # no chunk list: fetched whole, verified against its digest
G_CHUNKED = pattern(700_000, seed=4)  # listed in 200 kB chunks, each verified on its own
G_GOOD = b"served over gRPC\n"
G_DIR = Directory(files=(FileNode(b"f", b3(G_GOOD), len(G_GOOD)),))
G_BROKEN_DIR = Directory(symlinks=(SymlinkNode(b"s", b"t"),))
G_TREE = store_path("grpc-tree")
G_FILE = store_path("grpc-file")
G_ASKED = store_path("grpc-asked")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, ScriptedStore]]:
    fake = ScriptedStore()
    for data in (G_WHOLE, G_GOOD):
        fake.add_blob(data)
    fake.add_blob(G_CHUNKED, chunk=200_000)
    fake.add_directory(G_DIR)
    fake.add_directory(G_BROKEN_DIR)
    tree = Directory(
        directories=(DirectoryNode(b"dir", G_DIR.digest(), 2),
                     DirectoryNode(b"other", G_BROKEN_DIR.digest(), 2)),
        files=(FileNode(b"chunked", b3(G_CHUNKED), len(G_CHUNKED)),
               FileNode(b"whole", b3(G_WHOLE), len(G_WHOLE))),
    )
    fake.add_directory(tree)
    fake.add_root(DirectoryNode(G_TREE.basename.encode(), tree.digest(), 8))
    fake.add_root(FileNode(G_FILE.basename.encode(), b3(G_GOOD), len(G_GOOD)))
    fake.add_root(FileNode(G_ASKED.basename.encode(), b3(G_GOOD), len(G_GOOD)))
    base = tmp_path_factory.mktemp("grpc-integrity")
    try:
        with serving(base / "mnt", None, "--request-timeout", "3", urls=(fake.url,) * 3) as m:
            yield m, fake
    finally:
        fake.close()


def test_grpc_whole_blob_with_wrong_bytes(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    digest = b3(G_WHOLE)
    wrong = bytearray(G_WHOLE)
    wrong[123_456] ^= 1
    fake.faults[READ] = lambda d: ("bytes", bytes(wrong)) if d == digest else None
    target = m.path(G_TREE.basename, "whole")
    try:
        for _ in range(2):
            assert attempt(lambda: read_bytes(target))[0] == errno.EIO
        line = cursor.wait_for(rf"WARNING .*{re.escape(b3_text(digest))} from .* hashes to")
        assert "nothing of it was served" in line
        assert len(_warnings_naming(cursor, digest)) == 1
    finally:
        fake.faults.clear()
    assert read_bytes(target) == G_WHOLE  # the server is right again; nothing wrong was kept


def test_grpc_one_chunk_with_wrong_bytes(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    third = b3(G_CHUNKED[400_000:600_000])
    zeroed = G_CHUNKED[:400_000] + b"\0" * 200_000 + G_CHUNKED[600_000:]  # the whole-blob stream too
    fake.faults[READ] = (
        lambda d: ("bytes", b"\0" * 200_000) if d == third else
        ("bytes", zeroed) if d == b3(G_CHUNKED) else None)
    target = m.path(G_TREE.basename, "chunked")
    try:
        assert attempt(lambda: read_bytes(target))[0] == errno.EIO
        with open(target, "rb", buffering=0) as f:
            assert os.pread(f.fileno(), 1000, 0) == G_CHUNKED[:1000]  # other chunks verify and are served
        line = cursor.wait_for(rf"WARNING .*reading chunk 2 .*{re.escape(b3_text(b3(G_CHUNKED)))}")
        assert "do not match the chunk digest" in line
        # One line for the failed read, one for the bad whole-blob stream (streamed once per worker).
        warnings = _warnings_naming(cursor, b3(G_CHUNKED))
        assert len([w for w in warnings if "reading chunk 2" in w]) == 1
        assert 1 <= len([w for w in warnings if "chunk 2" in w and "hashes to" in w]) <= 2
    finally:
        fake.faults.clear()
    assert read_bytes(target) == G_CHUNKED


def test_grpc_directory_breaking_a_rule_or_not_matching(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    slashed = Directory(files=(FileNode(b"../up", b3(G_GOOD), len(G_GOOD)),)).encode()
    fake.faults[GET_DIR] = (
        lambda d: ("bytes", slashed) if d == G_DIR.digest() else
        ("bytes", G_DIR.encode()) if d == G_BROKEN_DIR.digest() else None)
    top = m.path(G_TREE.basename)
    try:
        assert attempt(lambda: os.listdir(top / "dir"))[0] == errno.EIO
        assert attempt(lambda: os.listdir(top / "other"))[0] == errno.EIO
        line = cursor.wait_for(rf"WARNING .*directory {re.escape(b3_text(G_DIR.digest()))}")
        assert "contains '/'" in line
        line = cursor.wait_for(rf"WARNING .*directory {re.escape(b3_text(G_BROKEN_DIR.digest()))}")
        assert re.search(r"content hashes to|sent \S+ first instead of the root", line)
        assert sorted(os.listdir(top)) == ["chunked", "dir", "other", "whole"]  # the parent is fine
    finally:
        fake.faults.clear()
    assert os.listdir(top / "dir") == ["f"]  # nothing broken was cached: served once the server is right
    assert os.listdir(top / "other") == ["s"]


def test_grpc_path_info_for_another_path_or_name(scripted: tuple[Mount, ScriptedStore]) -> None:
    m, fake = scripted
    cursor = LogCursor(m)
    other = encode_pathinfo(path_info(FileNode(G_FILE.basename.encode(), b3(G_GOOD), len(G_GOOD))))
    fake.faults[GET_INFO] = (
        lambda d: ("bytes", other) if d == G_ASKED.digest else None)
    try:
        assert attempt(lambda: os.stat(m.path(G_ASKED.basename)))[0] == errno.EIO
        cursor.wait_for(rf"WARNING .*store path {G_ASKED.basename}: .*answered with {G_FILE.basename}")
        assert attempt(lambda: os.stat(m.path(f"{G_FILE.hash_part}-not-its-name")))[0] == errno.ENOENT
    finally:
        fake.faults.clear()
    assert read_bytes(m.path(G_ASKED.basename)) == G_GOOD
    assert read_bytes(m.path(G_FILE.basename)) == G_GOOD
