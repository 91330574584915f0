"""The inode table and listing cache, without FUSE or workers."""

from __future__ import annotations

import blake3

from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.vfs import Vfs

D1 = blake3.blake3(b"one").digest()
D2 = blake3.blake3(b"two").digest()


def test_same_content_same_inode_wherever_it_is_named():
    vfs = Vfs()
    a = vfs.ref(FileNode(b"a", D1, 3))
    b = vfs.ref(FileNode(b"b", D1, 3))
    assert a == b
    assert vfs.ref(SymlinkNode(b"x", b"/t")) == vfs.ref(SymlinkNode(b"y", b"/t"))
    assert vfs.ref(DirectoryNode(b"x", D2, 1)) == vfs.ref(DirectoryNode(b"y", D2, 5))


def test_kinds_and_executable_bit_get_distinct_inodes():
    vfs = Vfs()
    inos = {
        vfs.ref(FileNode(b"a", D1, 3)),
        vfs.ref(FileNode(b"a", D1, 3, executable=True)),
        vfs.ref(FileNode(b"a", D2, 3)),
        vfs.ref(DirectoryNode(b"a", D1, 0)),
        vfs.ref(SymlinkNode(b"a", D1)),
    }
    assert len(inos) == 5
    assert 1 not in inos and 0 not in inos


def test_forget_drops_inode_after_all_lookups_and_number_is_stable():
    vfs = Vfs()
    node = FileNode(b"a", D1, 3)
    ino = vfs.ref(node)
    assert vfs.ref(node) == ino
    vfs.forget(ino, 1)
    assert vfs.node(ino) == node
    vfs.forget(ino, 1)
    assert vfs.node(ino) is None
    assert len(vfs) == 0
    assert vfs.ino_for(node) == ino  # the same content gets its number back
    vfs.forget(ino, 5)  # unknown inode: never raises


def test_readdir_inode_numbers_allocate_nothing():
    vfs = Vfs()
    node = FileNode(b"a", D1, 3)
    ino = vfs.ino_for(node)
    assert len(vfs) == 0
    assert vfs.ref(node) == ino


def test_hash_collision_probes_to_a_free_slot(monkeypatch):
    import tvixmount.vfs as vfs_module

    monkeypatch.setattr(vfs_module, "_home_slot", lambda key: 42)
    vfs = Vfs()
    a = vfs.ref(FileNode(b"a", D1, 3))
    b = vfs.ref(FileNode(b"b", D2, 3))
    assert (a, b) == (42, 43)
    assert vfs.ino_for(FileNode(b"c", D2, 3)) == 43


def test_listing_is_sorted_across_kinds_and_indexed():
    d = Directory(
        directories=(DirectoryNode(b"keep", D2, 1),),
        files=(FileNode(b".keep", D1, 0),),
        symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
    )
    vfs = Vfs()
    listing = vfs.add_listing(d.digest(), d)
    assert [n.name for n in listing.entries] == [b".keep", b"aa", b"keep"]
    assert listing.child(b"aa") == d.symlinks[0]
    assert listing.child(b"nope") is None
    assert vfs.add_listing(d.digest(), Directory()) is listing  # first one wins


def test_listing_cache_is_bounded_by_entries():
    vfs = Vfs(max_listed_entries=10)
    dirs = [Directory(files=tuple(FileNode(b"f%d" % i, D1, 1) for i in range(4 + n))) for n in range(3)]
    for d in dirs:
        vfs.add_listing(d.digest(), d)
    assert vfs.listing(dirs[0].digest()) is None
    assert vfs.listing(dirs[2].digest()) is not None
    assert vfs.stats().listed_entries <= 10


def test_root_names_are_keyed_by_full_name_and_bounded():
    vfs = Vfs(max_root_names=2)
    node = FileNode(b"00000000000000000000000000000000-test", D1, 2)
    vfs.add_root_entry(node.name, node)
    assert vfs.root_entry(b"00000000000000000000000000000000-tes") is None
    assert vfs.root_entry(node.name) == node
    vfs.add_root_entry(b"b", node)
    vfs.add_root_entry(b"c", node)
    assert vfs.stats().root_names == 2
