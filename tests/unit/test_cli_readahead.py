"""The mount's kernel readahead by default: raised only where blobs are read from local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvixmount import cli, flags
from tvixmount.store import StoreUrls
from tvixmount.store.cache.config import BlobCacheConfig

GRPC = "grpc+http://[::1]:8000"


@pytest.mark.parametrize(("urls", "expected"), [
    (StoreUrls.embedded("/var/lib/tvixmount"), 1 << 20),  # the worker fills the arena ahead
    (StoreUrls(GRPC, GRPC, GRPC), 0),  # no arena to fill: 1 MiB in flight made it 2.7x slower
    (StoreUrls(GRPC, GRPC, GRPC, blob_cache=BlobCacheConfig(Path("/var/cache/t"))), 1 << 20),
])
def test_default_kernel_readahead_follows_where_blobs_are(urls: StoreUrls, expected: int) -> None:
    assert cli.default_kernel_readahead(urls) == expected


def test_the_flag_left_out_is_none_and_given_is_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVIXMOUNT_KERNEL_READAHEAD", raising=False)
    parser = cli.build_parser()
    assert flags.parse(parser, ["/mnt"]).kernel_readahead is None  # run() picks by the store
    assert flags.parse(parser, ["/mnt", "--kernel-readahead", "0"]).kernel_readahead == 0
    assert flags.parse(parser, ["/mnt", "--kernel-readahead", "2M"]).kernel_readahead == 2 << 20
    monkeypatch.setenv("TVIXMOUNT_KERNEL_READAHEAD", "512K")
    assert flags.parse(parser, ["/mnt"]).kernel_readahead == 512 << 10
