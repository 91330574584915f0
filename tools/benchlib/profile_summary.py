#!/usr/bin/env python3
"""Summarise py-spy collapsed stacks (``py-spy record --format raw``) of a tvixmount mount.

    .venv/bin/python tools/benchlib/profile_summary.py PROFILE.txt... [--top 15]

A flame graph answers "where does the time go" for one person looking at
it; a report needs the same answer in a few lines. This prints, per kind
of process (the FUSE dispatcher, the workers), how many samples it had and
its top functions by self time (the frame on top of the stack) and by
inclusive time (anywhere on the stack), as percentages of that process
kind's samples. Idle threads are not sampled by py-spy by default, so the
samples are time spent running or blocked in a system call.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# Frames on every stack of a process kind (process start, thread start, main loops):
# they say nothing about where the time goes.
_PLUMBING = ("<frozen runpy>", "multiprocessing/", "threading.py:Thread.", "tvixmount/cli.py",
             "tvixmount/zygote.py", "tvixmount/mount.py:run", "tvixmount/pool.py:WorkerPool.start",
             "workers/loop.py:serve", "workers/loop.py:_loop", "workers/__main__")
_PLUMBING_FUNCS = (":main", ":<module>")


def frame_name(frame: str) -> str:
    """'read (tvixmount/fuse_ops.py:233)' -> 'fuse_ops.py:read' (lines dropped, so a function adds up)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = path.split("site-packages/")
    short = parts[-1] if len(parts) > 1 else "/".join(path.split("/")[-2:])
    return f"{short}:{m.group('func')}"


_BY_DEPTH = {1: "dispatcher", 2: "zygote"}


def process_kind(frames: list[str], depth: int = 0) -> str:
    """Which tvixmount process a stack is from.

    With ``py-spy --subprocesses`` each stack starts with the chain of
    processes from the one py-spy was given: the dispatcher, its zygote,
    the zygote's workers. Without that chain, guess from the frames.
    """
    if depth:
        return _BY_DEPTH.get(depth, "worker")
    text = ";".join(frames)
    if "workers/loop.py" in text or "workers/handlers.py" in text:
        return "worker"
    if "zygote" in text:
        return "zygote"
    return "dispatcher"


def summarise(paths: list[Path], top: int) -> str:
    samples: Counter[str] = Counter()
    selfs: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            frames = m.group("stack").split(";")
            # --subprocesses prefixes the chain of processes; --threads a thread frame
            depth = sum(1 for f in frames if f.startswith("process "))
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            count = int(m.group("count"))
            kind = process_kind(frames, depth)
            samples[kind] += count
            names = [frame_name(f) for f in frames]
            selfs.setdefault(kind, Counter())[names[-1]] += count
            inc = inclusive.setdefault(kind, Counter())
            for name in set(names):
                inc[name] += count
    out = []
    for kind, total in samples.most_common():
        out.append(f"{kind}: {total} samples")
        out.append("  self:")
        for name, n in selfs[kind].most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {name}")
        out.append("  inclusive (start-up and thread frames left out):")
        shown = [(name, n) for name, n in inclusive[kind].most_common()
                 if not name.startswith(_PLUMBING) and not name.endswith(_PLUMBING_FUNCS)]
        for name, n in shown[:top]:
            out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    print(summarise(args.profiles, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
