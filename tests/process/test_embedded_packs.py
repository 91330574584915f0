"""Small blobs in packs (store/embedded/packs.py) with real processes on a real store on disk.

A format-1 store (every blob its own file, no pack columns) is read as
before and upgraded only when a writer first packs; several ``tvixstore
import`` processes at once append without interleaving, store each blob
once and leave a store that verifies; an import killed with SIGKILL in the
middle of its batch leaves only unrecorded pack bytes, which verify reports
and the next writer cuts back.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from tests.embedded_layout import pack_bytes, pack_files, stored_at
from tests.store_suite import pattern
from tvixmount.store import StoreUrls, open_store
from tvixmount.store.embedded.layout import FORMAT_FILE
from tvixmount.store.embedded.packs import PACKED_MAX, plan_reads

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256 * 1024
OLD_SCHEMA = """
CREATE TABLE blobs (digest BLOB NOT NULL PRIMARY KEY, size INTEGER NOT NULL,
                    chunk_size INTEGER NOT NULL, chunks BLOB NOT NULL);
CREATE TABLE directories (digest BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE path_infos (digest BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL);
PRAGMA user_version = 1;
"""


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def tvixstore(store: Path, *argv: str, **popen: object) -> subprocess.Popen:
    quiet = ["--quiet"] if argv[0] != "verify" else []  # verify: the summary and the pack lines
    cmd = [sys.executable, "-m", "tvixmount.admin.cli", "--store-dir", str(store), *quiet, *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def verify(store: Path) -> tuple[int, list[str]]:
    code, out, err = finished(tvixstore(store, "verify"))
    assert "Traceback" not in err, err
    return code, out.splitlines()


def pack_columns(store: Path) -> bool:
    """Whether the blobs table has the pack columns and their index."""
    conn = sqlite3.connect(store / "store.sqlite")
    try:
        columns = any(row[1] == "pack" for row in conn.execute("PRAGMA table_info(blobs)"))
        index = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'blobs_by_pack'").fetchone()
        assert (index is not None) == columns, "the pack columns come with their index"
        return columns
    finally:
        conn.close()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def files_of(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def read_blob(store: Path, digest: bytes) -> bytes:
    with open_store(StoreUrls.embedded(store)) as s, s.blobs.open_read(digest) as reader:
        return reader.pread(0, 1 << 30)


# -- a store made before packs ------------------------------------------------------------------


def make_format_1_store(root: Path, blobs: list[bytes]) -> None:
    """A store as tvixmount wrote it before packs: marker format=1, one file per blob, no pack columns."""
    root.mkdir()
    for sub in ("blobs", "tmp", *(f"blobs/{i:02x}" for i in range(256))):
        (root / sub).mkdir()
    conn = sqlite3.connect(root / "store.sqlite")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(OLD_SCHEMA)
    for data in blobs:
        digest = b3(data)
        count = -(-len(data) // CHUNK)
        chunks = b"".join(b3(data[i * CHUNK : (i + 1) * CHUNK]) for i in range(count)) if count > 1 else b""
        conn.execute("INSERT INTO blobs VALUES (?, ?, ?, ?)", (digest, len(data), CHUNK, chunks))
        (root / "blobs" / digest.hex()[:2] / digest.hex()).write_bytes(data)
    conn.commit()
    conn.close()
    (root / FORMAT_FILE).write_text(f"tvixmount-store\nformat=1\nchunk_size={CHUNK}\n")


def test_format_1_store_is_read_as_before_and_upgraded_by_the_first_pack(tmp_path: Path) -> None:
    store = tmp_path / "store"
    old = [b"small, from before packs", pattern(3 * CHUNK + 5, seed=1)]
    make_format_1_store(store, old)
    reader = open_store(StoreUrls.embedded(store))  # opened before the upgrade, kept open throughout
    try:
        assert [read_blob(store, b3(d)) for d in old] == old
        assert reader.blobs.read_many([(b3(d), len(d)) for d in old]) == old
        # A writer storing only a big blob does not upgrade the store.
        big = pattern(PACKED_MAX + 1, seed=2)
        with open_store(StoreUrls.embedded(store, create=True)) as writer:
            writer.blobs.put(big)
        assert "format=1" in (store / FORMAT_FILE).read_text() and not pack_columns(store)
        # Another process packs a small file: columns first, then the marker, then the pack.
        tree = make_tree(tmp_path / "tree", {"new": b"packed after the upgrade", "old": old[0]})
        code, _, err = finished(tvixstore(store, "import", str(tree)))
        assert code == 0, err
        assert "format=2" in (store / FORMAT_FILE).read_text() and pack_columns(store)
        new = b3(b"packed after the upgrade")
        assert stored_at(store, new)[0].parent.name == "packs"
        assert stored_at(store, b3(old[0]))[0].parent.parent.name == "blobs"  # kept, not packed again
        # The reader that opened the format-1 store finds the packed blob all the same.
        assert reader.blobs.read_many([(new, 24), (b3(old[0]), 24)]) == [b"packed after the upgrade", old[0]]
        with reader.blobs.open_read(new) as r:
            assert r.pread(0, 100) == b"packed after the upgrade"
    finally:
        reader.close()
    assert [read_blob(store, b3(d)) for d in [*old, big]] == [*old, big]
    code, lines = verify(store)
    assert code == 0 and lines[-1].endswith(": OK"), lines


# -- several writers ------------------------------------------------------------------------------


def test_concurrent_importers_append_without_interleaving(tmp_path: Path) -> None:
    shared = {f"shared/{i:04d}": pattern(200 + 37 * i, seed=i) for i in range(300)}
    trees = []
    for n in range(3):
        own = {f"own{n}/{i:04d}": pattern(100 + 53 * i, seed=1000 * (n + 1) + i) for i in range(400)}
        own[f"own{n}/big"] = pattern(PACKED_MAX + 1000 * n + 1, seed=77 + n)
        trees.append(make_tree(tmp_path / f"tree{n}", {**shared, **own}))
    store = tmp_path / "store"
    finished(tvixstore(store, "import", str(make_tree(tmp_path / "seed", {"x": b"x"}))))  # the store exists
    procs = [tvixstore(store, "import", str(tree)) for tree in trees]
    results = [finished(p) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    code, lines = verify(store)
    assert code == 0, lines
    assert lines[-1].startswith("checked 1504 blobs") and lines[-1].endswith("4 path infos: OK"), lines
    conn = sqlite3.connect(store / "store.sqlite")
    rows = conn.execute("SELECT pack, pack_offset, size FROM blobs WHERE pack IS NOT NULL "
                        "ORDER BY pack, pack_offset").fetchall()
    conn.close()
    assert len(rows) == 1 + 300 + 3 * 400  # each distinct small blob recorded once
    for (pack, offset, _), (prev_pack, prev_offset, prev_size) in zip(rows[1:], rows, strict=False):
        assert pack != prev_pack or offset >= prev_offset + prev_size, "two blobs share bytes"
    with open_store(StoreUrls.embedded(store)) as s:
        for tree in trees:
            wanted = files_of(tree)
            got = s.blobs.read_many([(b3(d), len(d)) for d in wanted.values()])
            assert got == list(wanted.values())


def test_import_killed_in_its_batch_leaves_only_unrecorded_pack_bytes(tmp_path: Path) -> None:
    files = {f"d{i // 100:02d}/f{i:05d}": pattern(300 + (i % 97) * 41, seed=i) for i in range(6000)}
    tree = make_tree(tmp_path / "tree", files)
    store = tmp_path / "store"
    finished(tvixstore(store, "import", str(make_tree(tmp_path / "seed", {"x": b"seed"}))))
    before = pack_bytes(store)
    proc = tvixstore(store, "import", str(tree))
    deadline = time.monotonic() + 60
    while pack_bytes(store) < before + 100_000 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # appended, not yet recorded: the batch ends after the walk
    assert finished(proc)[0] == -signal.SIGKILL
    dead = pack_bytes(store) - before
    assert dead >= 100_000
    code, lines = verify(store)
    assert code == 0, lines  # nothing recorded is damaged...
    [pack] = pack_files(store)
    assert lines[:-1] == [f"pack {pack.name}: {dead} of {before + dead} bytes unreferenced "
                          "(1 blobs recorded; harmless, see --help)"]  # ...and the dead tail is reported
    after = b"the first blob written after the crash"
    code, _, err = finished(tvixstore(store, "import", str(make_tree(tmp_path / "after", {"a": after}))))
    assert code == 0, err
    code, lines = verify(store)
    assert code == 0 and len(lines) == 1 and lines[0].endswith(": OK"), lines  # the tail was cut back
    assert pack_files(store) == [pack]  # the next import took the dead writer's pack...
    assert stored_at(store, b3(after)) == (pack, before, len(after))  # ...and appended where the tail began
    assert pack_bytes(store) == before + len(after)
    code, _, err = finished(tvixstore(store, "import", str(tree)))
    assert code == 0, err
    with open_store(StoreUrls.embedded(store)) as s:
        got = s.blobs.read_many([(b3(d), len(d)) for d in files.values()])
    assert got == list(files.values())


# -- reads planned per pack ------------------------------------------------------------------------


@pytest.mark.parametrize(("ranges", "expected"), [
    ([], []),
    ([(0, 10, 0)], [(0, 10, (0,))]),
    ([(100, 10, 1), (0, 10, 0)], [(0, 110, (0, 1))]),  # sorted by offset, gap 90 <= gap
    ([(0, 10, 0), (10 + 65537, 5, 1)], [(0, 10, (0,)), (65547, 65552, (1,))]),  # gap too wide
    ([(0, 600_000, 0), (600_000, 600_000, 1)], [(0, 600_000, (0,)), (600_000, 1_200_000, (1,))]),  # span
    ([(0, 10, 0), (0, 10, 1)], [(0, 10, (0, 1))]),  # the same blob asked twice
])
def test_plan_reads(ranges: list, expected: list) -> None:
    assert [(r.start, r.end, r.items) for r in plan_reads(ranges)] == expected
