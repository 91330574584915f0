"""The store suite against the gRPC client talking to a real daemon (local:// behind it).

Every test gets a fresh daemon process with a fresh embedded store
(``DaemonSpares`` starts the next one while a test runs). The suite's
damage hooks write the daemon's sqlite file directly, so the errors
checked are the daemon's, carried over the wire.

Two things tvix's protocol cannot do are bridged here, for the suite's
own checks only: listing blobs and directories (no List RPC) reads the
digests from the backing store directly; and a directory whose child is
missing cannot be uploaded through a daemon (it refuses an open closure),
so that test plants it in the backing store instead.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Iterator

import pytest

from tests.grpc_daemon import Daemon, DaemonSpares, scratch_dir
from tests.store_suite import (
    DIR_COMPLICATED,
    DIR_WITH_KEEP,
    BlobTests,
    DirectoryTests,
    Harness,
    PathInfoTests,
)
from tvixmount.castore.nodes import b3_text
from tvixmount.errors import InvalidData, NotFound
from tvixmount.store import Store, StoreUrls, open_store
from tvixmount.store.embedded.layout import DB_FILE
from tvixmount.store.grpc import client as grpc_client
from tvixmount.store.grpc.blobs import GrpcBlobService
from tvixmount.store.grpc.directories import GrpcDirectoryService


@pytest.fixture(scope="module")
def spares() -> Iterator[DaemonSpares]:
    base = scratch_dir("tvx-suite-")
    pool = DaemonSpares(base)
    yield pool
    pool.close()
    shutil.rmtree(base, ignore_errors=True)


class _ListingBlobs(GrpcBlobService):
    def __init__(self, url: str, backing: Store) -> None:
        super().__init__(grpc_client.open_blob_service(url).endpoint)
        self._backing = backing

    def iter_digests(self) -> Iterator[bytes]:
        return self._backing.blobs.iter_digests()


class _ListingDirectories(GrpcDirectoryService):
    def __init__(self, url: str, backing: Store) -> None:
        super().__init__(grpc_client.open_directory_service(url).endpoint)
        self._backing = backing

    def iter_digests(self) -> Iterator[bytes]:
        return self._backing.directories.iter_digests()


@pytest.fixture
def daemon(spares: DaemonSpares) -> Iterator[Daemon]:
    daemon = spares.take()
    yield daemon
    assert daemon.stop() == 0, daemon.log()
    assert daemon.problems() == []


@pytest.fixture
def backing(daemon: Daemon) -> Iterator[Store]:
    with open_store(StoreUrls.embedded(daemon.store_dir)) as store:
        yield store


@pytest.fixture
def harness(daemon: Daemon, backing: Store) -> Iterator[Harness]:
    def update(table: str, digest: bytes, data: bytes) -> None:
        conn = sqlite3.connect(daemon.store_dir / DB_FILE)
        with conn:
            conn.execute(f"UPDATE {table} SET data = ? WHERE digest = ?", (data, digest))
        conn.close()

    store = Store(
        _ListingBlobs(daemon.url, backing),
        _ListingDirectories(daemon.url, backing),
        grpc_client.open_path_info_service(daemon.url),
    )
    with store:
        yield Harness(
            store,
            lambda digest, data: update("directories", digest, data),
            lambda digest, data: update("path_infos", digest, data),
        )


class TestGrpcBlobs(BlobTests):
    pass


class TestGrpcDirectories(DirectoryTests):
    def test_recursive_missing_descendant(self, harness: Harness, backing: Store) -> None:
        # A daemon refuses a directory whose child it does not have ...
        with pytest.raises(InvalidData, match="leaves first"):
            harness.store.directories.put(DIR_COMPLICATED)
        # ... so plant one in its store, as damage would leave it.
        backing.directories.put(DIR_COMPLICATED)
        with pytest.raises(NotFound, match=re.escape(b3_text(DIR_WITH_KEEP.digest()))):
            list(harness.store.directories.get_recursive(DIR_COMPLICATED.digest()))


    def test_corrupted_row_is_invalid_data(self, harness: Harness, backing: Store) -> None:
        # As the suite's test, but DIR_COMPLICATED (child absent) is planted, not uploaded.
        digest = backing.directories.put(DIR_COMPLICATED)
        harness.corrupt_directory(digest, DIR_WITH_KEEP.encode())  # valid, but another digest
        with pytest.raises(InvalidData, match=re.escape(b3_text(digest))):
            harness.store.directories.get(digest)
        harness.corrupt_directory(digest, b"\xff\xff\xff")  # not protobuf
        with pytest.raises(InvalidData, match=re.escape(b3_text(digest))):
            harness.store.directories.get(digest)


class TestGrpcPathInfos(PathInfoTests):
    pass
