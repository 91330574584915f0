"""THE dispatcher<->worker wire; both sides import this package and nothing else speaks it.

One module per concern:

* ``framing``  bytes on a pipe: msgpack values in length-prefixed frames,
  ``FrameReader``/``write_frame``, ``RingRef``, ``ProtocolError``;
* ``messages`` what travels in a frame: requests, replies, the worker's
  hello, and the pool <-> zygote control datagrams;
* ``ops``      each op declared once (``Op[R]``: name, argument types,
  result codec) and the table of handlers that answer them;
* ``batch``    ``blob_batch``'s request and packed reply;
* ``readwire`` ``blob_read``'s request and ring reply as fixed structs (the
  read path's lean wire), told from msgpack frames by their first byte.

One request, end to end::

    FUSE thread ─ Fetcher.path_info ─ pool.call(ops.PATH_INFO, digest) ─ encode_request ─> request pipe ─┐
                                                                                                        │
    worker:  FrameReader.read ─ decode_request ─ handlers.find("path_info", args) ─ handler(ctx, *args)
                                                              │ R (or a RingRef), or TvixError
             write_frame(encode_reply_parts(op.encode(R)) | encode_error) ▼ ──> reply pipe ──────────┐
                                                                                                        │
    collector thread:  FrameReader.read ─ RingRef -> bytes ─ decode_reply ─ completes the waiting call
    FUSE thread:       pool.call returns ops.PATH_INFO.decode(result): a Node or None

Bulk bytes: a ``blob_read`` reply from a pool worker normally carries a
``RingRef`` naming where the worker put the verified bytes in its
shared-memory ring (shmring.py); the collector copies them out before
anyone sees the reply, so callers always get bytes. Without room in the
ring, or without a ring (``python -m workers``, LocalFetcher), the bytes
travel inline.

Invariants:

* Decoding untrusted bytes raises ``ProtocolError`` and nothing else; the
  dispatcher answers it by killing the sender, never by dying itself.
* Results are plain msgpack types on the wire and an op's ``R`` on either
  end; the op object holds the one encoder/decoder pair.
"""
