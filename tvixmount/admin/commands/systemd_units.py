"""``tvixstore systemd-units``: write the shipped systemd units for this installation.

The units live in the package (tvixmount/systemd/); this writes them into a
directory with ``ExecStart=`` pointing at this installation's commands, so
that ``tvixstore systemd-units -o /etc/systemd/system`` is the whole install.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..command import Subcommands


def add_parsers(commands: Subcommands) -> None:
    p = commands.add(
        "systemd-units", "write the systemd units (tvixmount@.service, tvixstore-daemon.*)",
        "Write tvixmount@.service, tvixstore-daemon.service and tvixstore-daemon.socket\n"
        "into a directory, their ExecStart= naming this installation's commands.",
        run,
        "example:\n"
        "  tvixstore systemd-units -o /etc/systemd/system && systemctl daemon-reload\n"
        "  systemctl enable --now \"tvixmount@$(systemd-escape --path /mnt/store).service\"\n"
        "  systemctl enable --now tvixstore-daemon.socket",
        common=False)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="where to write the units (made if missing), e.g. /etc/systemd/system")
    p.add_argument("--bin-dir", type=Path, default=None, metavar="DIR",
                   help="directory holding tvixmount and tvixstore (default: where this tvixstore "
                        "is installed); --bin-dir '' keeps the bare names, found in /usr/bin etc.")


def installed_bin_dir() -> Path | None:
    """The directory of the running ``tvixstore`` (or of ``tvixmount`` on PATH), if it holds both."""
    candidates = [Path(sys.argv[0]).absolute().parent]
    found = shutil.which("tvixmount")
    if found:
        candidates.append(Path(found).absolute().parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("tvixmount", "tvixstore")):
            return directory
    return None


def run(args: argparse.Namespace) -> int:
    from ... import systemd

    if args.bin_dir is None:
        bin_dir = installed_bin_dir()
    else:
        bin_dir = None if str(args.bin_dir) in ("", ".") else args.bin_dir.absolute()
    for path in systemd.write(args.output, bin_dir):
        print(path)
    return 0
