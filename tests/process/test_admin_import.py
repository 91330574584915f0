"""``tvixstore import``: trees, files, symlinks and NARs into an embedded store.

Every test drives the real entry point (``main(argv)`` in-process, or the
console module in a subprocess where the terminal matters) against a
``local://`` store in a temp dir, and checks store paths against what Nix
itself computes: ``nix-store --dump`` when it works here, else the
vectors of docs/protocol.md, 'Test vectors'.
"""

from __future__ import annotations

import hashlib
import io
import os
import pty
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.embedded_layout import pack_bytes
from tvixmount.admin import cli
from tvixmount.admin.ingest import Ingester
from tvixmount.castore import storepath
from tvixmount.castore.directory import SizeConvention
from tvixmount.castore.nar import nar_chunks, nar_hash
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.store import StoreUrls, open_store

ROOT = Path(__file__).resolve().parents[2]
IMPORT_FIXTURES = "/nix/store/bqh6kd0x3vps2rzagzpl7qmbbgnx19cp-import_fixtures"


def _nix_store_works() -> bool:
    exe = shutil.which("nix-store")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "--dump", str(ROOT / "setup.cfg")], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")


NIX = _nix_store_works()
needs_nix = pytest.mark.skipif(not NIX, reason="nix-store --dump does not work offline here")


def run(capsysbinary, *argv: str) -> tuple[int, bytes, str]:
    """main(argv) in-process: (exit status, stdout bytes, stderr text)."""
    code = cli.main(list(argv))
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def store_args(store_dir: Path) -> list[str]:
    return ["--store-dir", str(store_dir)]


def make_import_fixtures(parent: Path) -> Path:
    """The tree behind the test vector bqh6kd0x...-import_fixtures (all files empty)."""
    root = parent / "import_fixtures"
    (root / "a_dir").mkdir(parents=True)
    (root / "a_dir" / "a_file").touch()
    (root / "a_file").touch()
    (root / "b_dir" / "a_dir").mkdir(parents=True)
    (root / "c_dir").mkdir()
    (root / "c_dir" / "symlink_to_a_file").symlink_to("../a_dir/a_file")
    (root / "d_dir").mkdir()
    (root / "d_dir" / "dangling_symlink").symlink_to("a_dir/a_file")
    (root / "symlink_to_a_dir").symlink_to("a_dir")
    return root


def make_rich_tree(parent: Path) -> Path:
    """Files, executables, symlinks (relative, absolute, dangling), nesting, empties, a big file."""
    root = parent / "rich-tree-1.0"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    (root / "bin" / "hello").chmod(0o755)
    (root / "bin" / "hi").symlink_to("hello")
    (root / "lib" / "deep" / "er" / "est").mkdir(parents=True)
    (root / "lib" / "deep" / "er" / "est" / "data.bin").write_bytes(bytes(range(256)) * 40)
    (root / "lib" / "big.so").write_bytes(os.urandom(3 * 1024 * 1024 + 5))  # streamed path (> 1 MiB)
    (root / "lib" / "big.so").chmod(0o555)
    (root / "lib" / "same-as-data.bin").write_bytes(bytes(range(256)) * 40)  # duplicate content
    (root / "lib" / "abs").symlink_to("/nix/store/00000000000000000000000000000000-other/lib/x.so")
    (root / "lib" / "dangling").symlink_to("../nowhere/at/all")
    (root / "share" / "empty-dir").mkdir(parents=True)
    (root / "share" / "empty-file").touch()
    (root / "share" / "group-exec-only").write_bytes(b"x")
    (root / "share" / "group-exec-only").chmod(0o654)  # owner has no x: not executable, as in Nix
    (root / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"non-UTF-8 name inside the tree")
    return root


def nix_dump(path: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout


def expected_path(path: Path, nar: bytes) -> str:
    return storepath.from_nar_sha256(path.name, hashlib.sha256(nar).digest()).absolute


def blob_files(store_dir: Path) -> set[str]:
    return {p.name for p in (store_dir / "blobs").glob("*/*")}


# -- directory imports ------------------------------------------------------------


def test_import_fixtures_vector(tmp_path, capsysbinary):
    tree = make_import_fixtures(tmp_path)
    code, out, err = run(capsysbinary, *store_args(tmp_path / "store"), "import", str(tree))
    assert (code, err) == (0, "")
    assert out == IMPORT_FIXTURES.encode() + b"\n"


@needs_nix
def test_rich_tree_matches_nix_store_dump(tmp_path, capsysbinary):
    tree = make_rich_tree(tmp_path)
    code, out, err = run(capsysbinary, *store_args(tmp_path / "store"), "import", str(tree))
    assert (code, err) == (0, "")
    nar = nix_dump(tree)
    assert out.decode().strip() == expected_path(tree, nar)
    with open_store(StoreUrls.embedded(tmp_path / "store")) as store:
        info = store.path_infos.get(storepath.parse_absolute(out.decode().strip()).digest)
        assert info is not None and info.narinfo is not None
        assert (info.narinfo.nar_size, info.narinfo.nar_sha256) == (len(nar), hashlib.sha256(nar).digest())
        # The NAR hashed during the walk is byte-identical to castore/nar.py's rendering from the store.
        rendered = b"".join(nar_chunks(info.node, store.directories.get, _reader(store)))
        assert rendered == nar


def _reader(store):
    def read(digest: bytes, size: int):
        with store.blobs.open_read(digest) as r:
            yield r.pread(0, size)

    return read


@needs_nix
def test_single_file_and_symlink_roots(tmp_path, capsysbinary):
    exe = tmp_path / "tool"
    exe.write_bytes(b"Hello World!")
    exe.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to("/nix/store/somewhereelse")
    code, out, _ = run(capsysbinary, *store_args(tmp_path / "store"), "import", str(exe), str(link))
    assert code == 0
    assert out.decode().split() == [expected_path(exe, nix_dump(exe)), expected_path(link, nix_dump(link))]


def test_root_file_vector_without_nix(tmp_path, capsysbinary):
    """docs/protocol.md, 'Test vectors': an empty regular file named valid-name is nd5z11x7...-valid-name."""
    (tmp_path / "valid-name").touch()
    code, out, _ = run(capsysbinary, *store_args(tmp_path / "store"), "import", str(tmp_path / "valid-name"))
    assert (code, out) == (0, b"/nix/store/nd5z11x7zjqqz44rkbhc6v7yifdkn659-valid-name\n")


def test_size_conventions(tmp_path, capsysbinary):
    tree = make_import_fixtures(tmp_path)
    sizes = {}
    for convention in ("documented", "doubled"):
        store = tmp_path / convention
        code, out, _ = run(capsysbinary, *store_args(store), "import", "--dir-size-convention", convention,
                           str(tree))
        assert (code, out.decode().strip()) == (0, IMPORT_FIXTURES)  # the NAR does not depend on it
        with open_store(StoreUrls.embedded(store)) as s:
            info = s.path_infos.get(storepath.parse_absolute(IMPORT_FIXTURES).digest)
            assert isinstance(info.node, DirectoryNode)
            sizes[convention] = info.node.size
    # 6 entries + 4 subdirectories holding one entry each (b_dir's a_dir is empty)
    assert sizes == {"documented": 10, "doubled": 20}


def test_reimport_stores_no_new_blobs(tmp_path, capsysbinary):
    tree = make_rich_tree(tmp_path)
    store = tmp_path / "store"
    code, first, _ = run(capsysbinary, *store_args(store), "import", str(tree))
    assert code == 0
    blobs = blob_files(store)
    packed = pack_bytes(store)
    with open_store(StoreUrls.embedded(store)) as s:
        dirs = set(s.directories.iter_digests())
        # distinct contents: hello, data.bin (twice), big.so, empty, "x", the latin1-named file
        assert len(list(s.blobs.iter_digests())) == 6
    assert len(blobs) == 1 and packed > 0  # big.so in its own file, the small ones packed
    inodes = {p.name: p.stat().st_ino for p in (store / "blobs").glob("*/*")}
    code, second, _ = run(capsysbinary, *store_args(store), "import", "-j", "0", str(tree))
    assert (code, second) == (0, first)
    assert blob_files(store) == blobs and pack_bytes(store) == packed
    assert {p.name: p.stat().st_ino for p in (store / "blobs").glob("*/*")} == inodes  # nothing rewritten
    assert not any((store / "tmp").iterdir())
    with open_store(StoreUrls.embedded(store)) as s:
        assert set(s.directories.iter_digests()) == dirs
        assert len(list(s.path_infos.list())) == 1


def test_blobs_are_recorded_before_the_path_info(tmp_path, monkeypatch):
    """The PathInfo is put after the import's blob batch ended: every blob below it is recorded."""
    tree = make_rich_tree(tmp_path)
    with open_store(StoreUrls.single(f"local://{tmp_path / 'store'}?create=1")) as store:
        real_put = store.path_infos.put
        checked: list[int] = []

        def put(info):
            for directory in store.directories.get_recursive(info.node.digest):
                for file in directory.files:
                    assert store.blobs.stat(file.digest) is not None, file.name
                    checked.append(1)
            return real_put(info)

        monkeypatch.setattr(store.path_infos, "put", put)
        Ingester(store).import_path(tree)
    assert len(checked) == 7  # every file node of the rich tree


def test_parallel_and_serial_agree(tmp_path):
    tree = make_rich_tree(tmp_path)
    results = []
    for workers in (0, 4):
        with open_store(StoreUrls.single(f"local://{tmp_path / f'store{workers}'}?create=1")) as store:
            results.append(Ingester(store, SizeConvention.DOUBLED, workers).import_path(tree).info)
    assert results[0] == results[1]


def test_big_file_is_streamed_not_held(tmp_path):
    """A 24 MiB file must not be read whole: peak Python allocations stay a few MiB."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for i in range(24):
            f.write(bytes([i]) * (1 << 20))
    with open_store(StoreUrls.single(f"local://{tmp_path / 'store'}?create=1")) as store:
        tracemalloc.start()
        try:
            imported = Ingester(store, workers=0).import_path(big)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(imported.info.node, FileNode) and imported.info.node.size == 24 << 20
        assert peak < 6 << 20, f"peak {peak} bytes"
        assert nar_hash(imported.info.node, store.directories.get, _reader(store))[1] == (
            imported.info.narinfo.nar_sha256
        )


# -- failures: one clear line, exit 1, no path info --------------------------------


def _no_paths(store: Path) -> bool:
    if not store.exists():
        return True
    with open_store(StoreUrls.embedded(store)) as s:
        return not list(s.path_infos.list())


def _make_socket(directory: Path) -> None:
    """A unix socket file (bound by a relative name: socket paths are limited to 108 bytes)."""
    import socket

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock")
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda t: os.mkfifo(t / "pipe"), "is a named pipe (fifo)"),
        (lambda t: _make_socket(t), "is a socket"),
    ],
    ids=["fifo", "socket"],
)
def test_special_file_fails_whole_import(tmp_path, capsysbinary, make, why):
    tree = make_rich_tree(tmp_path)
    inner = tree / "lib" / "deep"
    make(inner)
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, *store_args(store), "import", str(tree))
    assert code == 1 and out == b""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tvixstore: error: {inner}/")
    assert why in lines[0]
    assert _no_paths(store)
    # The blobs stored before the failure were in the import's batch: none is recorded.
    with open_store(StoreUrls.embedded(store)) as s:
        assert list(s.blobs.iter_digests()) == []


def test_missing_and_badly_named_inputs(tmp_path, capsysbinary):
    good = make_import_fixtures(tmp_path)
    bad_utf8 = tmp_path / os.fsdecode(b"bad\xff")
    bad_utf8.mkdir()
    spaced = tmp_path / "has space"
    spaced.mkdir()
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, *store_args(store), "import", str(tmp_path / "nope"), str(bad_utf8),
                         str(spaced), str(good))
    assert code == 1
    assert out.decode().split() == [IMPORT_FIXTURES]  # the good one is still imported
    lines = err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == f"tvixstore: error: {tmp_path}/nope: No such file or directory"
    assert "bad\\xff" in lines[1] and "not valid UTF-8" in lines[1]
    assert "'has space' is not a valid store path name" in lines[2]
    assert "Traceback" not in err


def test_file_changing_while_read_is_refused(tmp_path, capsysbinary):
    """/proc files claim size 0 but have contents: the importer must notice, not store a lie."""
    store = tmp_path / "store"
    code, out, err = run(capsysbinary, *store_args(store), "import", "/proc/self/stat")
    assert (code, out) == (1, b"")
    assert err == "tvixstore: error: /proc/self/stat: file grew while being read (more than 0 bytes)\n"
    assert _no_paths(store)


# -- NAR imports ----------------------------------------------------------------------


def _nar_of(tree: Path) -> bytes:
    if NIX:
        return nix_dump(tree)
    with open_store(StoreUrls.single("memory://")) as store:
        info = Ingester(store, workers=0).import_path(tree).info
        return b"".join(nar_chunks(info.node, store.directories.get, _reader(store)))


def test_import_nar_file_and_stdin_round_trip(tmp_path, capsysbinary, monkeypatch):
    tree = make_rich_tree(tmp_path)
    store = tmp_path / "store"
    code, out, _ = run(capsysbinary, *store_args(store), "import", str(tree))
    assert code == 0
    nar = _nar_of(tree)
    (tmp_path / "tree.nar").write_bytes(nar)
    code, from_file, err = run(capsysbinary, *store_args(store), "import", "--nar",
                               str(tmp_path / "tree.nar"), "--name", tree.name,
                               "--expected-sha256", hashlib.sha256(nar).hexdigest())
    assert (code, err, from_file) == (0, "", out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(nar)))
    code, from_stdin, _ = run(capsysbinary, *store_args(store), "import", "--nar", "-", "--name", tree.name)
    assert (code, from_stdin) == (0, out)
    with open_store(StoreUrls.embedded(store)) as s:
        assert len(list(s.path_infos.list())) == 1


def test_import_nar_vector_and_nar_py_output(tmp_path, capsysbinary):
    tree = make_import_fixtures(tmp_path)
    with open_store(StoreUrls.single("memory://")) as mem:
        info = Ingester(mem, workers=0).import_path(tree).info
        nar = b"".join(nar_chunks(info.node, mem.directories.get, _reader(mem)))
    (tmp_path / "x.nar").write_bytes(nar)
    code, out, _ = run(capsysbinary, *store_args(tmp_path / "store"), "import",
                       "--nar", str(tmp_path / "x.nar"), "--name", "import_fixtures")
    assert (code, out.decode().strip()) == (0, IMPORT_FIXTURES)


def test_import_nar_rejects_bad_input(tmp_path, capsysbinary):
    tree = make_import_fixtures(tmp_path)
    nar = _nar_of(tree)
    store = tmp_path / "store"
    (tmp_path / "trunc.nar").write_bytes(nar[:-8])
    (tmp_path / "ok.nar").write_bytes(nar)
    code, _, err = run(capsysbinary, *store_args(store), "import", "--nar", str(tmp_path / "trunc.nar"),
                       "--name", "t")
    assert code == 1 and "truncated" in err and err.count("\n") == 1
    code, _, err = run(capsysbinary, *store_args(store), "import", "--nar", str(tmp_path / "ok.nar"),
                       "--name", "t", "--expected-sha256", "0" * 64)
    assert code == 1 and "expected 0000" in err
    code, _, err = run(capsysbinary, *store_args(store), "import", "--nar", str(tmp_path / "ok.nar"),
                       "--name", "bad name")
    assert code == 2 and "not a valid store path name" in err
    code, _, err = run(capsysbinary, *store_args(store), "import", "--nar", str(tmp_path / "none.nar"),
                       "--name", "t")
    assert code == 1 and err == f"tvixstore: error: {tmp_path}/none.nar: No such file or directory\n"
    assert _no_paths(store)


# -- the console entry: progress only on a terminal -----------------------------------


def _console(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tvixmount.admin.cli", *args]
    return subprocess.run(command, env=env, timeout=120, **kwargs)


def _console_on_terminal(args: list[str]) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal: (status, stdout, what the terminal saw)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tvixmount.admin.cli", *args], env=env,
                                stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        seen = b""
        while True:  # read while it runs, or a full terminal buffer would block it
            try:
                piece = os.read(controller, 65536)
            except OSError:  # EIO: the child side is closed
                break
            if not piece:
                break
            seen += piece
        out = proc.stdout.read()
        status = proc.wait(timeout=120)
    finally:
        os.close(controller)
    return status, out, seen


def test_piped_import_has_no_progress_bar(tmp_path):
    tree = make_rich_tree(tmp_path)
    done = _console([*store_args(tmp_path / "store"), "import", str(tree)], capture_output=True)
    assert done.returncode == 0
    assert done.stderr == b""
    assert done.stdout.startswith(b"/nix/store/") and done.stdout.count(b"\n") == 1


@pytest.mark.parametrize("quiet", [False, True])
def test_terminal_shows_progress_unless_quiet(tmp_path, quiet):
    tree = make_rich_tree(tmp_path)
    args = [*store_args(tmp_path / "store"), "import", *(["-q"] if quiet else []), str(tree)]
    status, out, seen = _console_on_terminal(args)
    assert status == 0 and out.startswith(b"/nix/store/")
    if quiet:
        assert seen == b""
    else:
        assert b"files" in seen and b"data" in seen  # the two bars' labels
