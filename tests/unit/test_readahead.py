"""Small-file readahead: what it schedules, and a real mount read file by file (tar-like) serving
reads from it with the right bytes, while a stat-only walk fetches nothing."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from tests.mount.test_metrics import metric, metrics_url, scrape
from tvixmount import readahead
from tvixmount.admin.ingest import Ingester
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.readahead import SmallFileReadahead, TreeAhead, TreeAheadStats
from tvixmount.vfs import Listing
from tvixmount.walkplaces import WalkPlaces

# -- scheduling ----------------------------------------------------------------------------


def _file(i: int, size: int) -> FileNode:
    return FileNode(b"f%03d" % i, bytes([i]) * 32, size)


def _listing() -> Listing:
    files = [_file(i, 100 + i) for i in range(20)]
    files[5] = _file(5, 10 << 20)  # a big one: never fetched ahead
    return Listing.of(Directory(
        (DirectoryNode(b"d", b"\x01" * 32, 0),), tuple(files), (SymlinkNode(b"l", b"t"),)))


class _Fetches:
    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.groups: list[list[bytes]] = []
        self.gate = threading.Event()

    def __call__(self, nodes: list[FileNode]) -> list[bytes | None]:
        self.asked += [node.name for node in nodes]
        self.groups.append([node.name for node in nodes])
        self.gate.wait(5)
        return [b"x" * node.size for node in nodes]


def _open_first(ra: SmallFileReadahead, listing: Listing) -> None:
    """Look up and open f000 of ``listing`` as inode 1: the fetches ahead of it start."""
    ra.note_lookup(1, listing, b"f000")
    ra.on_open(1, listing.child(b"f000"))


def _settle(ra: SmallFileReadahead) -> None:
    deadline = time.monotonic() + 5
    while ra.stats().pending and time.monotonic() < deadline:
        time.sleep(0.005)


def test_open_fetches_the_next_small_files_and_reads_take_them_once():
    fetches = _Fetches()
    fetches.gate.set()
    ra = SmallFileReadahead(fetches, depth=3)
    listing = _listing()
    ra.note_lookup(42, listing, b"f003")
    ra.on_open(42, listing.child(b"f003"))
    _settle(ra)
    # 2 * depth files in one request; f005 is big: skipped
    assert fetches.groups == [[b"f004", b"f006", b"f007", b"f008", b"f009", b"f010"]]
    f4 = listing.child(b"f004")
    assert ra.take(f4, 0, 50) == b"x" * 50  # a partial read leaves the entry
    assert ra.take(f4, 50, 4096) == b"x" * (f4.size - 50)  # its end: the entry goes
    assert ra.take(f4, 0, 4096) is None
    assert ra.stats().hits == 2
    ra.close()


def test_files_are_chosen_when_half_the_depth_is_left_pending_and_as_many_are_new_as_ahead():
    fetches = _Fetches()  # gate closed: fetches hang until released
    ra = SmallFileReadahead(fetches, depth=2)
    listing = _listing()
    for name, ino in ((b"f000", 1), (b"f001", 2), (b"f002", 3)):
        ra.note_lookup(ino, listing, name)
        ra.on_open(ino, listing.child(name))
    time.sleep(0.05)
    # the first open chose 2 * depth files, one request; the next opens found 4 > depth // 2 pending
    assert fetches.groups == [[b"f001", b"f002", b"f003", b"f004"]] and ra.stats().pending == 4
    fetches.gate.set()
    _settle(ra)
    ra.note_lookup(5, listing, b"f001")
    ra.on_open(5, listing.child(b"f001"))  # f002-f004 still ahead, one new (f006): not yet
    _settle(ra)
    assert len(fetches.groups) == 1
    ra.note_lookup(4, listing, b"f003")
    ra.on_open(4, listing.child(b"f003"))  # f004 still ahead, three new (f005 is big): chosen
    _settle(ra)
    assert fetches.groups[1:] == [[b"f006", b"f007", b"f008"]]
    assert len(fetches.asked) == len(set(fetches.asked))
    ra.close()


def test_a_file_read_whole_is_not_fetched_again():
    fetches = _Fetches()
    fetches.gate.set()
    ra = SmallFileReadahead(fetches, depth=2)
    listing = _listing()
    _open_first(ra, listing)  # f001-f004
    _settle(ra)
    f1, f2 = listing.child(b"f001"), listing.child(b"f002")
    assert ra.take(f1, 0, 4096) == b"x" * f1.size  # read whole from what was fetched
    ra.missed(f2)  # read by its reader alone, say after the cache dropped it
    ra.note_lookup(2, listing, b"f000")  # a second walk over the same tree (a warm tar)
    ra.on_open(2, listing.child(b"f000"))
    _settle(ra)
    assert fetches.groups[1:] == [[b"f006", b"f007"]]  # f003 and f004 still ahead; not f001, f002
    ra.close()


def test_a_group_is_at_most_a_batch_of_bytes(monkeypatch):
    fetches = _Fetches()
    fetches.gate.set()
    big = readahead.GROUP_BYTES // 2 - 1000
    files = [_file(0, 100)] + [_file(i, big) for i in range(1, 4)] + [_file(4, readahead.GROUP_BYTES)]
    listing = Listing.of(Directory((), tuple(files), ()))
    ra = SmallFileReadahead(fetches, depth=4)
    _open_first(ra, listing)
    _settle(ra)
    assert fetches.groups == [[b"f001", b"f002"], [b"f003"], [b"f004"]]
    assert ra.take(listing.child(b"f002"), 0, big) == b"x" * big
    monkeypatch.setattr(readahead.batch, "MAX_FILES", 2)
    assert [len(g) for g in readahead._groups([_file(i, 1) for i in range(5)])] == [2, 2, 1]
    ra.close()


def test_only_files_within_the_scan_window_and_the_size_bounds_are_fetched(monkeypatch):
    monkeypatch.setattr(readahead, "SCAN_LIMIT", 4)
    fetches = _Fetches()
    fetches.gate.set()
    files = [_file(i, 100) for i in range(40)]  # at most min_file: left to the batches
    files[3] = _file(3, 5000)
    files[25] = _file(25, 5000)  # more than depth * SCAN_LIMIT (8) entries after f001
    files[30] = _file(30, 5000)
    listing = Listing.of(Directory((), tuple(files), ()))
    ra = SmallFileReadahead(fetches, depth=2, min_file=1000)
    ra.note_lookup(1, listing, b"f001")
    ra.on_open(1, listing.child(b"f001"))
    _settle(ra)
    assert fetches.asked == [b"f003"]
    ra.note_lookup(2, listing, b"f002")  # left to the batches, in the listing looked from already
    ra.on_open(2, listing.child(b"f002"))
    ra.note_lookup(3, listing, b"f025")  # f030 is within the window of f025
    ra.on_open(3, listing.child(b"f025"))
    _settle(ra)
    assert fetches.asked == [b"f003", b"f030"]
    ra.close()


def _walk_tree() -> tuple[dict[bytes, Listing], bytes, dict[bytes, bytes]]:
    """``r`` holding d1/ (a of 100 bytes, b), d2/ (c, e), d3/ (g, not listed), f and h, in that
    readdir order; the listings by digest, r's digest and each directory's by name."""
    def file(name: bytes, size: int = 5000) -> FileNode:
        return FileNode(name, name.ljust(32, b"."), size)

    dirs = {b"d1": Directory(files=(file(b"a", 100), file(b"b"))),
            b"d2": Directory(files=(file(b"c"), file(b"e"))), b"d3": Directory(files=(file(b"g"),))}
    r = Directory(directories=tuple(DirectoryNode(n, d.digest(), 2) for n, d in dirs.items()),
                  files=(file(b"f"), file(b"h")))
    listings = {d.digest(): Listing.of(d) for d in (r, dirs[b"d1"], dirs[b"d2"])}
    return listings, r.digest(), {n: d.digest() for n, d in dirs.items()}


def _walk_readahead(depth: int, places: bool = True) -> tuple[SmallFileReadahead, _Fetches]:
    listings, r, dirs = _walk_tree()
    fetches = _Fetches()
    fetches.gate.set()
    where = WalkPlaces()
    for name, digest in dirs.items():
        where.note(digest, r, listings[r].index[name])
    ra = SmallFileReadahead(fetches, depth=depth, min_file=1000, listing_of=listings.get,
                            places=where if places else None)
    d1 = listings[dirs[b"d1"]]
    ra.note_lookup(1, d1, b"a", dirs[b"d1"])
    ra.on_open(1, d1.child(b"a"))
    _settle(ra)
    ra.close()
    return ra, fetches


def test_the_window_goes_on_as_a_walk_does_past_the_directory():
    # d1's b, then on in r after d1: into d2 (c, e), past d3 (not listed: an open there
    # chooses its files), then f and h; a (100 bytes) is the batches' (min_file)
    assert _walk_readahead(depth=4)[1].groups == [[b"b", b"c", b"e", b"f", b"h"]]
    # without the directories' places the window ends with d1
    assert _walk_readahead(depth=4, places=False)[1].groups == [[b"b"]]


def test_the_window_counts_the_entries_of_every_listing_it_passes(monkeypatch):
    monkeypatch.setattr(readahead, "SCAN_LIMIT", 2)
    # 4 entries: b in d1, d1 and d2 in r, c and e in d2; not f, h
    assert _walk_readahead(depth=2)[1].asked == [b"b", b"c", b"e"]


def test_the_listings_remembered_for_opens_stay_within_their_entry_bound(monkeypatch):
    monkeypatch.setattr(readahead, "SCANNED_ENTRIES", 30)
    fetches = _Fetches()
    fetches.gate.set()
    ra = SmallFileReadahead(fetches, depth=2)
    others = tuple(FileNode(b"f%03d" % i, bytes([100 + i]) * 32, 100) for i in range(20))
    first, second = _listing(), Listing.of(Directory((), others, ()))
    assert len(first.entries) <= 30 < len(first.entries) + len(second.entries)
    for ino, listing in ((1, first), (2, second)):
        ra.note_lookup(ino, listing, b"f000")
        ra.on_open(ino, listing.child(b"f000"))
    _settle(ra)
    assert ra._scanned_entries <= 30 and len(ra._scanned) == 1  # the first was forgotten for the second
    assert sorted(fetches.asked) == sorted([b"f001", b"f002", b"f003", b"f004"] * 2)  # each listing's own
    ra.close()


def test_no_lookup_no_readahead_and_depth_zero_is_off():
    fetches = _Fetches()
    fetches.gate.set()
    listing = _listing()
    ra = SmallFileReadahead(fetches, depth=4)
    ra.on_open(7, listing.child(b"f000"))  # opened without a lookup we saw (e.g. by inode)
    off = SmallFileReadahead(fetches, depth=0)
    off.note_lookup(7, listing, b"f000")
    off.on_open(7, listing.child(b"f000"))
    time.sleep(0.05)
    assert fetches.asked == []
    ra.close()
    off.close()


def _broken(nodes: list[FileNode]) -> list[bytes | None]:
    raise OSError("store is down")


def test_a_failed_fetch_is_forgotten_and_not_served():
    ra = SmallFileReadahead(_broken, depth=2)
    listing = _listing()
    _open_first(ra, listing)
    _settle(ra)
    assert ra.stats().failed == 4
    assert ra.take(listing.child(b"f001"), 0, 4096) is None
    ra.close()


def test_a_file_its_group_could_not_bring_is_not_served_and_the_others_are():
    def one_failed(nodes: list[FileNode]) -> list[bytes | None]:
        return [None if node.name == b"f002" else b"x" * node.size for node in nodes]

    ra = SmallFileReadahead(one_failed, depth=2)
    listing = _listing()
    _open_first(ra, listing)
    _settle(ra)
    assert ra.stats().failed == 1 and ra.stats().fetched == 3
    f1, f2 = listing.child(b"f001"), listing.child(b"f002")
    assert ra.take(f2, 0, 4096) is None and ra.waiter(f2) is None  # its read asks a worker itself
    assert ra.take(f1, 0, 4096) == b"x" * f1.size
    ra.close()


def test_a_read_of_a_file_in_flight_gets_a_waiter_that_its_fetch_ends_either_way():
    fetches = _Fetches()  # gate closed: the fetches hang until released
    ra = SmallFileReadahead(fetches, depth=2)
    listing = _listing()
    _open_first(ra, listing)
    f1, f2 = listing.child(b"f001"), listing.child(b"f002")
    time.sleep(0.05)
    event = ra.waiter(f1)
    assert event is not None and not event.is_set() and ra.take(f1, 0, 10) is None
    assert ra.waiter(listing.child(b"f010")) is None  # not fetched ahead: nothing to wait for
    fetches.gate.set()
    assert event.wait(5)
    assert ra.take(f1, 0, 10) == b"x" * 10  # woken with the bytes already cached
    _settle(ra)
    assert ra.take(f2, 0, 4096) == b"x" * f2.size and ra.waiter(f2) is None
    assert ra.stats().waited == 1
    ra.close()


def test_waiters_wake_when_the_fetch_fails_or_the_readahead_closes():
    failing = SmallFileReadahead(_broken, depth=1)
    listing = _listing()
    _open_first(failing, listing)
    _settle(failing)
    assert failing.waiter(listing.child(b"f001")) is None  # ended: the read asks a worker itself
    failing.close()

    fetches = _Fetches()  # never released before the close
    hanging = SmallFileReadahead(fetches, depth=1)
    _open_first(hanging, listing)
    event = hanging.waiter(listing.child(b"f001"))
    assert event is not None and not event.is_set()
    hanging.close()
    assert event.is_set()
    fetches.gate.set()


def test_the_cache_is_bounded():
    fetches = _Fetches()
    fetches.gate.set()
    ra = SmallFileReadahead(fetches, depth=8, max_bytes=300)
    listing = _listing()
    _open_first(ra, listing)
    _settle(ra)
    stats = ra.stats()
    assert stats.cached_bytes <= 300 and stats.evicted >= 1
    ra.close()


# -- a real mount --------------------------------------------------------------------------


@pytest.fixture
def small_files(tmp_path, local_store):
    """A store path with 3 directories of 60 small files each, all different."""
    root = tmp_path / "src" / "smalls-1.0"
    expected = {}
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(60):
            data = os.urandom(1000 + 97 * i)
            (root / f"d{d}" / f"f{i:03d}").write_bytes(data)
            expected[f"d{d}/f{i:03d}"] = data
    imported = Ingester(local_store).import_path(root)
    return imported.store_path.basename, expected


def _stats(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.tvixmount.stats"))


def test_reading_a_directory_file_by_file_is_served_ahead_and_right(mount, small_files):
    name, expected = small_files
    m = mount("--readahead-files", "4", "--small-batches", "0", "--metrics-listen", "127.0.0.1:0")
    base = m.path(name)
    for rel in sorted(expected):
        assert (base / rel).read_bytes() == expected[rel], rel
    stats = _stats(m.mountpoint)
    ahead = stats["readahead"]
    assert ahead["hits"] > 100  # most of the 180 files after the first of each directory
    assert ahead["fetched"] >= ahead["hits"]
    assert ahead["failed"] == 0
    samples = scrape(metrics_url(m))
    assert metric(samples, "tvixmount_readahead_hits_total") >= ahead["hits"]
    assert metric(samples, "tvixmount_read_bytes_total") == sum(len(v) for v in expected.values())
    # Every read and every group of files fetched ahead came through shared memory, not a pipe:
    # a read on its thread's lane (whatever its size), a group in its worker's ring. The rest
    # is the store path's look-up and its four directories.
    shared = metric(samples, "tvixmount_pool_ring_replies_total") + metric(samples,
                                                                           "tvixmount_pool_lane_replies_total")
    assert stats["fetcher"]["requests"] - 5 <= shared <= stats["fetcher"]["requests"]
    # Groups: fewer requests than files (one each before, docs/performance.md; 65-76 of 180 when
    # the fetches keep ahead, 124 once with the reader overtaking them)
    assert stats["fetcher"]["requests"] < len(expected)


def test_a_stat_only_walk_fetches_nothing(mount, small_files):
    name, expected = small_files
    m = mount("--readahead-files", "4", "--small-batches", "0")
    seen = 0
    for dirpath, _dirs, files in os.walk(m.path(name)):
        for f in files:
            os.lstat(os.path.join(dirpath, f))
            seen += 1
    assert seen == len(expected)
    stats = _stats(m.mountpoint)
    assert stats["readahead"]["scheduled"] == 0
    assert stats["ops"].get("read", 0) == 0


def test_readahead_off_reads_everything_itself(mount, small_files):
    name, expected = small_files
    m = mount("--readahead-files", "0", "--small-batches", "0")
    for rel in sorted(expected)[:20]:
        assert (m.path(name) / rel).read_bytes() == expected[rel]
    assert _stats(m.mountpoint)["readahead"]["scheduled"] == 0


# -- trees of the next store paths ---------------------------------------------------------


def test_tree_ahead_queues_the_next_store_paths_once_and_skips_listed_ones():
    fetched: list[bytes] = []
    done = threading.Event()

    def fetch(digest: bytes) -> None:
        fetched.append(digest)
        if len(fetched) == 4:
            done.set()

    ahead = TreeAhead(fetch, ahead=2)
    order = [bytes([i]) * 32 for i in range(6)]
    ahead.set_order(order)
    listed = {order[2]}
    ahead.on_walk(order[0], listed.__contains__)  # -> 1 (2 is listed)
    ahead.on_walk(order[1], listed.__contains__)  # -> 3 (2 listed)
    ahead.on_walk(order[3], listed.__contains__)  # -> 4, 5
    ahead.on_walk(b"\xff" * 32, listed.__contains__)  # not a store path of the listing: nothing
    assert done.wait(5)
    time.sleep(0.05)
    ahead.close()
    assert fetched == [order[1], order[3], order[4], order[5]]  # one thread, in the order queued
    assert ahead.stats() == TreeAheadStats(scheduled=4, fetched=4, failed=0)


def test_a_find_over_the_root_fetches_following_trees_ahead(mount, local_store, tmp_path):
    expected = set()
    for p in range(5):
        root = tmp_path / "src" / f"pkg{p}-1.0"
        for d in range(4):
            (root / f"d{d}").mkdir(parents=True)
            (root / f"d{d}" / "f").write_bytes(b"%d-%d" % (p, d))
        name = Ingester(local_store).import_path(root).store_path.basename
        expected |= {name, f"{name}/d0", f"{name}/d1", f"{name}/d2", f"{name}/d3"}
        expected |= {f"{name}/d{d}/f" for d in range(4)}
    m = mount("--list-root")
    found = set()
    for dirpath, dirs, files in os.walk(m.mountpoint):
        rel = os.path.relpath(dirpath, m.mountpoint)
        found |= {os.path.normpath(os.path.join(rel, x)) for x in dirs + files}
    assert found == expected
    stats = _stats(m.mountpoint)
    assert stats["tree_ahead"]["scheduled"] >= 1
    assert stats["tree_ahead"]["failed"] == 0
