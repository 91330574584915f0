"""What every ``tvixstore`` subcommand shares: its parser, the store it opens, its output.

A subcommand lives in its own module under ``admin/commands/`` and brings
its own flags and entry point: ``add_parsers(commands)`` registers it with
``commands.add(name, ..., run=entry)``, and ``entry(args)`` returns the exit
status. Usage problems found after parsing are raised as InvalidArgument;
cli.main turns every failure into one line and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from .. import flags, logsetup
from ..store import Store, StoreUrls, open_store
from ..storeflags import ADMIN, StoreFlags, log_choice
from . import progress

log = logging.getLogger("tvixmount.admin")  # every subcommand logs under this name

PROG = "tvixstore"
EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Run = Callable[[argparse.Namespace], int]


Parser = flags.Parser  # usage errors in one line, ``tvixstore: error: ...``, exit 2


def log_level(text: str) -> str:
    """``--log-level``: tvix-store's level names in any case, as lower-case logging names (``warning``)."""
    return logsetup.level_name(text).lower()


def add_common(parser: argparse.ArgumentParser, suppress: bool, store: StoreFlags = ADMIN) -> None:
    """The store and logging flags; on subcommands defaults are SUPPRESS, so a top-level value wins.

    (The store flags are always added that way: flags.resolve fills them in.)
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("store and output")
    store.add_to(group)
    group.add_argument("--log-level", type=log_level, default=default(None), metavar="LEVEL",
                       help="log verbosity on stderr: trace, debug, info, warn or error, any case "
                            "(default: RUST_LOG's level, else warning, info for daemon; debug adds "
                            "tracebacks)")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="no progress bars and no summary lines")


class Subcommands:
    """The ``tvixstore`` subparsers; each subcommand gets the common flags and its entry point."""

    def __init__(self, parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        self._sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                          parser_class=Parser)
        self._argv = argv

    def add(
        self, name: str, help_: str, description: str, run: Run, epilog: str = "",
        common: bool = True, store: StoreFlags = ADMIN,
    ) -> argparse.ArgumentParser:
        """A subcommand whose parsed args go to ``run``; add its own flags to what is returned.

        ``common``: give it the store and output flags (described by
        ``store``'s help); ``mount`` brings its own.
        """
        parser = self._sub.add_parser(name, help=help_, description=description, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.program = PROG  # its usage errors read "tvixstore: error: ..."
        if common:
            add_common(parser, suppress=True, store=store)
        parser.set_defaults(run=run)
        return parser

    def mentioned(self, name: str) -> bool:
        """Whether the command line names ``name``: flags that are costly to define are added only then."""
        return name in self._argv


def store_urls(args: argparse.Namespace, writable: bool = False) -> StoreUrls:
    """The store the common flags name; ``writable``: an embedded store it names is created."""
    return ADMIN.urls(args, create=writable)


def open_from(args: argparse.Namespace, writable: bool = False) -> Store:
    """Open the store the common flags name (see ``store_urls``); log which address each service uses."""
    choice = ADMIN.choice(args, create=writable)
    log_choice(log, choice)
    return open_store(choice.urls)


def bars(args: argparse.Namespace) -> bool:
    """Whether progress bars are wanted (not with -q, and only on a terminal)."""
    return progress.wanted(args.quiet)


def stdout() -> BinaryIO:
    return sys.stdout.buffer


class FileError(Exception):
    """An input file the user named could not be opened."""

    def __init__(self, name: str, exc: OSError) -> None:
        super().__init__(f"{name}: {exc.strerror or exc}")


def report(exc: BaseException, args: argparse.Namespace | None, prefix: str = "") -> None:
    """One ``tvixstore: error:`` line on stderr; the traceback too with --log-level debug."""
    if args is not None and getattr(args, "log_level", "warning") in ("debug", "trace"):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{PROG}: error: {prefix}{exc}", file=sys.stderr)
