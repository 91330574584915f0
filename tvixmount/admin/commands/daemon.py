"""``tvixstore daemon``: serve the store over gRPC (tvixmount/server/daemon.py).

The daemon's own flags live in the server package, which loads grpc
(0.2 s that no other command should pay), so they are added only when the
command line names ``daemon``.
"""

from __future__ import annotations

import argparse

from ...storeflags import DAEMON
from ..command import Subcommands


def add_parsers(commands: Subcommands) -> None:
    p = commands.add("daemon", "serve the store over tvix's gRPC protocol",
                     "Serve the store (the embedded one by default) over tvix's gRPC protocol until\n"
                     "SIGTERM or SIGINT, so tvix tools and remote tvixmount instances can use it.\n"
                     "Logs at info level by default.",
                     run,
                     "examples:\n  tvixstore daemon                  # [::1]:8000 and 127.0.0.1:8000\n"
                     "  tvixmount /mnt --path-info-service-addr grpc+http://[::1]:8000   # the others: "
                     "the same default\n"
                     "  tvixstore daemon -l /run/tvix-store.sock\n"
                     "  systemd-socket-activate -l 8000 tvixstore daemon -l sd-listen",
                     store=DAEMON)
    if commands.mentioned("daemon"):
        from ...server.daemon import add_arguments

        add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ...server import daemon

    return daemon.run(args, daemon.store_from(args))
