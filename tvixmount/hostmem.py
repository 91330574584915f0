"""How much memory this process may use: the machine's RAM, or its cgroup's limit when lower.

Why: a default sized from memory (the segment arena's, segcache.py) must
follow what the mount may really use. Under systemd a unit's ``MemoryMax=``
and in a container the cgroup's limit are often far below the machine's
RAM, and memory the arena holds counts against that limit.
"""

from __future__ import annotations

import os
from pathlib import Path

UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a huge page-rounded number (~2**63)


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                 root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``), or None when there is none or it cannot be read.

    Only the process's own cgroup is read, not its ancestors': systemd sets
    ``MemoryMax=`` on the unit's own cgroup, and a container's limit is on the
    cgroup the container sees as its root.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates += [root / relative / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):
            # in a cgroup namespace the process's own cgroup is mounted as the controller's root
            candidates += [root / "memory" / relative / "memory.limit_in_bytes",
                           root / "memory" / "memory.limit_in_bytes"]
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < UNLIMITED else None
    return None


def usable_memory() -> int:
    """RAM, or the cgroup's limit when that is lower."""
    ram = physical_memory()
    limit = cgroup_limit()
    return min(ram, limit) if limit is not None else ram
