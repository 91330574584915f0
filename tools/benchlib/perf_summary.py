"""CPU of a FUSE mount by thread group and by kind of work, from a ``perf record -g`` of its processes.

Python 3.11 shows perf nothing of its own frames (every Python function
is ``_PyEval_EvalFrameDefault``), but what a read costs outside the
interpreter perf sees well: blake3, the copies, the system calls, the
context switches. Each sample is charged to its thread's group (FUSE
threads, collector, each worker: readpath_profile.py knows which thread is
which) and to one kind of work, found from its leaf function and, for the
kernel, the call chain above it. On a virtual machine without a PMU, perf
samples on a timer, and a sample taken while interrupts were off lands
where they are switched on again (``finish_task_switch``,
``_raw_spin_unlock_irqrestore``): those count as "switches and wake-ups".
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

# kernel: the first of these found in a sample's call chain (leaf first) names its kind
_KERNEL = (
    (("finish_task_switch", "__schedule", "schedule", "try_to_wake_up", "_raw_spin_unlock_irqrestore",
      "wake_up_q", "futex_wake", "futex_wait"), "kernel: switches, wake-ups, futexes"),
    (("fuse_dev_", "fuse_copy", "fuse_direct_io", "fuse_file_read_iter"), "kernel: FUSE device and request"),
    (("filemap_read", "generic_file_read_iter", "ext4_file_read_iter"), "kernel: pread from the page cache"),
    (("pipe_read", "pipe_write"), "kernel: pipes"),
    (("ep_poll", "do_epoll_wait", "do_sys_poll"), "kernel: epoll and poll"),
    (("handle_mm_fault", "exc_page_fault"), "kernel: page faults"),
)


def kind_of(chain: list[tuple[str, str]]) -> str:
    """One sample's kind of work from its call chain of (symbol, dso), leaf first."""
    if not chain:
        return "unknown"
    sym, dso = chain[0]
    if "kernel" in dso:
        for frame_sym, _ in chain:
            for names, kind in _KERNEL:
                if frame_sym.startswith(names):
                    return kind
        return "kernel: other (syscall entry and exit, ...)"
    if "blake3" in dso:
        return "blake3"
    if "msgpack" in dso:
        return "msgpack"
    if "llfuse" in dso or "libfuse" in dso:
        return "llfuse and libfuse"
    if "libpython" in dso:
        return "Python interpreter"
    if "libc" in dso:
        return "libc copies (memmove)" if "mem" in sym and ("move" in sym or "cpy" in sym) else "libc other"
    return "other"


def samples(data: Path) -> list[tuple[int, list[tuple[str, str]]]]:
    """(tid, call chain) of every sample in a perf.data file."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"], capture_output=True,
                          text=True, check=True).stdout
    out: list[tuple[int, list[tuple[str, str]]]] = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or not lines[0].strip().isdigit():
            continue
        chain = []
        for line in lines[1:]:
            parts = line.strip().split(" ", 1)
            if len(parts) < 2:
                continue
            sym, _, dso = parts[1].rpartition(" (")
            chain.append((sym, dso.rstrip(")")))
        out.append((int(lines[0].strip()), chain))
    return out


def summarise(data: Path, groups: dict[int, str], cpu_us: dict[str, float]) -> dict[str, dict[str, float]]:
    """group -> kind -> microseconds per read: each group's measured CPU per read split by its samples."""
    counts: dict[str, Counter[str]] = {}
    for tid, chain in samples(data):
        group = groups.get(tid)
        if group is not None:
            counts.setdefault(group, Counter())[kind_of(chain)] += 1
    out: dict[str, dict[str, float]] = {}
    for group, kinds in sorted(counts.items()):
        total = sum(kinds.values())
        out[group] = {kind: cpu_us.get(group, 0.0) * n / total for kind, n in kinds.most_common()}
    return out
