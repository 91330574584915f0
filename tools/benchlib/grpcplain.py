"""The gRPC baseline: a plain client streaming blobs from the daemon, no FUSE in between.

The target "tvixmount over gRPC reads at >= 0.7x of what the network and
daemon allow" needs that allowance measured on the same machine and daemon:
this is the least work a client can do (one ``Read(digest)`` stream per
blob, summing the sizes of the chunks, nothing verified or kept).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def stream_blobs(listen: str, digests: Sequence[bytes], sizes: Sequence[int]) -> dict[str, float]:
    """Read every blob once over one channel; MB/s over all of them."""
    import grpc

    from tvixmount.proto import rpc_blobstore_pb2 as pb
    from tvixmount.proto import rpc_blobstore_pb2_grpc as pb_grpc

    total = 0
    with grpc.insecure_channel(listen, options=GRPC_OPTIONS) as channel:
        stub = pb_grpc.BlobServiceStub(channel)
        start = time.perf_counter()
        for digest, size in zip(digests, sizes, strict=True):
            got = 0
            for chunk in stub.Read(pb.ReadBlobRequest(digest=digest), timeout=600):
                got += len(chunk.data)
            if got != size:
                raise RuntimeError(f"Read(b3:{digest.hex()}) streamed {got} bytes, expected {size}")
            total += got
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "bytes": total, "mb_s": total / elapsed / 1e6}
