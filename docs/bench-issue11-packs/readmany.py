"""read_many over every blob of <= 64 KiB of a store, in batches of 64 in directory walk order.

Run from a tree's root (its tvixmount): python readmany.py STORE_DIR. Prints blobs, batches, seconds.
"""
import sys
import time

from tvixmount.castore.nodes import DirectoryNode
from tvixmount.store import StoreUrls, open_store

store_dir = sys.argv[1]
with open_store(StoreUrls.embedded(store_dir)) as store:
    wanted = []
    for info in store.path_infos.list():
        node = info.node
        if not isinstance(node, DirectoryNode):
            continue
        for _, directory in store.directories.get_tree(node.digest):
            wanted += [(f.digest, f.size) for f in directory.files if f.size <= 65536]
    start = time.monotonic()
    batches = 0
    for i in range(0, len(wanted), 64):
        out = store.blobs.read_many(wanted[i:i + 64])
        assert all(isinstance(b, bytes) for b in out)
        batches += 1
    print(f"{len(wanted)} blobs in {batches} batches: {time.monotonic() - start:.2f} s")
