#!/usr/bin/env python3
"""tools/passthrough.py SOURCE MOUNTPOINT: a bare, read-only llfuse passthrough of SOURCE.

Why: the floor of a Python FUSE filesystem. Every handler is one system
call on the source tree, one thread serves every request, so what it costs
per request is what llfuse and the kernel cost. tools/bench mounts it beside
tvixmount: whatever tvixmount spends above it is ours to take out.
"""

import errno
import os
import sys

import llfuse

FOREVER = 365 * 24 * 3600.0  # as tvixmount: the tree does not change under the mount


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


if __name__ == "__main__":
    source, mountpoint = sys.argv[1:3]
    llfuse.init(Passthrough(os.fsencode(os.path.abspath(source))), mountpoint,
                ["fsname=passthrough", "subtype=passthrough", "ro", "nodev", "nosuid"])
    try:
        llfuse.main(workers=1)
    finally:
        llfuse.close()
