"""The on-disk blob cache, kept in front of a remote blob service and shared by the workers.

``tvixmount.store.open_store`` wraps the blob service in it when
``StoreUrls.blob_cache`` asks for one. The pieces::

    config.py       BlobCacheConfig (directory, size) and the --cache-dir/--cache-size flags
    service.py      CachingBlobService: hits, fills, eviction, and the cache's readers
    index.py        the cache directory and its sqlite index, shared by every process

The rule: no grpc, and nothing from ``embedded/``. What the cache shares
with the embedded store is ``store/segments.py`` (how a blob file is
hashed and verified per segment) and ``store/sqlite.py`` (connections,
WAL, write transactions). ``config.py`` imports neither sqlite nor the
cache, and this ``__init__`` imports nothing, so naming a cache in
``StoreUrls`` loads no cache.
"""
