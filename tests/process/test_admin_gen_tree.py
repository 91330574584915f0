"""tools/gen_tree.py: deterministic, closure-shaped, and importable as Nix would."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tvixmount.admin import cli
from tvixmount.castore import storepath

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "tools" / "gen_tree.py"


def generate(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN), str(out), *args], capture_output=True, timeout=120)


def fingerprint(root: Path) -> dict[str, tuple]:
    """Everything an import depends on: kind, owner-x bit, contents hash or link target, per path."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("d",)
            else:
                result[rel] = ("f", bool(st.st_mode & 0o100), hashlib.sha256(path.read_bytes()).hexdigest())
    return result


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "tree"
    done = generate(out, "--files", "600", "--seed", "1")
    assert done.returncode == 0, done.stderr
    return out


def test_deterministic_per_seed(small_tree, tmp_path):
    again = tmp_path / "again"
    assert generate(again, "--files", "600", "--seed", "1").returncode == 0
    assert fingerprint(again) == fingerprint(small_tree)
    other = tmp_path / "other"
    assert generate(other, "--files", "600", "--seed", "2").returncode == 0
    assert fingerprint(other) != fingerprint(small_tree)


def test_closure_like_shape(small_tree):
    fp = fingerprint(small_tree)
    files = {k: v for k, v in fp.items() if v[0] == "f"}
    links = {k: v for k, v in fp.items() if v[0] == "l"}
    dirs = [k for k, v in fp.items() if v[0] == "d"]
    assert len(files) == 600
    for package in small_tree.iterdir():
        assert storepath.check_name(package.name) is None
        assert (package / "bin").is_dir() and (package / "lib").is_dir() and (package / "share").is_dir()
    assert any(v[1] for v in files.values()) and not all(v[1] for v in files.values())
    assert any(v[2] == hashlib.sha256(b"").hexdigest() for v in files.values())  # empty files
    assert max(Counter(v[2] for v in files.values()).values()) > 1  # duplicate contents
    assert any(t[1].startswith("/nix/store/") for t in links.values())
    assert any(not t[1].startswith("/") for t in links.values())
    assert any(not any((small_tree / d).iterdir()) for d in dirs)  # empty directories
    assert 5 <= len(files) / len(dirs) <= 15
    sizes = sorted((small_tree / k).stat().st_size for k in files)
    assert sizes[len(sizes) // 2] < 16 * 1024  # most files small...
    assert sizes[-1] > 100 * 1024  # ...a tail of big ones


def test_big_files_and_refusing_a_full_outdir(tmp_path):
    out = tmp_path / "big"
    done = generate(out, "--files", "20", "--big", "2", "--big-size", "3M")
    assert done.returncode == 0, done.stderr
    bigs = sorted((out / "bigdata-1.0" / "share" / "data").iterdir())
    assert [p.stat().st_size for p in bigs] == [3 << 20, 3 << 20]
    assert bigs[0].read_bytes() != bigs[1].read_bytes()
    again = generate(out, "--files", "20")
    assert again.returncode == 1 and b"not an empty directory" in again.stderr
    bad = generate(tmp_path / "x", "--big-size", "lots")
    assert bad.returncode == 2 and b"not a size" in bad.stderr


@pytest.mark.skipif(shutil.which("nix-store") is None, reason="nix-store is not installed")
def test_generated_tree_imports_as_nix_computes(small_tree, tmp_path, capsysbinary):
    packages = sorted(small_tree.iterdir())
    code = cli.main(["--store-dir", str(tmp_path / "store"), "import", *map(str, packages)])
    out, err = capsysbinary.readouterr()
    assert (code, err) == (0, b"")
    expected = []
    for package in packages:
        nar = subprocess.run(["nix-store", "--dump", str(package)], check=True, capture_output=True).stdout
        expected.append(storepath.from_nar_sha256(package.name, hashlib.sha256(nar).digest()).absolute)
    assert out.decode().split() == expected
    assert cli.main(["--store-dir", str(tmp_path / "store"), "verify"]) == 0
