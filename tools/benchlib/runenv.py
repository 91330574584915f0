"""What the benchmark watches around its measurements: the machine, the page cache, py-spy.

Kept apart from the measurements themselves: none of this is measured,
all of it decides whether a measurement can be trusted (a busy machine, a
page cache dropped by someone else) or explains it (a profile).
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

TOOLS = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def in_turn(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at round_index (wrapping), so that nobody always goes first or last.

    This machine slows down during long runs of reads: whoever always ran
    last would pay for everyone before it.
    """
    shift = round_index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


class PySpy:
    """py-spy record --subprocesses on the mount for the duration of one workload.

    Collapsed stacks (``--format raw``): summarise them with
    ``tools/benchlib/profile_summary.py``, or load them into a flame graph viewer.
    """

    def __init__(self, pid: int, out: Path, say: Callable[[str], None], gil: bool = False) -> None:
        self.pid, self.out, self.say, self.gil = pid, out, say, gil
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PySpy:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        cmd = [str(spy), "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking", "--rate", "250",
               "--format", "raw", "-o", str(self.out), *(["--gil"] if self.gil else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach before the workload starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.say(f"profile: {self.out}")


class CacheWatch:
    """Notices, while a warm run goes on, that another process dropped the page cache.

    ``echo 3 > drop_caches`` empties the cache at once; a warm run that
    re-reads its data refills it, so comparing before and after misses
    it. Sampling every 20 ms sees the cliff.
    """

    def __init__(self) -> None:
        self.peak = self.low = page_cache_bytes()
        self.dropped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = page_cache_bytes()
            if self.peak > 64 << 20 and now < self.peak // 2:
                self.dropped = True
                self.low = min(self.low, now)
            self.peak = max(self.peak, now)

    def __enter__(self) -> CacheWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def page_cache_bytes() -> int:
    """The kernel's page cache size ("Cached" in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "memory_gib": mem / (1 << 30), "kernel": platform.release(),
            "python": platform.python_version(), "cpu": cpu}


def git_commit() -> str:
    """HEAD, with "+dirty" when the mount's own code (tvixmount/, workers/) has uncommitted changes."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=TOOLS, capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tvixmount", "workers"], cwd=TOOLS.parent,
                           capture_output=True, text=True, check=False)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


