"""The in-process FUSE fixture the unit tests of the FUSE edge share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fuse_inprocess import Fuse, fuse_factory
from tests.fuse_tree import populate
from tvixmount.store import memory


@pytest.fixture
def fuse(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., Fuse]]:
    """``fuse(expect_errors=False, **MountOptions)`` over the populated memory:// (fuse_inprocess.py)."""
    populate()
    yield from fuse_factory(caplog)
    memory.reset()
