"""Cross-check the NAR encoder, reader and store paths against a real Nix.

Real file trees are created on disk, built into castore trees the way an
importer would, and compared with ``nix-store --dump``, ``nix-hash`` and
``nix-store --add``. Nix runs against a scratch store/state directory, so
its store paths are computed for that directory (``store_dir=``).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.castore_fixtures import Exe, Link, Store, make_on_disk
from tvixmount.castore import nar, nixbase32, storepath
from tvixmount.castore.narreader import read_nar

TREES = {
    "plain-file": b"hello\n",
    "exe-file": Exe(b"#!/bin/sh\nexit 0\n"),
    "empty-dir": {},
    "mixed": {
        b"bin": {b"run": Exe(b"x" * 4097), b"link": Link(b"run")},
        b".hidden": b"",
        b"data": {b"nested": {b"deeper": {b"f": b"12345678"}}, b"empty": {}},
        b"abs": Link(b"/nix/store/somewhereelse"),
        b"dangling": Link(b"../nowhere/at all"),
        b"\xff\xferaw": b"non-utf8 name",
        b"Z": b"capital sorts first",
    },
}


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("nix-store") is None or shutil.which("nix-hash") is None:
        pytest.skip("nix-store/nix-hash not on PATH (Debian package nix-bin)")
    base = tmp_path_factory.mktemp("nix")
    env = dict(os.environ)
    for var, sub in (("NIX_STORE_DIR", "store"), ("NIX_STATE_DIR", "state"),
                     ("NIX_LOG_DIR", "log"), ("NIX_CONF_DIR", "conf")):
        (base / sub).mkdir()
        env[var] = str(base / sub)
    probe = base / "probe"
    probe.write_bytes(b"")
    try:
        result = subprocess.run(["nix-store", "--dump", str(probe)], env=env, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"nix-store --dump does not run here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"nix-store --dump fails offline: {result.stderr.decode(errors='replace')[:200]}")
    return env


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trees")
    for name, spec in TREES.items():
        make_on_disk(root / name, spec)
    return root


@pytest.mark.parametrize("name", list(TREES))
def test_nar_bytes_match_nix_store_dump(nix_env: dict[str, str], on_disk: Path, name: str) -> None:
    expected = subprocess.run(
        ["nix-store", "--dump", str(on_disk / name)], env=nix_env, capture_output=True, check=True, timeout=30
    ).stdout
    store = Store()
    node = store.build_from_disk(on_disk / name)
    assert node == store.build(TREES[name])  # the disk tree is the spec'd tree
    assert b"".join(nar.nar_chunks(node, store.get_directory, store.read_blob)) == expected
    assert nar.nar_size(node, store.get_directory) == len(expected)
    # And Nix's NAR reads back into the identical castore tree.
    assert Store().build_from_nar(read_nar(io.BytesIO(expected))) == node


def test_hashes_and_store_paths_match_nix(nix_env: dict[str, str], on_disk: Path) -> None:
    paths = [str(on_disk / name) for name in TREES]
    hashes = subprocess.run(
        ["nix-hash", "--type", "sha256", "--base32", *paths], env=nix_env, capture_output=True, check=True,
        timeout=30,
    ).stdout.decode().split()
    added = subprocess.run(
        ["nix-store", "--add", *paths], env=nix_env, capture_output=True, check=True, timeout=60
    ).stdout.decode().split()
    assert len(hashes) == len(added) == len(TREES)
    for name, nix_hash, nix_path in zip(TREES, hashes, added, strict=True):
        store = Store()
        node = store.build_from_disk(on_disk / name)
        _size, sha256 = nar.nar_hash(node, store.get_directory, store.read_blob)
        assert nixbase32.encode(sha256) == nix_hash, name
        ours = storepath.from_nar_sha256(name, sha256, store_dir=nix_env["NIX_STORE_DIR"])
        assert f"{nix_env['NIX_STORE_DIR']}/{ours.basename}" == nix_path, name
