"""The gRPC store backend: a tvix-store daemon as the three services (entry point: client.py)."""
