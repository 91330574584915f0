"""The kernel's readahead for this mount: how far ahead of a sequential reader it asks.

Why: a FUSE mount's backing device starts with the readahead the daemon
negotiated at INIT (128 KiB under libfuse 2), so a sequential reader has
one or two requests in flight and waits for each in turn. With 1 MiB the
kernel keeps several 128 KiB reads in flight: the FUSE threads, the workers
and the reader overlap (+10-20 % measured by hand, docs/performance.md).

The knob is ``/sys/class/bdi/<major>:<minor>/read_ahead_kb`` of the mount's
device. The device comes from ``/proc/self/mountinfo``, not from a stat of
the mountpoint: nothing in this process may stat the mount before llfuse
serves it (the request would wait for ourselves). And it is set once the
kernel has the daemon's INIT reply, which lowers it to what libfuse asked:
by the mount's first request (``KernelReadahead``; the kernel sends none
before it has the reply).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
BDI = Path("/sys/class/bdi")


def mount_device(mountpoint: Path, mountinfo: str = MOUNTINFO) -> str | None:
    """``major:minor`` of the last mount on ``mountpoint`` (the one on top), or None."""
    want = os.fsencode(mountpoint)
    found = None
    with open(mountinfo, "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == want:
                found = fields[2].decode()
    return found


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1: i + 4].isdigit():
            out.append(int(field[i + 1: i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def set_readahead(mountpoint: Path, kib: int, bdi: Path = BDI, mountinfo: str = MOUNTINFO) -> bool:
    """Set the mount's readahead to ``kib`` KiB; log what was done, or why not (never fatal)."""
    device = mount_device(mountpoint, mountinfo)
    if device is None:
        log.warning("kernel readahead left as is: %s is not in %s", mountpoint, mountinfo)
        return False
    knob = bdi / device / "read_ahead_kb"
    try:
        before = knob.read_text().strip()
        knob.write_text(f"{kib}\n")
    except OSError as exc:
        log.warning("kernel readahead left as is: cannot write %s: %s", knob, exc)
        return False
    log.info("kernel readahead of %s (device %s): %s KiB -> %d KiB", mountpoint, device, before, kib)
    return True


class KernelReadahead:
    """The mount's readahead, set once, by the mount's first request, before its reply.

    Why then: the kernel sizes a file's readahead from the device when the
    file is opened, after the daemon answered the OPEN, and every open is
    preceded by a lookup. A reader that opened a file before the knob was
    written read the whole file with the INIT's 128 KiB: a cold sequential
    read of 4 x 256 MiB right after the mount came up read 352-388 MB/s per
    file in one run of three, against 992-1092 in the others
    (docs/performance.md, "The kernel's readahead before the first open").

    Why not from a thread of our own that stats the mount: while its stat
    waits for the answer it holds the mountpoint, and an unmount right
    after the mount came up (``fusermount -u``, a unit stopped at once)
    failed with EBUSY (seen once in the test suite).
    """

    def __init__(self, mountpoint: Path, kib: int, bdi: Path = BDI, mountinfo: str = MOUNTINFO) -> None:
        self.mountpoint, self.kib, self._bdi, self._mountinfo = mountpoint, kib, bdi, mountinfo
        self._lock = threading.Lock()  # held over the write: whoever comes second finds it written
        self._done = False

    def apply(self) -> None:
        """Write the knob unless done already (a FUSE handler may call it: no FUSE request here)."""
        with self._lock:
            if not self._done:
                self._done = True
                set_readahead(self.mountpoint, self.kib, self._bdi, self._mountinfo)
