"""CPU seconds per process class (daemon, mount, tar) while a cold tar runs; printed on SIGTERM.

    python3 cpusample.py > cpu.txt &  tools/tar_cold.py ...;  pkill -TERM -f cpusample.py

Why a sampler: the mount's processes (dispatcher, zygote, workers) and the
daemon exit at the end of each run, so their CPU time has to be read from
/proc while they live. Every 0.1 s the last value per process is kept; a
process's final 0.1 s may be missed.
"""

from __future__ import annotations

import collections
import os
import signal
import time

TICK = os.sysconf("SC_CLK_TCK")


def process_class(command: str) -> str | None:
    if "tvixmount.server" in command:
        return "daemon"
    if "tvixmount" in command:  # the mount; its zygote and workers are forks with its command line
        return "mount"
    if command.startswith("tar"):
        return "tar"
    return None


def main() -> None:
    last: dict[str, tuple[str, float]] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            kind = process_class(command)
            if kind is not None:
                last[pid] = (kind, (int(fields[11]) + int(fields[12])) / TICK)  # utime + stime
        time.sleep(0.1)
    total: collections.Counter[str] = collections.Counter()
    for kind, seconds in last.values():
        total[kind] += seconds
    print({kind: round(seconds, 2) for kind, seconds in total.items()})


if __name__ == "__main__":
    main()
