#!/usr/bin/env python3
"""tools/passthrough.py [--verify] SOURCE MOUNTPOINT: a bare, read-only llfuse passthrough of SOURCE.

Why: the floor of a Python FUSE filesystem. Every handler is one system
call on the source tree, one thread serves every request, so what it costs
per request is what llfuse and the kernel cost. tools/bench mounts it beside
tvixmount: whatever tvixmount spends above it is ours to take out.

``--verify`` adds the one piece of work tvixmount may not leave out: every
byte served has been hashed with blake3 as part of its whole 256 KiB
segment (the store's unit of verification) and matched against the
segment's digest. The first hash of a segment records the digest (a
stand-in for the store's; it costs the same as a comparison), a changed
source byte afterwards is EIO. Each open file keeps its last verified
segment, as a tvixmount reader does, so an in-order reader hashes each
segment once and a random reader about once per read: the floor of a
verifying Python filesystem with no cache beyond that.
"""

import argparse
import errno
import os

import llfuse
from blake3 import blake3

FOREVER = 365 * 24 * 3600.0  # as tvixmount: the tree does not change under the mount
SEGMENT = 256 * 1024  # tvixmount.store.segments.SEGMENT; not imported, so that this file stands alone


class Passthrough(llfuse.Operations):
    def __init__(self, source: bytes) -> None:
        super().__init__()
        self.root_ino = os.lstat(source).st_ino
        self.paths = {llfuse.ROOT_INODE: source}  # inode -> a path in SOURCE (the source's st_ino)

    def _attr(self, path: bytes) -> llfuse.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise llfuse.FUSEError(exc.errno) from None
        a = llfuse.EntryAttributes()
        a.st_ino = llfuse.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino
        self.paths[a.st_ino] = path
        for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                    "st_ctime_ns", "st_blocks"):
            setattr(a, key, getattr(st, key))
        a.st_blksize = 128 * 1024
        a.entry_timeout = a.attr_timeout = FOREVER
        return a

    def lookup(self, parent: int, name: bytes, ctx=None) -> llfuse.EntryAttributes:
        return self._attr(os.path.join(self.paths[parent], name))

    def getattr(self, inode: int, ctx=None) -> llfuse.EntryAttributes:
        return self._attr(self.paths[inode])

    def readlink(self, inode: int, ctx=None) -> bytes:
        return os.readlink(self.paths[inode])

    def opendir(self, inode: int, ctx=None) -> int:
        return inode

    def readdir(self, inode: int, off: int):
        names = sorted(os.listdir(self.paths[inode]))
        for i in range(off, len(names)):  # offsets are index + 1 into the sorted listing
            yield names[i], self._attr(os.path.join(self.paths[inode], names[i])), i + 1

    def open(self, inode: int, flags: int, ctx=None) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise llfuse.FUSEError(errno.EROFS)
        return os.open(self.paths[inode], os.O_RDONLY)

    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    def release(self, fh: int) -> None:
        os.close(fh)


class VerifyingPassthrough(Passthrough):
    """Serves only bytes of segments whose blake3 digest matched; see the module's docstring."""

    def __init__(self, source: bytes) -> None:
        super().__init__(source)
        self.digests: dict[tuple[int, int], bytes] = {}  # (st_ino, segment index) -> digest
        self.kept: dict[int, tuple[int, bytes]] = {}  # fh -> (segment index, its verified bytes)
        self.inodes: dict[int, int] = {}  # fh -> st_ino

    def open(self, inode: int, flags: int, ctx=None) -> int:
        fh = super().open(inode, flags, ctx)
        self.inodes[fh] = os.fstat(fh).st_ino
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        first, last = off // SEGMENT, (off + size - 1) // SEGMENT
        data = b"".join(self._segment(fh, i) for i in range(first, last + 1))
        start = off - first * SEGMENT
        return data[start:start + size]

    def _segment(self, fh: int, index: int) -> bytes:
        kept = self.kept.get(fh)
        if kept is not None and kept[0] == index:
            return kept[1]
        data = os.pread(fh, SEGMENT, index * SEGMENT)
        digest = blake3(data).digest()
        known = self.digests.setdefault((self.inodes[fh], index), digest)
        if digest != known:
            raise llfuse.FUSEError(errno.EIO)
        self.kept[fh] = (index, data)
        return data

    def release(self, fh: int) -> None:
        self.kept.pop(fh, None)
        self.inodes.pop(fh, None)
        super().release(fh)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--verify", action="store_true",
                        help="serve only blake3-verified 256 KiB segments, as tvixmount must")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    ops = (VerifyingPassthrough if args.verify else Passthrough)(os.fsencode(os.path.abspath(args.source)))
    llfuse.init(ops, args.mountpoint, ["fsname=passthrough", "subtype=passthrough", "ro", "nodev", "nosuid"])
    try:
        llfuse.main(workers=1)
    finally:
        llfuse.close()
