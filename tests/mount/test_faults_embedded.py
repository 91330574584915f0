"""Damage to the embedded on-disk store under a real mount, and what ``tvixstore verify`` says.

Damaged on disk, with every connection to the store closed: a blob file
cut in the middle of a segment, one whose last segment is missing, one
deleted, a blob row whose chunk list is damaged, and a page in the middle
of store.sqlite overwritten with garbage. Each is EIO for the objects it
affects and a WARNING naming them and the damage, the rest of the store is
served, a repaired blob is served again, and ``tvixstore verify`` reports
exactly the damaged objects (and the store paths whose trees they break).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded_layout import flip_byte, stored_at
from tests.faults import LogCursor, attempt, b3, direct_read, path_info, read_bytes, serving, store_path
from tests.mounting import FUSE_MISSING, Mount
from tests.store_suite import pattern
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode, b3_text
from tvixmount.errors import TvixError
from tvixmount.store import StoreUrls, open_store
from tvixmount.store.embedded.packs import PACKED_MAX

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

SEGMENT = 256 * 1024
REPO = Path(__file__).resolve().parents[2]

GOOD = b"an undamaged file\n"
CUT = pattern(2 * SEGMENT + 70_000, seed=21)  # the file ends inside segment 1
LAST = pattern(3 * SEGMENT + 5_000, seed=22)  # the file lacks its last segment
GONE = pattern(PACKED_MAX + 5_000, seed=23)  # the file is deleted
ROW = pattern(2 * SEGMENT + 10, seed=24)  # the row's chunk list is damaged
FLIP = pattern(3_000, seed=25)  # packed, with a byte flipped; GOOD and NEAR are its neighbours
NEAR = pattern(4_000, seed=26)
TAIL = b"appended by a writer that died before recording it"
TREE = store_path("embedded-damage")


def _blob_file(store_dir: Path, data: bytes) -> Path:
    hex_ = b3(data).hex()
    return store_dir / "blobs" / hex_[:2] / hex_


def _verify(store_dir: Path) -> tuple[int, list[str]]:
    argv = [sys.executable, "-m", "tvixmount.admin.cli", "--store-dir", str(store_dir), "verify"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    return done.returncode, done.stdout.splitlines()


def _damage_blobs(store_dir: Path) -> None:
    flip_byte(store_dir, b3(FLIP), 1234)
    with open(stored_at(store_dir, b3(FLIP))[0], "ab") as pack:
        pack.write(TAIL)
    os.truncate(_blob_file(store_dir, CUT), SEGMENT + 1000)
    os.truncate(_blob_file(store_dir, LAST), 3 * SEGMENT)
    os.unlink(_blob_file(store_dir, GONE))
    db = sqlite3.connect(store_dir / "store.sqlite")
    try:
        db.execute("UPDATE blobs SET chunks = substr(chunks, 1, 40) WHERE digest = ?", (b3(ROW),))
        db.commit()
    finally:
        db.close()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    base = tmp_path_factory.mktemp("embedded")
    store_dir = base / "store"
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        for data in (GOOD, FLIP, NEAR, CUT, LAST, GONE, ROW):
            store.blobs.put(data)
        sub = Directory(files=(FileNode(b"inner", b3(GOOD), len(GOOD)),))
        store.directories.put(sub)
        top = Directory(
            directories=(DirectoryNode(b"sub", sub.digest(), 2),),
            files=tuple(FileNode(name, b3(data), len(data)) for name, data in
                        ((b"cut", CUT), (b"flip", FLIP), (b"gone", GONE), (b"good", GOOD), (b"last", LAST),
                         (b"near", NEAR), (b"row", ROW))),
        )
        store.directories.put(top)
        store.path_infos.put(path_info(DirectoryNode(TREE.basename.encode(), top.digest(), 14)))
    _damage_blobs(store_dir)
    with serving(base / "mnt", store_dir, "--request-timeout", "3") as m:
        yield m, store_dir


def test_verify_reports_exactly_the_damaged_blobs(damaged: tuple[Mount, Path]) -> None:
    _, store_dir = damaged
    code, lines = _verify(store_dir)
    assert code == 1
    pack = stored_at(store_dir, b3(FLIP))[0]
    packs = [line for line in lines if line.startswith("pack ")]
    assert packs == [f"pack {pack.name}: {len(TAIL)} of {pack.stat().st_size} bytes unreferenced "
                     "(3 blobs recorded; harmless, see --help)"]
    problems = {line.split(": ", 1)[0]: line for line in lines[:-1] if line not in packs}
    damaged = (CUT, LAST, GONE, ROW, FLIP)
    assert set(problems) == {f"blob {b3_text(b3(d))}" for d in damaged} | {f"path {TREE}"}
    assert re.search(r"chunk 0 .* \(packed in pack \w+ at \d+\) does not match its digest",
                     problems[f"blob {b3_text(b3(FLIP))}"])
    assert "is truncated" in problems[f"blob {b3_text(b3(CUT))}"]
    assert "is truncated" in problems[f"blob {b3_text(b3(LAST))}"]
    assert "is missing" in problems[f"blob {b3_text(b3(GONE))}"]
    assert "damaged row" in problems[f"blob {b3_text(b3(ROW))}"]
    assert "tree is broken" in problems[f"path {TREE}"]
    assert lines[-1].endswith(": 6 problem(s)")


def _eio_then_warning(m: Mount, name: str, data: bytes, why: str) -> str:
    cursor = LogCursor(m)
    target = m.path(TREE.basename, name)
    for _ in range(2):
        assert attempt(lambda: read_bytes(target))[0] == errno.EIO
    line = cursor.wait_for(rf"WARNING .*{re.escape(b3_text(b3(data)))}.*{why}")
    assert len(cursor.lines("WARNING", b3_text(b3(data)))) == 1
    assert cursor.lines("ERROR") == []
    assert read_bytes(m.path(TREE.basename, "sub", "inner")) == GOOD  # the rest is served
    return line


def test_blob_file_cut_inside_a_segment(damaged: tuple[Mount, Path]) -> None:
    m, store_dir = damaged
    # The kernel's readahead (1 MiB) may ask for segment 2 (wholly past the cut) before
    # segment 1 (cut after 1000 bytes): either read's line names what it found
    line = _eio_then_warning(m, "cut", CUT, r"chunk [12]: file in .* is truncated")
    cut_at_1 = f"chunk 1: file in .* is truncated \\(got 1000 of {SEGMENT} bytes at offset {SEGMENT}\\)"
    past_cut = (f"chunk 2: file in .* is truncated "
                f"\\(got 0 of {len(CUT) - 2 * SEGMENT} bytes at offset {2 * SEGMENT}\\)")
    assert re.search(cut_at_1, line) or re.search(past_cut, line), line
    assert direct_read(m.path(TREE.basename, "cut"), 0, 4096) == CUT[:4096]  # segment 0 is whole and good
    _blob_file(store_dir, CUT).write_bytes(CUT)  # repaired
    assert read_bytes(m.path(TREE.basename, "cut")) == CUT


def test_blob_file_missing_its_last_segment(damaged: tuple[Mount, Path]) -> None:
    m, store_dir = damaged
    line = _eio_then_warning(m, "last", LAST, r"chunk 3: file in .* is truncated")
    assert "got 0 of 5000 bytes" in line
    whole_segment = direct_read(m.path(TREE.basename, "last"), 2 * SEGMENT, 4096)
    assert whole_segment == LAST[2 * SEGMENT : 2 * SEGMENT + 4096]
    _blob_file(store_dir, LAST).write_bytes(LAST)
    assert read_bytes(m.path(TREE.basename, "last")) == LAST


def test_blob_file_deleted(damaged: tuple[Mount, Path]) -> None:
    m, store_dir = damaged
    _eio_then_warning(m, "gone", GONE, r"is recorded in store .* but its file .* is missing")
    _blob_file(store_dir, GONE).write_bytes(GONE)
    assert read_bytes(m.path(TREE.basename, "gone")) == GONE


def test_packed_blob_with_a_flipped_byte(damaged: tuple[Mount, Path]) -> None:
    m, store_dir = damaged
    _eio_then_warning(m, "flip", FLIP, r"chunk 0 .*packed in pack .* does not match its digest")
    for name, data in (("near", NEAR), ("good", GOOD)):  # its neighbours in the pack
        assert read_bytes(m.path(TREE.basename, name)) == data
    flip_byte(store_dir, b3(FLIP), 1234)  # repaired
    assert read_bytes(m.path(TREE.basename, "flip")) == FLIP


def test_blob_row_with_a_damaged_chunk_list(damaged: tuple[Mount, Path]) -> None:
    m, _ = damaged
    _eio_then_warning(m, "row", ROW, r"has a damaged row: size \d+, chunk size \d+, 40 bytes of chunk")


# -- a damaged page of store.sqlite --------------------------------------------------------------

PAGE = 4096
PATHS = 30


def _leaf_pages(db_file: Path, table: str) -> dict[int, int]:
    """rowid -> the b-tree leaf page holding it (leaves in key order hold consecutive rowids)."""
    db = sqlite3.connect(db_file)
    try:
        leaves = db.execute("SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
                            "ORDER BY path", (table,)).fetchall()
        rowids = [r for (r,) in db.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
    finally:
        db.close()
    where, position = {}, 0
    for pageno, cells in leaves:
        for rowid in rowids[position : position + cells]:
            where[rowid] = pageno
        position += cells
    return where


@pytest.fixture(scope="module")
def damaged_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path, dict[bytes, bytes]]]:
    """A store of PATHS directory paths; one leaf page of the directories table overwritten.

    Yields the mount, the store, and {directory digest: store path basename} of the directories
    the damaged page held.
    """
    base = tmp_path_factory.mktemp("sqlite")
    store_dir = base / "store"
    owner = {}
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        for i in range(PATHS):  # each directory ~1.5 KiB: two rows per 4 KiB page
            target = b"/nix/store/t-%d-" % i + b"x" * 34
            d = Directory(symlinks=tuple(SymlinkNode(b"l%02d" % j, target + b"%d" % j) for j in range(24)))
            store.directories.put(d)
            path = store_path(f"sqlite-page-{i}")
            store.path_infos.put(path_info(DirectoryNode(path.basename.encode(), d.digest(), 48)))
            owner[d.digest()] = path.basename.encode()
    db_file = store_dir / "store.sqlite"
    db = sqlite3.connect(db_file)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every row in the main file, nothing in the WAL
        rows = dict(db.execute("SELECT rowid, digest FROM directories").fetchall())
    finally:
        db.close()
    where = _leaf_pages(db_file, "directories")
    pages = sorted(set(where.values()))
    victim = pages[len(pages) // 2]
    hit = {bytes(rows[r]): owner[bytes(rows[r])] for r, page in where.items() if page == victim}
    assert 1 <= len(hit) < PATHS // 4
    with open(db_file, "r+b") as f:
        f.seek((victim - 1) * PAGE)
        f.write(random.Random(7).randbytes(PAGE))
    with open_store(StoreUrls.embedded(store_dir)) as store:  # the damage as the store itself sees it
        broken = set()
        for digest in owner:
            try:
                store.directories.get(digest)
            except TvixError:
                broken.add(digest)
    assert broken == set(hit)
    with serving(base / "mnt", store_dir, "--request-timeout", "3") as m:
        yield m, store_dir, hit
    shutil.rmtree(base, ignore_errors=True)


def test_damaged_database_page_is_eio_for_the_rows_on_it(damaged_db: tuple[Mount, Path, dict]) -> None:
    m, _, hit = damaged_db
    cursor = LogCursor(m)
    served = 0
    for i in range(PATHS):
        name = store_path(f"sqlite-page-{i}").basename.encode()
        code, _ = attempt(lambda name=name: os.listdir(m.path(name)))
        if name in hit.values():
            assert code == errno.EIO, name
        else:
            assert code == 0, name
            served += 1
    assert served == PATHS - len(hit)
    for digest in hit:
        line = cursor.wait_for(rf"WARNING .*directory {re.escape(b3_text(digest))}")
        assert "database disk image is malformed (the database file is damaged)" in line
    assert cursor.lines("ERROR") == []


def test_verify_reports_exactly_the_directories_on_the_damaged_page(
        damaged_db: tuple[Mount, Path, dict]) -> None:
    _, store_dir, hit = damaged_db
    code, lines = _verify(store_dir)
    assert code == 1
    expected = {f"directory {b3_text(d)}" for d in hit}
    expected |= {f"path /nix/store/{name.decode()}" for name in hit.values()}
    assert {line.split(": ", 1)[0] for line in lines[:-1]} == expected, lines
    assert all("malformed" in line or "is damaged" in line for line in lines[:-1])
    assert lines[-1].endswith(f"{PATHS} directories, {PATHS} path infos: {2 * len(hit)} problem(s)")
