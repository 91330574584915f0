"""Real gRPC daemons for tests: ``python -m tvixmount.server`` in a subprocess.

``Daemon`` runs one daemon exactly as a user would (own process, own
store, a unix socket or a loopback TCP port) and waits until its health
service answers SERVING.

A suite that wants a fresh daemon per test would spend most of its time
starting Python and importing grpc. ``Forker`` is a helper process that
imports the daemon once and forks a daemon per request (it never opens a
channel or server itself, so the fork is clean); each child runs the same
``daemon.main(argv)`` as ``python -m tvixmount.server``, in its own
process with its own signals. ``DaemonSpares`` hands out such daemons, one
always starting ahead. Tests of start-up and signals use the real command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tvixmount.server import health
from tvixmount.store import StoreUrls, open_store

_REPO = Path(__file__).resolve().parent.parent


def scratch_dir(prefix: str) -> Path:
    """A new short-named directory, in RAM where the host has /dev/shm.

    Short: unix socket paths are limited to ~107 bytes. In RAM: a test
    store is ~260 directories, and making and removing hundreds of them on
    a disk costs seconds.
    """
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (racy, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_FORKER_CODE = r"""
import json, os, signal, sys, time
from tvixmount.server import daemon

for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "spawn":
        argv, log_path = json.loads(arg)
        pid = os.fork()
        if pid == 0:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(0)
            code = 1
            try:
                code = daemon.main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply = str(pid)
    elif cmd == "wait":
        pid_text, timeout = arg.split()
        deadline = time.monotonic() + float(timeout)
        reply = "running"
        while True:
            done, status = os.waitpid(int(pid_text), os.WNOHANG)
            if done:
                reply = str(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
    else:
        reply = "?"
    sys.stdout.write(reply + "\n")
    sys.stdout.flush()
"""


class Forker:
    """A process that forks daemons on request and reaps them (see the module doc)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _FORKER_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=_REPO)

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def spawn(self, argv: list[str], log_path: Path) -> _Forked:
        return _Forked(self, int(self._ask("spawn " + json.dumps([argv, str(log_path)]))))

    def wait(self, pid: int, timeout: float) -> int | None:
        reply = self._ask(f"wait {pid} {timeout}")
        return None if reply == "running" else int(reply)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


class _Forked:
    """The subprocess.Popen calls Daemon uses, for a daemon the Forker started."""

    def __init__(self, forker: Forker, pid: int) -> None:
        self.forker = forker
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.forker.wait(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.forker.wait(self.pid, 3600 if timeout is None else timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired("forked daemon", timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Daemon:
    """One daemon process serving ``store_urls`` (default: an embedded store in ``root``)."""

    def __init__(self, root: Path, *args: str, tcp: bool = False, port: int | None = None,
                 store_urls: StoreUrls | None = None, log_level: str = "debug",
                 forker: Forker | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_dir = root / "store"
        self.store_urls = store_urls or StoreUrls.embedded(self.store_dir, create=True)
        if tcp:
            self.port = port or free_port()
            self.listen = f"127.0.0.1:{self.port}"
            self.url = f"grpc+http://127.0.0.1:{self.port}"
        else:
            self.listen = str(root / "daemon.sock")
            self.url = f"grpc+unix://{self.listen}"
        self.log_path = root / "daemon.log"
        self.forker = forker
        self.argv = [
            "--log-level", log_level,
            "--listen-address", self.listen, "--stats-interval", "0",
            "--blob-service-addr", self.store_urls.blob,
            "--directory-service-addr", self.store_urls.directory,
            "--path-info-service-addr", self.store_urls.path_info,
            *args,
        ]
        self.cmd = [sys.executable, "-m", "tvixmount.server", *self.argv]
        self.proc: subprocess.Popen | _Forked | None = None
        self._log_file = None

    def launch(self) -> Daemon:
        """Start the process without waiting for it; refused while one it started still runs.

        A second start would drop the first process, which then outlives the
        suite (``with Daemon(...).start()`` did exactly that).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"daemon {self.listen} already runs (pid {self.proc.pid}); stop it first")
        if self.forker is not None:
            self.proc = self.forker.spawn(self.argv, self.log_path)
            return self
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     cwd=_REPO)
        return self

    def wait_ready(self, timeout: float = 20.0) -> Daemon:
        """Block until the health service says SERVING; RuntimeError with the log if not."""
        assert self.proc is not None
        target = self.listen if not self.listen.startswith("/") else "unix:" + self.listen
        deadline = time.monotonic() + timeout
        # Short reconnect back-off: grpc's default (1 s) would dominate start-up.
        options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                   ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(target, options=options) as channel:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if health.check(channel, timeout=0.5) == health.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise RuntimeError(f"daemon not serving within {timeout} s:\n{self.log()}")
                time.sleep(0.02)

    def start(self, timeout: float = 20.0) -> Daemon:
        return self.launch().wait_ready(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the daemon and wait; its exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def problems(self) -> list[str]:
        """Log lines at ERROR or above, and tracebacks (a test expecting none asserts [])."""
        return [line for line in self.log().splitlines()
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DaemonSpares:
    """Hands out fresh, ready daemons (embedded store, unix socket), one always starting ahead."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.forker = Forker()
        self._next: Daemon | None = None
        self._started: list[Daemon] = []
        # Copying an empty store is much cheaper than creating one (sqlite set-up, fsyncs).
        self._template = base / "template"
        open_store(StoreUrls.embedded(self._template, create=True)).close()

    def _spawn(self) -> Daemon:
        root = Path(tempfile.mkdtemp(prefix="d", dir=self.base))
        shutil.copytree(self._template, root / "store")
        daemon = Daemon(root, log_level="info", forker=self.forker).launch()
        self._started.append(daemon)
        return daemon

    def take(self) -> Daemon:
        daemon = self._next or self._spawn()
        self._next = self._spawn()
        return daemon.wait_ready()

    def close(self) -> None:
        for daemon in self._started:
            daemon.stop()
        self.forker.close()


# -- in-test servers that misbehave on purpose ------------------------------------------------

_STREAMING = {
    "/tvix.castore.v1.BlobService/Read": "unary_stream",
    "/tvix.castore.v1.BlobService/Put": "stream_unary",
    "/tvix.castore.v1.DirectoryService/Get": "unary_stream",
    "/tvix.castore.v1.DirectoryService/Put": "stream_unary",
    "/tvix.store.v1.PathInfoService/List": "unary_stream",
    "/tvixmount.castore.v1.BlobBatchService/Read": "unary_stream",
}


class FakeServer:
    """A real gRPC server whose methods are plain functions over raw bytes.

    ``handlers`` maps a full method path to ``fn(request, context)``; the
    request is bytes (or an iterator of bytes for client streams) and the
    result bytes (or an iterator of bytes for server streams), so a test
    can send exactly the bytes it wants: unknown fields, broken digests,
    wrong orders. ``calls`` counts calls per method path.
    """

    def __init__(self, handlers: dict, root: Path | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.handlers = handlers
        self.calls: dict[str, int] = {}
        self.root = root or scratch_dir("tvx-fake-")
        self.socket = self.root / "fake.sock"
        self.url = f"grpc+unix://{self.socket}"
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([_Generic(self)])
        self.server.add_insecure_port("unix:" + str(self.socket))
        self.server.start()

    def close(self) -> None:
        self.server.stop(0).wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method
        fn = self.fake.handlers.get(path)
        if fn is None:
            return None

        def counted(request, context):  # type: ignore[no-untyped-def]
            self.fake.calls[path] = self.fake.calls.get(path, 0) + 1
            return fn(request, context)

        kind = _STREAMING.get(path, "unary_unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(counted)
