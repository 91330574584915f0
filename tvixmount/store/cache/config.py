"""What a blob cache is asked to be: its directory and how big it may grow.

Kept apart from the cache itself (service.py, index.py) so that naming a
cache, in ``StoreUrls`` and on the command line (``tvixmount.storeflags``),
loads neither sqlite nor the cache: the mount's dispatcher only passes the
config on to the workers, which open the cache after their fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...units import format_size

DEFAULT_SIZE = 10 << 30


@dataclass(frozen=True, slots=True)
class BlobCacheConfig:
    """Where a blob cache lives and how big it may grow (bytes)."""

    directory: Path
    max_bytes: int = DEFAULT_SIZE

    def describe(self) -> str:
        return f"blob cache {self.directory} ({format_size(self.max_bytes)})"
