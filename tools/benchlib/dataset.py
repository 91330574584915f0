"""The benchmark's data: one generated tree, its embedded store and its squashfs image.

All three are built once per workdir and reused while the generator's
parameters stay the same (``dataset.json`` records them): generating,
importing and compressing ~2 GB takes minutes, measuring a mount should not
wait for that every time. Each step writes to a temporary name and renames
when done, so an interrupted run never leaves a half-built piece that a
later run would trust.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent
BIG_PACKAGE = "bigdata-1.0"


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    files: int
    big: int
    big_size: int
    seed: int


@dataclass(slots=True)
class Dataset:
    """Where the pieces are, and what every target must show (for sanity checks)."""

    spec: DatasetSpec
    tree: Path
    store: Path
    image: Path
    compression: str
    store_names: dict[str, str]  # package dir name -> "<hash>-<name>" at the tvixmount root
    big_files: list[tuple[str, int]] = field(default_factory=list)  # (path under the package, size)
    packages: list[str] = field(default_factory=list)
    big_digests: list[bytes] = field(default_factory=list)  # blake3 of each big file (the blob digests)
    entries: int = 0  # everything below the root, as os.walk sees it
    tree_bytes: int = 0

    @property
    def small_packages(self) -> list[str]:
        return [p for p in self.packages if p != BIG_PACKAGE]


def squashfs_compression() -> str:
    """lz4 when this mksquashfs has it (fast to decompress, like a build farm would pick), else gzip."""
    out = subprocess.run(["mksquashfs"], capture_output=True, text=True, check=False)
    text = out.stdout + out.stderr
    section = text.split("Compressors available", 1)[-1]
    return "lz4" if re.search(r"^\s*lz4\b", section, re.M) else "gzip"


def prepare(workdir: Path, spec: DatasetSpec, say: Callable[[str], None]) -> Dataset:
    """Build (or reuse) the tree, the store and the image under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp_path = workdir / "dataset.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    if stamp.get("spec") != asdict(spec):
        if stamp:
            say("dataset parameters changed: rebuilding tree, store and image")
        stamp = {"spec": asdict(spec)}
        for name in ("tree", "store", "image.sqfs"):
            _remove(workdir / name)
        stamp_path.write_text(json.dumps(stamp, indent=1))

    tree = workdir / "tree"
    if not stamp.get("tree"):
        _remove(tree)
        tmp = workdir / "tree.tmp"
        _remove(tmp)
        say(f"generating tree: {spec.files} files + {spec.big} x {spec.big_size >> 20} MiB "
            f"(seed {spec.seed})")
        cmd = [sys.executable, str(TOOLS / "gen_tree.py"), str(tmp), "--files", str(spec.files),
               "--big", str(spec.big), "--big-size", str(spec.big_size), "--seed", str(spec.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        say("  " + (out.stdout + out.stderr).strip().splitlines()[-1])
        tmp.rename(tree)
        stamp["tree"] = True
        stamp_path.write_text(json.dumps(stamp, indent=1))
    packages = sorted(os.listdir(tree))

    store = workdir / "store"
    if not stamp.get("store_names"):
        _remove(store)
        tmp = workdir / "store.tmp"
        _remove(tmp)
        say(f"importing {len(packages)} packages into the embedded store")
        tvixstore = [sys.executable, "-c",
                     "import sys; from tvixmount.admin.cli import main; sys.exit(main())"]
        out = subprocess.run([*tvixstore, "--store-dir", str(tmp), "--quiet", "import",
                              *(str(tree / p) for p in packages)],
                             capture_output=True, text=True, check=False, cwd=TOOLS.parent)
        if out.returncode != 0:
            raise RuntimeError(f"tvixstore import failed ({out.returncode}):\n{out.stderr[-3000:]}")
        printed = [line.strip() for line in out.stdout.splitlines() if line.startswith("/nix/store/")]
        names = {}
        for line in printed:
            base = line.rsplit("/", 1)[-1]
            names[base.split("-", 1)[1]] = base
        if sorted(names) != packages:
            raise RuntimeError(f"tvixstore import printed {sorted(names)}, expected {packages}")
        tmp.rename(store)
        stamp["store_names"] = names
        stamp_path.write_text(json.dumps(stamp, indent=1))

    image = workdir / "image.sqfs"
    compression = stamp.get("compression") or squashfs_compression()
    if not stamp.get("image"):
        _remove(image)
        tmp = workdir / "image.sqfs.tmp"
        _remove(tmp)
        say(f"building squashfs image (mksquashfs -comp {compression})")
        subprocess.run(["mksquashfs", str(tree), str(tmp), "-comp", compression, "-noappend", "-no-progress",
                        "-quiet"], check=True, capture_output=True)
        tmp.rename(image)
        stamp["image"] = True
        stamp["compression"] = compression
        stamp_path.write_text(json.dumps(stamp, indent=1))

    big_files: list[tuple[str, int]] = []
    big_root = tree / BIG_PACKAGE
    if big_root.is_dir():
        for dirpath, _dirs, files in sorted(os.walk(big_root)):
            for name in sorted(files):
                path = Path(dirpath) / name
                big_files.append((str(path.relative_to(big_root)), path.stat().st_size))
    if len(stamp.get("big_digests", [])) != len(big_files):
        stamp["big_digests"] = [_blake3_file(big_root / rel).hex() for rel, _ in big_files]
        stamp_path.write_text(json.dumps(stamp, indent=1))
    entries = 0
    total = 0
    for dirpath, dirs, files in os.walk(tree):
        entries += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
    return Dataset(spec=spec, tree=tree, store=store, image=image, compression=compression,
                   store_names=stamp["store_names"], big_files=big_files,
                   big_digests=[bytes.fromhex(d) for d in stamp["big_digests"]], packages=packages,
                   entries=entries, tree_bytes=total)


def _blake3_file(path: Path) -> bytes:
    import blake3

    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            hasher.update(block)
    return hasher.digest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # generated trees are read-only in places (store-like modes): make them writable first
        for dirpath, _dirs, _files in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
