"""The gRPC backend: a tvix-store daemon (ours or tvix's) as the three services.

``tvixmount.store`` opens ``grpc+http://``, ``grpc+https://`` and
``grpc+unix://`` URLs through ``client.py``, by module name. The pieces::

    client.py       open_blob_service & co.: an Endpoint per service
    channel.py      Endpoint: the channel (made per process), deadlines, reconnects, the stream watchdog
    status.py       grpc status codes as tvixmount errors
    deadline.py     a request's deadline as the patience of its calls (imports no grpc)
    wire.py         names, limits and BlobChunk framing shared with the daemon (imports no grpc)
    blobs.py        GrpcBlobService: Stat, whole-blob fetches and their retries
    reader.py       ChunkedBlobReader: verified chunks, runs, read-ahead
    runs.py         one Read of a whole chunked blob, cut into verified chunks
    copies.py       verified local copies of whole blobs, and the spool they are made in
    writer.py       GrpcBlobWriter: one Put stream
    directories.py  GrpcDirectoryService
    pathinfo.py     GrpcPathInfoService

The rule: this package may import grpc, and nothing else under
``tvixmount.store`` does. Its own ``__init__`` imports nothing, so that the
daemon (``tvixmount.server``) can import ``wire.py``, and a worker of any
store ``deadline.py``, without loading the client.
"""
