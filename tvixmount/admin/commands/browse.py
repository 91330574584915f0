"""``tvixstore ls``, ``cat``, ``info`` and ``list``: read what a store holds (admin/browse.py)."""

from __future__ import annotations

import argparse
import os

from ...errors import InvalidArgument
from ..command import EXIT_OK, Subcommands, open_from, stdout


def add_parsers(commands: Subcommands) -> None:
    p = commands.add("ls", "list a directory (or show one node) inside a store path",
                     "List the entries of a directory inside a store path, or the node itself.\n"
                     "STOREPATH is <hash>-<name> or /nix/store/<hash>-<name>, optionally followed\n"
                     "by /sub/path. Symlinks are shown, not followed.",
                     run_ls,
                     "examples:\n  tvixstore ls <hash>-hello\n  tvixstore ls -l /nix/store/<hash>-hello/bin")
    p.add_argument("target", metavar="STOREPATH[/SUB/PATH]")
    p.add_argument("-l", "--long", action="store_true",
                   help="long format: mode, size (bytes; for directories the DirectoryNode.size), "
                        "b3: digest, name, symlink target")

    p = commands.add("cat", "write a file's contents to stdout",
                     "Stream a file inside a store path to stdout; every byte is verified against\n"
                     "its blake3 digest before it is written.",
                     run_cat)
    p.add_argument("target", metavar="STOREPATH/FILE")

    p = commands.add("info", "print a store path's PathInfo as JSON",
                     "Print the PathInfo of a store path (root node, NAR size and hash, references,\n"
                     "signatures) as JSON.",
                     run_info)
    p.add_argument("target", metavar="STOREPATH")

    commands.add("list", "list every store path in the store", "Print every store path the store holds.",
                 run_list)


def run_ls(args: argparse.Namespace) -> int:
    from ..browse import lookup, ls_lines, parse_target

    target = parse_target(args.target)
    with open_from(args) as store:
        resolved = lookup(store, target)
        out = stdout()
        for line in ls_lines(store, resolved, args.long):
            out.write(line + b"\n")
    return EXIT_OK


def run_cat(args: argparse.Namespace) -> int:
    from ..browse import cat, lookup, parse_target

    target = parse_target(args.target)
    with open_from(args) as store:
        cat(store, lookup(store, target), stdout())
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    from ..browse import info_json, lookup, parse_target

    target = parse_target(args.target)
    if target.components:
        raise InvalidArgument(f"info: {args.target}: give the store path itself, without a sub path")
    with open_from(args) as store:
        text = info_json(lookup(store, target))
    stdout().write(text.encode() + b"\n")
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    from ..browse import list_paths

    with open_from(args) as store:
        paths = list_paths(store)
    out = stdout()
    for path in paths:
        out.write(os.fsencode(path) + b"\n")
    return EXIT_OK
