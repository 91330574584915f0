"""The worker pool's bookkeeping: calls, workers, slots, and the rules that move a call.

Shared by pool.py (callers' threads) and collector.py (the collector
thread). Every ``PoolState`` method runs with ``PoolState.lock`` held, which
its callers take; the classes here are the private, mutable records of one
process and never leave the pool modules, except the frozen ``PoolStats``
snapshot that ``stats()`` takes.

Invariants:

* An unanswered call is in exactly one place: one worker's ``inflight``
  table or the ``backlog`` (no worker was ready). Whoever takes it out
  either completes it, exactly once (``complete``), or places it again
  (``route``).
* A call is written only to a worker that is ready and not doomed, and is
  on that worker's books (``inflight``, ``Call.worker``) before its request
  is written: an answer on a lane is read without the state lock.
* ``Worker.doomed`` is set once we know (or decided) the worker is dead:
  it gets no new calls, and the collector retires it on its EOF.
* Worker ids are slots 0..N-1; a restart keeps the id and changes the pid.
* A worker that has held calls without answering any for ``STALLED_AFTER``
  seconds gets no new call while another worker can take it, affinity or
  not: it may be hung, and every call sent to it would tie up a FUSE
  thread until that call's deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .castore import nixbase32
from .castore.nodes import b3_text
from .deadlines import HANG_FRACTION
from .metrics import counter, gauge
from .protocol import readwire
from .protocol.framing import FrameReader
from .protocol.messages import encode_request
from .protocol.ops import Op
from .shmring import RingReader

log = logging.getLogger("tvixmount.pool")

SERVING = ("starting", "running")  # the phases in which calls are taken (see PoolState.phase)
STALLED_AFTER = 1.0  # seconds of silence while holding calls after which a worker gets no new ones

Outcome = tuple[str, str]  # (error code, message) of a failed call


class Call:
    """One request as its caller sees it; ``done`` is its caller's latch, released exactly once for it.

    The latch is the calling thread's own, reused from call to call (pool.py):
    it is locked while the thread is not waiting, ``complete`` releases it
    once per call (``finished`` under the state lock), and the caller
    acquires it once per call, also after a timeout (``expire`` or the late
    reply released it), so it is locked again before the thread's next call.
    """

    __slots__ = ("affinity", "args", "created", "deadline", "done", "finished", "frame", "id", "idempotent",
                 "lane", "ok", "op", "sends", "sent_at", "timeout", "value", "worker")

    def __init__(self, req_id: int, op: Op[Any], args: tuple[Any, ...], timeout: float,
                 affinity: int | None, idempotent: bool, done: threading.Lock | None = None,
                 lane: int | None = None) -> None:
        """``done``: the caller's latch, locked (a fresh one when None); ``lane``: the caller's lane
        (lanes.py), for an op with a fixed frame, whose worker then answers there."""
        self.id = req_id
        self.op = op.name
        self.args = args
        self.timeout = timeout
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.affinity = affinity
        self.idempotent = idempotent
        self.lane = lane  # the caller's lane its answer goes to (lanes.py), or None
        # Re-sent as is. InvalidArgument (before anything was sent) for arguments a fixed frame cannot hold.
        if op.fixed is None:
            self.frame = encode_request(req_id, op.name, args, self.deadline)
        elif len(args) != len(op.arg_types):  # the fixed encoder checks the types, not the count
            op.check_args(args)
        elif lane is None:
            self.frame = op.fixed(req_id, self.deadline, *args)
        else:
            self.frame = op.fixed(req_id, self.deadline, *args, lane=lane)
        self.sends = 0
        self.sent_at = 0.0
        self.worker: Worker | None = None
        self.finished = False
        self.ok = False
        self.value: Any = None  # the wire result, or an Outcome
        if done is None:
            done = threading.Lock()
            done.acquire()
        self.done = done

    def drop_lane(self) -> None:
        """Be answered on the worker's reply pipe from now on, not on the caller's lane (a
        ``blob_read``'s fixed request, the only op with lanes, without its lane)."""
        self.lane = None
        self.frame = readwire.encode_request(self.id, self.deadline, *self.args)

    def what(self) -> str:
        """The call for log lines and error messages: ``op(arguments)``."""
        return f"{self.op}({summarize(self.args)})"


class Worker:
    """One worker process as the dispatcher sees it."""

    __slots__ = ("doomed", "fatal", "id", "inflight", "last_reply", "pid", "poller", "reader", "reading",
                 "ready", "rep_fd", "req_fd", "ring", "started")

    def __init__(self, worker_id: int, pid: int, req_fd: int, rep_fd: int,
                 ring: RingReader | None = None) -> None:
        self.id = worker_id
        self.pid = pid
        self.req_fd = req_fd  # non-blocking; requests are shorter than PIPE_BUF, so writes are atomic
        self.rep_fd = rep_fd
        self.reader = FrameReader(rep_fd, fixed=readwire.decode_reply)
        # Who reads the reply pipe now (reader, ring): None, the collector, or the Call whose caller
        # leads it (collector.py). Changed under the state lock; only the owner touches the reader.
        self.reading: object | None = None
        self.poller = select.poll()  # the owner's wait for replies (a caller leading the pipe)
        self.poller.register(rep_fd, select.POLLIN)
        self.ring = ring  # its slot's shared-memory ring, where read replies put their bytes
        self.inflight: dict[int, Call] = {}
        self.ready = False  # its store opened and it said hello
        self.started = time.monotonic()
        self.last_reply = self.started
        self.doomed: str | None = None  # why it is dead or being killed
        self.fatal: str | None = None  # why it could not open its store

    def silence(self, now: float) -> float:
        """Seconds this worker has held calls without answering any (0 while it holds none).

        A worker serves its pipe in order, so the oldest call it holds is the
        one it works on: the silence counts from that call's send or from the
        last reply, whichever came later.
        """
        if not self.inflight:
            return 0.0
        oldest = next(iter(self.inflight.values()))
        return now - max(self.last_reply, oldest.sent_at)


class Slot:
    """A worker id and what outlives its processes: restarts and back-off."""

    __slots__ = ("fast_deaths", "id", "last_error", "respawn_at", "restarts", "spawning", "worker")

    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.worker: Worker | None = None
        self.spawning = False
        self.respawn_at: float | None = None
        self.fast_deaths = 0
        self.restarts = 0
        self.last_error: str | None = None  # a store-open failure during start-up


class PoolState:
    """Slots, the backlog and counters, behind one lock (with a condition for start-up)."""

    def __init__(self, size: int, retries: int) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.size = size
        self.retries = retries
        self.slots = [Slot(i) for i in range(size)]
        self.backlog: deque[Call] = deque()
        self.phase = "new"  # new -> starting -> running -> closing -> closed
        self.zygote_gone = False
        self.counts = dict.fromkeys(
            ("requests", "errors", "timeouts", "lost", "resent", "restarts", "killed", "ring_replies",
             "ring_bytes", "own_replies", "lane_replies", "lanes_given_up"), 0)
        self.lane_waiters = 0  # callers waiting on their lane now (close() waits for them)
        self.lanes = 0  # lanes made at start (lanes.py), for stats
        self._rotor = 0

    @property
    def serving(self) -> bool:
        return self.phase in SERVING

    def workers(self) -> list[Worker]:
        return [s.worker for s in self.slots if s.worker is not None]

    # -- placing calls ---------------------------------------------------------------------

    def route(self, call: Call, exclude: Worker | None = None) -> None:
        """Send ``call`` to a worker, or park it in the backlog, or fail it if none can come."""
        tried: list[Worker] = [] if exclude is None else [exclude]
        while (worker := self._pick(call.affinity, tried)) is not None:
            if self._send(worker, call):
                return
            tried.append(worker)
        if self.zygote_gone and not any(not w.doomed for w in self.workers()):
            self.complete(call, False,
                          ("unavailable", f"{call.what()}: no worker left and the zygote is gone"))
            return
        call.worker = None
        self.backlog.append(call)

    def _pick(self, affinity: int | None, tried: list[Worker]) -> Worker | None:
        """The affinity slot's worker while it serves and answers, else the least loaded one.

        Affinity keeps a file's reads on the worker that holds its reader
        (verified segments, an open stream), but it is a preference, not a
        rule: when that worker is busy with another file's request and some
        worker is idle, the idle one gets the call. Readers whose handles
        share a slot would otherwise queue behind each other while other
        workers wait (measured: 8 random readers over gRPC with 20 ms per
        call reached 4.7x of one worker with 8 workers, against 8x possible).
        Requests of the same file (kernel readahead) stay together.
        Workers silent for ``STALLED_AFTER`` come last; ties rotate.
        """
        now = time.monotonic()
        preferred: Worker | None = None
        if affinity is not None:
            worker = self.slots[affinity % self.size].worker
            if (worker is not None and worker.ready and not worker.doomed and worker not in tried
                    and worker.silence(now) < STALLED_AFTER):
                for other in worker.inflight.values():  # a loop, not all(): this runs for every read
                    if other.affinity != affinity:
                        preferred = worker
                        break
                else:
                    return worker
        best = self._least_loaded(tried, now)
        if preferred is not None and (best is None or best.inflight or best.silence(now) >= STALLED_AFTER):
            return preferred
        return best

    def _least_loaded(self, tried: list[Worker], now: float) -> Worker | None:
        best: Worker | None = None
        best_rank = (True, 0)
        self._rotor = (self._rotor + 1) % self.size
        for i in range(self.size):
            worker = self.slots[(self._rotor + i) % self.size].worker
            if worker is None or not worker.ready or worker.doomed or worker in tried:
                continue
            rank = (worker.silence(now) >= STALLED_AFTER, len(worker.inflight))
            if best is None or rank < best_rank:
                best, best_rank = worker, rank
                if rank == (False, 0):
                    break
        return best

    def _send(self, worker: Worker, call: Call) -> bool:
        """Write the request; False if the pipe took nothing (full, or the worker is gone).

        The call is on the worker's books before the request is written: an
        answer on a lane is read without the state lock (pool._await_lane),
        and may come before this thread has run again after the write.
        """
        worker.inflight[call.id] = call
        call.worker = worker
        try:
            os.write(worker.req_fd, call.frame)
        except OSError as exc:
            del worker.inflight[call.id]
            call.worker = None
            if isinstance(exc, BlockingIOError):
                log.debug("worker %d pid %d: request pipe full; trying another", worker.id, worker.pid)
            else:
                log.debug("worker %d pid %d: request pipe broken (%s)", worker.id, worker.pid, exc)
                worker.doomed = worker.doomed or "its request pipe broke"
            return False
        call.sends += 1
        call.sent_at = time.monotonic()
        return True

    def drain_backlog(self) -> None:
        """Route parked calls again (a worker became ready, or none ever will)."""
        parked = list(self.backlog)
        self.backlog.clear()
        for call in parked:
            self.route(call)

    def complete(self, call: Call, ok: bool, value: Any) -> None:
        """Record the outcome and wake the caller; the call must be in no table any more."""
        if call.finished:
            return
        call.finished = True
        call.ok = ok
        call.value = value
        call.worker = None
        call.done.release()

    # -- failures --------------------------------------------------------------------------

    def expire(self, call: Call) -> None:
        """The caller's deadline passed: take the call back and fail it with Timeout.

        Its worker is killed as hung if it held the call for at least
        ``HANG_FRACTION`` of the call's budget (deadlines.py), answered
        nothing in that time, and no earlier call it still holds, with time
        left, could explain the silence.
        """
        if call.finished:
            return  # the reply won the race
        worker = self.take_back(call)
        now = time.monotonic()
        if worker is not None:
            busy_earlier = any(other.sent_at < call.sent_at and other.deadline > now
                               for other in worker.inflight.values())
            where = f"on worker {worker.id} pid {worker.pid}"
            silent = now - worker.last_reply
            if (worker.last_reply < call.sent_at and now - call.sent_at >= call.timeout * HANG_FRACTION
                    and not busy_earlier and not worker.doomed):
                self.kill(worker, f"no reply for {silent:.1f} s ({call.what()} timed out)")
        else:
            where = "waiting for a ready worker"
        self.counts["timeouts"] += 1
        self.complete(call, False, ("timeout", f"{call.what()} timed out after {call.timeout:.1f} s {where}"))

    def take_back(self, call: Call) -> Worker | None:
        """Take an unanswered call out of its place; the worker whose books it was on (None: the
        backlog, or nowhere). Whoever takes it back completes it or places it again."""
        worker = call.worker
        if worker is not None and worker.inflight.get(call.id) is call:
            del worker.inflight[call.id]
            return worker
        with contextlib.suppress(ValueError):
            self.backlog.remove(call)
        return None

    def kill(self, worker: Worker, why: str) -> None:
        """SIGKILL a worker; the collector retires it when its reply pipe reports EOF."""
        worker.doomed = why
        self.counts["killed"] += 1
        log.warning("worker %d pid %d: %s; killing it", worker.id, worker.pid, why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def resend_or_fail(self, dead: Worker, calls: list[Call], exited: bool = True) -> None:
        """A worker died holding ``calls``: re-send the idempotent ones with sends and time left.

        ``exited``: its process is known to be gone. If it may not be (killed,
        but its pipe did not end in time: stuck in the kernel), a call on a
        lane is re-sent without its lane, so that whatever the old process
        still writes into that lane's buffer reaches nobody: the answer comes
        on the new worker's pipe, and the caller gives the lane up.
        """
        now = time.monotonic()
        for call in calls:
            if call.idempotent and call.sends <= self.retries and call.deadline > now:
                self.counts["resent"] += 1
                if not exited and call.lane is not None:
                    call.drop_lane()
                self.route(call, exclude=dead)
                continue
            why = ("not idempotent" if not call.idempotent else
                   "already re-sent" if call.sends > self.retries else "deadline passed")
            self.counts["lost"] += 1
            log.warning("%s on worker %d pid %d failed: the worker died (%s)", call.what(), dead.id, dead.pid,
                        why)
            self.complete(call, False,
                          ("worker_lost", f"{call.what()}: worker {dead.id} pid {dead.pid} died"))

    def take_all_calls(self) -> list[Call]:
        """Every unanswered call, removed from its place (for shutdown)."""
        calls = list(self.backlog)
        self.backlog.clear()
        for worker in self.workers():
            calls.extend(worker.inflight.values())
            worker.inflight.clear()
        return calls

    def stats(self) -> PoolStats:
        counts = self.counts
        return PoolStats(
            workers={s.id: WorkerStats(pid=s.worker.pid if s.worker else None,
                                       ready=bool(s.worker and s.worker.ready),
                                       inflight=len(s.worker.inflight) if s.worker else 0,
                                       restarts=s.restarts)
                     for s in self.slots},
            state=self.phase,
            failures=counts["errors"] + counts["timeouts"] + counts["lost"],
            backlog=len(self.backlog),
            lanes=self.lanes,
            **counts,
        )


@dataclass(frozen=True, slots=True)
class WorkerStats:
    pid: int | None  # None while the slot's worker is being replaced
    ready: bool
    inflight: int
    restarts: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The pool's counters since start, and its state now. ``PoolState.counts`` holds the counters."""

    workers: dict[int, WorkerStats]  # by worker id
    state: str  # PoolState.phase
    requests: int = counter("store requests sent to a worker")
    errors: int = counter("store requests answered with an error")
    timeouts: int = counter("store requests that ran past their deadline")
    lost: int = counter("store requests lost with their worker and not re-sent")
    resent: int = counter("store requests re-sent after their worker died")
    killed: int = counter("workers killed as hung")
    ring_replies: int = counter("read replies whose bytes came through the shared-memory ring")
    ring_bytes: int = counter("bytes that came through the shared-memory ring")
    own_replies: int = counter("store requests whose caller read the reply itself (no collector hop)")
    lane_replies: int = counter("reads answered on their caller's own lane (no shared reply pipe)")
    lanes_given_up: int = counter("lanes given up after a read on them ended without its reply")
    restarts: int = counter("worker processes restarted after dying", name="worker_restarts")
    failures: int = 0  # errors + timeouts + lost
    backlog: int = gauge("store requests waiting for a ready worker")
    lanes: int = gauge("lanes for reading threads' own replies, 128 KiB of shared memory each")


def summarize(args: Iterable[Any], limit: int = 120) -> str:
    """Arguments for a log line: digests in the notation of their kind."""
    parts = []
    for arg in args:
        if isinstance(arg, bytes):
            if len(arg) == 32:
                parts.append(b3_text(arg))
            elif len(arg) == 20:
                parts.append(nixbase32.encode(arg))
            else:
                parts.append(arg[:16].hex() + ("..." if len(arg) > 16 else ""))
        else:
            parts.append(repr(arg))
    text = ", ".join(parts)
    return text if len(text) <= limit else text[:limit] + "..."
