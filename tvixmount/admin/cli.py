"""``tvixstore``: fill and inspect a store (import, ls, cat, info, list, verify, copy, daemon).

This module only builds the top-level parser, collects the subcommands
(admin/commands/, each with its own flags and entry point), runs the one
asked for and turns failures into one line on stderr and an exit status:

* 0 success; 1 a data or store problem (unreadable input, missing object,
  corruption, unreachable store); 2 a usage problem (bad flag, bad URL,
  an argument that is not a store path); 130 interrupted.
* Each failure is one line, ``tvixstore: error: <what>: <why>``; a traceback
  only with ``--log-level debug``.

Store flags mirror tvix-store's (storeflags.ADMIN): three service URLs
(env BLOB_SERVICE_ADDR, DIRECTORY_SERVICE_ADDR, PATH_INFO_SERVICE_ADDR); any
not given is the embedded store in ``--store-dir``. They are accepted before
the subcommand and after it (tvix puts them on the subcommand).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import InvalidArgument, TvixError
from ..store.location import ENV_VAR as STORE_DIR_ENV
from ..store.location import default_store_dir
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

DESCRIPTION = """\
Fill and inspect a tvix store: import local trees or NAR files as store paths,
list and read what a store holds, verify every object in it, and copy store
paths with their closure into another store."""

EPILOG = f"""\
The store: by default the embedded on-disk store in --store-dir (env
{STORE_DIR_ENV}; default {default_store_dir()}), created by the first import.
Point any service elsewhere with --blob-service-addr, --directory-service-addr,
--path-info-service-addr (memory://, local:///DIR, grpc+http://HOST:PORT,
grpc+unix:///SOCKET); a service not given stays the embedded store.

examples:
  tvixstore import ./result ./src        # prints /nix/store/<hash>-result ...
  tvixstore import --nar hello.nar --name hello
  nix-store --dump ./tree | tvixstore import --nar - --name tree
  tvixstore list
  tvixstore ls -l /nix/store/<hash>-result/bin
  tvixstore cat <hash>-result/share/doc/README > README
  tvixstore info <hash>-result           # the PathInfo as JSON
  tvixstore verify                       # exit 1 on any damaged object
  tvixstore copy <hash>-result --to-store-dir /srv/store   # with its closure
  tvixstore daemon -l 127.0.0.1:8000     # serve the store over gRPC
  tvixstore --store-dir /srv/store import ./tree
  tvixstore import ./tree --blob-service-addr grpc+http://[::1]:8000 \\
      --directory-service-addr grpc+http://[::1]:8000 \\
      --path-info-service-addr grpc+http://[::1]:8000

exit status: 0 ok, 1 data or store error, 2 usage error, 130 interrupted.
"""


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line; ``daemon``'s own flags are added only when ``argv`` mentions it.

    (They live in tvixmount.server, which pulls in grpc: 0.2 s that no other
    command should pay.)
    """
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common(parser, suppress=False)
    commands = Subcommands(parser, argv)
    for module in MODULES:
        module.add_parsers(commands)
    return parser


def _setup_logging(level: str) -> None:
    """One stderr handler on the ``tvixmount`` logger, replaced on every call.

    Not logging.basicConfig: main() may run many times in one process (tests),
    each time with a different sys.stderr, and must not touch root handlers.
    """
    logger = logging.getLogger("tvixmount")
    for handler in list(logger.handlers):
        if getattr(handler, "_tvixstore", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    handler._tvixstore = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def exit_status(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_DATA


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "daemon" else "warning"
    _setup_logging(args.log_level)
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
        if args.log_level == "debug":
            traceback.print_exception(exc, file=sys.stderr)
        return EXIT_DATA


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

