#!/usr/bin/env python3
"""spysum.py RAW [N]: the N innermost Python lines with the most samples in a ``py-spy --format raw`` file.

Stacks that end in a bare process or thread frame (no Python on top) are
left out: with ``--gil`` there are almost none.
"""

import collections
import sys


def main(path: str, top: int) -> None:
    by_line: collections.Counter[str] = collections.Counter()
    total = busy = 0
    with open(path) as raw:
        for line in raw:
            line = line.rstrip()
            if not line:
                continue
            stack, count = line.rsplit(" ", 1)
            total += int(count)
            frames = [f for f in stack.split(";") if f]
            if not frames or frames[-1].startswith(("process", "thread")):
                continue
            busy += int(count)
            by_line[frames[-1]] += int(count)
    print("total", total, "python-busy", busy)
    for frame, count in by_line.most_common(top):
        print(f"{count:6d} {frame}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
