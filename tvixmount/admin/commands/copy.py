"""``tvixstore copy [NIX_ATTRS_JSON_FILE]``: a Nix closure from /nix/store, as tvix-store copies (nixcopy.py).

The file is the ``.attrs.json`` a derivation with ``__structuredAttrs`` and
``exportReferencesGraph.closure`` gets in its build (``$NIX_ATTRS_JSON_FILE``,
which is also read when no file is given), or a copy of it; ``-`` reads
stdin. The store flags are the usual ones. (Copying between two tvix stores
is ``tvixstore sync``.)
"""

from __future__ import annotations

import argparse
import sys
import time

from ... import flags
from ...errors import InvalidArgument
from .. import progress
from ..command import EXIT_DATA, EXIT_OK, FileError, Subcommands, bars, log, open_from, report, stdout

ENV = "NIX_ATTRS_JSON_FILE"


def add_parsers(commands: Subcommands) -> None:
    p = commands.add(
        "copy", "copy a Nix closure from /nix/store into the store (tvix-store copy)",
        "Copy into the store every store path of the closure a Nix build describes: the\n"
        "`closure` list that `exportReferencesGraph.closure = [ ... ]` with\n"
        "`__structuredAttrs = true` puts in the build's .attrs.json ($NIX_ATTRS_JSON_FILE).\n"
        "Each path is read from /nix/store and keeps its store path, references, NAR hash\n"
        "and size (and deriver, signatures, ca when given); its NAR hash and size must be\n"
        "the file's, or the path is an error and is not stored, nor is anything that\n"
        "refers to it. Paths go in references first; paths the store holds are skipped.\n"
        "Prints a summary line; exits 1 if any path failed.",
        run,
        "examples:\n"
        "  tvixstore copy ./closure.json\n"
        "  NIX_ATTRS_JSON_FILE=$PWD/.attrs.json tvixstore copy   # inside a build\n"
        "  tvixstore copy closure.json --blob-service-addr grpc+http://[::1]:8000 \\\n"
        "      --directory-service-addr grpc+http://[::1]:8000 \\\n"
        "      --path-info-service-addr grpc+http://[::1]:8000\n\n"
        "a derivation that writes such a file:\n"
        "  derivation { name = \"closure\"; builder = \"/bin/sh\"; system = builtins.currentSystem;\n"
        "    __structuredAttrs = true; exportReferencesGraph.closure = [ pkg ];\n"
        "    args = [ \"-c\" \"...copy $NIX_ATTRS_JSON_FILE...\" ]; }",
    )
    flags.add(p, "nix_attrs_json_file", nargs="?", metavar="NIX_ATTRS_JSON_FILE", env=ENV,
              help="the JSON file with the closure ('-': stdin)")


def run(args: argparse.Namespace) -> int:
    from ..ingest import Ingester
    from ..nixcopy import ClosureCopier, read_closure

    name = args.nix_attrs_json_file
    if not name:
        raise InvalidArgument(f"copy: no closure file: give NIX_ATTRS_JSON_FILE (an argument or the {ENV} "
                              "variable)")
    entries = read_closure(_read(name), "stdin" if name == "-" else name)
    started = time.monotonic()
    with open_from(args, writable=True) as store:
        bar = progress.bar(bars(args), "paths", unit="path", total=len(entries))
        try:
            result = ClosureCopier(Ingester(store), bar).copy(entries)
        finally:
            bar.close()
    for path, reason in result.failed:
        report(Exception(reason), args, prefix=f"copy {path}: ")
    summary = result.summary(time.monotonic() - started)
    log.info("%s", summary)
    if not args.quiet:
        stdout().write(summary.encode() + b"\n")
    return EXIT_DATA if result.failed else EXIT_OK


def _read(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as exc:
        raise FileError(name, exc) from None
