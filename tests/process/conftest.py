"""Fixtures the pool, lane and fetcher tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.worker_fixtures import Tree, populate
from tvixmount.store import StoreUrls, memory, open_store

MEMORY = StoreUrls.single("memory://")


@pytest.fixture
def tree() -> Iterator[Tree]:
    """The worker fixtures' tree in a fresh memory:// store, seen by the workers forked after it."""
    memory.reset()
    with open_store(MEMORY) as store:
        yield populate(store)
    memory.reset()
