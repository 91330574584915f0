"""Real mounts for tests: a tvixmount subprocess on a temporary directory.

The mount runs exactly as a user runs it (``python -m tvixmount.cli``), so
these tests cover the CLI, the worker pool and llfuse together. Teardown
always leaves nothing mounted: SIGTERM first, then ``fusermount -u -z``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tvixmount.mount import mountinfo_path

FUSE_MISSING = None
if not os.path.exists("/dev/fuse"):
    FUSE_MISSING = "/dev/fuse is missing"
elif os.geteuid() != 0:
    FUSE_MISSING = "real-mount tests need root (mount options ro,nodev; drop_caches)"


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(mountinfo_path(line.split()[4]) == target for line in f)


def _children_by_parent() -> dict[int, list[int]]:
    """Every live process's pid under its parent's pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, parents before children (the zygote, then its workers)."""
    by_parent = _children_by_parent()
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


class Mount:
    """One tvixmount process; use as a context manager."""

    def __init__(self, mountpoint: Path, store_dir: Path | None = None, *args: str,
                 urls: tuple[str, str, str] | None = None, workers: int = 2, log_path: Path | None = None):
        self.mountpoint = mountpoint
        self.log_path = log_path or mountpoint.parent / (mountpoint.name + ".log")
        cmd = [sys.executable, "-m", "tvixmount.cli", str(mountpoint), "--workers", str(workers),
               "--log-level", "DEBUG", "--request-timeout", "10", *args]
        if urls:
            cmd += ["--blob-service-addr", urls[0], "--directory-service-addr", urls[1],
                    "--path-info-service-addr", urls[2]]
        else:
            cmd += ["--store-dir", str(store_dir)]
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tvixmount exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tvixmount did not mount within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop the mount; return its exit status (None if it had to be killed)."""
        status = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                status = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc is not None:
            status = self.proc.returncode
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], check=False)
        if hasattr(self, "_log"):
            self._log.close()
        return status

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def path(self, *parts: bytes | str) -> Path:
        return self.mountpoint.joinpath(*(os.fsdecode(p) for p in parts))
