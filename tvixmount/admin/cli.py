"""``tvixstore``: fill and inspect a store (import, ls, cat, info, list, verify, copy, daemon).

This module only parses flags, opens the store, calls the module doing the
work and turns failures into one line on stderr and an exit status:

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
import base64
import binascii
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..castore import nixbase32, storepath
from ..castore.directory import SizeConvention
from ..errors import InvalidArgument, TvixError
from ..store import Store, describe, open_store
from ..store.location import ENV_VAR as STORE_DIR_ENV
from ..store.location import default_store_dir
from ..storeflags import ADMIN, COPY_TARGET
from . import progress

log = logging.getLogger("tvixmount.admin")

PROG = "tvixstore"
EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

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

class _Parser(argparse.ArgumentParser):
    """argparse with our error line format (status 2, as argparse)."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The store and logging flags; on subcommands defaults are SUPPRESS, so a top-level value wins."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("store and output")
    ADMIN.add_to(group, suppress=suppress)
    group.add_argument("--log-level", type=str.lower, default=default(None),
                       choices=["debug", "info", "warning", "error"],
                       help="log verbosity on stderr (default warning, info for daemon; debug adds "
                            "tracebacks)")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="no progress bars and no summary lines")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line; ``daemon``'s own flags are added only when ``argv`` mentions it.

    (They live in tvixmount.server, which pulls in grpc: 0.2 s that no other
    command should pay.)
    """
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, help_: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p, suppress=True)
        return p

    p = command(
        "import", "import directories, files, symlinks or a NAR as store paths",
        "Import each PATH (a directory, recursively; a regular file; or a symlink, kept\n"
        "verbatim) as the store path /nix/store/<hash>-<basename of PATH>, where <hash>\n"
        "comes from the sha256 of its NAR, as `nix-store --add` computes it. Prints one\n"
        "store path per PATH. A file is executable when its owner x bit is set.\n"
        "Fifos, sockets, devices and unreadable files are errors; the store path only\n"
        "becomes visible when everything below it is stored.",
        "examples:\n  tvixstore import ./result\n  tvixstore import --nar out.nar --name hello-2.12\n"
        "  nix-store --dump ./tree | tvixstore import --nar - --name tree",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="paths to import")
    p.add_argument("--nar", metavar="FILE", help="import one NAR file instead ('-' reads stdin)")
    p.add_argument("--name", help="store path name for --nar (required with it)")
    p.add_argument("--expected-sha256", metavar="HASH",
                   help="with --nar: refuse a NAR whose sha256 differs (hex, nixbase32, sha256:..., SRI)")
    p.add_argument("--dir-size-convention", choices=[c.value for c in SizeConvention],
                   default=SizeConvention.DOUBLED.value,
                   help="how DirectoryNode.size is counted: 'doubled' (default) is what a current "
                        "tvix-store computes and checks on upload (every entry twice); 'documented' is "
                        "the proto's descendant count, as seed-era stores hold")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="threads storing small files in parallel (default 8; 0 stores on the walking "
                        "thread)")

    p = command("ls", "list a directory (or show one node) inside a store path",
                "List the entries of a directory inside a store path, or the node itself.\n"
                "STOREPATH is <hash>-<name> or /nix/store/<hash>-<name>, optionally followed\n"
                "by /sub/path. Symlinks are shown, not followed.",
                "examples:\n  tvixstore ls <hash>-hello\n  tvixstore ls -l /nix/store/<hash>-hello/bin")
    p.add_argument("target", metavar="STOREPATH[/SUB/PATH]")
    p.add_argument("-l", "--long", action="store_true",
                   help="long format: mode, size (bytes; for directories the DirectoryNode.size), "
                        "b3: digest, name, symlink target")

    p = command("cat", "write a file's contents to stdout",
                "Stream a file inside a store path to stdout; every byte is verified against\n"
                "its blake3 digest before it is written.")
    p.add_argument("target", metavar="STOREPATH/FILE")

    p = command("info", "print a store path's PathInfo as JSON",
                "Print the PathInfo of a store path (root node, NAR size and hash, references,\n"
                "signatures) as JSON.")
    p.add_argument("target", metavar="STOREPATH")

    command("list", "list every store path in the store", "Print every store path the store holds.")

    p = command("verify", "re-hash every blob and directory, check every store path's tree",
                "Read every blob and re-compute its blake3 digest, decode and re-hash every\n"
                "directory, and check that every store path's tree is complete (all its\n"
                "directories and blobs present and good). Prints one line per bad object,\n"
                "then a summary; exits 1 if anything is wrong.")
    p.add_argument("--nar", action="store_true",
                   help="also re-render every store path's NAR and compare its size and sha256 "
                        "(reads every file once more)")

    p = command("copy", "copy store paths and their closure into another store",
                "Copy each STOREPATH, and every path it references (recursively, as its PathInfo\n"
                "lists them), from this store (the usual store flags) into a target store. For\n"
                "each path: blobs first (those the target has are skipped), then directories,\n"
                "then the PathInfo, so the target never shows a path it cannot read; paths the\n"
                "target already holds are skipped whole. The target is --to-store-dir (an\n"
                "embedded store, created if needed) and/or the three --to-*-service-addr URLs;\n"
                "a service not given there is the --to-store-dir one. Prints a summary line.",
                "examples:\n  tvixstore copy <hash>-hello --to-store-dir /srv/store\n"
                "  tvixstore copy --all --to-blob-service-addr grpc+unix:///run/tvix.sock \\\n"
                "      --to-directory-service-addr grpc+unix:///run/tvix.sock \\\n"
                "      --to-path-info-service-addr grpc+unix:///run/tvix.sock")
    p.add_argument("paths", nargs="*", metavar="STOREPATH", help="<hash>-<name> or /nix/store/<hash>-<name>")
    p.add_argument("--all", action="store_true", help="copy every store path the source holds")
    COPY_TARGET.add_to(p)
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="blobs copied at once (default 8)")

    p = command("daemon", "serve the store over tvix's gRPC protocol",
                "Serve the store (the embedded one by default) over tvix's gRPC protocol until\n"
                "SIGTERM or SIGINT, so tvix tools and remote tvixmount instances can use it.\n"
                "Logs at info level by default.",
                "example:\n  tvixstore daemon -l 127.0.0.1:8000\n"
                "  tvixmount /mnt --blob-service-addr grpc+http://127.0.0.1:8000 ...")
    if "daemon" in argv:
        from ..server.daemon import add_arguments

        add_arguments(p)
    return parser


# -- helpers ---------------------------------------------------------------------


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


def _open(args: argparse.Namespace, writable: bool = False) -> Store:
    store_urls = ADMIN.urls(args, create=writable)
    log.debug("opening %s", describe(store_urls))
    return open_store(store_urls)


def _bars(args: argparse.Namespace) -> bool:
    return progress.wanted(args.quiet)


def _parse_sha256(text: str) -> bytes:
    """hex (64), nixbase32 (52), ``sha256:`` + either, or SRI ``sha256-<base64>``."""
    value = text.strip()
    if value.startswith("sha256-"):
        try:
            digest = base64.b64decode(value[7:], validate=True)
        except binascii.Error:
            digest = b""
    else:
        value = value.removeprefix("sha256:")
        digest = b""
        try:
            if len(value) == 64:
                digest = bytes.fromhex(value)
            elif len(value) == 52:
                digest = nixbase32.decode(value)
        except (ValueError, TvixError):
            digest = b""
    if len(digest) != 32:
        raise InvalidArgument(f"--expected-sha256 {text!r}: not a sha256 in hex, nixbase32 or SRI form")
    return digest


def _out() -> Any:
    return sys.stdout.buffer


# -- commands ---------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from .ingest import Ingester, IngestError

    if args.nar is not None:
        if args.paths:
            raise InvalidArgument("import: give either PATHs or --nar FILE, not both")
        if not args.name:
            raise InvalidArgument("import --nar: --name NAME is required")
        return _import_nar(args)
    if args.name or args.expected_sha256:
        raise InvalidArgument("import: --name and --expected-sha256 only go with --nar")
    if not args.paths:
        raise InvalidArgument("import: nothing to import (give PATHs, or --nar FILE --name NAME)")
    jobs = 8 if args.jobs is None else args.jobs
    if jobs < 0:
        raise InvalidArgument(f"import: --jobs {jobs} must not be negative")
    convention = SizeConvention(args.dir_size_convention)
    bars = _bars(args)
    failed = 0
    started = time.monotonic()
    files = total = 0
    with _open(args, writable=True) as store:
        files_bar = progress.bar(bars, "files", unit="file", position=0)
        bytes_bar = progress.bar(bars, "data", unit="B", unit_scale=True, position=1)
        try:
            ingester = Ingester(store, convention, jobs, files_bar, bytes_bar)
            for path in args.paths:
                try:
                    result = ingester.import_path(path)
                except IngestError as exc:  # names the path itself
                    failed += 1
                    _report(exc, args)
                    continue
                except TvixError as exc:
                    failed += 1
                    _report(exc, args, prefix=f"import {path}: ")
                    continue
                files += result.stats.files
                total += result.stats.bytes
                _out().write(result.store_path.absolute.encode() + b"\n")
                _out().flush()
        finally:
            bytes_bar.close()
            files_bar.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("imported %d of %d paths: %d files, %.1f MB in %.2f s (%.0f files/s, %.1f MB/s)",
             len(args.paths) - failed, len(args.paths), files, total / 1e6, elapsed,
             files / elapsed, total / 1e6 / elapsed)
    return EXIT_DATA if failed else EXIT_OK


def _import_nar(args: argparse.Namespace) -> int:
    from .nar_import import import_nar

    expected = _parse_sha256(args.expected_sha256) if args.expected_sha256 else None
    convention = SizeConvention(args.dir_size_convention)
    problem = storepath.check_name(args.name)
    if problem:
        raise InvalidArgument(f"import --nar: --name {args.name!r} is not a valid store path name: {problem}")
    with _open(args, writable=True) as store:
        bar = progress.bar(_bars(args), "NAR", unit="B", unit_scale=True)
        try:
            if args.nar == "-":
                result = import_nar(store, sys.stdin.buffer, args.name, convention, expected, bar, "stdin")
            else:
                try:
                    stream = open(args.nar, "rb")  # noqa: SIM115 - closed below, after the import
                except OSError as exc:
                    raise _FileError(args.nar, exc) from None
                with stream:
                    result = import_nar(store, stream, args.name, convention, expected, bar, args.nar)
        finally:
            bar.close()
    _out().write(result.store_path.absolute.encode() + b"\n")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from .browse import lookup, ls_lines, parse_target

    target = parse_target(args.target)
    with _open(args) as store:
        resolved = lookup(store, target)
        out = _out()
        for line in ls_lines(store, resolved, args.long):
            out.write(line + b"\n")
    return EXIT_OK


def cmd_cat(args: argparse.Namespace) -> int:
    from .browse import cat, lookup, parse_target

    target = parse_target(args.target)
    with _open(args) as store:
        cat(store, lookup(store, target), _out())
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from .browse import info_json, lookup, parse_target

    target = parse_target(args.target)
    if target.components:
        raise InvalidArgument(f"info: {args.target}: give the store path itself, without a sub path")
    with _open(args) as store:
        text = info_json(lookup(store, target))
    _out().write(text.encode() + b"\n")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from .browse import list_paths

    with _open(args) as store:
        paths = list_paths(store)
    out = _out()
    for path in paths:
        out.write(os.fsencode(path) + b"\n")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import Verifier

    out = _out()

    def on_problem(problem: Any) -> None:
        out.write(str(problem).encode("utf-8", "backslashreplace") + b"\n")
        out.flush()

    bars = _bars(args)
    with _open(args) as store:
        report = Verifier(
            store, on_problem, lambda desc, total: progress.bar(bars, desc, unit="obj", total=total), args.nar
        ).run()
    if not args.quiet:
        out.write(report.summary().encode() + b"\n")
    return EXIT_DATA if report.problems else EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    from .browse import parse_target
    from .copy import DEFAULT_JOBS, Closure, Copier

    if args.all and args.paths:
        raise InvalidArgument("copy: give STOREPATHs or --all, not both")
    if not args.all and not args.paths:
        raise InvalidArgument("copy: nothing to copy (give STOREPATHs, or --all)")
    roots = []
    for arg in args.paths:
        parsed = parse_target(arg)
        if parsed.components:
            raise InvalidArgument(f"copy: {arg}: give the store path itself, without a sub path")
        roots.append(parsed.store_path)
    jobs = DEFAULT_JOBS if args.jobs is None else args.jobs
    if jobs < 1:
        raise InvalidArgument(f"copy: --jobs {jobs} must be at least 1")
    target_urls = COPY_TARGET.urls(args, create=True)
    bars = _bars(args)
    started = time.monotonic()
    with _open(args) as source:
        closure = Closure(source)
        infos = closure.resolve(closure.every_path() if args.all else roots)
        with open_store(target_urls) as target:
            copier = Copier(source, target, jobs)
            copier.check_target(describe(target_urls))
            copier.paths_bar = progress.bar(bars, "paths", unit="path", total=len(infos), position=0)
            copier.bytes_bar = progress.bar(bars, "data", unit="B", unit_scale=True, position=1)
            try:
                stats = copier.copy(infos)
            finally:
                copier.bytes_bar.close()
                copier.paths_bar.close()
    if not args.quiet:
        _out().write(stats.summary(time.monotonic() - started).encode() + b"\n")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from ..server import daemon

    return daemon.run(args, daemon.store_urls_from(args))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "import": cmd_import,
    "ls": cmd_ls,
    "cat": cmd_cat,
    "info": cmd_info,
    "list": cmd_list,
    "verify": cmd_verify,
    "copy": cmd_copy,
    "daemon": cmd_daemon,
}


# -- errors ------------------------------------------------------------------------


class _FileError(Exception):
    """An input file the user named could not be opened."""

    def __init__(self, name: str, exc: OSError) -> None:
        super().__init__(f"{name}: {exc.strerror or exc}")


def _report(exc: BaseException, args: argparse.Namespace | None, prefix: str = "") -> None:
    if args is not None and getattr(args, "log_level", "warning") == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"{PROG}: error: {prefix}{exc}", file=sys.stderr)


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
        return COMMANDS[args.command](args)
    except (TvixError, _FileError) as exc:
        _report(exc, args)
        return exit_status(exc)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        _report(replace_os_error(exc), args)
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, the traceback on request
        _report(RuntimeError(f"internal error: {type(exc).__name__}: {exc} "
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

