"""Helpers for tools/bench.py and tools/loadtest.py.

Kept out of the tvixmount package on purpose: benchmarks drive the mount
from the outside (processes, mounts, page cache), exactly as an operator
would, and must never become a dependency of the filesystem itself.
"""
