"""tvixmount: a read-only FUSE filesystem over a tvix store, in Python."""

__version__ = "0.1.0"
