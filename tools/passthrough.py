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

``--verify --hop N`` moves that work where tvixmount's shape puts it: the
FUSE threads (``--threads``, default 4, tvixmount's on 2 CPUs) open no
file and read nothing; each read goes over a pipe to one of N worker
processes, chosen by segment (so each segment's digest and the kept
segment live in one process), which preads and verifies and puts the
bytes in a shared buffer for the thread to copy out. One request, one
reply, two wake-ups per read and nothing else: the floor of a verifying
Python filesystem built as the card says, against which tvixmount's own
round trip is measured.
"""

import argparse
import errno
import mmap
import os
import struct
import threading

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
        return self._handle(inode)

    def _handle(self, inode: int) -> int:
        """The file handle of an open for reading: here, an fd of the source file."""
        return os.open(self.paths[inode], os.O_RDONLY)

    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    def release(self, fh: int) -> None:
        os.close(fh)


def check_segment(digests: dict, key: object, data: bytes) -> None:
    """EIO unless ``data`` hashes as segment ``key`` did when first seen (the first hash is its digest)."""
    digest = blake3(data).digest()
    if digest != digests.setdefault(key, digest):
        raise OSError(errno.EIO, "segment does not match its digest")


class Segments:
    """Verified segments of files read by ``pread``: the first hash of a segment is its digest."""

    def __init__(self) -> None:
        self.digests: dict[tuple[object, int], bytes] = {}  # (file, segment index) -> digest
        self.kept: dict[int, tuple[int, bytes]] = {}  # open fd -> (segment index, its verified bytes)

    def read(self, fd: int, file: object, off: int, size: int) -> bytes:
        first, last = off // SEGMENT, (off + size - 1) // SEGMENT
        data = b"".join(self._segment(fd, file, i) for i in range(first, last + 1))
        start = off - first * SEGMENT
        return data[start:start + size]

    def _segment(self, fd: int, file: object, index: int) -> bytes:
        kept = self.kept.get(fd)
        if kept is not None and kept[0] == index:
            return kept[1]
        data = os.pread(fd, SEGMENT, index * SEGMENT)
        check_segment(self.digests, (file, index), data)
        self.kept[fd] = (index, data)
        return data


class VerifyingPassthrough(Passthrough):
    """Serves only bytes of segments whose blake3 digest matched; see the module's docstring."""

    def __init__(self, source: bytes) -> None:
        super().__init__(source)
        self.segments = Segments()
        self.inodes: dict[int, int] = {}  # fh -> st_ino

    def open(self, inode: int, flags: int, ctx=None) -> int:
        fh = super().open(inode, flags, ctx)
        self.inodes[fh] = os.fstat(fh).st_ino
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return self.segments.read(fh, self.inodes[fh], off, size)
        except OSError as exc:
            raise llfuse.FUSEError(exc.errno or errno.EIO) from None

    def release(self, fh: int) -> None:
        self.segments.kept.pop(fh, None)
        self.inodes.pop(fh, None)
        super().release(fh)


REQUEST = struct.Struct("<QII")  # offset, size, length of the path that follows
REPLY = struct.Struct("<q")  # bytes put in the shared buffer, or -errno
LARGEST_READ = 128 * 1024  # libfuse 2's largest read


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = os.read(fd, n - len(out))
        if not got:
            return out
        out += got
    return out


def serve_requests(requests: int, replies: int, shared: mmap.mmap, read) -> None:
    """A worker process's loop: ``read(path, off, size)`` for the FUSE threads until its request pipe ends."""
    while True:
        head = _read_exact(requests, REQUEST.size)
        if len(head) < REQUEST.size:
            return
        off, size, length = REQUEST.unpack(head)
        path = _read_exact(requests, length)
        try:
            data = read(path, off, size)
            shared[:len(data)] = data
            os.write(replies, REPLY.pack(len(data)))
        except OSError as exc:
            os.write(replies, REPLY.pack(-(exc.errno or errno.EIO)))


def _serve(requests: int, replies: int, shared: mmap.mmap) -> None:
    """A worker process of the source tree: verified preads."""
    segments, files = Segments(), {}

    def read(path: bytes, off: int, size: int) -> bytes:
        if path not in files:
            files[path] = os.open(path, os.O_RDONLY)
        return segments.read(files[path], path, off, size)

    serve_requests(requests, replies, shared, read)


class Worker:
    """One worker process, as the FUSE threads see it: its pipes, its shared buffer, its lock.

    ``serve(requests, replies, shared)`` is the child's loop (``_serve``: preads of the source).
    """

    def __init__(self, inherited: list[int], serve=None) -> None:
        self.shared = mmap.mmap(-1, LARGEST_READ + SEGMENT)  # MAP_SHARED: the child's writes are seen
        child_requests, self.requests = os.pipe()
        self.replies, child_replies = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in (*inherited, self.requests, self.replies):  # other workers' pipes: theirs to end
                os.close(fd)
            try:
                (serve or _serve)(child_requests, child_replies, self.shared)
            finally:
                os._exit(0)
        os.close(child_requests)
        os.close(child_replies)
        self.lock = threading.Lock()

    def read(self, path: bytes, off: int, size: int) -> bytes:
        with self.lock:
            os.write(self.requests, REQUEST.pack(off, size, len(path)) + path)
            reply = _read_exact(self.replies, REPLY.size)
            if len(reply) < REPLY.size:
                raise llfuse.FUSEError(errno.EIO)  # the worker died
            (got,) = REPLY.unpack(reply)
            if got < 0:
                raise llfuse.FUSEError(-got)
            return self.shared[:got]


class HopPassthrough(Passthrough):
    """The verifying passthrough with its reads in worker processes; see the module's docstring."""

    def __init__(self, source: bytes, workers: int, serve=None) -> None:
        super().__init__(source)
        self.workers: list[Worker] = []
        for _ in range(workers):
            inherited = [fd for w in self.workers for fd in (w.requests, w.replies)]
            self.workers.append(Worker(inherited, serve))
        self.handles: dict[int, bytes] = {}  # fh -> path; the dispatcher opens nothing
        self.next_fh = 0

    def _handle(self, inode: int) -> int:
        self.next_fh += 1
        self.handles[self.next_fh] = self.paths[inode]
        return self.next_fh

    def _worker(self, path: bytes, off: int) -> Worker:
        """By segment: each segment's digest and its kept copy live in one process."""
        return self.workers[(hash(path) + off // SEGMENT) % len(self.workers)]

    def read(self, fh: int, off: int, size: int) -> bytes:
        path = self.handles[fh]
        worker = self._worker(path, off)
        with llfuse.lock_released:
            return worker.read(path, off, size)

    def release(self, fh: int) -> None:
        self.handles.pop(fh, None)


def parse_floor_args(parser: argparse.ArgumentParser, reads: str) -> argparse.Namespace:
    """--verify, --hop N, --threads N (default resolved), SOURCE and MOUNTPOINT, as every floor takes them.

    ``reads``: what --hop moves, for its help.
    """
    parser.add_argument("--verify", action="store_true",
                        help="serve only blake3-verified 256 KiB segments, as tvixmount must")
    parser.add_argument("--hop", type=int, default=0, metavar="N",
                        help=f"with --verify: {reads} in N worker processes, not in the FUSE threads")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="llfuse threads (default 1; with --hop 4, tvixmount's on 2 CPUs)")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    if args.hop and not args.verify:
        parser.error("--hop is a way to --verify")
    args.threads = args.threads or (4 if args.hop else 1)
    args.source = os.fsencode(os.path.abspath(args.source))
    return args


def mount(ops: Passthrough, mountpoint: str, name: str, threads: int) -> None:
    """Serve ``ops`` on ``mountpoint`` until it is unmounted."""
    llfuse.init(ops, mountpoint, [f"fsname={name}", f"subtype={name}", "ro", "nodev", "nosuid"])
    try:
        llfuse.main(workers=threads)
    finally:
        llfuse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    args = parse_floor_args(parser, "read and verify")
    if args.hop:
        ops: Passthrough = HopPassthrough(args.source, args.hop)  # forks before llfuse starts a thread
    else:
        ops = (VerifyingPassthrough if args.verify else Passthrough)(args.source)
    mount(ops, args.mountpoint, "passthrough", args.threads)
