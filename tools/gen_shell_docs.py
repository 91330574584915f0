#!/usr/bin/env python3
"""Generate man pages and shell completions for tvixmount and tvixstore from their parsers.

The man pages (argparse-manpage) and completions (shtab) come from the very
argparse parsers the commands use, so they cannot drift from ``--help``.
``tvixstore``'s parser is built with every subcommand's flags (``daemon``'s
are otherwise added only when the command line names it).

    tools/gen_shell_docs.py -o DIR
      DIR/man/man1/tvixmount.1, tvixstore.1
      DIR/bash-completion/completions/tvixmount, tvixstore
      DIR/zsh/site-functions/_tvixmount, _tvixstore

``tools/setup.sh`` runs it with ``-o .venv/share``: ``man tvixmount`` then
works with the virtualenv's bin on PATH (man looks in ../share/man beside each
PATH entry). docs/systemd.md ("Man pages and completion") says how to install
them system-wide.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The two programs' parsers, complete (every subcommand's flags)."""
    from tvixmount import cli
    from tvixmount.admin import cli as admin_cli

    return {
        "tvixmount": cli.build_parser(),
        "tvixstore": admin_cli.build_parser(["daemon"], extra=(cli.MountCommand,)),
    }


def man_page(parser: argparse.ArgumentParser) -> str:
    from argparse_manpage.manpage import Manpage

    from tvixmount import __version__

    data = {
        "project_name": "tvixmount", "version": __version__, "manual_section": "1",
        "manual_title": "tvixmount manual", "description": parser.description,
        # A fixed date keeps the output reproducible; the version says which release.
        "date": datetime.date(2026, 1, 1).strftime("%Y-%m-%d"),
    }
    return str(Manpage(parser, _data=data))


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    return shtab.complete(parser, shell=shell)


def generate(out: Path) -> list[Path]:
    """Write every file under ``out``; the paths written."""
    written = []
    for name, parser in parsers().items():
        files = {
            out / "man" / "man1" / f"{name}.1": man_page(parser),
            out / "bash-completion" / "completions" / name: completion(parser, "bash"),
            out / "zsh" / "site-functions" / f"_{name}": completion(parser, "zsh"),
        }
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    args = p.parse_args(argv)
    for path in generate(args.output):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
