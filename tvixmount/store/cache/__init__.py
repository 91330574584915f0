"""The on-disk blob cache in front of a remote blob service (entry point: service.py)."""
