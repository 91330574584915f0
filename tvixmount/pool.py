"""Worker processes behind one blocking ``call()``: request ids, deadlines, re-sends, restarts.

Data flow (the protocol package has the wire side)::

    FUSE thread ── call(op, *args) ── route: affinity slot, else least loaded ──> request pipe ──> worker
        │             (the call goes into that worker's in-flight table)          (one atomic,      │
        │                                                                          non-blocking     │
        │                                                                          write)           ▼
        └── waits on its call's latch, never past ── collector thread <── reply frames <── reply pipe
            its deadline (then: Timeout, and a       (collector.py: one selector over every
            silent worker is SIGKILLed)               reply pipe and the zygote's socket)

    collector ──"spawn"──> zygote (zygote.py) ──"spawned" + fds──> collector     (start, and restarts)

    When nobody reads the worker's reply pipe, the caller takes it and reads its reply itself
    (collector.py: claim, lead), waking on the reply instead of on the collector's latch release.

    A blob_read of a thread with a lane (lanes.py) names the lane in its request: the worker
    puts the bytes in the lane's buffer and answers on the lane's pipe, which only that thread
    reads (_await_lane). The call is on the worker's books like any other (routing, hang
    detection, re-sends); only its answer takes another way.

Three modules share the work: this one (the public API and the caller's
side), collector.py (the thread that reads the pipes no caller reads, a
caller's own reading of its reply, and worker deaths and births),
poolstate.py (the bookkeeping both change, under one lock).

Invariants:

* An unanswered call is in exactly one place: one worker's in-flight
  table or the backlog (no worker ready). Whoever takes it out completes
  it, exactly once, or places it again.
* A reply pipe has one reader at a time (``Worker.reading``, changed under
  the state lock): the collector, or a caller that sent a call to a worker
  whose pipe nobody read, until its own call is answered, its deadline
  passes or the pipe ends; then it gives the pipe back to the collector,
  whose epoll reports whatever is left. Whoever reads completes the calls
  its replies answer, so replies and ring bytes are taken in order and
  each call is completed once.
* A lane carries one call at a time, and its thread takes an answer only
  from the process that holds the call now (a killed worker's answer,
  written before its call was re-sent, is ignored). A call that ends on a
  lane without its answer once it was sent (a timeout, a failure, close)
  gives the lane up for good: its request may still be queued at a live
  worker, which would write the lane's buffer later.
* Only the collector retires workers (a caller leading a pipe that ends
  gives it back; the collector sees the end). A caller that finds a worker
  hung only SIGKILLs it; the EOF that follows is handled like any other
  death.
* EOF on a reply pipe means the worker is gone: the zygote keeps no copy
  of a worker's fds, and workers inherit none of each other's. A retired
  worker's calls are re-sent only after that EOF (collector.py ``_retire``),
  so a killed worker has exited before another may answer its calls.
* A dead worker re-sends only its own idempotent calls, each at most
  ``retries`` more times and never past its deadline; the rest fail with
  WorkerLost and a WARNING naming the op, its arguments and the worker.
* A calling thread waits on its own latch, reused from call to call: it is
  released exactly once per call (``PoolState.complete``) and acquired
  exactly once per call, also after a timeout, so a late reply to a call
  that timed out wakes nobody's next call. A thread whose wait was
  interrupted (an exception in ``acquire``) drops its latch for a new one.
* Every wait is bounded: calls by their deadline (a caller reading its
  own reply polls its worker's pipe no longer, and close() wakes it at
  once), start-up by
  ``start_timeout``, close() by a few seconds. Every log line about a
  worker names its id and pid.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
import time
from typing import Any, TypeVar

from . import segcache, shmring, zygote
from .collector import Collector
from .errors import InvalidArgument, Unavailable, from_code
from .lanes import Lane, Lanes
from .poolstate import SERVING, Call, PoolState, PoolStats, Worker
from .protocol import ops
from .protocol.framing import ProtocolError
from .protocol.messages import decode_error_value
from .protocol.readwire import LaneReply
from .store import StoreUrls, describe
from .zygote import WorkerMain

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
LANE_TICK = 0.05  # a caller waiting on its lane looks this often whether another thread ended its call

R = TypeVar("R")


class WorkerPool:
    """N worker processes serving ``call(op, *args)`` from any thread.

    ``start()`` must run before ``llfuse.init`` (it forks the zygote) and
    after logging is configured (with multiprocessing-logging installed,
    worker log records reach the dispatcher's handlers).
    """

    def __init__(self, urls: StoreUrls, workers: int, worker_main: WorkerMain, *,
                 request_timeout: float = 30.0, retries: int = 1,
                 start_timeout: float = DEFAULT_START_TIMEOUT, hang_fraction: float | None = None,
                 segment_cache: int = segcache.DEFAULT_SIZE, lanes: int = 0, fuse_threads: int = 1) -> None:
        """``worker_main``: the life of one worker (``workers.loop.serve``; the caller names it, so
        this package needs no import of the workers).

        ``hang_fraction``: a worker that answers nothing for this fraction of its oldest call's
        budget is declared hung at once, killed, and its calls re-sent with the time they have
        left; None declares it hung only when a call it holds times out (that call then fails).

        ``segment_cache``: bytes of the shared arena of verified segments (segcache.py); 0: none.

        ``lanes``: how many calling threads may have a lane of their own for ``blob_read`` (lanes.py;
        128 KiB of shared memory each); 0: every reply comes on the worker's reply pipe.

        ``fuse_threads``: how many threads read from ``segments`` at once (the mount's FUSE
        threads), which decides how it copies (``SegmentArena.reader``).
        """
        if workers < 1:
            raise InvalidArgument(f"a worker pool needs at least one worker, not {workers}")
        if (request_timeout <= 0 or retries < 0 or start_timeout <= 0 or lanes < 0 or fuse_threads < 1
                or (hang_fraction is not None and not 0 < hang_fraction < 1)):
            raise InvalidArgument(f"bad pool settings: request_timeout {request_timeout}, retries {retries}, "
                                  f"start_timeout {start_timeout}, hang_fraction {hang_fraction}, "
                                  f"lanes {lanes}, fuse_threads {fuse_threads}")
        self.urls = urls
        self.size = workers
        self.worker_main = worker_main
        self.request_timeout = request_timeout
        self.start_timeout = start_timeout
        self.hang_fraction = hang_fraction
        self._state = PoolState(workers, retries)
        self._ids = itertools.count(1)
        self._latches = threading.local()  # each calling thread's latch (see Call), locked between calls,
        # and its lane (False: none left for it)
        self._zygote: Any = None  # multiprocessing.Process
        self._zygote_pid = 0
        self._collector: Collector | None = None
        self._arena: shmring.Arena | None = None
        self.segment_cache_size = segment_cache
        self.segments: segcache.SegmentCache | None = None  # the dispatcher's end, once started
        self.lane_count = lanes
        self.fuse_threads = fuse_threads
        self._lanes: Lanes | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Fork the zygote and N workers; return once each answered a ping.

        Raises Unavailable naming the worker and the store when a worker
        cannot open its store, or when the workers are not up within
        ``start_timeout`` seconds; nothing is left running then.
        """
        state = self._state
        with state.lock:
            if state.phase != "new":
                raise InvalidArgument(f"worker pool already {state.phase}")
            state.phase = "starting"
        try:
            size = self.segment_cache_size
            segments = segcache.SegmentArena.for_mount(size, self.size) if size else None
            lanes = Lanes(self.lane_count) if self.lane_count else None
            self._arena = shmring.Arena(self.size, segments=segments, lanes=lanes)
            self.segments = None if segments is None else segments.reader(self.fuse_threads)
            self._zygote, ctl = zygote.start(self.urls, self.worker_main, self._arena)
            if lanes is not None:
                lanes.forked()  # the zygote and its workers hold the write ends; this process never writes
                self._lanes = lanes
                state.lanes = lanes.count
            self._zygote_pid = self._zygote.pid
            log.debug("zygote pid %d started for %s", self._zygote_pid, describe(self.urls))
            self._collector = Collector(state, ctl, self._zygote_pid, describe(self.urls), self.start_timeout,
                                        self.hang_fraction, self._arena)
            self._collector.start()
            with state.lock:
                for slot in state.slots:
                    self._collector.request_spawn(slot)
            self._wait_until_ready()
            for slot in state.slots:
                worker_id, pid = self.call(ops.PING, affinity=slot.id, timeout=self.start_timeout)
                log.debug("worker %d pid %d answered a ping", worker_id, pid)
        except BaseException:
            self.close()
            raise
        with state.lock:
            if state.phase == "starting":
                state.phase = "running"
        shape = self.segments.stats() if self.segments else segcache.SegmentCacheStats()
        log.info("worker pool up: %d workers for %s; segment arena %d MiB in %d slots (%d for streams); "
                 "%d lanes", self.size, describe(self.urls), shape.size >> 20, shape.slots,
                 shape.stream_slots, self.lane_count)

    def _wait_until_ready(self) -> None:
        state = self._state
        deadline = time.monotonic() + self.start_timeout
        with state.changed:
            while True:
                for slot in state.slots:
                    if slot.last_error is not None:
                        raise Unavailable(f"worker {slot.id} could not open {describe(self.urls)}: "
                                          f"{slot.last_error}")
                if state.zygote_gone:
                    raise Unavailable("the worker fork server (zygote) exited during start-up")
                ready = sum(1 for w in state.workers() if w.ready)
                if ready == self.size:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"only {ready} of {self.size} workers for {describe(self.urls)} "
                                      f"started within {self.start_timeout:.0f} s")
                state.changed.wait(remaining)

    def close(self) -> None:
        """Fail pending calls, stop the workers and the zygote; bounded in time, idempotent."""
        state = self._state
        with state.lock:
            if state.phase in ("closing", "closed"):
                return
            if state.phase == "new":
                state.phase = "closed"
                return
            state.phase = "closing"
            for call in state.take_all_calls():
                state.complete(call, False, ("unavailable", f"{call.what()}: worker pool closed"))
        if self._collector is not None:
            self._collector.stop(CLOSE_TIMEOUT)
        workers = state.workers()
        for worker in workers:
            _close_quietly(worker.req_fd)  # each worker sees EOF and exits
        if self._collector is not None:
            self._collector.ctl.close()  # the zygote sees EOF, waits for the workers, reaps them, exits
        if self._zygote is not None:
            self._zygote.join(CLOSE_TIMEOUT)
            if self._zygote.exitcode is None:
                log.warning("zygote pid %d did not exit; killing it", self._zygote_pid)
                self._zygote.kill()
                self._zygote.join(1.0)
            with contextlib.suppress(ValueError):
                self._zygote.close()
        with state.changed:  # callers reading their replies give the pipes back at EOF (or their deadline)
            state.changed.wait_for(lambda: not any(type(w.reading) is Call for w in workers)
                                   and not state.lane_waiters, CLOSE_TIMEOUT)
            leased = [w for w in workers if type(w.reading) is Call]
            lanes_busy = state.lane_waiters > 0  # never close a lane a caller may still poll
        for worker in workers:
            if worker not in leased:  # never close an fd a caller may still poll
                _close_quietly(worker.rep_fd)
        if self._collector is not None and not leased:
            self._collector.release()
        with state.lock:
            for slot in state.slots:
                slot.worker = None
            state.phase = "closed"
        if self._arena is not None and not lanes_busy:
            self._arena.close()
        log.debug("worker pool closed")

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        """True while the pool serves: started, not closed, its zygote running, a worker ready."""
        with self._state.lock:
            return (self._state.phase == "running" and not self._state.zygote_gone
                    and any(w.ready for w in self._state.workers()))

    def stats(self) -> PoolStats:
        """Counters (requests, errors, timeouts, lost, resent, restarts, killed) and per-worker state."""
        with self._state.lock:
            return self._state.stats()

    def pids(self) -> list[int | None]:
        """The current pid of each worker id (None while one is being replaced)."""
        with self._state.lock:
            return [s.worker.pid if s.worker else None for s in self._state.slots]

    # -- calls ---------------------------------------------------------------------------

    def call(self, op: ops.Op[R], *args: Any, affinity: int | None = None, timeout: float | None = None,
             idempotent: bool = True) -> R:
        """Run ``op`` on a worker; block until its reply, never past ``timeout`` seconds.

        Returns the op's result, decoded (ProtocolError if it does not fit).
        Raises the worker's error rebuilt from its code, Timeout,
        WorkerLost, or Unavailable when the pool is down. Thread-safe.
        Calls with the same ``affinity`` go to the same worker while it lives.
        """
        return op.decode(self._run(op, args, affinity, timeout, idempotent, False))

    def read_view(self, digest: bytes, offset: int, length: int, size: int, affinity: int | None = None,
                  timeout: float | None = None) -> bytes | memoryview:
        """``call(ops.BLOB_READ, ...)`` whose bytes, when they come on the calling thread's lane, are a
        view of the lane's buffer instead of a copy.

        The view stays right until this thread's next call into the pool,
        and no longer: for a caller that hands the bytes on at once (a FUSE
        read's reply) and keeps nothing. Nothing else can write the buffer
        meanwhile (lanes.py, the rules): the accepted answer ended the only
        request on the lane, and every process that held it before was dead
        before it was sent again.
        """
        value = self._run(ops.BLOB_READ, (digest, offset, length, size), affinity, timeout, True, True)
        return value if type(value) is memoryview else ops.BLOB_READ.decode(value)

    def _run(self, op: ops.Op[Any], args: tuple[Any, ...], affinity: int | None, timeout: float | None,
             idempotent: bool, view: bool) -> Any:
        """``call`` up to the decoding: the reply's wire value (a lane's view, with ``view``)."""
        latch: threading.Lock | None = getattr(self._latches, "latch", None)
        if latch is None:
            latch = self._latches.latch = threading.Lock()
            latch.acquire()
        lanes = self._lanes
        lane: Lane | None = None
        if op is ops.BLOB_READ and lanes is not None and len(args) == 4 and type(args[2]) is int \
                and args[2] <= lanes.size:  # bad arguments: Call() says
            lane = getattr(self._latches, "lane", None)  # this thread's, kept from call to call
            if lane is False:
                lane = None  # none was left for this thread, and lanes are never returned
            elif lane is None or lane.given_up:
                lane = self._new_lane()
        call = Call(next(self._ids), op, args, self.request_timeout if timeout is None else timeout,
                    affinity, idempotent, latch, None if lane is None else lane.index)
        if len(call.frame) > select.PIPE_BUF:
            raise InvalidArgument(f"{call.what()}: request of {len(call.frame)} bytes is too large")
        state = self._state
        with state.lock:
            if state.phase not in SERVING:  # state.serving, written out: every call passes here
                raise Unavailable(f"{call.what()}: worker pool is {state.phase}")
            state.counts["requests"] += 1
            state.route(call)
            if lane is not None:
                state.lane_waiters += 1
                leading = None
            else:
                leading = self._collector.claim(call) if self._collector is not None else None
        try:
            if lane is not None:  # the reply comes on this thread's own lane
                self._await_lane(call, lane, view)
            elif leading is not None:  # nobody reads that worker's replies: this thread does, until its own
                self._collector.lead(call, leading)  # type: ignore[union-attr]  # claimed through it
            if not latch.acquire(timeout=max(0.0, call.deadline - time.monotonic())):
                with state.lock:
                    state.expire(call)  # completes the call unless its reply did: released either way
                if not latch.acquire(timeout=CLOSE_TIMEOUT):  # once per call: immediate, since released
                    self._latches.latch = None  # never expected; a new latch rather than a wrong wake-up
        except BaseException:
            self._latches.latch = None  # its state is unknown now; the next call takes a new one
            raise
        if call.ok:
            return call.value
        code, message = call.value
        raise from_code(code, message)

    # -- lanes ---------------------------------------------------------------------------

    def _new_lane(self) -> Lane | None:
        """A lane for the calling thread, whose own is missing or given up; None when none is left
        (remembered as False: lanes are never returned)."""
        assert self._lanes is not None and self._collector is not None
        lane = self._lanes.take()
        if lane is not None:
            lane.poller.register(self._collector.closing_fd)  # close() wakes it at once
        self._latches.lane = lane if lane is not None else False
        return lane

    def _await_lane(self, call: Call, lane: Lane, view: bool) -> None:
        """Wait on ``lane`` for ``call``'s reply, until it comes, the call ends otherwise, its
        deadline passes or the pool closes; complete the call with the reply (``view``: the
        bytes as a view of the lane's buffer, see ``read_view``).

        An answer counts only from the process that holds the call now
        (lanes.py, the rules). The bytes are copied out (or viewed) before the
        state lock, and the call taken off its worker's books under it only if
        that worker still holds it: if it was re-sent meanwhile, the copy is
        dropped and the wait goes on for the new worker's answer. A call that
        ends without its answer after it was sent gives the lane up.
        """
        state = self._state
        answered = False
        try:
            while not call.finished:
                remaining = call.deadline - time.monotonic()
                if remaining <= 0:
                    break  # pool.call expires it
                if not lane.poller.poll(min(remaining, LANE_TICK) * 1000 + 1):
                    continue  # look again whether another thread ended the call (a failure, close)
                if self._collector is None or self._collector.stopping:
                    break  # the pool is closing (close() failed the call)
                try:
                    reply = lane.next_reply()
                except BlockingIOError:
                    continue  # woken by the closing pipe, or by nothing
                if reply is None:
                    break  # every writer is gone (the zygote and its workers): nothing more can come
                if reply.req_id == call.id and self._take_lane_reply(call, lane, reply, view):
                    answered = True
        except ProtocolError as exc:  # bytes no worker of ours writes: whoever holds the call is broken
            with state.lock:
                worker = state.take_back(call)  # not re-sent: its answer would go to this lane
                if worker is not None and not worker.doomed:
                    state.kill(worker, f"sent a malformed reply on lane {lane.index} ({exc})")
                state.counts["errors"] += 1
                state.complete(call, False, ("unavailable", f"{call.what()}: a malformed reply on lane "
                                                            f"{lane.index} ({exc})"))
        finally:
            if not answered:  # (an answer counted this thread out of lane_waiters with the call)
                with state.lock:
                    state.lane_waiters -= 1
                    if call.sends:
                        state.counts["lanes_given_up"] += 1
                        lane.give_up()
                    if state.phase == "closing":
                        state.changed.notify_all()

    def _take_lane_reply(self, call: Call, lane: Lane, reply: LaneReply, view: bool) -> bool:
        """Complete ``call`` from ``reply`` if it came from the worker holding the call; True if it did
        (the caller no longer counts among the lane waiters then)."""
        if reply.length > len(lane.buffer):
            raise ProtocolError(f"a lane reply of {reply.length} bytes, more than lane {lane.index} holds")
        worker: Worker | None = call.worker  # looked at again under the lock before anything counts
        if worker is None or worker.pid != reply.pid:
            return False  # a dead worker's answer, written before its call was re-sent
        value: object
        if not reply.ok:
            value = decode_error_value(lane.copy(reply.length))
        elif view:
            value = lane.buffer[:reply.length]  # no copy: see read_view
        else:
            value = lane.copy(reply.length)
        state = self._state
        with state.lock:
            if call.finished or call.worker is not worker or worker.inflight.get(call.id) is not call:
                return False
            del worker.inflight[call.id]
            worker.last_reply = time.monotonic()
            state.counts["lane_replies"] += 1
            if not reply.ok:
                state.counts["errors"] += 1
            state.complete(call, reply.ok, value)
            state.lane_waiters -= 1
            if state.backlog:
                state.drain_backlog()
            if state.phase == "closing":
                state.changed.notify_all()
        return True


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
