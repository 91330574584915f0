"""The store suite against memory://, plus what is special about memory://."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import pytest

from tests.store_suite import BlobTests, DirectoryTests, Harness, PathInfoTests, b3, pattern
from tvixmount.errors import InvalidArgument
from tvixmount.store import (
    StoreUrls,
    memory,
    open_blob_service,
    open_directory_service,
    open_path_info_service,
    open_store,
)


@pytest.fixture
def harness() -> Iterator[Harness]:
    memory.reset()

    def corrupt_directory(digest: bytes, data: bytes) -> None:
        memory.tables().directories[digest] = data

    def corrupt_path_info(digest: bytes, data: bytes) -> None:
        memory.tables().path_infos[digest] = data

    with open_store(StoreUrls.single("memory://")) as store:
        yield Harness(store, corrupt_directory, corrupt_path_info)
    memory.reset()


class TestMemoryBlobs(BlobTests):
    pass


class TestMemoryDirectories(DirectoryTests):
    pass


class TestMemoryPathInfos(PathInfoTests):
    pass


def test_separately_opened_services_share_one_store(harness: Harness) -> None:
    digest = harness.store.blobs.put(b"shared")
    other = open_blob_service("memory://")
    assert other.stat(digest) is not None
    dirs = open_directory_service("memory://")
    from tests.store_suite import DIR_WITH_KEEP

    dirs.put(DIR_WITH_KEEP)
    assert harness.store.directories.get(DIR_WITH_KEEP.digest()) == DIR_WITH_KEEP
    assert open_path_info_service("memory://").get(b"\0" * 20) is None


def test_reset_forgets_everything(harness: Harness) -> None:
    digest = harness.store.blobs.put(b"gone soon")
    memory.reset()
    assert harness.store.blobs.stat(digest) is None


def test_corrupted_blob_in_memory_is_detected(harness: Harness) -> None:
    digest = harness.store.blobs.put(pattern(100))
    memory.tables().blobs[digest] = pattern(100, seed=1)
    from tvixmount.errors import IntegrityError

    with pytest.raises(IntegrityError):
        harness.store.blobs.open_read(digest)


def _child_sees(digest: bytes, queue: multiprocessing.Queue) -> None:
    queue.put(open_blob_service("memory://").stat(digest) is not None)


def test_forked_child_gets_a_copy(harness: Harness) -> None:
    digest = harness.store.blobs.put(b"before fork")
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_child_sees, args=(digest, queue))
    child.start()
    assert queue.get(timeout=10) is True
    child.join(10)
    assert child.exitcode == 0


@pytest.mark.parametrize("url", ["memory:///", "memory://x", "memory://?a=1", "memory:", "memory:/"])
def test_memory_url_must_be_exact(url: str) -> None:
    with pytest.raises(InvalidArgument, match="memory"):
        open_blob_service(url)


def test_blob_digest_is_content_hash(harness: Harness) -> None:
    assert harness.store.blobs.put(b"abc") == b3(b"abc")
