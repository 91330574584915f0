"""Small files in batches: the blob_batch codec, and what SmallBlobs queues, caches and serves."""

from __future__ import annotations

import errno
import threading
import time

import blake3
import pytest

from tests.fuse_inprocess import CTX, errno_of, wait_released
from tests.fuse_tree import SMALLS, TREE, rot
from tvixmount import smallblobs
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode
from tvixmount.errors import InvalidArgument
from tvixmount.protocol import batch
from tvixmount.protocol.framing import ProtocolError
from tvixmount.smallblobs import SmallBlobs
from tvixmount.vfs import Listing

# -- the codec ------------------------------------------------------------------------------


def test_request_round_trips_and_is_bounded():
    wanted = [(bytes([i]) * 32, 100 * i) for i in range(5)]
    assert batch.decode_request(*batch.encode_request(wanted)) == wanted
    with pytest.raises(InvalidArgument, match="digests"):
        batch.decode_request(b"x" * 31, [1])
    with pytest.raises(InvalidArgument, match="digests"):
        batch.decode_request(b"", [])
    too_many = [(b"d" * 32, 1)] * (batch.MAX_FILES + 1)
    with pytest.raises(InvalidArgument):
        batch.decode_request(*batch.encode_request(too_many))
    one_whole = [(b"d" * 32, batch.MAX_BYTES)]  # a blob of up to 1 MiB is a batch alone (readahead.py)
    assert batch.decode_request(*batch.encode_request(one_whole)) == one_whole
    with pytest.raises(InvalidArgument, match="sizes"):
        batch.decode_request(b"d" * 32, [batch.MAX_BYTES + 1])
    with pytest.raises(InvalidArgument, match="sizes"):
        batch.decode_request(b"d" * 32 * 20, [64 << 10] * 20)  # 1.25 MiB together
    with pytest.raises(InvalidArgument, match="sizes"):
        batch.decode_request(b"d" * 32, [-1])
    with pytest.raises(InvalidArgument, match="sizes"):
        batch.decode_request(b"d" * 32, [True])


def test_reply_round_trips_with_failed_entries():
    blobs = [b"abc", None, b"", b"x" * 5000, None]
    packed = batch.pack_reply(blobs)
    assert len(packed) == batch.reply_length([3, -1, 0, 5000, -1])
    assert batch.decode_reply(packed) == blobs


@pytest.mark.parametrize("wire", [
    "text",
    b"",
    b"\x01\x00\x00\x00",  # a count and no lengths
    batch.pack_reply([b"abc"])[:-1],  # one byte short
    batch.pack_reply([b"abc"]) + b"!",  # one byte too many
    b"\x01\x00\x00\x00" + (-2).to_bytes(8, "little", signed=True),
    b"\xff\xff\xff\xff",
])
def test_a_reply_that_does_not_add_up_is_a_protocol_error(wire):
    with pytest.raises(ProtocolError):
        batch.decode_reply(wire)


# -- queueing and the cache -----------------------------------------------------------------


def _file(name: bytes, size: int) -> FileNode:
    return FileNode(name, blake3.blake3(name).digest(), size)


class _Tree:
    """A directory ``top`` holding a, sub/ (s1, s2), b, big, and a second directory ``other``."""

    def __init__(self) -> None:
        sub = Directory(files=(_file(b"s1", 10), _file(b"s2", 20)))
        top = Directory(directories=(DirectoryNode(b"m-sub", sub.digest(), 2),),
                        files=(_file(b"a", 1), _file(b"b", 2), _file(b"big", smallblobs.MAX_FILE + 1),
                               _file(b"z", 3)))
        self.listings = {top.digest(): Listing.of(top), sub.digest(): Listing.of(sub)}
        self.top, self.sub = top.digest(), sub.digest()

    def node(self, digest: bytes, name: bytes) -> FileNode:
        node = self.listings[digest].child(name)
        assert isinstance(node, FileNode)
        return node


class _Batches:
    def __init__(self, broken: frozenset[bytes] = frozenset()) -> None:
        self.asked: list[list[bytes]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.broken = broken

    def __call__(self, wanted: list[tuple[bytes, int]]) -> list[bytes | None]:
        self.asked.append([d for d, _ in wanted])
        assert self.gate.wait(5)
        return [None if d in self.broken else d[:1] * size for d, size in wanted]


def _settle(small: SmallBlobs) -> None:
    deadline = time.monotonic() + 5
    while (small.stats().in_flight or small.stats().queued) and time.monotonic() < deadline:
        time.sleep(0.005)


def _open(small: SmallBlobs, tree: _Tree, where: bytes, name: bytes, ino: int = 7) -> FileNode:
    node = tree.node(where, name)
    small.note_lookup(ino, node, where, tree.listings[where].index[name])
    small.on_open(ino, node)
    return node


def test_an_open_queues_its_directory_in_tree_order_once_and_reads_take_the_bytes():
    tree, batches = _Tree(), _Batches()
    small = SmallBlobs(batches, tree.listings.get, in_flight=1)
    a = _open(small, tree, tree.top, b"a")
    _settle(small)
    # Readdir order (by name): a, b, big (not small), then into m-sub where it appears, then z.
    names = [b"a", b"b", b"s1", b"s2", b"z"]
    assert batches.asked == [[tree.node(tree.top if n in (b"a", b"b", b"z") else tree.sub, n).digest
                              for n in names]]
    assert small.take(a, 0, 1) == a.digest[:1]
    assert small.take(a, 0, 1) is None  # served to its end: gone (the page cache has it)
    _open(small, tree, tree.top, b"b", ino=8)
    _open(small, tree, tree.sub, b"s1", ino=9)  # queued with top already
    _settle(small)
    assert len(batches.asked) == 1
    stats = small.stats()
    assert (stats.batches, stats.fetched, stats.hits, stats.cached_files) == (1, 5, 1, 4)
    small.close()


def test_a_walk_waits_at_a_directory_not_listed_yet_and_goes_on_once_it_is():
    tree, batches = _Tree(), _Batches()
    listed = {tree.top: tree.listings[tree.top]}  # m-sub's listing is not fetched yet
    wanted: list[bytes] = []
    small = SmallBlobs(batches, listed.get, in_flight=1, want_listing=wanted.append)
    _open(small, tree, tree.top, b"a")
    _settle(small)
    a, b, z = (tree.node(tree.top, name).digest for name in (b"a", b"b", b"z"))
    assert batches.asked == [[a, b]] and wanted == [tree.sub]  # stopped at m-sub, not past it
    listed[tree.sub] = tree.listings[tree.sub]
    small.on_listed(tree.top)  # no walk waits there: nothing happens
    small.on_listed(tree.sub)
    _settle(small)
    s1, s2 = (tree.node(tree.sub, name).digest for name in (b"s1", b"s2"))
    assert batches.asked[1:] == [[s1, s2, z]]  # m-sub's files, then on in top after it
    _open(small, tree, tree.sub, b"s2", ino=9)  # m-sub was queued with the walk
    _settle(small)
    assert len(batches.asked) == 2
    small.close()


def test_a_file_read_whole_is_not_fetched_again():
    tree, batches = _Tree(), _Batches()
    small = SmallBlobs(batches, tree.listings.get, in_flight=1)
    s1, s2 = tree.node(tree.sub, b"s1"), tree.node(tree.sub, b"s2")
    small.missed(s1)  # s1's reader asked a worker itself (its inode's pages are cached now)
    _open(small, tree, tree.top, b"a")
    _settle(small)
    assert len(batches.asked) == 1 and s1.digest not in batches.asked[0] and s2.digest in batches.asked[0]
    assert small.take(s2, 0, 4096) == s2.digest[:1] * 20  # read whole: the entry goes
    with small._lock:  # queued again (another walk meeting the same inode): no batch for it
        small._queue.append(s2)
        small._pump()
    assert len(batches.asked) == 1
    small.close()


def _walked_tree() -> tuple[dict[bytes, Listing], bytes, dict[bytes, bytes]]:
    """``r`` holding d1/ (f1, f2), d2/ (f3), a file d3 and d4/ (f4), in that readdir order;
    the listings by digest, r's digest, and each directory's digest by name."""
    dirs = {b"d1": Directory(files=(_file(b"f1", 1), _file(b"f2", 2))),
            b"d2": Directory(files=(_file(b"f3", 3),)), b"d4": Directory(files=(_file(b"f4", 4),))}
    r = Directory(directories=tuple(DirectoryNode(n, d.digest(), 1) for n, d in dirs.items()),
                  files=(_file(b"d3", 5),))
    listings = {d.digest(): Listing.of(d) for d in (r, *dirs.values())}
    return listings, r.digest(), {n: d.digest() for n, d in dirs.items()}


def _opened(small: SmallBlobs, listings: dict[bytes, Listing], where: bytes, name: bytes,
            ino: int) -> FileNode:
    node = listings[where].child(name)
    assert isinstance(node, FileNode)
    small.note_lookup(ino, node, where, listings[where].index[name])
    small.on_open(ino, node)
    return node


def test_queueing_goes_on_with_what_follows_the_directory_in_its_parent():
    listings, r, dirs = _walked_tree()
    listed = {r: listings[r]}  # r's directories not listed yet
    batches = _Batches()
    small = SmallBlobs(batches, listed.get, in_flight=1)
    d3 = _opened(small, listed, r, b"d3", 1)  # r queued: its own file only
    _settle(small)
    assert batches.asked == [[d3.digest]]
    listed.update(listings)
    for name, digest in dirs.items():
        small.places.note(digest, r, listings[r].index[name])
    f1 = _opened(small, listings, dirs[b"d1"], b"f1", 2)  # d1, then on in r after d1: d2, d4
    _settle(small)
    f2, f3, f4 = (listings[dirs[d]].child(n) for d, n in ((b"d1", b"f2"), (b"d2", b"f3"), (b"d4", b"f4")))
    assert batches.asked[1:] == [[f1.digest, f2.digest, f3.digest, f4.digest]]  # not d3 again
    _opened(small, listings, dirs[b"d2"], b"f3", 3)  # queued with d1's walk already
    _settle(small)
    assert len(batches.asked) == 2
    small.close()


def test_queueing_past_a_directory_takes_its_parents_files_after_it_if_the_parent_was_not_queued():
    listings, r, dirs = _walked_tree()
    batches = _Batches()
    small = SmallBlobs(batches, listings.get, in_flight=1)
    small.places.note(dirs[b"d2"], r, listings[r].index[b"d2"])
    f3 = _opened(small, listings, dirs[b"d2"], b"f3", 1)  # d2, then r after d2: d3 and d4, not d1
    _settle(small)
    d3, f4 = listings[r].child(b"d3"), listings[dirs[b"d4"]].child(b"f4")
    assert batches.asked == [[f3.digest, d3.digest, f4.digest]]
    small.close()


def test_a_blob_the_batch_could_not_bring_is_a_miss_and_the_others_are_served():
    tree = _Tree()
    bad = tree.node(tree.sub, b"s1")
    small = SmallBlobs(_Batches(frozenset({bad.digest})), tree.listings.get, in_flight=2)
    _open(small, tree, tree.top, b"a")
    _settle(small)
    assert small.take(bad, 0, 10) is None
    s2 = tree.node(tree.sub, b"s2")
    assert small.take(s2, 0, 20) == s2.digest[:1] * 20
    assert small.stats().failed == 1
    small.close()


def test_a_read_waits_for_its_batch_in_flight():
    tree, batches = _Tree(), _Batches()
    batches.gate.clear()
    small = SmallBlobs(batches, tree.listings.get, in_flight=1)
    a = _open(small, tree, tree.top, b"a")
    event = small.waiter(a)
    assert event is not None and not event.is_set()
    batches.gate.set()
    assert event.wait(5)
    assert small.take(a, 0, 1) == a.digest[:1]
    assert small.stats().waited == 1
    small.close()


def test_the_cache_is_bounded_and_fetching_follows_the_reader():
    files = tuple(_file(b"f%04d" % i, 1000) for i in range(300))
    top = Directory(files=files)
    listings = {top.digest(): Listing.of(top)}
    batches = _Batches()
    small = SmallBlobs(batches, listings.get, in_flight=2, capacity=40_000)
    small.note_lookup(1, files[0], top.digest(), 0)
    small.on_open(1, files[0])
    _settle_in_flight(small)
    stats = small.stats()
    # Unread plus coming bytes stay within half the capacity: 20 files, then it waits for the reader.
    assert (stats.fetched, stats.cached_bytes, stats.queued) == (20, 20_000, 280)
    for node in files[:4]:  # room for 4 files: less than an eighth of the cache, no batch yet
        assert small.take(node, 0, 1000) is not None
    assert small.stats().batches == stats.batches and len(batches.asked[-1]) > 4
    assert small.take(files[4], 0, 1000) is not None
    _settle_in_flight(small)
    assert small.stats().batches == stats.batches + 1 and len(batches.asked[-1]) == 5
    most = 0
    for node in files[5:]:
        event = small.waiter(node)
        if event is not None:
            assert event.wait(5)
        assert small.take(node, 0, 1000) == node.digest[:1] * 1000
        most = max(most, small.stats().cached_bytes)
    _settle(small)
    stats = small.stats()
    assert stats.hits == 300 and stats.evicted == 0 and stats.batches <= 2 + 280 // 5
    assert most <= 20_000 and stats.cached_bytes == 0
    small.close()


def _settle_in_flight(small: SmallBlobs) -> None:
    deadline = time.monotonic() + 5
    while small.stats().in_flight and time.monotonic() < deadline:
        time.sleep(0.005)


def test_off_queues_nothing():
    tree, batches = _Tree(), _Batches()
    small = SmallBlobs(batches, tree.listings.get, in_flight=0)
    a = _open(small, tree, tree.top, b"a")
    assert small.take(a, 0, 1) is None and batches.asked == []


# -- through the FUSE operations, over memory:// ---------------------------------------------



def test_fuse_reads_come_from_batches_and_a_rotten_blob_fails_alone(fuse):
    """The tree's small files come in batches, the walk waiting at each directory that cannot be
    listed (mismatch, missing, slashed) until its background fetch failed; the rotten and the
    missing blob are EIO, each on its own read (asked alone after a batch left them out), and
    every other file is right."""
    rot(True)
    f = fuse(small_batches=2, expect_errors=True)
    tree = f.lookup(TREE.basename).st_ino
    assert errno_of(lambda: f.read_all(f.ops.lookup(tree, b"gone", CTX).st_ino)) == errno.EIO
    # the walk from "gone" goes on past the three broken directories, as their fetches fail
    assert wait_released(lambda: f.ops.stats().tree_ahead.failed == 3 and not f.ops.small._stops
                         and not f.ops.small.stats().in_flight)
    for i, data in enumerate(SMALLS):
        assert f.read_all(f.ops.lookup(tree, b"s%d" % i, CTX).st_ino) == data
    assert errno_of(lambda: f.read_all(f.ops.lookup(tree, b"rotten", CTX).st_ino)) == errno.EIO
    stats = f.ops.stats().small_blobs
    assert stats.failed == 3  # rotten, gone, and liar (2 bytes, not 10)
    assert stats.hits >= len(SMALLS) and stats.misses == 2  # gone and rotten, asked alone
    assert f.fetcher.calls["blob_batch"] == stats.batches >= 2
    assert f.ops.stats().tree_ahead.scheduled == 3  # mismatch, missing, slashed: asked for once each
    assert f.fetcher.calls["blob_read"] == 2  # the rotten and the missing one, asked alone
    assert f.fetcher.with_lock_held == []
