"""A small store tree for the pool, worker and fetcher tests, and process inspection helpers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.storepath import StorePath
from tvixmount.pool import WorkerPool
from tvixmount.protocol import ops
from tvixmount.store import Store


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


SMALL = b"hello, worker\n"
BIG = bytes(range(256)) * 1200  # 300 KiB: more than one 128 KiB read
LEAF = Directory(files=(FileNode(b"small", b3(SMALL), len(SMALL)),))
ROOT = Directory(
    directories=(DirectoryNode(b"leaf", LEAF.digest(), 1),),
    files=(FileNode(b"big", b3(BIG), len(BIG), executable=True),),
    symlinks=(SymlinkNode(b"link", b"big"),),
)


def store_path(name: str) -> StorePath:
    return StorePath(hashlib.sha256(name.encode()).digest()[:20], name)


DIR_PATH = store_path("tree")
FILE_PATH = store_path("file")
LINK_PATH = store_path("link")
ABSENT_PATH = store_path("absent")


@dataclass(frozen=True)
class Tree:
    dir_node: DirectoryNode
    file_node: FileNode
    link_node: SymlinkNode


def _info(node, path: StorePath) -> PathInfo:
    return PathInfo(node=node, narinfo=NarInfo(nar_size=1, nar_sha256=hashlib.sha256(path.basename.encode())
                                               .digest()))


def populate(store: Store) -> Tree:
    """Put the tree into ``store``: two directories, two blobs, three path infos."""
    store.blobs.put(SMALL)
    store.blobs.put(BIG)
    store.directories.put_many([LEAF, ROOT])
    tree = Tree(
        DirectoryNode(DIR_PATH.basename.encode(), ROOT.digest(), 5),
        FileNode(FILE_PATH.basename.encode(), b3(SMALL), len(SMALL)),
        SymlinkNode(LINK_PATH.basename.encode(), b"/nix/store/elsewhere"),
    )
    store.path_infos.put(_info(tree.dir_node, DIR_PATH))
    store.path_infos.put(_info(tree.file_node, FILE_PATH))
    store.path_infos.put(_info(tree.link_node, LINK_PATH))
    return tree


# -- processes and fds ----------------------------------------------------------------


def open_fds(pid: int | str = "self") -> dict[int, str]:
    """fd -> readlink target for a process (pipes read as 'pipe:[inode]')."""
    out = {}
    base = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(base):
        with contextlib.suppress(OSError):
            out[int(entry)] = os.readlink(base / entry)
    return out


def process_exists(pid: int) -> bool:
    """True while /proc has the pid, zombies included (a zombie means nobody reaped it)."""
    return Path(f"/proc/{pid}").exists()


def replaced(pool: WorkerPool, slot: int, old_pid: int) -> bool:
    """Whether ``slot`` has a ready worker other than ``old_pid`` (a dead worker keeps its
    slot until the collector retires it, so a pid alone proves nothing)."""
    pid = pool.pids()[slot]
    return pid is not None and pid != old_pid and pool.stats().workers[slot].ready


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def stopped_behind_an_earlier_call(pool: WorkerPool, slot: int = 0) -> Iterator[None]:
    """Worker ``slot`` SIGSTOPped while it holds another thread's earlier call.

    A call that times out behind it then does not get it killed (it was busy
    with the earlier call, which still has time). On leaving, the worker runs
    on and the earlier call is answered; its late replies to the calls that
    timed out come after. Set poolstate.STALLED_AFTER high: a worker silent
    that long gets no new calls.
    """
    victim = pool.pids()[slot]
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as executor:
            earlier = executor.submit(pool.call, ops.DIRECTORY_TREE, ROOT.digest(), 1, affinity=slot)
            assert wait_until(lambda: pool.stats().workers[slot].inflight == 1, 5)
            yield
            assert pool.stats().killed == 0
            os.kill(victim, signal.SIGCONT)
            assert earlier.result(timeout=10) == [(ROOT.digest(), ROOT)]
    finally:
        os.kill(victim, signal.SIGCONT)
