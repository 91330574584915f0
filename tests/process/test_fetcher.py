"""Both fetchers answer the same questions the same way: in-process, through the wire codec, and
through real worker processes (memory:// filled before the fork, and the embedded local:// store)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.worker_fixtures import ABSENT_PATH, BIG, LEAF, ROOT, SMALL, b3, populate
from tvixmount.castore.directory import Directory
from tvixmount.errors import InvalidArgument, InvalidData, NotFound
from tvixmount.fetcher import LocalFetcher, PoolFetcher
from tvixmount.pool import WorkerPool
from tvixmount.store import Store, StoreUrls, memory, open_store
from workers.handlers import HANDLERS, Context
from workers.loop import serve

MEMORY = StoreUrls.single("memory://")


def local(store: Store, **options: bool) -> LocalFetcher[Context]:
    return LocalFetcher(HANDLERS, Context(-1, store), **options)


@pytest.fixture(scope="module")
def tree():
    memory.reset()
    with open_store(MEMORY) as store:
        yield populate(store)
    memory.reset()


@pytest.fixture(scope="module")
def pool(tree) -> Iterator[WorkerPool]:
    with WorkerPool(MEMORY, 2, serve, request_timeout=10) as pool:  # workers fork a copy of the filled tables
        yield pool


@pytest.fixture(params=["local", "local-wire", "pool"])
def fetcher(request, tree):
    if request.param == "pool":
        yield PoolFetcher(request.getfixturevalue("pool"))
        return
    f = local(open_store(MEMORY), wire=request.param == "local-wire", owns_store=True)
    yield f
    f.close()


def test_path_info(fetcher, tree):
    assert fetcher.path_info(ABSENT_PATH.digest) is None
    for node in (tree.dir_node, tree.file_node, tree.link_node):
        from tvixmount.castore.storepath import parse_basename

        assert fetcher.path_info(parse_basename(node.name).digest) == node


def test_directory_tree(fetcher, tree):
    assert fetcher.directory_tree(ROOT.digest(), 1000) == [(ROOT.digest(), ROOT), (LEAF.digest(), LEAF)]
    assert fetcher.directory_tree(ROOT.digest(), 1) == [(ROOT.digest(), ROOT)]  # bounded, root first
    assert fetcher.directory_tree(LEAF.digest(), 1) == [(LEAF.digest(), LEAF)]
    with pytest.raises(NotFound, match="not found"):
        fetcher.directory_tree(b3(b"no such directory"), 1000)


def test_list_root(fetcher, tree):
    assert sorted(fetcher.list_root(), key=lambda n: n.name) == sorted(
        [tree.dir_node, tree.file_node, tree.link_node], key=lambda n: n.name)


def test_blobs(fetcher):
    assert fetcher.blob_read(b3(SMALL), 0, 100) == SMALL
    assert fetcher.blob_read(b3(BIG), 1000, 131072, affinity=3) == BIG[1000:1000 + 131072]
    assert fetcher.blob_read(b3(BIG), len(BIG) - 10, 4096, affinity=3) == BIG[-10:]
    assert fetcher.blob_read(b3(BIG), len(BIG) + 10, 4096, affinity=3) == b""
    with pytest.raises(NotFound):
        fetcher.blob_read(b3(b"absent"), 0, 1)


def test_bad_arguments_are_invalid_argument(fetcher):
    with pytest.raises(InvalidArgument, match="blob digest is 3 bytes"):
        fetcher.blob_read(b"abc", 0, 1)
    with pytest.raises(InvalidArgument, match="out of range"):
        fetcher.blob_read(b3(SMALL), -1, 1)
    with pytest.raises(InvalidArgument, match="store path digest"):
        fetcher.path_info(b"\0" * 32)


def test_sequential_reads_reuse_one_reader():
    memory.reset()
    with open_store(MEMORY) as store:
        populate(store)
        f = local(store)
        data = b"".join(f.blob_read(b3(BIG), off, 65536) for off in range(0, len(BIG), 65536))
        assert data == BIG
        assert f.stats().readers_opened == 1


def test_broken_path_info_is_invalid_data_across_the_pool(tmp_path):
    """A row whose PathInfo belongs to another store path: InvalidData, with its class intact."""
    memory.reset()
    with open_store(MEMORY) as store:
        tree = populate(store)
        from tvixmount.castore.storepath import parse_basename

        tables = memory.tables()
        good = parse_basename(tree.file_node.name).digest
        tables.path_infos[ABSENT_PATH.digest] = tables.path_infos[good]
        with pytest.raises(InvalidData):
            local(store).path_info(ABSENT_PATH.digest)
        with WorkerPool(MEMORY, 1, serve, request_timeout=10) as pool, pytest.raises(InvalidData):
            PoolFetcher(pool).path_info(ABSENT_PATH.digest)
    memory.reset()


def test_pool_over_the_embedded_store(tmp_path):
    """Each worker opens the on-disk store itself, after the fork."""
    urls = StoreUrls.embedded(tmp_path / "store", create=True)
    with open_store(urls) as store:
        tree = populate(store)
    with WorkerPool(StoreUrls.embedded(tmp_path / "store"), 2, serve, request_timeout=10) as pool:
        f = PoolFetcher(pool)
        assert f.directory_tree(ROOT.digest(), 1) == [(ROOT.digest(), ROOT)]
        assert isinstance(f.directory_tree(ROOT.digest(), 1)[0][1], Directory)
        assert f.blob_read(b3(BIG), 0, len(BIG), affinity=1) == BIG
        assert sorted(n.name for n in f.list_root()) == sorted(
            n.name for n in (tree.dir_node, tree.file_node, tree.link_node))
        assert f.stats().requests >= 3
