"""CPU seconds of processes from /proc: what a run cost each side, not only how long it took.

On a machine with two CPUs a mount, its workers and a gRPC daemon share
them: a read is as fast as the sum of their CPU allows, so the sums per
process say where a run's time went when the wall-clock figures cannot.
"""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (workers, their helpers), each after its parent, siblings by pid."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            pass
    found.sort()
    return found + [grand for child in found for grand in descendants(child)]


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User plus system CPU seconds of each process (its exited threads included); gone ones left out."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two ``cpu_seconds`` samples (a process new since counts from zero)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())
