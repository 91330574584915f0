"""Where the embedded store keeps a blob's bytes on disk, for tests that damage them.

A blob is either its own file ``blobs/<2 hex>/<64 hex>`` or a range of a pack
``packs/<16 hex>`` (store/embedded/packs.py); its row says which.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def stored_at(store_dir: Path, digest: bytes) -> tuple[Path, int, int]:
    """(file, offset, size) of a recorded blob's bytes."""
    conn = sqlite3.connect(f"file:{store_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT size, pack, pack_offset FROM blobs WHERE digest = ?", (digest,)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"blob {digest.hex()} has no row"
    size, pack, offset = row
    if pack is None:
        return store_dir / "blobs" / digest.hex()[:2] / digest.hex(), 0, size
    return store_dir / "packs" / f"{pack:016x}", offset, size


def flip_byte(store_dir: Path, digest: bytes, at: int) -> None:
    """Invert byte ``at`` of the blob where it is stored."""
    path, offset, _ = stored_at(store_dir, digest)
    with open(path, "r+b") as f:
        f.seek(offset + at)
        byte = f.read(1)
        f.seek(offset + at)
        f.write(bytes([byte[0] ^ 0xFF]))


def pack_files(store_dir: Path) -> list[Path]:
    return sorted(p for p in (store_dir / "packs").glob("*") if p.is_file())


def pack_bytes(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in pack_files(store_dir))
