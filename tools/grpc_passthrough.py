#!/usr/bin/env python3
"""tools/grpc_passthrough.py [--verify [--hop N]] --listen ADDR --blobs MAP SOURCE MOUNTPOINT

Why: the floor of a Python FUSE filesystem that reads blobs from a tvix
daemon, beside which tvixmount's gRPC sequential read is measured. The
plain client of tools/bench (one ``Read`` stream per blob, nothing
verified, no FUSE) is what the daemon and the wire allow; this is that
same client behind llfuse, so the difference between the two is what
llfuse, the kernel and the CPUs the mount takes from the daemon cost.

The tree (names, attributes, listings) is tools/passthrough.py's, from
SOURCE. A file that MAP (JSON: path relative to SOURCE -> hex blake3
digest) lists is read from the daemon instead: each file one ``Read``
stream, cut into 256 KiB segments in the order they arrive; a read behind
the last few segments kept starts the stream again (the stream has no
offset). Other files are read from SOURCE.

``--verify`` hashes every segment with blake3 before any of it is served
(the first hash records the digest: tvixmount compares against the
store's, which costs the same). ``--verify --hop N`` moves the streams
and the hashing into N worker processes, a file's stream in one of them,
and the FUSE threads (``--threads``, default 4) only copy out of shared memory: tvixmount's
shape, the floor its round trip is measured against.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import llfuse

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # tvixmount.proto, for the messages

from passthrough import (  # noqa: E402
    SEGMENT,
    HopPassthrough,
    Passthrough,
    check_segment,
    mount,
    parse_floor_args,
    serve_requests,
)

KEPT_SEGMENTS = 8  # per stream: the kernel's readahead can hand in-order reads to threads out of order
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


class BlobStream:
    """One blob's ``Read`` stream as 256 KiB segments, each hashed (``verify``) before it is served."""

    def __init__(self, stub, digest: bytes, verify: bool) -> None:
        self.stub, self.digest, self.verify = stub, digest, verify
        self.digests: dict[int, bytes] = {}  # segment index -> the blake3 of its first arrival
        self._start()

    def _start(self) -> None:
        from tvixmount.proto import rpc_blobstore_pb2 as pb

        self.chunks = iter(self.stub.Read(pb.ReadBlobRequest(digest=self.digest), timeout=600))
        self.pending = bytearray()
        self.next = 0  # index of the next segment the stream will give
        self.kept: OrderedDict[int, bytes] = OrderedDict()

    def read(self, off: int, size: int) -> bytes:
        first, last = off // SEGMENT, (off + size - 1) // SEGMENT
        data = b"".join(self._segment(i) for i in range(first, last + 1))
        start = off - first * SEGMENT
        return data[start:start + size]

    def _segment(self, index: int) -> bytes:
        if index in self.kept:
            return self.kept[index]
        if index < self.next:  # behind what is kept: the stream starts over
            self._start()
        data = b""
        while self.next <= index:
            data = self._take()
            if self.verify:
                check_segment(self.digests, self.next, data)
            self.kept[self.next] = data
            if len(self.kept) > KEPT_SEGMENTS:
                self.kept.popitem(last=False)
            self.next += 1
            if not data:  # past the end
                break
        return data

    def _take(self) -> bytes:
        while len(self.pending) < SEGMENT:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.pending += chunk.data
        data = bytes(self.pending[:SEGMENT])
        del self.pending[:SEGMENT]
        return data


class Blobs:
    """The streams of one process: a channel of its own and a stream per file read."""

    def __init__(self, listen: str, digests: dict[bytes, bytes], verify: bool) -> None:
        import grpc

        from tvixmount.proto import rpc_blobstore_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(listen, options=GRPC_OPTIONS)
        self.stub = pb_grpc.BlobServiceStub(self.channel)
        self.digests, self.verify = digests, verify
        self.streams: dict[bytes, BlobStream] = {}

    def read(self, path: bytes, off: int, size: int) -> bytes:
        stream = self.streams.get(path)
        if stream is None:
            stream = self.streams[path] = BlobStream(self.stub, self.digests[path], self.verify)
        try:
            return stream.read(off, size)
        except OSError:
            raise
        except Exception as exc:  # grpc.RpcError and the like: the daemon failed this read
            print(f"grpc_passthrough: Read of {path!r}: {exc}", file=sys.stderr)
            self.streams.pop(path, None)
            raise OSError(errno.EIO, str(exc)) from None


class GrpcPassthrough(Passthrough):
    """Files in MAP read from the daemon in the FUSE thread (one thread, as tools/passthrough.py)."""

    def __init__(self, source: bytes, listen: str, digests: dict[bytes, bytes], verify: bool) -> None:
        super().__init__(source)
        self.blobs = Blobs(listen, digests, verify)
        self.handles: dict[int, bytes | int] = {}  # fh -> a path read from the daemon, or a source fd
        self.next_fh = 0

    def _handle(self, inode: int) -> int:
        path = self.paths[inode]
        self.next_fh += 1
        self.handles[self.next_fh] = path if path in self.blobs.digests else os.open(path, os.O_RDONLY)
        return self.next_fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        what = self.handles[fh]
        if isinstance(what, int):
            return os.pread(what, size, off)
        try:
            return self.blobs.read(what, off, size)
        except OSError as exc:
            raise llfuse.FUSEError(exc.errno or errno.EIO) from None

    def release(self, fh: int) -> None:
        what = self.handles.pop(fh, None)
        if isinstance(what, int):
            os.close(what)


class GrpcHopPassthrough(HopPassthrough):
    """The daemon's streams and their hashing in worker processes, a file's stream in one of them."""

    def __init__(self, source: bytes, listen: str, digests: dict[bytes, bytes], workers: int) -> None:
        self.digests = digests

        def serve(requests: int, replies: int, shared) -> None:  # in the child: its own channel
            serve_requests(requests, replies, shared, Blobs(listen, digests, verify=True).read)

        super().__init__(source, workers, serve)

    def _worker(self, path: bytes, off: int):
        return self.workers[hash(path) % len(self.workers)]

    def read(self, fh: int, off: int, size: int) -> bytes:
        path = self.handles[fh]
        if path not in self.digests:
            with open(path, "rb", buffering=0) as f:  # not in MAP: not what this floor measures
                return os.pread(f.fileno(), size, off)
        return super().read(fh, off, size)


def load_map(source: bytes, map_path: str) -> dict[bytes, bytes]:
    """MAP's relative paths as the absolute source paths the passthrough's inodes carry."""
    with open(map_path, encoding="utf-8") as f:
        entries = json.load(f)
    return {os.path.join(source, os.fsencode(rel)): bytes.fromhex(digest) for rel, digest in entries.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--listen", required=True, help="the daemon's gRPC address (host:port, unix:PATH)")
    parser.add_argument("--blobs", required=True, metavar="MAP",
                        help="JSON: path relative to SOURCE -> hex blake3 digest of the blob to read for it")
    args = parse_floor_args(parser, "the streams and the hashing")
    digests = load_map(args.source, args.blobs)
    if args.hop:
        ops: Passthrough = GrpcHopPassthrough(args.source, args.listen, digests, args.hop)  # forks first
    else:
        ops = GrpcPassthrough(args.source, args.listen, digests, args.verify)
    mount(ops, args.mountpoint, "grpc-passthrough", args.threads)


if __name__ == "__main__":
    main()
