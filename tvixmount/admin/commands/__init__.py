"""The ``tvixstore`` subcommands, one module each, in the order ``--help`` lists them.

Each module's ``add_parsers(commands)`` adds its subcommand(s) with their
own flags and entry point (admin/command.py says how); cli.py only
collects them.
"""

from __future__ import annotations

from . import browse, copy, daemon, import_, substitute, sync, systemd_units, verify

MODULES = (import_, copy, substitute, browse, verify, sync, daemon, systemd_units)
