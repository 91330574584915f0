"""Defaults that follow the machine: the segment arena's size (memory) and the FUSE threads (CPUs, store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvixmount import cli, flags, hostmem, segcache
from tvixmount.store import StoreUrls
from tvixmount.store.cache.config import BlobCacheConfig

GRPC = "grpc+http://[::1]:8000"
EMBEDDED = StoreUrls.embedded("/var/lib/tvixmount")
MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.parametrize(("memory", "expected"), [
    (24 * GiB, 1536 * MiB),  # this machine: a sixteenth
    (512 * MiB, 64 * MiB),  # a small VM: never below the old fixed size
    (256 * GiB, 2 * GiB),  # a big builder: capped, the page cache serves the rest
    (24 * GiB + 12345, 1536 * MiB),  # whole MiB
])
def test_the_arena_is_a_sixteenth_of_memory_within_bounds(memory: int, expected: int) -> None:
    assert segcache.default_size(memory) == expected


def test_the_command_line_default_is_the_scaled_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVIXMOUNT_SEGMENT_CACHE", raising=False)
    args = flags.parse(cli.build_parser(), ["/mnt"])
    assert args.segment_cache == segcache.default_size(hostmem.usable_memory())


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> int | None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    root = tmp_path / "sys"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text + "\n")
    return hostmem.cgroup_limit(proc, root)


def test_a_v2_unit_limit_is_read_from_the_process_cgroup(tmp_path: Path) -> None:
    limit = _cgroup(tmp_path, "0::/system.slice/tvixmount.service",
                    {"system.slice/tvixmount.service/memory.max": str(4 * GiB), "memory.max": "max"})
    assert limit == 4 * GiB


def test_v2_max_and_v1_unlimited_are_no_limit(tmp_path: Path) -> None:
    assert _cgroup(tmp_path / "a", "0::/u", {"u/memory.max": "max"}) is None
    assert _cgroup(tmp_path / "b", "4:memory:/u",
                   {"memory/u/memory.limit_in_bytes": "9223372036854771712"}) is None


def test_a_v1_limit_in_a_cgroup_namespace_is_at_the_controller_root(tmp_path: Path) -> None:
    # the process's path names a cgroup the namespace does not show; its root is the process's own
    limit = _cgroup(tmp_path, "4:memory:/process_api/abc", {"memory/memory.limit_in_bytes": str(2 * GiB)})
    assert limit == 2 * GiB


def test_no_cgroup_files_is_no_limit(tmp_path: Path) -> None:
    assert _cgroup(tmp_path, "0::/", {}) is None
    assert hostmem.cgroup_limit(tmp_path / "missing", tmp_path) is None


def test_usable_memory_is_the_lower_of_ram_and_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmem, "physical_memory", lambda: 24 * GiB)
    monkeypatch.setattr(hostmem, "cgroup_limit", lambda: 3 * GiB)
    assert hostmem.usable_memory() == 3 * GiB
    monkeypatch.setattr(hostmem, "cgroup_limit", lambda: None)
    assert hostmem.usable_memory() == 24 * GiB


@pytest.mark.parametrize(("workers", "urls", "cpus", "expected"), [
    (8, EMBEDDED, 2, 4),  # the card's line on this machine: requests are CPU work, two at once
    (2, EMBEDDED, 2, 4),
    (8, EMBEDDED, 16, 10),  # enough CPUs: every worker's request runs at once
    (8, StoreUrls.single("memory://"), 2, 4),
    (8, StoreUrls(GRPC, GRPC, GRPC), 2, 10),  # remote: each request in flight waits on the network
    (8, StoreUrls(GRPC, GRPC, GRPC, blob_cache=BlobCacheConfig(Path("/var/cache/t"))), 2, 10),
    (1, StoreUrls(GRPC, GRPC, GRPC), 2, 4),  # never fewer than four
])
def test_threads_follow_what_can_make_progress_at_once(workers: int, urls: StoreUrls, cpus: int,
                                                      expected: int) -> None:
    assert cli.default_threads(workers, urls, cpus=cpus) == expected


def test_a_remote_path_info_service_makes_the_store_remote() -> None:
    local = EMBEDDED.blob
    cache = "nix+http://cache.example/"
    assert cli.default_threads(8, StoreUrls(local, local, cache), cpus=2) == 10
