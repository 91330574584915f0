"""Lanes: a dispatcher thread's own reply channel for its blob reads, shared by every worker.

Why: a read the segment arena missed used to come back on its worker's one
reply pipe, which every caller of that worker shares. A caller that found
the pipe read by another thread waited on its latch until that thread
delivered its reply, and a caller that read it had to take the pipe from
the collector and give it back (two ``epoll_ctl``), take the state lock
three times, and wake the others whose replies it read. Under 8 O_DIRECT
readers that machinery cost the FUSE threads ~60 us of CPU per read more
than a bare process hop (docs/performance.md, "The floor of tvixmount's
own shape"). On a lane the reply goes straight to the thread that waits
for it, the bytes into that thread's own buffer: one read of a pipe only
it reads, one copy, one state lock to take the call off the worker's books.

Layout: ``count`` lanes, each a pipe and a buffer of ``size`` bytes (one
FUSE read at most) in one anonymous ``MAP_SHARED`` mapping. Both are made
before the zygote is forked: every worker holds the write end of every
lane's pipe and the whole mapping; the dispatcher holds the read ends (the
zygote points its copies at /dev/null, zygote.py) and closes its write ends
once the zygote is forked, so it has no way to write into a lane itself.

The rules that keep a lane's bytes right (pool.py keeps them):

* A lane belongs to one dispatcher thread (``take``), which has at most one
  call on it at a time.
* A worker serving a request of lane ``l`` writes the bytes into ``l``'s
  buffer, then its reply frame, shorter than ``PIPE_BUF`` and so one atomic
  write whoever else writes to that pipe, naming the worker's pid.
* The thread accepts a reply only for its current call and only from the
  process that holds that call now. Any other reply is a killed worker's,
  written before it died, so before its calls were re-sent (a dead worker's
  calls are re-sent only once its reply pipe has ended, i.e. it exited):
  its bytes were written before the accepted process began writing, and
  are overwritten.
* A lane is given up, never taken again, when a call on it ends without
  its accepted reply (a timeout, a failure, the pool closing): its request
  may still be queued at a live worker, which would write the buffer later.
  With one spare lane per thread, a mount survives a timeout per thread
  before its threads go back to the shared reply pipes.

So once a thread has accepted an answer, nobody can write its buffer until
the thread sends its next request: a FUSE read hands the bytes to llfuse's
reply as a view of the buffer, without a copy (pool.py ``read_view``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading

from .protocol import readwire

LANE_BYTES = 128 << 10  # libfuse 2's largest read: one lane carries one FUSE read


class Lanes:
    """The lanes of one pool: made before the zygote fork, both sides' ends taken from here."""

    def __init__(self, count: int, size: int = LANE_BYTES) -> None:
        if count < 1 or size < mmap.PAGESIZE or size % mmap.PAGESIZE:
            raise ValueError(f"bad lanes shape: {count} lanes of {size} bytes")
        self.count = count
        self.size = size
        self._map = mmap.mmap(-1, count * size, flags=mmap.MAP_SHARED)
        self._pipes = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(count)]
        self._lock = threading.Lock()
        self._free = list(range(count - 1, -1, -1))  # taken from the end: lane 0 first
        self._taken: list[Lane] = []
        self._writes_open = True  # this process still holds the write ends (until forked())

    def write_fds(self) -> list[int]:
        """Every lane's write end, in lane order: the zygote keeps them, for its workers."""
        return [w for _, w in self._pipes]

    def forked(self) -> None:
        """The zygote holds the write ends now: the dispatcher drops its own."""
        self._close_write_ends()

    def _close_write_ends(self) -> None:
        if self._writes_open:  # once: a closed number may have been reused by then
            self._writes_open = False
            for _, w in self._pipes:
                with contextlib.suppress(OSError):
                    os.close(w)

    def writer(self, fds: list[int] | None = None) -> LaneWriter:
        """A worker's end: every lane's buffer and pipe (``fds``: the write ends, as inherited)."""
        return LaneWriter(memoryview(self._map), self.size, self.write_fds() if fds is None else fds)

    def take(self) -> Lane | None:
        """A lane for the calling thread to keep, or None when every lane is taken or given up."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        start = index * self.size
        lane = Lane(index, self._pipes[index][0], memoryview(self._map)[start:start + self.size])
        with self._lock:
            self._taken.append(lane)
        return lane

    def close(self) -> None:
        """Close the read ends and unmap, once no thread waits on a lane (the pool is closed)."""
        with self._lock:
            taken, self._taken = self._taken, []
            self._free.clear()
        for lane in taken:
            lane.buffer.release()
        self._close_write_ends()  # never forked (a test): nobody else holds them
        for r, _ in self._pipes:
            with contextlib.suppress(OSError):
                os.close(r)
        with contextlib.suppress(BufferError):  # a straggling view keeps it mapped until collected
            self._map.close()


class Lane:
    """The dispatcher's end of one lane: its pipe's read end and its buffer. One thread at a time."""

    __slots__ = ("buffer", "fd", "given_up", "index", "poller")

    def __init__(self, index: int, fd: int, buffer: memoryview) -> None:
        self.index = index
        self.fd = fd
        self.buffer = buffer
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.given_up = False

    def give_up(self) -> None:
        """Never use this lane again: a call on it ended without its reply (see the rules). Its
        number is not handed out again either (``Lanes.take`` gives each number once)."""
        self.given_up = True

    def next_reply(self) -> readwire.LaneReply | None:
        """The first reply in the pipe (BlockingIOError: none is there; ProtocolError: bytes that are
        none); None: every writer is gone.

        One read of one frame's size: every writer writes whole frames of
        that size at once, so the read takes exactly one, and a second
        reply (a killed worker's, then its successor's) stays for the next.
        """
        frame = os.read(self.fd, readwire.LANE_FRAME)
        return readwire.decode_lane_frame(frame) if frame else None

    def copy(self, length: int) -> bytes:
        """The first ``length`` bytes of the buffer, as an accepted reply says."""
        return bytes(self.buffer[:length])


class LaneWriter:
    """A worker's end of every lane: the buffer to fill and the pipe to answer on."""

    def __init__(self, whole: memoryview, size: int, fds: list[int]) -> None:
        self.size = size
        self._fds = fds
        # Every lane's buffer, sliced once: a worker looks one up for every read on a lane.
        self.buffers = [whole[i * size: (i + 1) * size] for i in range(len(fds))]

    def send(self, lane: int, body: bytes) -> bool:
        """Write one reply frame to ``lane`` (atomic: shorter than PIPE_BUF); False when its pipe is full.

        A full pipe means its thread gave the lane up and stopped reading it;
        the reply has nobody to go to.
        """
        frame = len(body).to_bytes(4, "big") + body
        if len(frame) > select.PIPE_BUF:
            raise ValueError(f"a lane reply of {len(frame)} bytes is not one atomic write")
        try:
            os.write(self._fds[lane], frame)
        except BlockingIOError:
            return False
        return True
