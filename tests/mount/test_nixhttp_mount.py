"""A binary cache real Nix wrote, served over real HTTP on loopback, mounted for real.

``tvixmount MNT --path-info-service-addr nix+http://127.0.0.1:PORT?trusted-public-keys=...``
with the embedded store in a scratch directory: a lookup of a store path
fetches and checks its narinfo, streams its NAR into the store and serves
it. What a reader sees is compared with the source tree Nix added
(``diff -r``); every fault is the right errno, one log line that says
what happened, and no PathInfo (the next lookup asks the server again).
Request counts come from the server.

The caches are built once per module (tests/nixhttp_fixtures.py); mounts
are shared where the tests only add to what they see.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import LogCursor, attempt, read_bytes, serving, wait_until, workers
from tests.mounting import FUSE_MISSING
from tests.nixhttp_fixtures import (
    COMPRESSIONS,
    CacheServer,
    NixCaches,
    build_caches,
    closed_port,
    nar_file,
    narinfo_file,
)

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

FAULTS_ALLOWED = (r"failed: .*(deadline|refused|Connection|hung up|IncompleteRead|ProtocolError|Timeout)",)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> NixCaches:
    return build_caches(tmp_path_factory.mktemp("nixhttp-mount"))


def cache_url(server_url: str, keys: str | None, **params: str) -> str:
    query = dict(params)
    if keys is not None:
        query["trusted-public-keys"] = keys
    text = "&".join(f"{k}={v}" for k, v in query.items())
    return "nix+" + server_url + (f"?{text}" if text else "")


def mounted(base: Path, name: str, url: str, *args: str, store: Path | None = None,
            allowed_errors: tuple[str, ...] = (), workers: int = 2):  # -> contextmanager of Mount
    return serving(base / f"mnt-{name}", store or base / f"store-{name}", "--path-info-service-addr", url,
                   *args, allowed_errors=allowed_errors, workers=workers)


def nar_url(caches: NixCaches, compression: str) -> str:
    """The server path of the src path's NAR in one cache."""
    cache = caches.caches[compression]
    return "/" + nar_file(cache, caches.src_path).relative_to(cache).as_posix()


def diff(source: Path, mounted_path: Path) -> None:
    done = subprocess.run(["diff", "-r", "--no-dereference", str(source), str(mounted_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"diff -r differs:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"


# -- each compression, equal to its source ---------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_each_compression_reads_as_its_source(caches: NixCaches, compression: str, tmp_path: Path) -> None:
    server = CacheServer(caches.caches[compression])
    try:
        url = cache_url(server.url, caches.public_key)
        with mounted(tmp_path, compression, url) as m:
            log = LogCursor(m)
            src = m.path(caches.src_path.basename)
            diff(caches.source, src)
            refs = m.path(caches.refs_path.basename)
            assert read_bytes(refs / "ref") == caches.src_path.absolute.encode() + b"\n"
            assert os.readlink(refs / "link") == caches.src_path.absolute + "/hello.txt"
            assert os.access(src / "bin" / "run", os.X_OK) and not os.access(src / "hello.txt", os.X_OK)
            log.wait_for(rf"substituted {re.escape(caches.src_path.absolute)}: NAR \d+ bytes .*{compression}")
            assert server.count("/nar/") == 2 and server.count(".narinfo") == 2
            os.stat(src)  # looked up again: nothing more is asked of the server
            assert server.count(".narinfo") == 2
    finally:
        server.stop()


def test_nix_hash_of_the_mounted_path_is_the_signed_nar_hash(caches: NixCaches, tmp_path: Path) -> None:
    server = CacheServer(caches.caches["zstd"])
    try:
        with mounted(tmp_path, "hash", cache_url(server.url, caches.public_key)) as m:
            got = caches.nix("nix-hash", "--type", "sha256", "--base32",
                             str(m.path(caches.src_path.basename))).decode().strip()
            want = caches.nix("nix-hash", "--type", "sha256", "--base32", str(caches.source)).decode().strip()
            assert got == want
    finally:
        server.stop()


# -- a substituted path outlives the server ---------------------------------------------------


def test_remount_with_the_server_stopped_serves_what_was_substituted(caches: NixCaches,
                                                                     tmp_path: Path) -> None:
    server = CacheServer(caches.caches["xz"])
    url = cache_url(server.url, caches.public_key)
    store = tmp_path / "store"
    try:
        with mounted(tmp_path, "first", url, store=store) as m:
            diff(caches.source, m.path(caches.src_path.basename))
            os.stat(m.path(caches.refs_path.basename))
    finally:
        server.stop()
    with mounted(tmp_path, "again", url, store=store) as m:
        diff(caches.source, m.path(caches.src_path.basename))
        self_line = caches.refs_path.absolute.encode() + b"\n"
        assert read_bytes(m.path(caches.refs_path.basename, "self")) == self_line


# -- faults, one mount, one path: each fails alone and stores nothing -------------------------


class Faults:
    """One mount over one server; ``lookup`` is one stat of the src path."""

    def __init__(self, caches: NixCaches, server: CacheServer, m) -> None:  # m: Mount
        self.caches = caches
        self.server = server
        self.m = m
        self.path = m.path(caches.src_path.basename)
        self.narinfo = "/" + narinfo_file(caches.caches["xz"], caches.src_path).name
        self.nar = nar_url(caches, "xz")

    def fails(self, expected_errno: int, line: str, **fault: object) -> None:
        """With ``fault`` on the NAR or narinfo, a lookup fails alone and leaves nothing stored."""
        log = LogCursor(self.m)
        narinfos = self.server.count(".narinfo")
        code, _ = attempt(lambda: os.stat(self.path))
        assert code == expected_errno, f"{errno.errorcode.get(code, code)}; log:\n{log.text()[-2000:]}"
        log.wait_for(line)
        said = log.lines(containing=self.caches.src_path.hash_part)
        assert len([s for s in said if " WARNING " in s or " ERROR " in s]) == 1, said
        assert self.server.count(".narinfo") == narinfos + 1
        self.server.faults.clear()


@pytest.fixture(scope="module")
def faults(caches: NixCaches, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    base = tmp_path_factory.mktemp("faults")
    server = CacheServer(caches.caches["xz"])
    url = cache_url(server.url, caches.public_key, **{"negative-ttl": "0"})
    try:
        with mounted(base, "faults", url, "--request-timeout", "3", "--substitute-timeout", "10",
                     allowed_errors=FAULTS_ALLOWED) as m:
            yield Faults(caches, server, m)
    finally:
        server.stop()


def test_tampered_nar_is_eio(faults: Faults) -> None:
    body = bytearray(nar_file(faults.caches.caches["xz"], faults.caches.src_path).read_bytes())
    body[len(body) // 2] ^= 1
    faults.server.fault(faults.nar, body=bytes(body))
    faults.fails(errno.EIO, r"WARNING .*(FileHash|NarHash|does not decompress|NAR)")


def test_tampered_narinfo_is_eio(faults: Faults) -> None:
    text = narinfo_file(faults.caches.caches["xz"], faults.caches.src_path).read_text()
    size = re.search(r"^NarSize: (\d+)$", text, re.M)
    assert size
    tampered = text.replace(size.group(0), f"NarSize: {int(size.group(1)) + 8}")
    faults.server.fault(faults.narinfo, body=tampered.encode())
    nars = faults.server.count(faults.nar)
    faults.fails(errno.EIO, r"WARNING .*no valid signature by a trusted key .*do not verify")
    assert faults.server.count(faults.nar) == nars  # nothing untrusted was downloaded


def test_missing_signature_is_eio(faults: Faults) -> None:
    text = narinfo_file(faults.caches.caches["xz"], faults.caches.src_path).read_text()
    unsigned = "".join(line + "\n" for line in text.splitlines() if not line.startswith("Sig: "))
    faults.server.fault(faults.narinfo, body=unsigned.encode())
    faults.fails(errno.EIO, r"WARNING .*carries no signature")


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_nar_longer_or_shorter_than_narsize_is_eio(faults: Faults, change: str) -> None:
    """The narinfo is signed, so the NAR itself is what differs: one NAR with more, one with less."""
    import lzma

    raw = faults.caches.nar[faults.caches.src_path.basename]
    nar = raw + b"\0" * 8 if change == "longer" else raw[:-8]
    faults.server.fault(faults.nar, body=lzma.compress(nar, format=lzma.FORMAT_XZ))
    faults.fails(errno.EIO,
                 r"WARNING .*nixhttp-src \(http.*: (.*longer than its NarSize|NAR at byte \d+: truncated)")


def test_server_going_away_mid_nar_is_eio(faults: Faults) -> None:
    size = nar_file(faults.caches.caches["xz"], faults.caches.src_path).stat().st_size
    faults.server.fault(faults.nar, hangup_after=size // 3)
    faults.fails(errno.EIO, r"ERROR .*failed: .*after \d+ bytes of the body")


def test_server_slower_than_the_substitute_timeout_is_eio(faults: Faults) -> None:
    """--substitute-timeout 10: the worker gives up at its share of it (0.4), well before 10 s."""
    faults.server.fault(faults.narinfo, delay=6.0, times=1)
    started = time.monotonic()
    faults.fails(errno.EIO, r"ERROR .*nixhttp-src failed: .*(deadline|timed out|Timeout)")
    assert time.monotonic() - started < 10


def test_server_errors_then_recovers_within_the_deadline(faults: Faults) -> None:
    """Two 503s are retried with back-off; the third answer is served."""
    faults.server.fault(faults.narinfo, status=503, times=2)
    code, _ = attempt(lambda: os.stat(faults.path))
    assert code == 0
    assert faults.server.count(faults.narinfo) >= 3
    diff(faults.caches.source, faults.path)


def test_absent_path_is_enoent(faults: Faults) -> None:
    absent = faults.m.path("0" * 32 + "-not-in-the-cache")
    assert attempt(lambda: os.stat(absent))[0] == errno.ENOENT


# -- faults that need a mount of their own ----------------------------------------------------


def test_404_is_enoent_and_remembered(caches: NixCaches, tmp_path: Path) -> None:
    server = CacheServer(caches.caches["zstd"])
    try:
        url = cache_url(server.url, caches.public_key, **{"negative-ttl": "60"})
        with mounted(tmp_path, "neg", url) as m:
            absent = m.path("1" * 32 + "-absent")
            for _ in range(3):
                assert attempt(lambda: os.stat(absent))[0] == errno.ENOENT
            assert server.count("11111111") == 1  # asked once, then remembered
            assert attempt(lambda: os.stat(m.path(caches.src_path.basename)))[0] == 0
    finally:
        server.stop()


def test_wrong_key_is_eio_and_downloads_nothing(caches: NixCaches, tmp_path: Path) -> None:
    server = CacheServer(caches.caches["zstd"])
    try:
        with mounted(tmp_path, "wrongkey", cache_url(server.url, caches.other_public_key)) as m:
            log = LogCursor(m)
            assert attempt(lambda: os.stat(m.path(caches.src_path.basename)))[0] == errno.EIO
            line = log.wait_for(r"WARNING .*no valid signature by a trusted key \(tried test-1\)")
            assert caches.src_path.absolute in line
            assert server.count("/nar/") == 0
    finally:
        server.stop()


def test_server_down_is_eio(caches: NixCaches, tmp_path: Path) -> None:
    url = cache_url(f"http://127.0.0.1:{closed_port()}", caches.public_key)
    with mounted(tmp_path, "down", url, "--substitute-timeout", "3",
                 allowed_errors=(r"failed: .*(refused|deadline)",)) as m:
        log = LogCursor(m)
        code, seconds = attempt(lambda: os.stat(m.path(caches.src_path.basename)))
        assert code == errno.EIO
        assert seconds < 30
        log.wait_for(r"ERROR .*nixhttp-src failed: .*(refused|deadline)")


def test_unsigned_cache_warns_once_at_start_and_serves(caches: NixCaches, tmp_path: Path) -> None:
    assert caches.unsigned is not None
    server = CacheServer(caches.unsigned)
    try:
        with mounted(tmp_path, "unsigned", cache_url(server.url, None)) as m:
            diff(caches.source, m.path(caches.src_path.basename))
            warned = [line for line in m.log().splitlines() if "signatures are NOT checked" in line]
            assert len(warned) == 1 and " WARNING " in warned[0]
    finally:
        server.stop()


# -- long lookups, and the pool staying responsive -------------------------------------------


def test_slow_substitution_gets_the_substitute_timeout_and_reads_go_on(caches: NixCaches,
                                                                       tmp_path: Path) -> None:
    """A NAR trickled over longer than --request-timeout is still substituted; other paths read meanwhile."""
    server = CacheServer(caches.caches["none"])
    url = cache_url(server.url, caches.public_key)
    src_nar = nar_url(caches, "none")
    try:
        with mounted(tmp_path, "slow", url, "--request-timeout", "2", "--substitute-timeout", "60",
                     workers=3) as m:
            refs = m.path(caches.refs_path.basename)
            assert read_bytes(refs / "self") == caches.refs_path.absolute.encode() + b"\n"
            size = nar_file(caches.caches["none"], caches.src_path).stat().st_size
            server.fault(src_nar, trickle=4.0 / (size / 1024))  # about 4 s for the whole NAR
            outcome: list[int] = []
            slow = threading.Thread(target=lambda: outcome.append(attempt(lambda: os.stat(
                m.path(caches.src_path.basename)))[0]))
            log = LogCursor(m)
            slow.start()
            wait_until(lambda: server.count(src_nar) == 1, 10)
            reads = 0
            while slow.is_alive():
                os.stat(refs / "ref")
                assert read_bytes(refs / "ref") == caches.src_path.absolute.encode() + b"\n"
                reads += 1
                time.sleep(0.2)
            slow.join()
            assert outcome == [0]
            assert reads >= 5  # the other path was served all along
            log.wait_for(r"lookup of .*nixhttp-src took \d+\.\d+ s \(substituted\)")
            diff(caches.source, m.path(caches.src_path.basename))
    finally:
        server.stop()


def test_concurrent_lookups_of_one_path_download_it_once(caches: NixCaches, tmp_path: Path) -> None:
    """Eight readers in one mount and four in a second mount on the same store: one NAR download."""
    server = CacheServer(caches.caches["zstd"])
    url = cache_url(server.url, caches.public_key)
    store = tmp_path / "shared"
    nar = nar_url(caches, "zstd")
    server.fault(nar, delay=1.0)  # all readers arrive while the first download is under way
    try:
        with mounted(tmp_path, "one", url, store=store, workers=3) as a, \
                mounted(tmp_path, "two", url, store=store, workers=3) as b:
            targets = [a.path(caches.src_path.basename, "hello.txt")] * 8 + \
                      [b.path(caches.src_path.basename, "hello.txt")] * 4
            results: list[bytes] = []
            threads = [threading.Thread(target=lambda p=p: results.append(read_bytes(p))) for p in targets]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert results == [b"hello, binary cache\n"] * 12
            assert server.count(nar) == 1
    finally:
        server.stop()


# -- a big NAR, memory flat ---------------------------------------------------------------

BIG = 512 << 20
BLOCK = 64 << 10
RSS_BOUND = 128 << 20  # a worker's peak while it ingests a 512 MiB NAR (measured: under 50 MiB at 256 MiB)


def _big_source(path: Path) -> str:
    """A 512 MiB file, half random and half zeros per 64 KiB block (zstd halves it); its sha256."""
    path.mkdir()
    rnd = random.Random(12)
    sha = hashlib.sha256()
    with open(path / "big.bin", "wb") as f:
        for _ in range(BIG // BLOCK):
            block = rnd.randbytes(BLOCK // 2) + bytes(BLOCK // 2)
            f.write(block)
            sha.update(block)
    (path / "small").write_bytes(b"beside the big one\n")
    return sha.hexdigest()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_a_big_nar_is_substituted_with_flat_memory(caches: NixCaches, tmp_path: Path) -> None:
    """A 512 MiB NAR (zstd, Nix-written) streams into the store; no worker's peak RSS comes near it."""
    source = tmp_path / "nixhttp-big"
    want = _big_source(source)
    added = caches.nix("nix-store", "--store", caches.store, "--add-fixed", "--recursive", "sha256",
                       str(source)).decode().strip()
    cache = tmp_path / "cache-big"
    caches.nix("nix", "copy", "--store", caches.store, "--to",
               f"file://{cache}?compression=zstd&secret-key={caches.secret_key}", added)
    shutil.rmtree(source)
    server = CacheServer(cache)
    try:
        # The arena's pages count in the RSS of the worker that wrote them (shared memory, bounded by
        # --segment-cache); a small one keeps VmHWM a measure of the substitution's own memory.
        with mounted(tmp_path, "big", cache_url(server.url, caches.public_key), "--substitute-timeout", "240",
                     "--segment-cache", "64M", workers=2) as m:
            sha = hashlib.sha256()
            with open(m.path(Path(added).name, "big.bin"), "rb") as f:
                while piece := f.read(1 << 20):
                    sha.update(piece)
            assert sha.hexdigest() == want
            peaks = {wid: _peak_rss(pid) for wid, pid in workers(m).items()}
            assert peaks and max(peaks.values()) < RSS_BOUND, {w: p >> 20 for w, p in peaks.items()}
            assert server.count("/nar/") == 1
    finally:
        server.stop()
