"""When a silent worker counts as hung: the one number the pool and the stores' patience share.

A request holds a FUSE thread until it is answered. A worker silent for
``HANG_FRACTION`` of a request's budget is declared hung, killed, and its
requests re-sent: waiting for the deadline itself could starve the whole
mount, and the re-sent request still has the rest of its budget to succeed
in. The pool also calls a worker hung by this rule when a call times out
on it (poolstate.py). A store call waiting for a server that is coming
back (store/grpc/deadline.py) must give up before this point, or the pool
would take the waiting worker for a hung one.

This module imports nothing: the pool and every store backend may use it.
"""

from __future__ import annotations

HANG_FRACTION = 0.5
