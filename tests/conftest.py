"""Shared fixtures: an embedded store in a temp dir, and real mounts of it."""

from __future__ import annotations

import os

# grpc's C core installs fork handlers that wait for its own threads; in a
# child of a process with live grpc threads (pytest runs gRPC servers
# in-process) they can hang the next fork, e.g. the pool's fork server
# forking a worker. tvixmount itself never loads grpc before it forks.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mounting import FUSE_MISSING, Mount


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def local_store(store_dir: Path) -> Iterator:
    """An embedded on-disk store (created), open for writing in this process."""
    from tvixmount.store import StoreUrls, open_store

    with open_store(StoreUrls.single(f"local://{store_dir}?create=1")) as store:
        yield store


_ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ", re.M)


@pytest.fixture
def mount(tmp_path: Path, store_dir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Mount]]:
    """Factory: ``mount(*args, expect_errors=False)`` mounts the store at tmp/mnt.

    After the test, the mount is stopped and its log is checked: an ERROR
    line fails the test unless the test said it expects errors.
    """
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    mounts: list[tuple[Mount, bool]] = []

    def make(*args: str, expect_errors: bool = False, name: str = "mnt", **kwargs) -> Mount:
        m = Mount(tmp_path / name, store_dir, *args, **kwargs)
        mounts.append((m, expect_errors))
        return m.start()

    yield make
    failures = []
    for m, expect_errors in mounts:
        status = m.stop()
        log = m.log()
        if status not in (0, None) or (status is None and m.proc and m.proc.returncode not in (0, None)):
            failures.append(f"tvixmount exited with {status}:\n{log[-3000:]}")
        if not expect_errors and _ERROR_LINE.search(log):
            failures.append(f"unexpected ERROR in the mount log:\n{log[-3000:]}")
    if failures:
        pytest.fail("\n".join(failures))
