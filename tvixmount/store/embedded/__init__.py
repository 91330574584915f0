"""The embedded on-disk store, ``local:///path`` (entry point: services.py)."""
