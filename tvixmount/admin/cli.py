"""``tvixstore``: fill and inspect a store (import, ls, cat, info, list, verify, copy, sync, daemon).

This module only builds the top-level parser, collects the subcommands
(admin/commands/, each with its own flags and entry point), runs the one
asked for and turns failures into one line on stderr and an exit status:

* 0 success; 1 a data or store problem (unreadable input, missing object,
  corruption, unreachable store); 2 a usage problem (bad flag, bad URL,
  an argument that is not a store path); 130 interrupted.
* Each failure is one line, ``tvixstore: error: <what>: <why>``; a traceback
  only with ``--log-level debug``.

Store flags mirror tvix-store's (storeflags.ADMIN): three service URLs
(env BLOB_SERVICE_ADDR, DIRECTORY_SERVICE_ADDR, PATH_INFO_SERVICE_ADDR); with
none, the embedded store in ``--store-dir``; with some, the others take
tvix-store's default, ``grpc+http://[::1]:8000`` (the daemon: the embedded
store). They are accepted before the subcommand and after it (tvix puts them
on the subcommand), as is ``--log-level`` (tvix puts it before).

``mount`` is not here: the mount is composed by tvixmount.cli, whose
``tvixstore`` entry point (the installed script) passes it in ``extra``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Protocol

from .. import __version__, flags, logsetup
from ..errors import InvalidArgument, TvixError
from ..store.location import ENV_VAR as STORE_DIR_ENV
from ..store.location import default_store_dir
from ..storeflags import UPSTREAM_DEFAULT
from .command import (
    EXIT_DATA,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    FileError,
    Parser,
    Subcommands,
    add_common,
    report,
)
from .commands import MODULES


class CommandModule(Protocol):
    """What a command module offers: ``add_parsers(commands)`` (admin/command.py)."""

    def add_parsers(self, commands: Subcommands) -> None: ...


DESCRIPTION = """\
Fill and inspect a tvix store: import local trees or NAR files as store paths,
copy a Nix closure in from /nix/store, list and read what a store holds, verify
every object in it, sync store paths with their closure into another store,
serve it over gRPC, and mount it; write the systemd units that run the mount
and the daemon."""

EPILOG = f"""\
The store: by default the embedded on-disk store in --store-dir (env
{STORE_DIR_ENV}; default {default_store_dir()}), created by the first import.
Point the services elsewhere with --blob-service-addr, --directory-service-addr,
--path-info-service-addr (env BLOB_SERVICE_ADDR, DIRECTORY_SERVICE_ADDR,
PATH_INFO_SERVICE_ADDR; memory://, local:///DIR, grpc+http://HOST:PORT,
grpc+unix:///SOCKET): once one is given, a service not given uses tvix-store's
default, {UPSTREAM_DEFAULT} (for the daemon: the embedded store). A
grpc+http URL without a port means port 80. tvix-store command lines work
with `tvix-store` replaced by `tvixstore`.

examples:
  tvixstore import ./result ./src        # prints /nix/store/<hash>-result ...
  tvixstore import --nar hello.nar --name hello
  nix-store --dump ./tree | tvixstore import --nar - --name tree
  tvixstore list
  tvixstore ls -l /nix/store/<hash>-result/bin
  tvixstore cat <hash>-result/share/doc/README > README
  tvixstore info <hash>-result           # the PathInfo as JSON
  tvixstore verify                       # exit 1 on any damaged object
  tvixstore copy closure.json            # a Nix closure from /nix/store (exportReferencesGraph)
  tvixstore sync <hash>-result --to-store-dir /srv/store   # with its closure
  tvixstore daemon -l 127.0.0.1:8000     # serve the store over gRPC
  tvixstore systemd-units -o /etc/systemd/system   # tvixmount@.service, tvixstore-daemon.*
  tvixstore mount /mnt/store             # = tvixmount /mnt/store
  tvixstore --store-dir /srv/store import ./tree
  tvixstore import ./tree --blob-service-addr grpc+http://[::1]:8000 \\
      --directory-service-addr grpc+http://[::1]:8000 \\
      --path-info-service-addr grpc+http://[::1]:8000

exit status: 0 ok, 1 data or store error, 2 usage error (one line, before
anything starts), 130 interrupted. `tvixstore mount` exits as tvixmount does.
"""


def build_parser(argv: Sequence[str] = (), extra: Sequence[CommandModule] = ()) -> argparse.ArgumentParser:
    """The whole command line; ``daemon``'s own flags are added only when ``argv`` mentions it.

    (They live in tvixmount.server, which pulls in grpc: 0.2 s that no other
    command should pay.) ``extra``: more command modules, after ours (mount).
    """
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--otlp", action="store_true",
                        help="--otlp, --otlp=true, --otlp=false: accepted for tvix-store's command lines; "
                             "tvixstore sends no OpenTelemetry traces either way")
    add_common(parser, suppress=False)
    commands = Subcommands(parser, argv)
    for module in (*MODULES, *extra):
        module.add_parsers(commands)
    return parser


def _setup_logging(level: str, timestamps: bool = False) -> None:
    """One stderr handler on the ``tvixmount`` logger, replaced on every call.

    Not logging.basicConfig: main() may run many times in one process (tests),
    each time with a different sys.stderr, and must not touch root handlers.
    A long-running daemon's lines carry timestamps, as the mount's do; under
    journald none do (logsetup).
    """
    logger = logging.getLogger("tvixmount")
    for handler in list(logger.handlers):
        if getattr(handler, "_tvixstore", False):
            logger.removeHandler(handler)
    handler = logsetup.stream_handler(
        sys.stderr, logsetup.PLAIN_FORMAT if timestamps else f"{PROG}: %(levelname)s: %(name)s: %(message)s")
    handler._tvixstore = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def exit_status(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_DATA


def main(argv: Sequence[str] | None = None, extra: Sequence[CommandModule] = ()) -> int:
    """Run one command; its exit status (a usage error exits 2 from the parser)."""
    argv = _without_otlp(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv, extra)
    try:
        args = flags.parse(parser, argv)
    except SystemExit as exc:  # --help, --version or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "own_logging", False):  # mount: tvixmount's logging, its exit statuses
        try:
            return int(args.run(args))
        except SystemExit as exc:  # a usage error found after parsing, already printed
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    daemon = args.command == "daemon"
    if args.log_level is None:
        args.log_level = logsetup.choose_level(None, default="INFO" if daemon else "WARNING").lower()
    _setup_logging(args.log_level, timestamps=daemon)
    try:
        return int(args.run(args))
    except (TvixError, FileError) as exc:
        report(exc, args)
        return exit_status(exc)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        report(replace_os_error(exc), args)
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, the traceback on request
        report(RuntimeError(f"internal error: {type(exc).__name__}: {exc} "
                             "(run with --log-level debug for a traceback)"), None)
        if args.log_level in ("debug", "trace"):
            traceback.print_exception(exc, file=sys.stderr)
        return EXIT_DATA


def _without_otlp(argv: list[str]) -> list[str]:
    """``argv`` without tvix-store's ``--otlp[=BOOL]``, whose value must be joined by ``=``.

    (argparse cannot require the ``=``: an optional value would swallow the
    command name in ``--otlp mount``.)
    """
    kept: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return kept + argv[i:]
        name, eq, value = arg.partition("=")
        if name != "--otlp":
            kept.append(arg)
        elif eq:
            try:
                flags.boolean(value)
            except argparse.ArgumentTypeError as exc:
                flags.error_line(PROG, f"argument --otlp: {exc}")
    return kept


def replace_os_error(exc: OSError) -> Exception:
    """An OSError as ``<file>: <reason>`` (Python's own text leads with ``[Errno n]``)."""
    if exc.filename is not None:
        return Exception(f"{os.fsdecode(exc.filename)}: {exc.strerror}")
    return Exception(exc.strerror or str(exc))


def _broken_pipe() -> int:
    """stdout's reader went away (``tvixstore cat ... | head``): stop quietly, as cat does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a process killed by it


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

