"""Where each directory was looked up: how a walk goes on past the directory it is in.

Why: a walk (``tar``, ``cp -r``, a loader) goes through a store path depth
first, in readdir order, and after a directory's tree it reads what
follows that directory in its parent. The parts that fetch ahead of a
walk (smallblobs.py, readahead.py) look past the directory being read;
a directory's node does not say where it sits, its lookup does. Store
path roots have no place here (their parent is the mount root), so
looking past ends at the store path.

Bounded: past ``REMEMBERED`` directories all are forgotten at once (a walk
looks them up again as it goes). Called under llfuse's lock only.
"""

from __future__ import annotations

REMEMBERED = 200_000


class WalkPlaces:
    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._remembered = remembered
        self._places: dict[bytes, tuple[bytes, int]] = {}  # directory -> its parent and place there

    def note(self, directory: bytes, parent: bytes, position: int) -> None:
        """``directory`` was looked up as entry ``position`` of ``parent``'s listing."""
        places = self._places
        if len(places) >= self._remembered and directory not in places:
            places.clear()
        places[directory] = (parent, position)

    def place(self, directory: bytes) -> tuple[bytes, int] | None:
        """The parent ``directory`` was last looked up in and its position there, if remembered."""
        return self._places.get(directory)
