"""``tvixstore sync``: store paths and their closure between stores (what ``copy`` was before).

Sources are embedded stores filled by the real importer; references are
added to their PathInfos by hand (an import of a local tree has none).
Targets are embedded stores and, at the end, a real daemon over a unix
socket. Every copy is checked by reading the target back: ``verify``
(which re-hashes everything and walks every tree) and ``cat``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.process.test_admin_import import _console_on_terminal, make_rich_tree, run
from tvixmount.admin.sync import Closure, leaves_first
from tvixmount.castore import storepath
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.castore.pathinfo import PathInfo
from tvixmount.store import StoreUrls, open_store


def sargs(store: Path) -> list[str]:
    return ["--store-dir", str(store)]


def import_tree(capsysbinary, store: Path, tree: Path, *extra: str) -> str:
    code, out, err = run(capsysbinary, *sargs(store), "import", *extra, str(tree))
    assert (code, err) == (0, ""), err
    return out.decode().strip()


def info_of(store: Path, path: str) -> PathInfo:
    with open_store(StoreUrls.embedded(store)) as s:
        info = s.path_infos.get(storepath.parse_absolute(path).digest)
    assert info is not None
    return info


def add_references(store: Path, path: str, *refs: str) -> None:
    """Give ``path``'s PathInfo these references (as a build's output would have)."""
    info = info_of(store, path)
    parsed = [storepath.parse_absolute(r) for r in refs]
    assert info.narinfo is not None
    new = replace(info, references=tuple(p.digest for p in parsed),
                  narinfo=replace(info.narinfo, reference_names=tuple(p.basename for p in parsed)))
    with open_store(StoreUrls.embedded(store)) as s:
        s.path_infos.put(new)


def small_tree(parent: Path, name: str, files: dict[str, bytes]) -> Path:
    root = parent / name
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def blob_inodes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (store / "blobs").glob("*/*")}


def summary(out: bytes) -> str:
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def closure(tmp_path, capsysbinary):
    """A source store with app -> lib -> dep (app also refers to itself); app and lib share a file."""
    src = tmp_path / "src"
    dep = import_tree(capsysbinary, src, small_tree(tmp_path, "dep-1.0", {"share/dep.txt": b"dep\n"}))
    lib = import_tree(capsysbinary, src, small_tree(tmp_path, "lib-2.0", {
        "lib/libx.so": b"\x7fELF" + bytes(range(256)) * 300,
        "share/licence": b"same licence text\n" * 50,
    }))
    app = import_tree(capsysbinary, src, small_tree(tmp_path, "app-3.0", {
        "bin/app": b"#!/bin/sh\nexec lib\n",
        "share/doc/licence": b"same licence text\n" * 50,
    }))
    add_references(src, lib, dep)
    add_references(src, app, lib, app)
    return src, app, lib, dep


# -- embedded -> embedded ---------------------------------------------------------------


def test_copy_then_verify_and_cat(tmp_path, capsysbinary):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree = make_rich_tree(tmp_path)
    path = import_tree(capsysbinary, src, tree, "--dir-size-convention", "documented")
    code, out, err = run(capsysbinary, *sargs(src), "sync", path, "--to-store-dir", str(dst))
    assert (code, err) == (0, "")
    # hello, data.bin (twice in the tree), big.so, empty, "x", the latin1-named file
    assert summary(out).startswith("copied 1 paths (0 already present): 6 blobs copied, 0 skipped, "
                                   f"{3 * 1024 * 1024 + 5 + 21 + 10240 + 1 + 30} bytes, 8 directories in ")
    code, out, err = run(capsysbinary, *sargs(dst), "verify", "--nar")
    assert (code, err) == (0, ""), out
    for sub in ("lib/big.so", "bin/hello", "lib/deep/er/est/data.bin"):
        code, out, _ = run(capsysbinary, *sargs(dst), "cat", f"{path}/{sub}")
        assert (code, out) == (0, (tree / sub).read_bytes())
    code, out, _ = run(capsysbinary, *sargs(dst), "list")
    assert out.decode().split() == [path]
    # Directory sizes travel as they are: the same (documented-convention) root node and tree.
    with open_store(StoreUrls.embedded(src)) as s, open_store(StoreUrls.embedded(dst)) as d:
        digest = storepath.parse_absolute(path).digest
        assert d.path_infos.get(digest) == s.path_infos.get(digest)
        root = s.path_infos.get(digest).node.digest
        assert set(d.directories.get_recursive(root)) == set(s.directories.get_recursive(root))
    assert not any((dst / "tmp").iterdir())


def test_copy_twice_copies_nothing_the_second_time(closure, tmp_path, capsysbinary):
    src, app, _, _ = closure
    dst = tmp_path / "dst"
    code, out, _ = run(capsysbinary, *sargs(src), "sync", app, "--to-store-dir", str(dst))
    assert code == 0 and summary(out).startswith("copied 3 paths (0 already present)")
    inodes = blob_inodes(dst)
    code, out, err = run(capsysbinary, *sargs(src), "sync", app, "--to-store-dir", str(dst))
    assert (code, err) == (0, "")
    assert summary(out).startswith(
        "copied 0 paths (3 already present): 0 blobs copied, 0 skipped, 0 bytes, 0 directories in ")
    assert blob_inodes(dst) == inodes


def test_closure_follows_references(closure, tmp_path, capsysbinary):
    src, app, lib, dep = closure
    dst = tmp_path / "dst"
    with open_store(StoreUrls.embedded(src)) as s:
        order = Closure(s).resolve([storepath.parse_absolute(app)])
    assert [storepath.STORE_DIR + "/" + i.node.name.decode() for i in order] == [dep, lib, app]
    code, out, _ = run(capsysbinary, *sargs(src), "sync", app, "--to-store-dir", str(dst))
    assert code == 0
    code, out, _ = run(capsysbinary, *sargs(dst), "list")
    assert sorted(out.decode().split()) == sorted([app, lib, dep])
    assert info_of(dst, app) == info_of(src, app)  # references kept
    code, out, err = run(capsysbinary, *sargs(dst), "verify")
    assert (code, err) == (0, ""), out


def test_paths_and_blobs_in_the_target_are_skipped(closure, tmp_path, capsysbinary):
    src, app, lib, _ = closure
    dst = tmp_path / "dst"
    code, out, _ = run(capsysbinary, *sargs(src), "sync", lib, "--to-store-dir", str(dst))
    assert code == 0 and summary(out).startswith("copied 2 paths (0 already present): 3 blobs copied")
    code, out, _ = run(capsysbinary, *sargs(src), "sync", app, "--to-store-dir", str(dst))
    # app's licence is lib's: already there
    assert code == 0
    assert summary(out).startswith("copied 1 paths (2 already present): 1 blobs copied, 1 skipped")
    code, out, _ = run(capsysbinary, *sargs(dst), "cat", f"{app}/share/doc/licence")
    assert out == b"same licence text\n" * 50


def test_copy_all_and_file_and_symlink_roots(closure, tmp_path, capsysbinary):
    src, app, lib, dep = closure
    (tmp_path / "tool").write_bytes(b"a single file")
    (tmp_path / "pointer").symlink_to("/nix/store/somewhere")
    tool = import_tree(capsysbinary, src, tmp_path / "tool")
    pointer = import_tree(capsysbinary, src, tmp_path / "pointer")
    dst = tmp_path / "dst"
    code, out, _ = run(capsysbinary, *sargs(src), "sync", "--all", "--to-store-dir", str(dst), "-j", "1")
    assert code == 0 and summary(out).startswith("copied 5 paths (0 already present)")
    code, out, _ = run(capsysbinary, *sargs(dst), "list")
    assert sorted(out.decode().split()) == sorted([app, lib, dep, tool, pointer])
    code, out, _ = run(capsysbinary, *sargs(dst), "cat", tool)
    assert out == b"a single file"
    assert info_of(dst, pointer) == info_of(src, pointer)


def test_shared_directory_on_two_levels(tmp_path, capsysbinary):
    """x and y/z are one directory: reversing get_recursive's order would send y before it."""
    same = {"f": b"shared"}
    tree = small_tree(tmp_path, "shapes", {**{f"x/c/{k}": v for k, v in same.items()},
                                           **{f"y/z/c/{k}": v for k, v in same.items()}})
    src, dst = tmp_path / "src", tmp_path / "dst"
    path = import_tree(capsysbinary, src, tree)
    code, out, err = run(capsysbinary, *sargs(src), "sync", path, "--to-store-dir", str(dst))
    assert (code, err) == (0, "")
    code, out, err = run(capsysbinary, *sargs(dst), "verify")
    assert (code, err) == (0, ""), out


def test_leaves_first_puts_every_child_before_its_parents():
    c = Directory(files=(FileNode(b"f", bytes(32), 0),))
    z = Directory(directories=(DirectoryNode(b"c2", c.digest(), 1),))
    x = Directory(directories=(DirectoryNode(b"c", c.digest(), 1),))
    y = Directory(directories=(DirectoryNode(b"z", z.digest(), 2),))
    root = Directory(directories=(DirectoryNode(b"x", x.digest(), 2), DirectoryNode(b"y", y.digest(), 3)))
    ordered = leaves_first([root, x, y, c, z])  # get_recursive's order
    position = {d.digest(): i for i, d in enumerate(ordered)}
    assert len(ordered) == 5
    for parent in ordered:
        for child in parent.directories:
            assert position[child.digest] < position[parent.digest()]


# -- failures ---------------------------------------------------------------------------


def test_missing_store_path_is_one_line_and_creates_nothing(closure, tmp_path, capsysbinary):
    src, app, _, _ = closure
    dst = tmp_path / "dst"
    missing = "/nix/store/" + "0" * 32 + "-nope"
    code, out, err = run(capsysbinary, *sargs(src), "sync", app, missing, "--to-store-dir", str(dst))
    assert (code, out) == (1, b"")
    assert err == f"tvixstore: error: {missing}: not in the source store\n"
    assert not dst.exists()


def test_missing_reference_names_its_referrer(closure, tmp_path, capsysbinary):
    src, app, lib, _ = closure
    ghost = "/nix/store/" + "1" * 32 + "-ghost"
    add_references(src, lib, ghost)
    code, out, err = run(capsysbinary, *sargs(src), "sync", app, "--to-store-dir", str(tmp_path / "dst"))
    assert (code, out) == (1, b"")
    assert err == f"tvixstore: error: {ghost} (referenced by {lib}): not in the source store\n"


def test_missing_blob_in_the_source(tmp_path, capsysbinary):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = {"a": b"will vanish", **{f"f{i}": b"file %d" % i for i in range(6)}}
    path = import_tree(capsysbinary, src, small_tree(tmp_path, "t", files))
    with open_store(StoreUrls.embedded(src)) as s:
        digest = s.directories.get(info_of(src, path).node.digest).files[0].digest  # "a"
    import sqlite3

    conn = sqlite3.connect(src / "store.sqlite")
    with conn:
        conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
    conn.close()
    code, out, err = run(capsysbinary, *sargs(src), "sync", path, "--to-store-dir", str(dst))
    assert (code, out) == (1, b"")
    assert err.startswith(f"tvixstore: error: {path}: blob b3:")
    assert err.endswith(": not in the source store\n")
    code, out, _ = run(capsysbinary, *sargs(dst), "list")
    assert out == b""  # no PathInfo without its tree
    with open_store(StoreUrls.embedded(dst)) as d:
        assert list(d.blobs.iter_digests()) == []  # the failed path's batch recorded nothing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sync", "--to-store-dir", "{T}"], "nothing to copy"),
        (["sync", "--all", "{P}", "--to-store-dir", "{T}"], "not both"),
        (["sync", "{P}"], "no target store"),
        (["sync", "{P}", "--to-blob-service-addr", "memory://"],
         "--to-directory-service-addr, --to-path-info-service-addr not given"),
        (["sync", "{P}/bin", "--to-store-dir", "{T}"], "without a sub path"),
        (["sync", "{P}", "--to-store-dir", "{T}", "-j", "0"], "argument -j/--jobs: 0 must be at least 1"),
        (["sync", "not-a-path", "--to-store-dir", "{T}"], "not a store path"),
        (["sync", "{P}", "--to-store-dir", "{T}", "--to-blob-service-addr", "bogus://x"], "bogus"),
    ],
)
def test_usage_errors(closure, tmp_path, capsysbinary, argv, message):
    src, app, _, _ = closure
    argv = [a.format(P=app, T=tmp_path / "dst") for a in argv]
    code, out, err = run(capsysbinary, *sargs(src), *argv)
    assert (code, out) == (2, b"")
    assert err.count("\n") == 1 and err.startswith("tvixstore: error: ") and message in err, err
    assert not (tmp_path / "dst").exists()


def test_unreachable_target(closure, tmp_path, capsysbinary):
    src, app, _, _ = closure
    url = f"grpc+unix://{tmp_path}/nobody.sock"
    code, out, err = run(capsysbinary, *sargs(src), "sync", app, *_to(url))
    assert (code, out) == (1, b"")
    assert err.startswith(f"tvixstore: error: target store {url}: ") and err.count("\n") == 1, err


def _to(url: str) -> list[str]:
    return [f"--to-{kind}-service-addr={url}" for kind in ("blob", "directory", "path-info")]


# -- the console: progress on a terminal ---------------------------------------------


def test_terminal_shows_progress(closure, tmp_path):
    src, app, _, _ = closure
    argv = [*sargs(src), "sync", app, "--to-store-dir", str(tmp_path / "d")]
    status, out, seen = _console_on_terminal(argv)
    assert status == 0 and out.startswith(b"copied 3 paths")
    assert b"paths" in seen and b"data" in seen


# -- into a real daemon ------------------------------------------------------------------


def test_copy_into_a_daemon_and_read_back(closure, tmp_path, capsysbinary):
    from tests.grpc_daemon import Daemon, scratch_dir

    src, app, lib, dep = closure
    base = scratch_dir("tvx-copy-")
    try:
        with Daemon(base, log_level="info") as daemon:
            code, out, err = run(capsysbinary, *sargs(src), "sync", app, *_to(daemon.url))
            assert (code, err) == (0, "")
            assert summary(out).startswith("copied 3 paths (0 already present): 4 blobs copied, 1 skipped")
            code, out, err = run(capsysbinary, *sargs(src), "sync", app, *_to(daemon.url))
            assert summary(out).startswith("copied 0 paths (3 already present): 0 blobs copied")
            remote = [f"--{kind}-service-addr={daemon.url}" for kind in ("blob", "directory", "path-info")]
            code, out, _ = run(capsysbinary, *remote, "cat", f"{app}/share/doc/licence")
            assert (code, out) == (0, b"same licence text\n" * 50)
            code, out, _ = run(capsysbinary, *remote, "list")
            assert sorted(out.decode().split()) == sorted([app, lib, dep])
            code, out, err = run(capsysbinary, *remote, "verify")
            assert (code, err) == (0, ""), out
        # and what the daemon stored is a complete embedded store of its own
        code, out, err = run(capsysbinary, *sargs(daemon.store_dir), "verify", "--nar")
        assert (code, err) == (0, ""), out
    finally:
        shutil.rmtree(base, ignore_errors=True)
