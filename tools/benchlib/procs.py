"""Processes the benchmark starts: FUSE mounts, gRPC daemons, and the page cache.

Every mount and daemon is registered in a ``Registry`` the moment its
process exists, so the caller's ``finally`` can stop whatever is still
running after an error or Ctrl-C. A benchmark that leaves a stale FUSE
mount behind breaks the next run (and every ``df`` on the machine), so
stopping always ends with ``fusermount -u -z`` when the polite way failed.

Children run in their own session: a Ctrl-C in the terminal reaches only
the benchmark, which then stops them in order (mount before daemon).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parent.parent.parent


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Registry:
    """Live processes, stopped newest first by ``close_all``."""

    def __init__(self) -> None:
        self._live: list[Stoppable] = []

    def add(self, item: Stoppable) -> None:
        self._live.append(item)

    def discard(self, item: Stoppable) -> None:
        if item in self._live:
            self._live.remove(item)

    def close_all(self) -> list[str]:
        """Stop everything still registered; the errors met (stopping goes on past them)."""
        problems = []
        while self._live:
            item = self._live.pop()
            try:
                item.stop()
            except Exception as exc:
                problems.append(f"{item}: {exc}")
        return problems


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(line.split()[4] == target for line in f)


def lazy_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount", "-u", "-z", str(path)], check=False, capture_output=True)


def drop_caches() -> bool:
    """sync + drop page cache, dentries and inodes; False when not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (racy, fine for one benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FuseMount:
    """One FUSE filesystem process in the foreground (tvixmount or squashfuse -f)."""

    def __init__(self, name: str, cmd: list[str], mountpoint: Path, log_path: Path,
                 registry: Registry) -> None:
        self.name = name
        self.cmd = cmd
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.registry = registry
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<{self.name} mount on {self.mountpoint}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> FuseMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        lazy_unmount(self.mountpoint)  # a leftover from a killed run
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it; closed right after Popen
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        finally:
            log.close()
        self.registry.add(self)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before mounting "
                                   f"{self.mountpoint}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount {self.mountpoint} within {timeout} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.01)
        return self

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (tvixmount unmounts itself) or fusermount -u; then -z and SIGKILL if needed."""
        self.registry.discard(self)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if self.name.startswith("tvixmount"):
                proc.send_signal(signal.SIGTERM)
            else:
                subprocess.run(["fusermount", "-u", str(self.mountpoint)], check=False, capture_output=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                lazy_unmount(self.mountpoint)
                proc.kill()
                proc.wait()
        lazy_unmount(self.mountpoint)


class GrpcDaemon:
    """``python -m tvixmount.server`` on a loopback port, read-only, serving an embedded store."""

    def __init__(self, store_dir: Path, log_path: Path, registry: Registry,
                 added_latency: float = 0.0) -> None:
        self.port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.url = f"grpc+http://{self.listen}"
        self.cmd = [sys.executable, "-m", "tvixmount.server", "--listen-address", self.listen,
                    "--store-dir", str(store_dir), "--read-only", "--stats-interval", "0",
                    "--log-level", "warning"]
        if added_latency:
            self.cmd += ["--added-latency", str(added_latency)]
        self.log_path = log_path
        self.registry = registry
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<gRPC daemon on {self.listen}>"

    def start(self, timeout: float = 30.0) -> GrpcDaemon:
        import grpc

        from tvixmount.server import health

        log = open(self.log_path, "ab")  # noqa: SIM115 - closed right after Popen
        try:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        finally:
            log.close()
        self.registry.add(self)
        deadline = time.monotonic() + timeout
        options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                   ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(self.listen, options=options) as channel:
            while True:
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"gRPC daemon exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if health.check(channel, timeout=0.5) == health.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"gRPC daemon not serving within {timeout} s; see {self.log_path}")
                time.sleep(0.02)

    def urls(self) -> list[str]:
        return ["--blob-service-addr", self.url, "--directory-service-addr", self.url,
                "--path-info-service-addr", self.url]

    def stop(self, timeout: float = 15.0) -> None:
        self.registry.discard(self)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tvixmount_cmd(mountpoint: Path, workers: int, store_args: list[str]) -> list[str]:
    """The mount exactly as an operator runs it, root listing on (find and walks start at the root)."""
    return [sys.executable, "-m", "tvixmount.cli", str(mountpoint), "--workers", str(workers),
            "--list-root", "--log-level", "WARNING", *store_args]
