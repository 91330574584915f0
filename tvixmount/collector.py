"""The collector thread: the owner of every reply pipe nobody else reads, and of the zygote's socket.

It completes calls as their replies arrive, notices a worker's death at once
(EOF on its reply pipe, since nobody else holds the write end), re-sends or
fails that worker's calls, and asks the zygote for a replacement, backing
off with jitter while replacements keep dying young. It is also the only
thread that registers fds in its selector and closes a dead worker's fds.

A caller may read its own reply (``claim`` and ``lead``): a thread that
sent a call to a worker whose pipe nobody reads takes the pipe, reads its
replies itself (completing the calls they answer, its own among them)
until its own call is answered, its deadline passes or the pipe ends, and
gives the pipe back. Why: the reply then wakes the thread that waits for
it, instead of the collector, which woke the caller in turn: one wake-up
and the collector's read, unpack and GIL hand-off less per read
(docs/performance.md, "The miss path: lean wire"). One owner per pipe at a
time (``Worker.reading``, under the state lock), so replies and ring bytes
are still taken in order, each call completed once. While a caller owns a
pipe, the collector's epoll watches it for nothing but its end, once
(``EPOLLONESHOT`` with no events); when the caller gives it back, it
watches for replies again, and a death seen meanwhile is reported then.

    reply pipe ──> read frames ──> decode_reply ──> state.complete(call)   (or hello: worker ready)
              └──> EOF / garbage ──> retire: resend_or_fail, schedule a respawn, close fds
    zygote ─────> "spawned"+fds: register the worker │ "exited": log its status │ EOF: no more respawns
    timers ─────> due respawns: "spawn" to the zygote; workers never ready: kill;
                  hung workers (with hang detection on): kill, so their calls are re-sent

State lives in poolstate.py; pool.py starts and stops this thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import selectors
import socket
import threading
import time

from .poolstate import Call, PoolState, Slot, Worker
from .protocol.framing import ProtocolError, RingRef
from .protocol.messages import HELLO_ID, decode_control, decode_hello, decode_reply, encode_control
from .shmring import Arena, RingError

log = logging.getLogger("tvixmount.pool")

FAST_DEATH = 1.0  # a worker dying sooner than this after its start counts towards back-off
BACKOFF_BASE = 0.1
BACKOFF_MAX = 10.0
HANG_TICK = 0.25  # with hang detection on, look at silent workers at least this often
# How long a retired worker's reply pipe may take to end (its process to exit) before its calls
# are re-sent anyway. A killed process exits within milliseconds.
END_WAIT = 2.0
_WATCH = select.EPOLLIN  # a pipe the collector reads
_LEASED = select.EPOLLONESHOT  # a pipe a caller reads: only its end (HUP/ERR) is reported, once
_REPLIES = object()  # the selector's key for the epoll of the reply pipes


class Collector:
    def __init__(self, state: PoolState, ctl: socket.socket, zygote_pid: int, store_name: str,
                 start_timeout: float, hang_fraction: float | None = None,
                 arena: Arena | None = None) -> None:
        self.state = state
        # The consumer end of each slot's ring; outlives the slot's workers.
        self.rings = [arena.reader(i) for i in range(state.size)] if arena is not None else None
        self.ctl = ctl
        self.zygote_pid = zygote_pid
        self.store_name = store_name  # for log lines: describe(urls)
        self.start_timeout = start_timeout
        # A worker silent for this fraction of its oldest call's budget is hung (None: never
        # declared hung before a call times out; see WorkerPool).
        self.hang_fraction = hang_fraction
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Every live worker's reply pipe; callers change a pipe's events (claim, lead) under the state lock.
        self._replies = select.epoll()
        self._by_fd: dict[int, Worker] = {}  # collector thread only
        # Readable from stop() on, never drained: wakes every caller still reading a pipe (lead), whose
        # call close() failed, instead of leaving it to wait for its worker or its deadline.
        self._closing_r, self._closing_w = os.pipe()
        # Set by stop(), never cleared; a plain attribute, since every lane wait looks at it.
        self.stopping = False
        self._timers_stale = True  # _next_timer must run again before the next wait
        self._thread = threading.Thread(target=self._run, name="tvixmount-pool-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def closing_fd(self) -> int:
        """Readable once the pool is closing: a caller waiting for a reply polls it too."""
        return self._closing_r

    def stop(self, timeout: float) -> None:
        """End the thread (bounded) and release its wake-up pipe; workers' fds stay open."""
        self.stopping = True
        os.write(self._closing_w, b"x")
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with self.state.lock:  # a caller giving a pipe back now finds the epoll closed (lead)
            self._replies.close()

    def release(self) -> None:
        """Close what callers reading a pipe may still poll; once none does (pool.close)."""
        for fd in (self._closing_r, self._closing_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def request_spawn(self, slot: Slot) -> None:
        """Ask the zygote for a worker in ``slot``. State lock held."""
        slot.respawn_at = None
        if self.state.zygote_gone:
            return
        try:
            self.ctl.send(encode_control("spawn", slot.id))
        except OSError as exc:
            log.error("cannot reach the zygote pid %d: %s", self.zygote_pid, exc)
            return
        slot.spawning = True

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        sel.register(self.ctl.fileno(), selectors.EVENT_READ, self.ctl)
        sel.register(self._replies.fileno(), selectors.EVENT_READ, _REPLIES)
        due: float | None = None
        try:
            while not self.stopping:
                try:
                    if self._timers_stale:
                        self._timers_stale = False
                        due = self._next_timer()
                    timeout = None if due is None else max(0.0, due - time.monotonic())
                    for key, _ in sel.select(timeout):
                        if key.data is None:
                            os.read(self._wake_r, 4096)
                            self._timers_stale = True
                        elif key.data is self.ctl:
                            self._on_control(sel)
                            self._timers_stale = True
                        else:
                            for fd, _ in self._replies.poll(0):
                                worker = self._by_fd.get(fd)
                                if worker is not None:
                                    self._on_replies(worker)
                    if due is not None and time.monotonic() >= due:
                        self._run_timers()
                        self._timers_stale = True
                except Exception:  # a bug here must not stop every reply from arriving
                    log.exception("worker pool collector failed; continuing")
                    self._timers_stale = True
                    time.sleep(0.1)
        finally:
            sel.close()

    def _next_timer(self) -> float | None:
        """When (monotonic) a respawn is due, a starting worker runs out of time, or a hang check.

        Computed again only after something that moves a timer (a control
        message, a worker retired, the timers run), not after every reply:
        replies are the hot path, and a stale time only runs the timers early.
        """
        with self.state.lock:
            times = [s.respawn_at for s in self.state.slots if s.respawn_at is not None]
            times += [w.started + self.start_timeout
                      for w in self.state.workers() if not w.ready and not w.doomed]
        if self.hang_fraction is not None:  # calls reach idle workers without waking this thread
            times.append(time.monotonic() + HANG_TICK)
        return min(times) if times else None

    def _run_timers(self) -> None:
        state = self.state
        with state.lock:
            if not state.serving:
                return
            now = time.monotonic()
            for slot in state.slots:
                worker = slot.worker
                if worker is None:
                    if slot.respawn_at is not None and slot.respawn_at <= now:
                        slot.restarts += 1
                        state.counts["restarts"] += 1
                        self.request_spawn(slot)
                elif not worker.ready and not worker.doomed and now - worker.started >= self.start_timeout:
                    state.kill(worker, f"not ready {self.start_timeout:.0f} s after it was started")
                elif worker.ready and not worker.doomed and worker.inflight:
                    self._check_hung(worker, now)

    def _check_hung(self, worker: Worker, now: float) -> None:
        """Kill a worker silent for ``hang_fraction`` of its oldest call's budget. State lock held.

        The budget is what the call had left when it was sent to this worker
        (a re-sent call has less), so a hung worker that was only handed
        re-sent calls is found before they run out. Its death re-sends the
        idempotent calls it held (once, with the time they have left)
        instead of letting each wait for its deadline.
        """
        if self.hang_fraction is None:
            return
        oldest = next(iter(worker.inflight.values()))
        silent = worker.silence(now)
        if silent >= (oldest.deadline - oldest.sent_at) * self.hang_fraction:
            self.state.kill(worker, f"hung: no reply for {silent:.1f} s while holding {len(worker.inflight)} "
                                    f"requests, the oldest {oldest.what()}")

    # -- replies ----------------------------------------------------------------------------

    def _on_replies(self, worker: Worker) -> None:
        """Read what a worker sent, unless a caller reads its pipe now; retire it when it is gone."""
        state = self.state
        with state.lock:
            if worker.reading is not None:
                return  # a caller reads it (its epoll entry reports nothing more until given back)
            worker.reading = self
        alive = self.deliver(worker)
        if not alive or worker.doomed:
            self._retire(worker)  # keeps the pipe: nobody reads a retired worker's fds again
            return
        with state.lock:
            worker.reading = None

    def deliver(self, worker: Worker) -> bool:
        """One read of ``worker``'s reply pipe: complete the calls answered; False when the pipe ended.

        Only the pipe's owner calls it (``Worker.reading``): the collector, or
        a caller leading it. A malformed frame or reply kills the worker (its
        death is handled when the collector sees the pipe end).
        """
        state = self.state
        try:
            messages = worker.reader.read()
        except BlockingIOError:
            return True  # readiness seen before another owner read the pipe dry: nothing now
        except (ProtocolError, OSError) as exc:
            with state.lock:
                if isinstance(exc, ProtocolError):
                    state.kill(worker, f"sent a malformed frame ({exc})")
                else:
                    worker.doomed = worker.doomed or f"reading its replies failed ({exc})"
            return False
        if messages is None:
            return False
        try:
            ring_replies, ring_bytes = _take_ring_bytes(worker, messages)
        except (ProtocolError, RingError) as exc:
            with state.lock:
                state.kill(worker, f"sent a bad reply ({exc})")
            return False
        with state.lock:
            state.counts["ring_replies"] += ring_replies
            state.counts["ring_bytes"] += ring_bytes
            now = time.monotonic()
            for message in messages:
                try:
                    req_id, ok, value = decode_reply(message)
                    if req_id == HELLO_ID:
                        self._on_hello(worker, ok, value)
                        continue
                except ProtocolError as exc:
                    state.kill(worker, f"sent a malformed message ({exc})")
                    return False
                worker.last_reply = now
                call = worker.inflight.pop(req_id, None)
                if call is None:
                    continue  # its caller gave up (timed out) before the reply came
                if not ok:
                    state.counts["errors"] += 1
                state.complete(call, ok, value)
            if state.backlog:
                state.drain_backlog()
        return True

    # -- a caller reading its own reply --------------------------------------------------------

    def claim(self, call: Call) -> Worker | None:
        """The worker ``call`` was just sent to, now read by its caller; None if someone reads it.

        State lock held. The caller must ``lead`` at once and give the pipe
        back there, whatever happens.
        """
        worker = call.worker
        if worker is None or worker.reading is not None or worker.doomed or not self.state.serving:
            return None
        try:
            self._replies.modify(worker.rep_fd, _LEASED)
        except (OSError, ValueError):  # the epoll is closed: the pool is closing
            return None
        worker.reading = call
        return worker

    def lead(self, call: Call, worker: Worker) -> None:
        """Read ``worker``'s replies until ``call`` is answered, its deadline passes or the pipe ends.

        Whatever else it reads is delivered too (replies come in the order
        the worker took its requests). Then the pipe goes back to the
        collector, which sees anything left: replies for later calls, or the
        pipe's end, which only the collector handles (retire).
        """
        try:
            while not call.finished:
                remaining = call.deadline - time.monotonic()
                if remaining <= 0 or not worker.poller.poll(remaining * 1000 + 1):
                    break  # the caller's deadline: pool.call expires the call
                if self.stopping:
                    break  # the pool is closing (close() failed the call)
                if not self.deliver(worker):
                    break  # the pipe ended, or the worker was killed: the collector retires it
        finally:
            with self.state.lock:
                if call.finished:
                    self.state.counts["own_replies"] += 1
                worker.reading = None
                with contextlib.suppress(OSError, ValueError):  # ValueError: closed (pool closing)
                    self._replies.modify(worker.rep_fd, _WATCH)
                self.state.changed.notify_all()  # close() waits for the pipes to be given back

    def _on_hello(self, worker: Worker, ok: bool, value: object) -> None:
        """State lock held."""
        slot = self.state.slots[worker.id]
        if not ok:
            assert isinstance(value, tuple)
            worker.fatal = value[1]
            slot.last_error = value[1] if self.state.phase == "starting" else None
            return
        worker_id, pid = decode_hello(value)
        if (worker_id, pid) != (worker.id, worker.pid):
            raise ProtocolError(f"hello from worker {worker_id} pid {pid}, expected "
                                f"worker {worker.id} pid {worker.pid}")
        worker.ready = True
        worker.last_reply = time.monotonic()
        if slot.restarts:
            log.info("worker %d restarted as pid %d (restart %d)", worker.id, worker.pid, slot.restarts)
        self.state.changed.notify_all()

    # -- deaths and births ------------------------------------------------------------------

    def _retire(self, worker: Worker) -> None:
        """Forget a dead (or killed) worker: re-send or fail its calls, schedule its replacement.

        The collector owns its pipe (``reading``), and keeps it: no caller
        claims a retired worker's pipe.

        Its calls are re-sent only once its pipe has ended, that is once the
        process has exited (only it holds the write end, zygote.py): a worker
        killed for a malformed reply, or as hung, is retired before then, and
        until it exits it could still write into the buffer of a lane whose
        call another worker has answered (lanes.py, the rules). A process
        that does not exit within ``END_WAIT`` (stuck in the kernel, where a
        read into a lane's buffer may still complete) has its lane calls
        re-sent without their lanes.
        """
        self._timers_stale = True
        self._replies.unregister(worker.rep_fd)
        del self._by_fd[worker.rep_fd]
        exited = _read_to_end(worker.rep_fd, END_WAIT)
        if not exited:
            log.warning("worker %d pid %d: its reply pipe did not end within %.0f s; re-sending its calls "
                        "without their lanes", worker.id, worker.pid, END_WAIT)
        state = self.state
        with state.lock:
            worker.doomed = worker.doomed or "its reply pipe closed"
            slot = state.slots[worker.id]
            if slot.worker is worker:
                slot.worker = None
            calls = list(worker.inflight.values())
            worker.inflight.clear()
            now = time.monotonic()
            if state.serving:
                self._log_death(worker, len(calls), now)
            state.resend_or_fail(worker, calls, exited)
            if state.phase == "running" or (state.phase == "starting" and worker.fatal is None):
                self._schedule_respawn(slot, worker, now)
            state.changed.notify_all()
        for fd in (worker.req_fd, worker.rep_fd):
            os.close(fd)

    def _log_death(self, worker: Worker, calls: int, now: float) -> None:
        if worker.fatal is not None:
            if self.state.phase == "running":
                log.warning("worker %d pid %d could not open %s: %s", worker.id, worker.pid, self.store_name,
                            worker.fatal)
            return
        why = worker.doomed or "its reply pipe closed"
        if worker.reader.pending:
            why += f", {worker.reader.pending} bytes of a reply unread"
        log.warning("worker %d pid %d is gone (%s) after %.1f s with %d requests in flight",
                    worker.id, worker.pid, why, now - worker.started, calls)

    def _schedule_respawn(self, slot: Slot, worker: Worker | None, now: float) -> None:
        """Next start now, or after an exponential, jittered delay while starts keep failing."""
        fast = (worker is None or worker.fatal is not None or not worker.ready
                or now - worker.started < FAST_DEATH)
        slot.fast_deaths = slot.fast_deaths + 1 if fast else 0
        delay = 0.0
        if slot.fast_deaths:
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.fast_deaths - 1)) * random.uniform(0.5, 1.5)
        slot.respawn_at = now + delay
        if delay >= 1.0:
            log.warning("worker %d (last pid %s) keeps dying; next start in %.1f s",
                        slot.id, worker.pid if worker else "-", delay)

    def _on_control(self, sel: selectors.BaseSelector) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.ctl, 4096, 4)
        except OSError as exc:
            log.error("reading from the zygote pid %d failed: %s", self.zygote_pid, exc)
            data, fds = b"", []
        if not data:
            self._on_zygote_gone(sel, fds)
            return
        try:
            message = decode_control(data)
        except ProtocolError as exc:
            log.error("zygote pid %d: %s", self.zygote_pid, exc)
            _close_all(fds)
            return
        if message[0] == "spawned":
            self._on_spawned(message[1], message[2], fds)
            return
        _close_all(fds)
        if message[0] == "spawn_failed":
            with self.state.lock:
                slot = self.state.slots[message[1]]
                slot.spawning = False
                log.error("zygote could not start worker %d: %s", slot.id, message[2])
                self._schedule_respawn(slot, None, time.monotonic())
        elif message[0] == "exited":
            _, worker_id, pid, how = message
            quiet = self.state.phase != "running" or how == "exited with status 0"
            log.log(logging.DEBUG if quiet else logging.INFO, "worker %d pid %d %s", worker_id, pid, how)

    def _on_spawned(self, worker_id: int, pid: int, fds: list[int]) -> None:
        if len(fds) != 2 or not 0 <= worker_id < self.state.size:
            log.error("zygote sent a bad spawn reply (worker %d pid %d, %d fds)", worker_id, pid, len(fds))
            _close_all(fds)
            return
        for fd in fds:
            os.set_inheritable(fd, False)  # SCM_RIGHTS fds arrive without close-on-exec
        req_fd, rep_fd = fds
        os.set_blocking(req_fd, False)
        # Non-blocking: the collector may act on readiness a caller that owned the pipe meanwhile used up.
        os.set_blocking(rep_fd, False)
        worker = Worker(worker_id, pid, req_fd, rep_fd, None if self.rings is None else self.rings[worker_id])
        worker.poller.register(self._closing_r, select.POLLIN)  # a leading caller wakes when the pool closes
        with self.state.lock:
            slot = self.state.slots[worker_id]
            slot.spawning = False
            if slot.worker is not None or not self.state.serving:
                _close_all(fds)  # the worker sees EOF and exits
                return
            slot.worker = worker
        self._by_fd[rep_fd] = worker
        self._replies.register(rep_fd, _WATCH)
        log.debug("worker %d started as pid %d", worker_id, pid)

    def _on_zygote_gone(self, sel: selectors.BaseSelector, fds: list[int]) -> None:
        _close_all(fds)
        sel.unregister(self.ctl.fileno())
        with self.state.lock:
            self.state.zygote_gone = True
            if self.state.serving:
                log.error("zygote pid %d exited; workers that die can no longer be replaced", self.zygote_pid)
            self.state.changed.notify_all()
            if self.state.backlog:
                self.state.drain_backlog()


def _take_ring_bytes(worker: Worker, messages: list[object]) -> tuple[int, int]:
    """Replace each reply's RingRef by the bytes it names, in order, freeing them in the ring.

    Done for every reply, also those whose caller gave up, so the ring's
    consumed position follows the worker's. Outside the state lock: the
    copy is the biggest thing the collector does. Returns (replies, bytes) taken.
    """
    replies = taken = 0
    for message in messages:
        if type(message) is list and len(message) == 3 and type(message[2]) is RingRef:
            if worker.ring is None:
                raise ProtocolError("a ring reference from a worker without a ring")
            ref = message[2]
            message[2] = worker.ring.take(ref.start, ref.length)
            replies += 1
            taken += ref.length
    return replies, taken


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_to_end(fd: int, timeout: float) -> bool:
    """Read and drop what is left in a retired worker's pipe until it ends; False if it did not end
    within ``timeout`` seconds, or reading failed."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return True
            continue
        except BlockingIOError:
            pass
        except OSError:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller.poll(left * 1000 + 1)
