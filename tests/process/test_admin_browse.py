"""``tvixstore ls/cat/info/list/verify`` and the command line's error handling.

A small tree is imported into a ``local://`` store in a temp dir through the
real entry point; the browsing commands are then checked against what is on
disk, and ``verify`` against a store damaged on disk (a blob file with a
flipped byte, a directory row with a changed byte).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from tests.embedded_layout import flip_byte
from tvixmount.admin import cli
from tvixmount.castore import storepath
from tvixmount.castore.nodes import b3_text
from tvixmount.store import StoreUrls, open_store

ROOT = Path(__file__).resolve().parents[2]


def run(capsysbinary, *argv: str) -> tuple[int, bytes, str]:
    code = cli.main(list(argv))
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


@pytest.fixture
def imported(tmp_path, capsysbinary):
    """(store dir, absolute store path, tree on disk) of a freshly imported small tree."""
    tree = tmp_path / "demo-1.0"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "demo").write_bytes(b"#!/bin/sh\necho demo\n")
    (tree / "bin" / "demo").chmod(0o755)
    (tree / "share" / "doc").mkdir(parents=True)
    (tree / "share" / "doc" / "README").write_bytes(b"read me\n" * 1000)
    (tree / "share" / "big").write_bytes(bytes(range(256)) * 8192)  # 2 MiB, several store chunks
    (tree / "share" / "empty").mkdir()
    (tree / "link").symlink_to("bin/demo")
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, "--store-dir", str(store), "import", str(tree))
    assert (code, err) == (0, "")
    return store, out.decode().strip(), tree


def test_list(imported, capsysbinary):
    store, path, _ = imported
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "list")
    assert (code, out.decode()) == (0, path + "\n")


def test_ls_short_and_long(imported, capsysbinary):
    store, path, tree = imported
    basename = path.removeprefix("/nix/store/")
    code, out, _ = run(capsysbinary, "ls", "--store-dir", str(store), basename)  # flags after the command
    assert (code, out) == (0, b"bin\nlink\nshare\n")
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "ls", "-l", path + "/share")
    lines = out.decode().splitlines()
    assert [line.split()[-1] for line in lines] == ["big", "doc", "empty"]
    big = lines[0].split()
    assert big[:3] == ["-r--r--r--", str(256 * 8192), b3_text(blake3.blake3((tree / "share" / "big")
                                                                          .read_bytes()).digest())]
    assert lines[1].startswith("dr-xr-xr-x")
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "ls", "-l", path)
    link = out.decode().splitlines()[1].split()
    assert (link[0], link[-3:]) == ("lrwxrwxrwx", ["link", "->", "bin/demo"])
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "ls", "-l", path + "/bin/demo")
    assert out.decode().startswith("-r-xr-xr-x ") and out.decode().endswith(f" {path}/bin/demo\n")


def test_cat_streams_exact_bytes(imported, capsysbinary):
    store, path, tree = imported
    for rel in ("share/big", "share/doc/README", "bin/demo"):
        code, out, err = run(capsysbinary, "--store-dir", str(store), "cat", f"{path}/{rel}")
        assert (code, err) == (0, "")
        assert out == (tree / rel).read_bytes()


def test_info_json(imported, capsysbinary):
    store, path, _ = imported
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "info", path)
    assert code == 0
    info = json.loads(out)
    assert info["path"] == path
    assert info["node"]["type"] == "directory"
    assert info["references"] == [] and info["narSize"] > 2 * 1024 * 1024


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["ls", "{path}/nope"], 1, "{path}/nope: no such file or directory"),
        (["cat", "{path}/share"], 2, "{path}/share: is a directory"),
        (["cat", "{path}/link"], 2, "{path}/link: is a symlink to bin/demo, not followed"),
        (["ls", "{path}/bin/demo/x"], 2, "{path}/bin/demo: not a directory"),
        (["ls", "not-a-store-path"], 2, "not-a-store-path: not a store path"),
        (["ls", "/etc/passwd"], 2, "/etc/passwd: not a store path"),
        (["info", "{path}/bin"], 2, "give the store path itself"),
        (["info", "/nix/store/00000000000000000000000000000000-absent"], 1,
         "/nix/store/00000000000000000000000000000000-absent: not in the store"),
        (["--blob-service-addr", "bogus://x", "list"], 2, "unknown scheme 'bogus'"),
        (["import", "--nar", "-"], 2, "--name NAME is required"),
    ],
)
def test_errors_are_one_line(imported, capsysbinary, argv, status, message):
    store, path, _ = imported
    argv = [a.format(path=path) for a in argv]
    code, _, err = run(capsysbinary, "--store-dir", str(store), *argv)
    assert code == status
    assert err.count("\n") == 1 and err.startswith("tvixstore: error: ")
    assert message.format(path=path) in err


def test_missing_store_is_a_clear_error(tmp_path, capsysbinary):
    code, _, err = run(capsysbinary, "--store-dir", str(tmp_path / "none"), "list")
    assert code == 1 and err.count("\n") == 1
    assert f"store directory {tmp_path / 'none'} does not exist" in err
    assert not (tmp_path / "none").exists()  # readers never create a store


def test_bad_flag_is_usage_error_and_debug_shows_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "tvixmount.admin.cli"]
    done = subprocess.run([*base, "list", "--no-such-flag"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stderr.decode().splitlines()[-1] == (
        "tvixstore: error: unrecognized arguments: --no-such-flag"
    )
    args = ["--store-dir", str(tmp_path / "none"), "list"]
    done = subprocess.run([*base, *args], capture_output=True, env=env, timeout=60)
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    done = subprocess.run([*base, *args, "--log-level", "debug"], capture_output=True, env=env, timeout=60)
    assert done.returncode == 1 and b"Traceback" in done.stderr


def test_env_store_dir(imported, capsysbinary, monkeypatch):
    store, path, _ = imported
    monkeypatch.setenv("TVIXMOUNT_STORE_DIR", str(store))
    code, out, _ = run(capsysbinary, "list")
    assert (code, out.decode()) == (0, path + "\n")


# -- verify -------------------------------------------------------------------------


def test_verify_good_store(imported, capsysbinary):
    store, _, _ = imported
    code, out, err = run(capsysbinary, "--store-dir", str(store), "verify", "--nar")
    assert (code, err) == (0, "")
    assert out.decode() == "checked 3 blobs (2105172 bytes), 5 directories, 1 path infos: OK\n"


def test_verify_reports_exactly_the_damaged_blob(imported, capsysbinary):
    store, path, tree = imported
    digest = blake3.blake3((tree / "share" / "doc" / "README").read_bytes()).digest()
    flip_byte(store, digest, 100)
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "verify")
    assert code == 1
    lines = out.decode().splitlines()
    assert lines[0].startswith(f"blob {b3_text(digest)}: ")
    assert lines[1] == f"path {path}: tree is broken: directory " + lines[1].split("directory ", 1)[1]
    assert b3_text(digest) in lines[1] and "is damaged" in lines[1]
    assert lines[2].endswith(": 2 problem(s)") and len(lines) == 3


def test_verify_reports_exactly_the_damaged_directory(imported, capsysbinary):
    store, path, _ = imported
    with open_store(StoreUrls.embedded(store)) as s:
        info = s.path_infos.get(storepath.parse_absolute(path).digest)
        root = s.directories.get(info.node.digest)
        share = next(d for d in root.directories if d.name == b"share")
    db = sqlite3.connect(store / "store.sqlite")
    try:
        (data,) = db.execute("SELECT data FROM directories WHERE digest = ?", (share.digest,)).fetchone()
        damaged = bytes(data).replace(b"README", b"README", 1).replace(b"big", b"bog", 1)
        assert damaged != bytes(data)
        db.execute("UPDATE directories SET data = ? WHERE digest = ?", (damaged, share.digest))
        db.commit()
    finally:
        db.close()
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "verify")
    assert code == 1
    lines = out.decode().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"directory {b3_text(share.digest)}: ")
    assert lines[1] == f"path {path}: tree is broken: directory {b3_text(share.digest)} is damaged"


def test_verify_reports_missing_objects(imported, capsysbinary):
    store, path, tree = imported
    digest = blake3.blake3((tree / "bin" / "demo").read_bytes()).digest()
    db = sqlite3.connect(store / "store.sqlite")
    try:
        db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        db.commit()
    finally:
        db.close()
    code, out, _ = run(capsysbinary, "--store-dir", str(store), "verify")
    assert code == 1
    lines = out.decode().splitlines()
    # The row was a packed blob's: its bytes are now unreferenced, reported apart (not a problem).
    packs = [line for line in lines if line.startswith("pack ")]
    assert len(packs) == 1 and f"{len((tree / 'bin' / 'demo').read_bytes())} of" in packs[0], lines
    lines = [line for line in lines if line not in packs]
    assert len(lines) == 3, lines
    assert lines[0].startswith("directory b3:")
    assert lines[0].endswith(f"'demo': blob {b3_text(digest)} is missing")
    assert lines[1].startswith(f"path {path}: tree is broken: ") and "is missing" in lines[1]


def test_verify_piped_has_no_progress_bar(imported):
    store, _, _ = imported
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tvixmount.admin.cli", "--store-dir", str(store), "verify"],
                          capture_output=True, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (0, b"")
