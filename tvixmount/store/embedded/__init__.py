"""The embedded on-disk store, ``local:///path``: one directory, one sqlite file, a file per blob.

``tvixmount.store`` opens it through ``services.py``. The pieces::

    services.py     the directory and path-info services, and open_*_service
    layout.py       the directory layout and format marker; opening a store (StoreHandle)
    db.py           the sqlite database: a connection pool per store, errors, fork safety
    blobs.py        EmbeddedBlobService: row cache, listings, batches for importers
    blobfile.py     one blob's row (BlobMeta), verified reader and durable writer

The rule: no grpc, and nothing from ``cache/``. What this store shares with
the blob cache is ``store/segments.py`` (how a blob file is hashed and
verified per segment) and ``store/sqlite.py`` (connections, WAL, write
transactions); its own ``__init__`` imports nothing.
"""
