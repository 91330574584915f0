"""The systemd units shipped in the package, and writing them out for an installation.

The files beside this module are the units as shipped: ``ExecStart=``
names the commands bare (``tvixmount``, ``tvixstore``), which systemd finds
in /usr/local/bin and /usr/bin. ``render`` puts the absolute path of the
installation at hand in their place (a virtualenv's bin directory, say), so
the written units run exactly the tvixmount that wrote them.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

UNITS = ("tvixmount@.service", "tvixstore-daemon.service", "tvixstore-daemon.socket")
COMMANDS = ("tvixmount", "tvixstore")


def shipped(name: str) -> str:
    """The text of the unit ``name`` as shipped."""
    if name not in UNITS:
        raise ValueError(f"no unit {name!r}; the units are {', '.join(UNITS)}")
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def render(name: str, bin_dir: Path | None) -> str:
    """The unit ``name`` with ``ExecStart=`` naming the commands in ``bin_dir`` (None: as shipped)."""
    text = shipped(name)
    if bin_dir is None:
        return text
    pattern = re.compile(rf"^(Exec\w+=[-@:+!]*)({'|'.join(COMMANDS)})(?=\s|$)", re.M)
    return pattern.sub(lambda m: f"{m[1]}{bin_dir / m[2]}", text)


def write(dest: Path, bin_dir: Path | None) -> list[Path]:
    """Write every unit into ``dest`` (made if missing); the paths written."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        path = dest / name
        path.write_text(render(name, bin_dir), encoding="utf-8")
        written.append(path)
    return written
