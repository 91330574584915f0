"""What our gRPC client and our daemon agree on: service and method names, limits, BlobChunk framing.

The daemon (``tvixmount.server``) imports this module and nothing else of
the client: it must not load the client's channel, readers and writers.
So this module imports no grpc and none of its siblings.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from ...errors import InvalidData
from ...proto import rpc_blobstore_pb2 as pb

BLOB_SERVICE = "tvix.castore.v1.BlobService"
DIRECTORY_SERVICE = "tvix.castore.v1.DirectoryService"
PATH_INFO_SERVICE = "tvix.store.v1.PathInfoService"
# tvixmount's own extension (protos/tvixmount/...), served by our daemon only; not tvix's.
BLOB_BATCH_SERVICE = "tvixmount.castore.v1.BlobBatchService"

BLOB_STAT = f"/{BLOB_SERVICE}/Stat"
BLOB_READ = f"/{BLOB_SERVICE}/Read"
BLOB_PUT = f"/{BLOB_SERVICE}/Put"
DIRECTORY_GET = f"/{DIRECTORY_SERVICE}/Get"
DIRECTORY_PUT = f"/{DIRECTORY_SERVICE}/Put"
PATH_INFO_GET = f"/{PATH_INFO_SERVICE}/Get"
PATH_INFO_PUT = f"/{PATH_INFO_SERVICE}/Put"
PATH_INFO_CALCULATE_NAR = f"/{PATH_INFO_SERVICE}/CalculateNAR"
PATH_INFO_LIST = f"/{PATH_INFO_SERVICE}/List"
BLOB_BATCH_READ = f"/{BLOB_BATCH_SERVICE}/Read"
BLOB_BATCH_MAX = 1024  # digests per BlobBatchService/Read; more is INVALID_ARGUMENT

MiB = 1024 * 1024
# Large enough for a Directory with ~500k entries; tonic's default is 4 MiB.
MAX_MESSAGE = 64 * MiB
# What a Put sends per message (docs/protocol.md, 'Blob service': well below 4 MiB).
PUT_MESSAGE = 1 * MiB

# Trailing metadata our daemon sets on errors: the tvixmount error code.
ERROR_CODE_KEY = "tvix-error-code"


def encode_blob_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """``BlobChunk{data}`` encoded with one copy (field 1, length-delimited: tag 0x0a).

    The protobuf runtime copies the payload twice (into the message, then
    out); at hundreds of MB/s that shows.
    """
    length = len(data)
    header = bytearray(b"\x0a")
    while True:
        low, length = length & 0x7F, length >> 7
        header.append(low | (0x80 if length else 0))
        if not length:
            break
    return b"".join((header, data))


def blob_chunk_data(raw: bytes, what: str, server: str) -> bytes | memoryview:
    """The payload of one ``BlobChunk``: a view into ``raw`` when it is just field 1, else decoded.

    The view saves copying every received byte once more (what protobuf's
    decoding does); anything other than a lone field 1 goes to protobuf.
    """
    if raw[:1] == b"\x0a":
        length = shift = 0
        position = 1
        while position < len(raw) and position <= 10:
            byte = raw[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if position + length == len(raw):
                    return memoryview(raw)[position:]
                break
    try:
        return pb.BlobChunk.FromString(raw).data
    except DecodeError as exc:
        raise InvalidData(f"{what}: {server} sent a message that is not a BlobChunk: {exc}") from None
