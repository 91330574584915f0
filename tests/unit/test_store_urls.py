"""Store URLs, their dispatch, and the default store location."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvixmount.errors import InvalidArgument
from tvixmount.store import (
    StoreUrls,
    default_store_dir,
    describe,
    open_blob_service,
    open_path_info_service,
    urls,
)
from tvixmount.store.memory import MemoryBlobService


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("memory", "scheme"),
        ("memory:///", "memory"),
        ("memory://x", "memory"),
        ("redb:///x", "unknown scheme"),
        ("local://", "absolute path"),
        ("local://host/abs", "no host"),
        ("local:relative", "scheme"),
        ("local:///", "refusing"),
        ("local:///a?create=maybe", "0 or 1"),
        ("local:///a?frobnicate=1", "unknown parameter"),
        ("local:///a#frag", "fragment"),
        ("local:///a%00b", "NUL"),
        ("local:///a\nb", "control"),
        ("grpc+http://", "host"),
        ("grpc+http://[::1]:8000/", "path must be empty"),
        ("grpc+http://h:notaport", "port"),
        ("grpc+unix://host/sock", "no host"),
        ("grpc+unix:///sock?create=1", "unknown parameter"),
    ],
)
def test_bad_urls_name_the_url_and_the_problem(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        urls.parse(url)
    assert problem in str(info.value)
    if url:
        assert repr(url) in str(info.value)


def test_good_urls() -> None:
    assert urls.parse("memory://").scheme == "memory"
    local = urls.parse("local:///var/lib/x?create=1")
    assert (local.scheme, local.path, local.flag("create")) == ("local", "/var/lib/x", True)
    assert not urls.parse("local:///var/lib/x").flag("create")
    grpc = urls.parse("grpc+http://[::1]:8000?wait-connect=1")
    assert (grpc.host, grpc.flag("wait-connect")) == ("[::1]:8000", True)
    assert urls.parse("grpc+unix:///run/tvix.sock").path == "/run/tvix.sock"
    assert urls.parse("grpc+https://cache.example:443").host == "cache.example:443"


@pytest.mark.parametrize(
    "name", ["plain", "with space", "q?mark", "hash#", "per%cent", "ünï", "bad\udcffbyte"]
)
def test_local_url_round_trips_any_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    parsed = urls.parse(urls.local_url(path, create=True))
    assert Path(parsed.path) == path and parsed.flag("create")


def test_store_urls_constructors(tmp_path: Path) -> None:
    single = StoreUrls.single("memory://")
    assert single == StoreUrls("memory://", "memory://", "memory://")
    embedded = StoreUrls.embedded(tmp_path)
    assert embedded.blob == f"local://{tmp_path}" == embedded.path_info
    assert StoreUrls.embedded(tmp_path, create=True).directory.endswith("?create=1")


def test_describe() -> None:
    assert describe(StoreUrls.single("memory://")) == "store memory://"
    mixed = StoreUrls("grpc+http://user:secret@h:1", "memory://", "local:///s")
    line = describe(mixed)
    assert "secret" not in line and "h:1" in line and "local:///s" in line


def test_dispatch() -> None:
    assert isinstance(open_blob_service("memory://"), MemoryBlobService)
    with pytest.raises(InvalidArgument, match="open it with open_store, over the store"):
        open_path_info_service("nix+https://cache.nixos.org")  # a cache substitutes into a store
    with pytest.raises(InvalidArgument, match="unknown parameter 'compression'"):
        urls.parse("nix+http://h?compression=xz")  # the cache's own checks, at parse time
    parsed = urls.parse("nix+https://u:pw@cache.example:8443/sub/?negative-ttl=5")
    assert (parsed.scheme, parsed.host, parsed.path) == ("nix+https", "cache.example:8443", "/sub")
    assert urls.unsigned_cache("nix+http://h") and not urls.unsigned_cache("nix+http://h?trusted-public-keys=")
    assert not urls.unsigned_cache("memory://")


def test_grpc_without_client_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import tvixmount.store as store

    # Pretend the gRPC client was never installed, whether or not it is.
    monkeypatch.setattr(store, "GRPC_MODULE", "tvixmount.store.no_such_grpc_client")
    with pytest.raises(InvalidArgument, match="grpc store support not available") as info:
        open_blob_service("grpc+http://[::1]:8000")
    assert "grpc+http://[::1]:8000" in str(info.value)


def test_default_store_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TVIXMOUNT_STORE_DIR", str(tmp_path / "s"))
    assert default_store_dir() == tmp_path / "s"
    monkeypatch.delenv("TVIXMOUNT_STORE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_store_dir() == Path("/var/lib/tvixmount")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_dir() == tmp_path / "xdg" / "tvixmount"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_dir() == tmp_path / "home" / ".local" / "share" / "tvixmount"


# -- what naming a store loads ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_naming_a_store_loads_no_backend() -> None:
    """The dispatcher names the store (with a cache) and hands it to workers; it opens nothing itself."""
    loaded = _modules_after(
        "from pathlib import Path\n"
        "from tvixmount.store import BlobCacheConfig, StoreUrls, describe, open_store\n"
        "grpc = 'grpc+http://127.0.0.1:1'\n"
        "urls = StoreUrls(grpc, grpc, grpc, blob_cache=BlobCacheConfig(Path('/c')))\n"
        "describe(urls), describe(StoreUrls.embedded('/s'))\n"
    )
    assert "tvixmount.store" in loaded  # the probe ran
    assert not {"sqlite3", "grpc"} & loaded
    light = {"base", "urls", "location", "cache", "cache.config"}
    backends = sorted(m for m in loaded if m.startswith("tvixmount.store.")
                      and m.removeprefix("tvixmount.store.") not in light)
    assert backends == []


def test_the_daemon_loads_only_the_wire_module_of_the_grpc_client() -> None:
    loaded = _modules_after("import tvixmount.server.daemon\n")
    assert "grpc" in loaded  # the daemon serves gRPC itself
    client_side = sorted(m for m in loaded if m.startswith("tvixmount.store.grpc."))
    assert client_side == ["tvixmount.store.grpc.wire"]


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "tvixmount" / "store").rglob("*.py")), ids=lambda p: p.name)
def test_store_modules_keep_the_package_rules(path: Path) -> None:
    """Only store/grpc imports grpc; embedded/ and cache/ share segments.py and sqlite.py, not each other."""
    imports = _imports(path)
    where = path.relative_to(ROOT / "tvixmount" / "store").parts[0]
    if where != "grpc":
        assert not {n for n in imports if n == "grpc" or n.startswith(("grpc.", "tvixmount.store.grpc"))}
    if where == "embedded":
        assert not {n for n in imports if n.startswith("tvixmount.store.cache")}
    if where == "cache":
        assert not {n for n in imports if n.startswith("tvixmount.store.embedded")}
