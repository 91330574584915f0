"""Substitution from binary caches real Nix wrote, served over real HTTP, into a real embedded store.

Every test checks what a reader of the store would see afterwards: the
tree is the NAR Nix dumped (byte for byte, rendered back from our blobs
and directories), and every failure leaves no PathInfo behind. Request
counts come from the server, so "one download" means one GET of the NAR.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.nixhttp_fixtures import (
    COMPRESSIONS,
    CacheServer,
    NixCaches,
    build_caches,
    closed_port,
    nar_file,
    narinfo_file,
)
from tvixmount.castore import nar, nixbase32
from tvixmount.castore.directory import Directory
from tvixmount.castore.pathinfo import CA_KINDS, PathInfo, narinfo_fingerprint, validate_pathinfo
from tvixmount.castore.storepath import StorePath
from tvixmount.errors import IntegrityError, InvalidData, Timeout, Unavailable
from tvixmount.store import Store, StoreUrls, open_store
from tvixmount.store.nixhttp import narinfo, parse_url, signing
from tvixmount.store.nixhttp.http import HttpConfig
from tvixmount.store.nixhttp.service import NixHttpPathInfoService

ROOT = Path(__file__).resolve().parents[2]
FAST = HttpConfig(connect_timeout=2.0, read_timeout=2.0, first_backoff=0.05, max_backoff=0.2)


@pytest.fixture(scope="session")
def caches(tmp_path_factory: pytest.TempPathFactory) -> NixCaches:
    return build_caches(tmp_path_factory.mktemp("nixhttp"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(StoreUrls.single(f"local://{tmp_path}/store?create=1")) as opened:
        yield opened


Servers = Callable[..., CacheServer]


@pytest.fixture
def serve() -> Iterator[Servers]:
    started: list[CacheServer] = []

    def start(directory: Path) -> CacheServer:
        started.append(CacheServer(directory))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def service(url: str, store: Store, tmp_path: Path, keys: str | None = "", locks: bool = True,
            **params: str) -> NixHttpPathInfoService:
    query = dict(params)
    if keys is not None:
        query["trusted-public-keys"] = keys
    text = "&".join(f"{k}={v}" for k, v in query.items())
    config = parse_url(f"nix+{url}" + (f"?{text}" if text else ""))
    lock_dir = tmp_path / "store" / "substitute-locks" if locks else None
    return NixHttpPathInfoService(config, store.blobs, store.directories, store.path_infos, lock_dir, FAST)


def rendered(store: Store, info: PathInfo) -> bytes:
    """The NAR of a stored path, rendered from the store's own blobs and directories."""

    def get_directory(digest: bytes) -> Directory:
        found = store.directories.get(digest)
        assert found is not None
        return found

    def read_blob(digest: bytes, size: int) -> Iterator[bytes]:
        with store.blobs.open_read(digest) as reader:
            yield reader.pread(0, size)

    return b"".join(nar.nar_chunks(dataclasses.replace(info.node, name=b""), get_directory, read_blob))


def absent(store: Store, path: StorePath) -> bool:
    return store.path_infos.get(path.digest) is None


# -- the real thing, in every compression ----------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_each_compression_gives_the_tree_nix_copied(caches: NixCaches, serve: Servers, store: Store,
                                                    tmp_path: Path, compression: str) -> None:
    server = serve(caches.caches[compression])
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    for path in (caches.refs_path, caches.src_path):
        info = svc.get(path.digest)
        assert info is not None and validate_pathinfo(info) == path
        assert rendered(store, info) == caches.nar[path.basename]
    assert server.count(".narinfo") == 2 and server.count("/nar/") == 2
    for path in (caches.refs_path, caches.src_path):  # local now: no request
        assert svc.get(path.digest) is not None
    assert server.count(".narinfo") == 2 and server.count("/nar/") == 2


def test_every_narinfo_field_is_kept(caches: NixCaches, serve: Servers, store: Store, tmp_path: Path) -> None:
    server = serve(caches.caches["zstd"])
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    refs = svc.get(caches.refs_path.digest)
    src = svc.get(caches.src_path.digest)
    assert refs is not None and refs.narinfo is not None and src is not None and src.narinfo is not None
    names = sorted((caches.src_path.basename, caches.refs_path.basename))
    assert refs.narinfo.reference_names == tuple(names)
    assert set(refs.references) == {caches.src_path.digest, caches.refs_path.digest}
    assert refs.narinfo.deriver == ("nixhttp-refs", nixbase32.decode(caches.deriver[:32]))
    nix_hash = caches.nix("nix-hash", "--type", "sha256", "--base32", str(caches.source)).decode().strip()
    assert nixbase32.encode(src.narinfo.nar_sha256) == nix_hash
    assert src.narinfo.nar_size == len(caches.nar[caches.src_path.basename])
    assert src.narinfo.ca is not None and CA_KINDS[src.narinfo.ca.hash_type] == ("fixed:r", "sha256")
    assert src.narinfo.ca.digest == src.narinfo.nar_sha256
    key = signing.parse_public_key(caches.public_key)
    for info in (refs, src):
        assert info.narinfo is not None and [s.name for s in info.narinfo.signatures] == ["test-1"]
        assert key.verifies(narinfo_fingerprint(info).encode(), info.narinfo.signatures[0])
    secret = signing.parse_secret_key(caches.secret_key.read_text())
    assert str(secret.public()) == caches.public_key  # == nix key convert-secret-to-public


def test_substituted_paths_read_after_a_restart_without_the_server(caches: NixCaches, serve: Servers,
                                                                   tmp_path: Path) -> None:
    server = serve(caches.caches["xz"])
    with open_store(StoreUrls.single(f"local://{tmp_path}/store?create=1")) as first:
        assert service(server.url, first, tmp_path, keys=caches.public_key).get(caches.src_path.digest)
    server.stop()
    with open_store(StoreUrls.single(f"local://{tmp_path}/store")) as again:
        svc = service(f"http://127.0.0.1:{closed_port()}", again, tmp_path, keys=caches.public_key)
        info = svc.get(caches.src_path.digest)
        assert info is not None
        assert rendered(again, info) == caches.nar[caches.src_path.basename]
        assert [i.node.name for i in svc.list()] == [caches.src_path.basename.encode()]


# -- what is refused before the NAR is asked for ------------------------------------------


def refused(error: type[Exception], match: str, caches: NixCaches, server: CacheServer, store: Store,
            tmp_path: Path, path: StorePath | None = None, keys: str | None = None, **params: str) -> None:
    path = path or caches.src_path
    svc = service(server.url, store, tmp_path, keys=caches.public_key if keys is None else keys, **params)
    with pytest.raises(error, match=match):
        svc.get(path.digest)
    assert absent(store, path)


def test_a_wrong_key_is_refused_before_the_nar(caches: NixCaches, serve: Servers, store: Store,
                                               tmp_path: Path) -> None:
    server = serve(caches.caches["zstd"])
    message = r"nixhttp-src has no valid signature by a trusted key \(tried test-1\); its signatures by"
    refused(signing.UntrustedError, message, caches, server, store, tmp_path, keys=caches.other_public_key)
    assert server.count("/nar/") == 0


def test_an_unsigned_cache_needs_no_keys_to_be_used(caches: NixCaches, serve: Servers, store: Store,
                                                    tmp_path: Path) -> None:
    assert caches.unsigned is not None
    server = serve(caches.unsigned)
    refused(signing.UntrustedError, "it carries no signature", caches, server, store, tmp_path)
    assert server.count("/nar/") == 0
    svc = service(server.url, store, tmp_path, keys=None)
    info = svc.get(caches.src_path.digest)
    assert info is not None and rendered(store, info) == caches.nar[caches.src_path.basename]


@pytest.mark.parametrize(("line", "value"), [
    ("NarSize", "1"),
    ("NarHash", "sha256:" + "0" * 52),
    ("References", "hsk5mj1g7c7vpffrl9808n7l8nj5i05g-other"),
])
def test_a_tampered_narinfo_is_refused_before_the_nar(caches: NixCaches, serve: Servers, store: Store,
                                                      tmp_path: Path, line: str, value: str) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    text = narinfo_file(cache, caches.src_path).read_text()
    lines = [f"{line}: {value}" if old.startswith(line + ":") else old for old in text.splitlines()]
    server.fault(narinfo_file(cache, caches.src_path).name, body=("\n".join(lines) + "\n").encode())
    refused(signing.UntrustedError, "do not verify", caches, server, store, tmp_path)
    assert server.count("/nar/") == 0


def test_a_narinfo_for_another_path_is_refused(caches: NixCaches, serve: Servers, store: Store,
                                               tmp_path: Path) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    server.fault(narinfo_file(cache, caches.src_path).name,
                 body=narinfo_file(cache, caches.refs_path).read_bytes())
    refused(InvalidData, f"describes {caches.refs_path}, another store path", caches, server, store, tmp_path)
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    other_name = StorePath(caches.refs_path.digest, "nixhttp-other")
    with pytest.raises(InvalidData, match=f"describes {caches.refs_path}, not {other_name} .same hash"):
        svc.substitute(other_name)
    assert server.count("/nar/") == 0 and absent(store, caches.refs_path)


def test_an_unknown_compression_is_refused_with_a_clear_line(caches: NixCaches, serve: Servers, store: Store,
                                                             tmp_path: Path) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    text = narinfo_file(cache, caches.src_path).read_text().replace("Compression: zstd", "Compression: br")
    server.fault(narinfo_file(cache, caches.src_path).name, body=text.encode())  # unsigned field
    refused(InvalidData, r"compression 'br' is not supported \(only none, xz, bzip2, gzip, zstd\)",
            caches, server, store, tmp_path)
    assert server.count("/nar/") == 0


# -- NARs that do not match ------------------------------------------------------------------


def unsized(caches: NixCaches, cache: Path, server: CacheServer) -> None:
    """Serve the src narinfo without FileHash/FileSize (unsigned), so only the NAR checks stand."""
    text = narinfo_file(cache, caches.src_path).read_text()
    kept = [line for line in text.splitlines() if not line.startswith(("FileHash:", "FileSize:"))]
    server.fault(narinfo_file(cache, caches.src_path).name, body=("\n".join(kept) + "\n").encode())


@pytest.mark.parametrize(("compression", "change", "error", "match"), [
    ("none", "flip", IntegrityError, "the NAR hashes to .*NarHash says"),
    ("zstd", "flip", InvalidData, "zstd|FileHash|NarHash|NAR at byte"),
    ("none", "flip-unsized", IntegrityError, "the NAR hashes to .*NarHash says"),
    ("none", "longer", InvalidData, "longer than its FileSize"),
    ("none", "longer-unsized", InvalidData, "the NAR is longer than its NarSize"),
    ("none", "shorter-unsized", InvalidData, "NAR at byte .* truncated|the NAR ends after"),
    ("xz", "shorter", InvalidData, "xz stream is cut short"),
])
def test_a_nar_that_does_not_match_stores_nothing(caches: NixCaches, serve: Servers, store: Store,
                                                  tmp_path: Path, compression: str, change: str,
                                                  error: type[Exception], match: str) -> None:
    cache = caches.caches[compression]
    server = serve(cache)
    original = nar_file(cache, caches.src_path)
    data = original.read_bytes()
    if change.startswith("flip"):
        middle = len(data) // 2
        body = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]
    elif change.startswith("longer"):
        body = data + bytes(8)
    else:
        body = data[:-8]
    if change.endswith("unsized"):
        unsized(caches, cache, server)
    server.fault(str(original.relative_to(cache)), body=body, times=1)
    refused(error, match, caches, server, store, tmp_path)
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    assert svc.get(caches.src_path.digest) is not None  # nothing was remembered: the next lookup works


def test_a_signed_narinfo_with_the_wrong_nar_hash_stores_nothing(caches: NixCaches, serve: Servers,
                                                                 store: Store, tmp_path: Path) -> None:
    """A cache that lies consistently (re-signed by the trusted key) is caught by the NAR itself."""
    cache = caches.caches["gzip"]
    server = serve(cache)
    info = narinfo.parse(narinfo_file(cache, caches.src_path).read_bytes())
    secret = signing.parse_secret_key(caches.secret_key.read_text())
    lying = dataclasses.replace(info, nar_sha256=bytes(32), ca=None)
    lying = dataclasses.replace(lying, signatures=(secret.sign(narinfo.fingerprint(lying)),))
    server.fault(narinfo_file(cache, caches.src_path).name, body=narinfo.render(lying).encode())
    refused(IntegrityError, "NarHash says sha256:" + "0" * 52, caches, server, store, tmp_path)
    assert server.count("/nar/") == 1


# -- the server misbehaving ------------------------------------------------------------------


def test_absent_paths_are_none_and_remembered_for_the_ttl(caches: NixCaches, serve: Servers, store: Store,
                                                          tmp_path: Path) -> None:
    server = serve(caches.caches["zstd"])
    svc = service(server.url, store, tmp_path, keys=caches.public_key, **{"negative-ttl": "0.5"})
    missing = StorePath(bytes(20), "missing")
    assert svc.get(missing.digest) is None
    assert svc.get(missing.digest) is None
    assert svc.narinfo(missing) is None
    assert server.count(missing.hash_part) == 1
    time.sleep(0.6)
    assert svc.get(missing.digest) is None
    assert server.count(missing.hash_part) == 2
    server.fault(narinfo_file(caches.caches["zstd"], caches.src_path).name, status=403, times=1)
    assert svc.get(caches.src_path.digest) is None  # 403 is "not there" too (S3)


def test_server_errors_are_retried_then_fail_and_are_not_remembered(caches: NixCaches, serve: Servers,
                                                                    store: Store, tmp_path: Path) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    name = narinfo_file(cache, caches.src_path).name
    server.fault(name, status=502, times=2)
    svc = service(server.url, store, tmp_path, keys=caches.public_key, timeout="1.5")
    assert svc.get(caches.src_path.digest) is not None
    assert server.count(name) == 3
    nar_path = str(nar_file(cache, caches.refs_path).relative_to(cache))
    server.fault(nar_path, status=500)
    with pytest.raises(Timeout, match="HTTP 500"):
        svc.get(caches.refs_path.digest)
    assert absent(store, caches.refs_path)
    server.faults.clear()
    assert svc.get(caches.refs_path.digest) is not None


def test_a_server_that_is_down_is_unavailable_within_the_timeout(caches: NixCaches, store: Store,
                                                                 tmp_path: Path) -> None:
    svc = service(f"http://127.0.0.1:{closed_port()}", store, tmp_path, keys=caches.public_key, timeout="1")
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"refused|NewConnectionError"):
        svc.get(caches.src_path.digest)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("where", ["narinfo", "nar"])
def test_a_slow_server_costs_the_timeout(caches: NixCaches, serve: Servers, store: Store, tmp_path: Path,
                                         where: str) -> None:
    cache = caches.caches["none"]
    server = serve(cache)
    if where == "narinfo":
        server.fault(narinfo_file(cache, caches.src_path).name, delay=5.0)
    else:
        server.fault(str(nar_file(cache, caches.src_path).relative_to(cache)), trickle=0.05)
    svc = service(server.url, store, tmp_path, keys=caches.public_key, timeout="1")
    started = time.monotonic()
    with pytest.raises(Timeout):
        svc.get(caches.src_path.digest)
    assert time.monotonic() - started < 2.0
    assert absent(store, caches.src_path)


def test_a_server_going_away_mid_nar_stores_nothing(caches: NixCaches, serve: Servers, store: Store,
                                                    tmp_path: Path) -> None:
    cache = caches.caches["none"]
    server = serve(cache)
    server.fault(str(nar_file(cache, caches.src_path).relative_to(cache)), hangup_after=500_000, times=1)
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    with pytest.raises(Unavailable, match=r"IncompleteRead|Connection broken") as caught:
        svc.get(caches.src_path.digest)
    assert not isinstance(caught.value, Timeout)
    assert absent(store, caches.src_path)
    assert svc.get(caches.src_path.digest) is not None


# -- one download per path ---------------------------------------------------------------------


@pytest.mark.parametrize("locks", [False, True], ids=["in-process", "with-file-locks"])
def test_concurrent_lookups_of_one_path_download_once(caches: NixCaches, serve: Servers, store: Store,
                                                      tmp_path: Path, locks: bool) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    server.fault(str(nar_file(cache, caches.src_path).relative_to(cache)), delay=0.5)
    svc = service(server.url, store, tmp_path, keys=caches.public_key, locks=locks)
    results: list[PathInfo | None] = []
    threads = [threading.Thread(target=lambda: results.append(svc.get(caches.src_path.digest)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8 and all(r == results[0] and r is not None for r in results)
    assert server.count(".narinfo") == 1 and server.count("/nar/") == 1


LOOKUP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tvixmount.castore import nixbase32
    from tvixmount.store import StoreUrls, open_store
    from tvixmount.store.nixhttp import open_path_info_service
    store_dir, url, hash_part = sys.argv[1:4]
    with open_store(StoreUrls.single(f"local://{store_dir}?create=1")) as store:
        svc = open_path_info_service(url, store.blobs, store.directories, store.path_infos,
                                     lock_dir=Path(store_dir) / "substitute-locks")
        info = svc.get(nixbase32.decode(hash_part))
        print(info.node.name.decode())
""")


def test_two_processes_sharing_a_store_download_once(caches: NixCaches, serve: Servers,
                                                     tmp_path: Path) -> None:
    cache = caches.caches["zstd"]
    server = serve(cache)
    server.fault(str(nar_file(cache, caches.src_path).relative_to(cache)), delay=1.0)
    url = f"nix+{server.url}?trusted-public-keys={caches.public_key}"
    with open_store(StoreUrls.single(f"local://{tmp_path}/store?create=1")):
        pass  # created once, so neither child races to create it
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LOOKUP, str(tmp_path / "store"), url, caches.src_path.hash_part],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.strip() == caches.src_path.basename
    assert server.count("/nar/") == 1
    assert server.count(".narinfo") == 1


# -- ahead of time, with progress ---------------------------------------------------------------


def test_substitute_a_closure_with_progress(caches: NixCaches, serve: Servers, store: Store,
                                            tmp_path: Path) -> None:
    server = serve(caches.caches["bzip2"])
    svc = service(server.url, store, tmp_path, keys=caches.public_key)
    seen: list[str] = []
    nar_bytes = [0]

    class Progress:
        def started(self, info: narinfo.NarinfoFile) -> None:
            seen.append(f"start {info.store_path.name}")

        def nar_bytes(self, n: int) -> None:
            nar_bytes[0] += n

        def finished(self, info: narinfo.NarinfoFile, seconds: float) -> None:
            seen.append(f"done {info.store_path.name}")

    found = svc.narinfo(caches.refs_path)  # --dry-run: the narinfo only
    assert found is not None and server.count("/nar/") == 0
    todo, done = [caches.refs_path], set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        info = svc.substitute(path, time.monotonic() + 30, Progress())
        assert info is not None and info.narinfo is not None
        todo.extend(StorePath(ref, name.split("-", 1)[1])
                    for ref, name in zip(info.references, info.narinfo.reference_names, strict=True))
    assert seen == ["start nixhttp-refs", "done nixhttp-refs", "start nixhttp-src", "done nixhttp-src"]
    assert nar_bytes[0] == sum(len(caches.nar[p.basename]) for p in (caches.src_path, caches.refs_path))
    assert server.count("/nar/") == 2
