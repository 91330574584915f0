"""``tvixstore verify``: re-hash every object and check every store path's tree (admin/verify.py)."""

from __future__ import annotations

import argparse
from typing import Any, BinaryIO

from .. import progress
from ..command import EXIT_DATA, EXIT_OK, Subcommands, bars, open_from, stdout


def add_parsers(commands: Subcommands) -> None:
    p = commands.add("verify", "re-hash every blob and directory, check every store path's tree",
                     "Read every blob and re-compute its blake3 digest, decode and re-hash every\n"
                     "directory, and check that every store path's tree is complete (all its\n"
                     "directories and blobs present and good). Prints one line per bad object,\n"
                     "then a summary; exits 1 if anything is wrong. In an embedded store, also\n"
                     "prints one line per pack holding bytes no blob refers to (harmless: left\n"
                     "by an interrupted import, cut back by the next writer to take the pack).",
                     run)
    p.add_argument("--nar", action="store_true",
                   help="also re-render every store path's NAR and compare its size and sha256 "
                        "(reads every file once more)")


def run(args: argparse.Namespace) -> int:
    from ..verify import Verifier

    out = stdout()

    def on_problem(problem: Any) -> None:
        out.write(str(problem).encode("utf-8", "backslashreplace") + b"\n")
        out.flush()

    want_bars = bars(args)
    with open_from(args) as store:
        report = Verifier(
            store, on_problem, lambda desc, total: progress.bar(want_bars, desc, unit="obj", total=total),
            args.nar,
        ).run()
        if not args.quiet:
            _report_packs(store.blobs, out)
    if not args.quiet:
        out.write(report.summary().encode() + b"\n")
    return EXIT_DATA if report.problems else EXIT_OK


def _report_packs(blobs: object, out: BinaryIO) -> None:
    """Bytes of the embedded store's packs that no row refers to (store/embedded/packs.py).

    Not a problem (the exit status ignores them): nothing reads them, and
    they come from an import that died between appending and recording,
    or from two writers storing the same small blob at the same moment.
    """
    usage = getattr(blobs, "pack_usage", None)
    if usage is None:
        return
    for pack in usage():
        if pack.unreferenced:
            out.write(f"pack {pack.name}: {pack.unreferenced} of {pack.size} bytes unreferenced "
                      f"({pack.blobs} blobs recorded; harmless, see --help)\n".encode())
