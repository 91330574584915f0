"""Worker processes: serve store requests from the dispatcher over a pipe pair.

A worker holds a store connection and caches, never filesystem state, so
the pool can kill and replace one at any time. ``loop.serve`` is the whole
life of a worker; ``handlers`` has one function per op. Workers are forked
by tvixmount.zygote; ``python -m workers`` runs one on stdin/stdout.
"""
