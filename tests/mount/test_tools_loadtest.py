"""tools/loadtest against real mounts: clean runs pass with verified bytes, a damaged blob fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from tvixmount.admin import cli

ROOT = Path(__file__).resolve().parents[2]
LOADTEST = ROOT / "tools" / "loadtest"
GEN_TREE = ROOT / "tools" / "gen_tree.py"

pytestmark = pytest.mark.mount

sys.path.insert(0, str(ROOT / "tools"))
import loadtest  # noqa: E402


@pytest.fixture
def imported(tmp_path: Path, store_dir: Path, capsysbinary) -> tuple[Path, list[str]]:
    """A small generated closure imported into ``store_dir``: (tree, store path names)."""
    tree = tmp_path / "tree"
    subprocess.run([sys.executable, str(GEN_TREE), str(tree), "--files", "40", "--big", "1",
                    "--big-size", "700K", "--seed", "5"], check=True, capture_output=True, timeout=60)
    packages = sorted(tree.iterdir())
    assert cli.main(["--store-dir", str(store_dir), "--quiet", "import", *map(str, packages)]) == 0
    out = capsysbinary.readouterr().out.decode()
    names = [line.rsplit("/", 1)[1] for line in out.split() if line.startswith("/nix/store/")]
    assert len(names) == len(packages)
    return tree, names


def regular_files(tree: Path) -> list[Path]:
    return [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]


def run_loadtest(mountpoint: Path, *args: str, timeout: float = 60) -> tuple[int, dict | None, str]:
    out_json = mountpoint.parent / "loadtest.json"
    out_json.unlink(missing_ok=True)
    proc = subprocess.run([str(LOADTEST), str(mountpoint), "--json", str(out_json), *args],
                          capture_output=True, text=True, timeout=timeout)
    summary = json.loads(out_json.read_text()) if out_json.exists() else None
    return proc.returncode, summary, proc.stdout + proc.stderr


def test_verified_seq_run_on_a_listable_root(imported, mount):
    m = mount("--list-root")
    code, s, output = run_loadtest(m.mountpoint, "--readers", "4", "--duration", "3s", "--verify")
    assert code == 0, output
    assert s is not None and s["ok"] is True
    assert s["error_count"] == 0 and s["errors"] == {}
    assert s["wrong_files"] == 0 and s["wrong_bytes"] == 0 and s["hangs"] == 0
    assert s["bytes"] > 0 and s["files"] > 0 and s["reads"] > 0
    assert s["store_paths"] == len(imported[1])
    # every file of the closure was found, and each full read was checked against its digest
    assert s["discovered_files"] == len(regular_files(imported[0]))
    assert s["verified_files"] == s["files"]
    assert 2.5 <= s["elapsed_s"] < 10
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    assert "result     OK" in output


def test_random_and_tree_with_store_paths_named(imported, mount, tmp_path):
    m = mount()  # no --list-root: the store paths must be named
    code, s, output = run_loadtest(m.mountpoint, "--readers", "2", "--duration", "1s")
    assert code == 2 and s is None
    assert "--paths" in output

    code, s, output = run_loadtest(m.mountpoint, "--pattern", "random", "--readers", "4",
                                   "--duration", "1.5s", "--verify",
                                   "--paths", *(f"/nix/store/{n}" for n in imported[1]))
    assert code == 0, output
    assert s["ok"] and s["error_count"] == 0 and s["wrong_bytes"] == 0
    assert s["reads"] > 0 and s["bytes"] > 0 and s["verified_files"] > 0

    names = tmp_path / "paths.txt"
    names.write_text("# store paths\n" + "".join(n + "\n" for n in imported[1]))
    code, s, output = run_loadtest(m.mountpoint, "--pattern", "tree", "--readers", "3", "--duration", "1.5s",
                                   "--verify", "--from-file", str(names))
    assert code == 0, output
    assert s["ok"] and s["stats"] > 0 and s["verified_files"] > 0


def test_corrupted_blob_gives_eio_and_a_failed_run(imported, store_dir, mount):
    tree, names = imported
    # the biggest file: several 256 KiB chunks, one of which we damage
    victim = max(regular_files(tree), key=lambda p: p.stat().st_size)
    digest = blake3.blake3(victim.read_bytes()).digest()
    blob = store_dir / "blobs" / digest.hex()[:2] / digest.hex()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))

    package = victim.relative_to(tree).parts[0]
    store_name = next(n for n in names if n.split("-", 1)[1] == package)
    m = mount(expect_errors=True)
    with pytest.raises(OSError) as exc:
        m.path(store_name, *victim.relative_to(tree / package).parts).read_bytes()
    assert exc.value.errno == 5  # EIO

    code, s, output = run_loadtest(m.mountpoint, "--readers", "2", "--duration", "2s", "--verify",
                                   "--paths", store_name)
    assert code == 1, output
    assert s is not None and s["ok"] is False
    assert s["errors"].get("EIO", 0) >= 1
    assert any(victim.name in msg for msg in s["messages"]), s["messages"]
    assert "FAILED" in output


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60), ("2m", 120), ("500ms", 0.5), ("1.5", 1.5)])
def test_duration_parsing(text, seconds):
    assert loadtest.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0s", "-1s", "5 minutes", "s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(Exception, match="duration"):
        loadtest.parse_duration(text)


def test_store_path_names():
    assert loadtest.store_path_name("/nix/store/abc-foo/") == "abc-foo"
    assert loadtest.store_path_name("abc-foo") == "abc-foo"
    for bad in ("", "/nix/store/", "a/b", ".."):
        with pytest.raises(Exception, match="store path"):
            loadtest.store_path_name(bad)


def test_wrong_bytes_count_only_bytes_that_differ():
    """A short read is an error of its own (SHORT_READ); only bytes that were returned and differ
    from the verified copy count as wrong."""
    run = loadtest.LoadTest(loadtest.build_parser().parse_args(["/nonexistent"]), [], [])
    run._compare("f", 0, b"abcd", b"abcdefgh")  # short, all returned bytes right
    assert run.totals.wrong_bytes == 0
    run._compare("f", 0, b"abXd", b"abcdefgh")  # short, one returned byte wrong
    assert run.totals.wrong_bytes == 1
    run._compare("f", 0, b"abcdefghij", b"abcdefgh")  # more than there is: the extra bytes are wrong
    assert run.totals.wrong_bytes == 3
