"""Copies out of shared memory that let the other threads run meanwhile.

Why: a FUSE read served from the segment arena is one copy of up to 128 KiB.
``memoryview.tobytes()`` makes it holding the GIL, ~4 µs, and with four llfuse
threads on two CPUs every thread that wants the GIL in that time sleeps and
must be woken: tools/readpath_profile.py counted 3.1 voluntary context
switches per O_DIRECT read. ctypes calls a foreign function with the GIL
released, so the same copy made by ``ctypes.memmove`` into a new bytes object
lets llfuse's other threads take their requests during it: 2.0 switches per
read, and about 10 % more O_DIRECT reads from the arena
(docs/performance.md, "The arena copy without the GIL (stop 31)"). With no
more threads than CPUs nobody waits for the GIL, the release and the ctypes
call are pure cost, and segcache.py copies with ``tobytes()``.

The result is an ordinary immutable ``bytes``, as ``tobytes()`` gives: it is
filled before anyone else can see it, the way C code fills the buffer of
``PyBytes_FromStringAndSize(NULL, n)``, and nothing holds on to the source.
"""

from __future__ import annotations

import ctypes
from typing import Any

# PyBytes_FromStringAndSize(NULL, n): a bytes object whose n bytes are not yet
# written (bytes(n) would zero them first, with the GIL held). ctypes.pythonapi
# keeps the GIL for the call, as the C API needs; ctypes drops the extra
# reference its py_object result conversion takes.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


class Pinned:
    """The address of a writable buffer's memory, valid for as long as this object lives.

    It holds an export of the buffer, so an ``mmap`` cannot be unmapped under
    a copy that began before its owner's ``close()``: ``mmap.close()`` refuses
    (BufferError) until the pin is collected with its owner.
    """

    def __init__(self, buffer: Any) -> None:
        self._export = ctypes.c_char.from_buffer(buffer)
        self.address = ctypes.addressof(self._export)


def copy_out(address: int, length: int) -> bytes:
    """``length`` bytes from ``address``, copied with the GIL released.

    The caller vouches that the memory stays mapped throughout (a ``Pinned``
    it holds); whether the bytes stayed *unchanged* is the caller's check too
    (segcache.py reads its sequence word before and after).
    """
    out: bytes = _new_bytes(None, length)
    # A bytes argument passes its buffer's address (typeshed does not list bytes for memmove).
    ctypes.memmove(out, address, length)  # type: ignore[arg-type]
    return out
