"""Where the embedded store lives when nobody says otherwise.

One rule, shared by the mount, the workers and ``tvixstore``, so that an
import and a later mount agree on the directory without a flag:

1. ``$TVIXMOUNT_STORE_DIR`` when set and non-empty (tests, odd layouts);
2. ``/var/lib/tvixmount`` for root (the system store, like Nix's);
3. ``$XDG_DATA_HOME/tvixmount`` for anyone else (default
   ``~/.local/share/tvixmount``), so an unprivileged user never needs write
   access to /var/lib.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TVIXMOUNT_STORE_DIR"
SYSTEM_STORE_DIR = Path("/var/lib/tvixmount")


def default_store_dir() -> Path:
    """The embedded store directory to use when no URL is given (see module doc)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser().absolute()
    if os.geteuid() == 0:
        return SYSTEM_STORE_DIR
    data_home = os.environ.get("XDG_DATA_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    if data_home and os.path.isabs(data_home):
        return Path(data_home) / "tvixmount"
    return Path.home() / ".local" / "share" / "tvixmount"
