"""Real binary caches written by Nix, and an HTTP server that can misbehave on request.

``build_caches`` makes, once per session, what a build farm publishes:

* a source tree (files, an executable, empty files, symlinks relative,
  absolute and dangling, nested and empty directories, a name with a space
  and non-ASCII bytes, a file bigger than one read piece) added with
  ``nix-store --add-fixed --recursive sha256`` (so its narinfo has a CA);
* a second path that references the first and itself and has a Deriver,
  registered with ``nix-store --load-db`` (Nix can build nothing offline
  here, but it signs and copies what its database says);
* ``nix copy --to 'file://DIR?compression=C&secret-key=SK'`` of both paths
  for each compression, and once without a key (unsigned).

Nix setup, found by trying (Debian's nix-bin 2.8 as root, offline): Nix
works on a chroot store ``--store 'local?root=DIR'`` (store dir still
``/nix/store``, so the paths are real ``/nix/store`` paths, but nothing
touches the machine's store); ``nix.conf`` in a scratch ``NIX_CONF_DIR``
turns on ``nix-command`` and empties ``substituters`` (else ``nix copy``
tries cache.nixos.org for anything missing); ``HOME`` points at a scratch
directory for Nix's caches. Building derivations does not work in a chroot
store without a static shell, hence ``--load-db`` for references.

``CacheServer`` serves a directory over HTTP/1.1 keep-alive on loopback
from threads, counts requests per path and connections, and injects
faults per path: an HTTP status, a delay before the answer, other bytes, a
body trickled slowly, or a hang-up after some bytes.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.castore_fixtures import Exe, Link, make_on_disk
from tvixmount.castore import nixbase32
from tvixmount.castore.storepath import StorePath, parse_absolute

COMPRESSIONS = ("none", "xz", "bzip2", "gzip", "zstd")
KEY_NAME = "test-1"

SOURCE = {
    b"hello.txt": b"hello, binary cache\n",
    b"empty": b"",
    b"bin": {b"run": Exe(b"#!/bin/sh\necho run\n"), b"run-link": Link(b"run")},
    b"lib": {
        b"libz.so.1": Exe(random.Random(1).randbytes(1024 * 1024 + 17)),  # > one read piece
        b"libz.so": Link(b"libz.so.1"),
        b"nested": {b"deeper": {b"deepest": {b"leaf": b"x" * 4097}}, b"empty-dir": {}},
    },
    b"share": {b"doc": {b"README": b"read me\n" * 100, b"also empty": b""}},
    b"abs-link": Link(b"/nix/store/00000000000000000000000000000000-elsewhere/bin/x"),
    b"dangling": Link(b"../no/such/file"),
    "caf\u00e9 menu".encode(): b"non-ASCII name\n",
}


@dataclass
class NixCaches:
    """What ``build_caches`` made; ``caches[compression]`` is a directory to serve."""

    root: Path
    env: dict[str, str]
    store: str  # --store argument
    source: Path
    src_path: StorePath
    refs_path: StorePath
    deriver: str  # basename of the refs path's (fake) deriver
    secret_key: Path
    public_key: str
    other_public_key: str
    caches: dict[str, Path] = field(default_factory=dict)
    unsigned: Path | None = None
    nar: dict[str, bytes] = field(default_factory=dict)  # basename -> nix-store --dump bytes

    def nix(self, *args: str, stdin: bytes | None = None) -> bytes:
        return run_nix(self.env, *args, stdin=stdin)


def run_nix(env: dict[str, str], *args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(args, env=env, input=stdin, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.decode(errors='replace')[-2000:]}")
    return result.stdout


def build_caches(base: Path) -> NixCaches:
    """Make the trees, keys and caches (see the module doc); skip when Nix does not work here."""
    for tool in ("nix", "nix-store", "nix-hash"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH (Debian package nix-bin)")
    conf, home = base / "conf", base / "home"
    conf.mkdir()
    home.mkdir()
    (conf / "nix.conf").write_text("experimental-features = nix-command\nsubstituters =\n")
    env = {**os.environ, "NIX_CONF_DIR": str(conf), "HOME": str(home)}
    store = f"local?root={base / 'root'}"
    source = base / "nixhttp-src"
    make_on_disk(source, SOURCE)
    try:
        out = run_nix(env, "nix-store", "--store", store, "--add-fixed", "--recursive", "sha256", str(source))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"nix-store --add-fixed does not work here: {exc}")
    src_path = parse_absolute(out.decode().strip())

    secret = base / "secret-key"
    secret.write_bytes(run_nix(env, "nix", "key", "generate-secret", "--key-name", KEY_NAME))
    public = run_nix(env, "nix", "key", "convert-secret-to-public", stdin=secret.read_bytes()).decode()
    other = run_nix(env, "nix", "key", "generate-secret", "--key-name", KEY_NAME)
    other_public = run_nix(env, "nix", "key", "convert-secret-to-public", stdin=other).decode()

    refs_path, deriver = _register_refs_path(env, store, base / "root", src_path)
    found = NixCaches(base, env, store, source, src_path, refs_path, deriver, secret, public.strip(),
                      other_public.strip())
    for path in (src_path, refs_path):
        on_disk = base / "root" / path.absolute.lstrip("/")
        found.nar[path.basename] = run_nix(env, "nix-store", "--dump", str(on_disk))
    paths = (src_path.absolute, refs_path.absolute)
    for compression in COMPRESSIONS:
        target = base / f"cache-{compression}"
        run_nix(env, "nix", "copy", "--store", store, "--to",
                f"file://{target}?compression={compression}&secret-key={secret}", *paths)
        found.caches[compression] = target
    found.unsigned = base / "cache-unsigned"
    run_nix(env, "nix", "copy", "--store", store, "--to", f"file://{found.unsigned}?compression=xz", *paths)
    return found


def _register_refs_path(env: dict[str, str], store: str, root: Path, src: StorePath) -> tuple[StorePath, str]:
    """A path referencing ``src`` and itself, with a Deriver, put in the database as it is."""
    path = StorePath(hashlib.sha256(b"nixhttp refs path").digest()[:20], "nixhttp-refs")
    deriver = f"{nixbase32.encode(hashlib.sha256(b'nixhttp deriver').digest()[:20])}-nixhttp-refs.drv"
    on_disk = root / path.absolute.lstrip("/")
    make_on_disk(on_disk, {
        b"ref": src.absolute.encode() + b"\n",
        b"self": path.absolute.encode() + b"\n",
        b"link": Link(src.absolute.encode() + b"/hello.txt"),
    })
    nar = run_nix(env, "nix-store", "--dump", str(on_disk))
    registration = "\n".join([
        path.absolute, "sha256:" + hashlib.sha256(nar).hexdigest(), str(len(nar)),
        f"/nix/store/{deriver}", "2", src.absolute, path.absolute, "",
    ])
    run_nix(env, "nix-store", "--store", store, "--load-db", stdin=registration.encode())
    return path, deriver


def narinfo_file(cache: Path, path: StorePath) -> Path:
    return cache / f"{path.hash_part}.narinfo"


def nar_file(cache: Path, path: StorePath) -> Path:
    """The NAR file the narinfo of ``path`` in ``cache`` points at."""
    for line in narinfo_file(cache, path).read_text().splitlines():
        if line.startswith("URL: "):
            return cache / line[len("URL: "):]
    raise AssertionError(f"no URL line for {path}")


# -- the server --------------------------------------------------------------------


@dataclass
class Fault:
    status: int | None = None  # answer this status instead
    times: int | None = None  # only for this many requests (None: always)
    delay: float = 0.0  # seconds before answering
    body: bytes | None = None  # serve these bytes instead of the file
    trickle: float = 0.0  # seconds between 1 KiB pieces of the body
    hangup_after: int | None = None  # close the connection after this many body bytes


class CacheServer:
    """A directory over HTTP on 127.0.0.1, with counters and per-path faults."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.requests: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.faults: dict[str, Fault] = {}
        self.on_request: Callable[[http.server.BaseHTTPRequestHandler], None] | None = None
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, part: str) -> int:
        """Requests for paths containing ``part`` (``.narinfo``, ``/nar/``, a hash)."""
        with self._lock:
            return sum(n for path, n in self.requests.items() if part in path)

    def fault(self, path: str, **kwargs: object) -> None:
        self.faults["/" + path.lstrip("/")] = Fault(**kwargs)  # type: ignore[arg-type]

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            self.requests[path] += 1
            fault = self.faults.get(path)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[path]
            return fault

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up (as the code under test does on purpose) are no error here."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _handler(server: CacheServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with server._lock:
                server.connections += 1

        def log_message(self, format: str, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            try:
                self._get(head=False)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away; nothing to tell it

        def do_HEAD(self) -> None:  # Nix asks for a narinfo with HEAD before it GETs it
            self._get(head=True)

        def _get(self, head: bool) -> None:
            if server.on_request is not None:
                server.on_request(self)
            path = self.path.split("?")[0]
            fault = server._take_fault(path) or Fault()
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                self._answer(fault.status, b"fault\n", head)
                return
            body = fault.body
            if body is None:
                file = (server.directory / path.lstrip("/")).resolve()
                if not file.is_relative_to(server.directory.resolve()) or not file.is_file():
                    self._answer(404, b"not found\n", head)
                    return
                body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if fault.hangup_after is not None:
                self.wfile.write(body[: fault.hangup_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault.trickle:
                for start in range(0, len(body), 1024):
                    self.wfile.write(body[start : start + 1024])
                    self.wfile.flush()
                    time.sleep(fault.trickle)
                return
            self.wfile.write(body)

        def _answer(self, status: int, body: bytes, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
