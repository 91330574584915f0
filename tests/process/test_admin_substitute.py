"""``tvixstore substitute --from URL STOREPATH...``: a store filled from a binary cache real Nix wrote.

The command runs as a user runs it (a subprocess), against a real HTTP
server on loopback; the store it fills is read back through ``tvixstore
cat``/``ls``, and the server's request counts say what was downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nixhttp_fixtures import CacheServer, NixCaches, build_caches

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> NixCaches:
    return build_caches(tmp_path_factory.mktemp("nixhttp-admin"))


@pytest.fixture
def server(caches: NixCaches) -> Iterator[CacheServer]:
    started = CacheServer(caches.caches["zstd"])
    yield started
    started.stop()


def tvixstore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tvixmount.admin.cli", "--store-dir", str(store), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_closure_is_substituted_references_first_and_only_once(caches: NixCaches, server: CacheServer,
                                                                tmp_path: Path) -> None:
    url = f"nix+{server.url}?trusted-public-keys={caches.public_key}"
    store = tmp_path / "store"
    done = tvixstore(store, "substitute", "--from", url, caches.refs_path.absolute)
    assert done.returncode == 0, done.stderr
    assert "substituted 2 paths" in done.stdout and "0 failed" in done.stdout
    assert server.count("/nar/") == 2
    cat = tvixstore(store, "cat", f"{caches.src_path.absolute}/hello.txt")
    assert cat.returncode == 0 and cat.stdout == "hello, binary cache\n"
    info = json.loads(tvixstore(store, "info", caches.refs_path.absolute).stdout)  # the narinfo fields kept
    assert info["references"] == sorted([caches.src_path.absolute, caches.refs_path.absolute])
    assert info["deriver"] == f"/nix/store/{caches.deriver}"
    assert [sig.split(":")[0] for sig in info["signatures"]] == ["test-1"]
    src_info = json.loads(tvixstore(store, "info", caches.src_path.absolute).stdout)
    assert src_info["ca"].startswith("fixed:r:sha256:")
    again = tvixstore(store, "substitute", "--from", url, caches.refs_path.basename)
    assert again.returncode == 0 and "substituted 0 paths" in again.stdout
    assert "2 already present" in again.stdout
    assert server.count("/nar/") == 2  # nothing downloaded again


def test_dry_run_lists_what_would_be_fetched_and_downloads_no_nar(caches: NixCaches, server: CacheServer,
                                                                 tmp_path: Path) -> None:
    url = f"nix+{server.url}?trusted-public-keys={caches.public_key}"
    done = tvixstore(tmp_path / "store", "substitute", "--dry-run", "--from", url, caches.refs_path.absolute)
    assert done.returncode == 0, done.stderr
    listed = [line.split("\t")[0] for line in done.stdout.splitlines() if "\t" in line]
    assert listed == [caches.src_path.absolute, caches.refs_path.absolute]  # references first
    assert "would fetch 2 paths" in done.stdout
    assert server.count("/nar/") == 0 and server.count(".narinfo") == 2


def test_failures_are_one_line_each_and_store_nothing(caches: NixCaches,
                                                                        server: CacheServer,
                                                                        tmp_path: Path) -> None:
    wrong = f"nix+{server.url}?trusted-public-keys={caches.other_public_key}"
    absent = "/nix/store/" + "2" * 32 + "-absent"
    done = tvixstore(tmp_path / "store", "substitute", "--from", wrong, caches.refs_path.absolute, absent)
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2, done.stderr  # refs fails at its narinfo, so src is never asked for
    assert any(caches.refs_path.absolute in e and "no valid signature" in e for e in errors)
    assert any(absent in e and "not in the cache" in e for e in errors)
    assert server.count("/nar/") == 0
    listing = tvixstore(tmp_path / "store", "list")
    assert caches.src_path.basename not in listing.stdout and caches.refs_path.basename not in listing.stdout


def test_usage_errors_name_the_argument(tmp_path: Path) -> None:
    not_cache = tvixstore(tmp_path / "store", "substitute", "--from", "grpc+http://h:1", "a" * 32 + "-x")
    assert not_cache.returncode == 2 and "not a nix+http:// or nix+https:// URL" in not_cache.stderr
    bad_path = tvixstore(tmp_path / "store", "substitute", "--from", "nix+http://h", "not-a-store-path")
    assert bad_path.returncode == 2 and "not-a-store-path" in bad_path.stderr
