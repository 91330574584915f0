"""Worker processes behind one blocking ``call()``: ids, deadlines, a collector, respawns.

Data flow (protocol.py has the wire side)::

    FUSE thread ── call(op, *args) ── pick worker ── request frame ──> request pipe ──> worker
        │            (affinity, else least loaded;     (non-blocking,                      │
        │             call goes into worker.inflight)   one atomic write)                  │
        │                                                                                  ▼
        └─ waits on its call's latch <── collector thread <── reply frames <── reply pipe
           (never past the deadline)     (one selector over every reply pipe,
                                          the zygote socket and a wake-up pipe)

    collector <──"spawned"+fds / "exited"── zygote <──"spawn"── collector (restarts, with back-off)

Invariants (all state below is guarded by ``_lock``):

* An unanswered call is in exactly one place: one worker's ``inflight``
  table or the ``_backlog`` (no worker ready). Whoever takes it out
  completes it, exactly once, or puts it in another place.
* Only the collector thread reads reply pipes, changes its selector and
  retires dead workers. A caller that finds a worker hung only SIGKILLs
  it; the collector sees the EOF and retires it like any other death.
* EOF on a reply pipe means the worker is gone: the zygote keeps no copy
  of any worker's fds (zygote.py).
* A dead worker re-sends only its own idempotent calls, each at most
  ``retries`` more times and never past its deadline; the rest fail with
  WorkerLost and a WARNING naming the op, its arguments and the worker.
* Worker ids are slots 0..N-1; a restart keeps the id and changes the pid.
  Every log line names both.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import select
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from . import protocol, zygote
from .castore import nixbase32
from .castore.nodes import b3_text
from .errors import InvalidArgument, Unavailable, from_code
from .store import StoreUrls, describe

log = logging.getLogger(__name__)

FAST_DEATH = 1.0  # a worker dying sooner than this after its start counts towards back-off
BACKOFF_BASE = 0.1
BACKOFF_MAX = 10.0
DEFAULT_START_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0


class _Call:
    """One request from a caller's point of view; ``done`` is a latch released once."""

    __slots__ = (
        "affinity",
        "args",
        "created",
        "deadline",
        "done",
        "finished",
        "frame",
        "id",
        "idempotent",
        "ok",
        "op",
        "sends",
        "sent_at",
        "timeout",
        "value",
        "worker",
    )

    def __init__(self, req_id: int, op: str, args: tuple[Any, ...], timeout: float,
                 affinity: int | None, idempotent: bool) -> None:
        self.id = req_id
        self.op = op
        self.args = args
        self.timeout = timeout
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.affinity = affinity
        self.idempotent = idempotent
        self.frame = protocol.encode_request(req_id, op, args, self.deadline)
        self.sends = 0
        self.sent_at = 0.0
        self.worker: _Worker | None = None
        self.finished = False
        self.ok = False
        self.value: Any = None
        self.done = threading.Lock()
        self.done.acquire()


class _Worker:
    """One live worker process as the dispatcher sees it."""

    __slots__ = ("doomed", "fatal", "id", "inflight", "last_reply", "pid", "reader", "ready", "rep_fd",
                 "req_fd", "started")

    def __init__(self, worker_id: int, pid: int, req_fd: int, rep_fd: int) -> None:
        self.id = worker_id
        self.pid = pid
        self.req_fd = req_fd
        self.rep_fd = rep_fd
        self.reader = protocol.FrameReader(rep_fd)
        self.inflight: dict[int, _Call] = {}
        self.ready = False
        self.started = time.monotonic()
        self.last_reply = self.started
        self.doomed: str | None = None  # why we killed it, once we did
        self.fatal: str | None = None  # why it could not start (its store did not open)


class _Slot:
    __slots__ = ("fast_deaths", "id", "last_error", "respawn_at", "restarts", "spawning", "worker")

    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.worker: _Worker | None = None
        self.spawning = False
        self.respawn_at: float | None = None
        self.fast_deaths = 0
        self.restarts = 0
        self.last_error: str | None = None


class WorkerPool:
    """N worker processes serving ``call(op, *args)`` from any thread.

    ``start()`` must run before ``llfuse.init`` (it forks the zygote) and
    after logging is configured (with multiprocessing-logging installed,
    worker log records reach the dispatcher's handlers).
    """

    def __init__(self, urls: StoreUrls, workers: int, *, request_timeout: float = 30.0, retries: int = 1,
                 start_timeout: float = DEFAULT_START_TIMEOUT) -> None:
        if workers < 1:
            raise InvalidArgument(f"a worker pool needs at least one worker, not {workers}")
        if request_timeout <= 0 or retries < 0:
            raise InvalidArgument(f"bad pool settings: request_timeout {request_timeout}, retries {retries}")
        self.urls = urls
        self.size = workers
        self.request_timeout = request_timeout
        self.retries = retries
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._slots = [_Slot(i) for i in range(workers)]
        self._backlog: deque[_Call] = deque()
        self._ids = itertools.count(1)
        self._rotor = 0
        self._state = "new"  # new -> starting -> running -> closing -> closed
        self._zygote: Any = None
        self._zygote_pid = 0
        self._ctl: socket.socket | None = None
        self._zygote_gone = False
        self._collector: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._counts = dict.fromkeys(
            ("requests", "errors", "timeouts", "lost", "resent", "restarts", "killed"), 0)

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Fork the zygote and N workers; return once each answered a ping.

        Raises Unavailable naming the worker and the store when a worker
        cannot open its store, or when the workers are not up within
        ``start_timeout`` seconds.
        """
        with self._lock:
            if self._state != "new":
                raise InvalidArgument(f"worker pool already {self._state}")
            self._state = "starting"
        self._zygote, self._ctl = zygote.start(self.urls)
        self._zygote_pid = self._zygote.pid
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._collector = threading.Thread(target=self._collect, name="tvixmount-pool-collector", daemon=True)
        self._collector.start()
        log.debug("zygote pid %d started for %s", self._zygote_pid, describe(self.urls))
        try:
            with self._lock:
                for slot in self._slots:
                    self._request_spawn(slot)
            self._wait_until_ready()
            for slot in self._slots:
                worker_id, pid = protocol.OPS["ping"].decode(
                    self.call("ping", affinity=slot.id, timeout=self.start_timeout))
                log.debug("worker %d pid %d answered a ping", worker_id, pid)
        except BaseException:
            self.close()
            raise
        with self._lock:
            if self._state == "starting":
                self._state = "running"
        log.info("worker pool up: %d workers for %s", self.size, describe(self.urls))

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        with self._changed:
            while True:
                for slot in self._slots:
                    if slot.last_error is not None:
                        raise Unavailable(f"worker {slot.id} could not open {describe(self.urls)}: "
                                          f"{slot.last_error}")
                if self._zygote_gone:
                    raise Unavailable("the worker fork server (zygote) exited during start-up")
                ready = sum(1 for s in self._slots if s.worker is not None and s.worker.ready)
                if ready == self.size:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(f"only {ready} of {self.size} workers for {describe(self.urls)} "
                                      f"started within {self.start_timeout:.0f} s")
                self._changed.wait(remaining)

    def close(self) -> None:
        """Stop the workers and the zygote; bounded in time, safe to call twice."""
        with self._lock:
            if self._state in ("closing", "closed"):
                return
            if self._state == "new":
                self._state = "closed"
                return
            self._state = "closing"
            for call in self._take_all_calls():
                self._complete(call, False, ("unavailable", f"{self._what(call)}: worker pool closed"))
        self._stopping = True
        self._wake()
        if self._collector is not None:
            self._collector.join(CLOSE_TIMEOUT)
        workers = [s.worker for s in self._slots if s.worker is not None]
        for worker in workers:
            _close_fd(worker.req_fd)  # each worker sees EOF and exits
        if self._ctl is not None:
            self._ctl.close()  # the zygote sees EOF, reaps the workers, exits
        if self._zygote is not None:
            self._zygote.join(CLOSE_TIMEOUT)
            if self._zygote.exitcode is None:
                log.warning("zygote pid %d did not exit; killing it", self._zygote_pid)
                self._zygote.kill()
                self._zygote.join(1.0)
            self._zygote.close()
        for worker in workers:
            _close_fd(worker.rep_fd)
        for slot in self._slots:
            slot.worker = None
        _close_fd(self._wake_r)
        _close_fd(self._wake_w)
        with self._lock:
            self._state = "closed"
        log.debug("worker pool closed")

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        """True while the pool serves: started, not closed, its zygote running, a worker ready."""
        with self._lock:
            return (self._state == "running" and not self._zygote_gone
                    and any(s.worker is not None and s.worker.ready for s in self._slots))

    def stats(self) -> dict[str, Any]:
        """Counters and per-worker state, for the stats xattr and tests."""
        with self._lock:
            workers = {
                str(s.id): {
                    "pid": s.worker.pid if s.worker else None,
                    "ready": bool(s.worker and s.worker.ready),
                    "inflight": len(s.worker.inflight) if s.worker else 0,
                    "restarts": s.restarts,
                }
                for s in self._slots
            }
            return {
                **self._counts,
                "failures": self._counts["errors"] + self._counts["timeouts"] + self._counts["lost"],
                "workers": workers,
                "backlog": len(self._backlog),
                "state": self._state,
            }

    def pids(self) -> list[int | None]:
        """The current pid of each worker id (None while one is being replaced)."""
        with self._lock:
            return [s.worker.pid if s.worker else None for s in self._slots]

    # -- calls ---------------------------------------------------------------------------

    def call(self, op: str, *args: Any, affinity: int | None = None, timeout: float | None = None,
             idempotent: bool = True) -> Any:
        """Run ``op`` on a worker; block until its reply, never past ``timeout`` seconds.

        Returns the op's result in wire form (protocol.OPS[op].decode makes
        castore values of it). Raises the worker's error rebuilt from its
        code, Timeout, WorkerLost, or Unavailable when the pool is down.
        Thread-safe. Calls with the same ``affinity`` go to the same worker
        while it lives.
        """
        budget = self.request_timeout if timeout is None else timeout
        call = _Call(next(self._ids), op, args, budget, affinity, idempotent)
        if len(call.frame) > select.PIPE_BUF:
            raise InvalidArgument(f"{self._what(call)}: request of {len(call.frame)} bytes is too large")
        with self._lock:
            if self._state not in ("starting", "running"):
                raise Unavailable(f"{self._what(call)}: worker pool is {self._state}")
            self._counts["requests"] += 1
            self._route(call)
        if not call.done.acquire(timeout=max(0.0, call.deadline - time.monotonic())):
            self._expire(call)
        if call.ok:
            return call.value
        code, message = call.value
        raise from_code(code, message)

    def _route(self, call: _Call, exclude: _Worker | None = None) -> None:
        """Send ``call`` to a worker, or park it in the backlog. Lock held."""
        tried: list[_Worker] = [] if exclude is None else [exclude]
        while True:
            worker = self._pick(call.affinity, tried)
            if worker is None:
                break
            if self._send(worker, call):
                return
            tried.append(worker)
        if self._zygote_gone and not any(s.worker is not None and not s.worker.doomed for s in self._slots):
            self._complete(call, False, ("unavailable",
                                         f"{self._what(call)}: no worker left and the zygote is gone"))
            return
        call.worker = None
        self._backlog.append(call)

    def _pick(self, affinity: int | None, tried: list[_Worker]) -> _Worker | None:
        if affinity is not None:
            worker = self._slots[affinity % self.size].worker
            if worker is not None and worker.ready and not worker.doomed and worker not in tried:
                return worker
        best: _Worker | None = None
        n = self.size
        self._rotor = (self._rotor + 1) % n
        for i in range(n):
            worker = self._slots[(self._rotor + i) % n].worker
            if worker is None or not worker.ready or worker.doomed or worker in tried:
                continue
            if best is None or len(worker.inflight) < len(best.inflight):
                best = worker
                if not best.inflight:
                    break
        return best

    def _send(self, worker: _Worker, call: _Call) -> bool:
        """Write the request (atomic: it is shorter than PIPE_BUF); False if the pipe took nothing."""
        try:
            os.write(worker.req_fd, call.frame)
        except BlockingIOError:
            log.debug("worker %d pid %d: request pipe full; trying another", worker.id, worker.pid)
            return False
        except OSError as exc:
            log.debug("worker %d pid %d: request pipe broken (%s)", worker.id, worker.pid, exc)
            worker.doomed = worker.doomed or "its request pipe broke"
            return False
        worker.inflight[call.id] = call
        call.worker = worker
        call.sends += 1
        call.sent_at = time.monotonic()
        return True

    def _complete(self, call: _Call, ok: bool, value: Any) -> None:
        """Record the outcome and wake the caller. Lock held; the call is in no table any more."""
        if call.finished:
            return
        call.finished = True
        call.ok = ok
        call.value = value
        call.worker = None
        call.done.release()

    def _expire(self, call: _Call) -> None:
        """The caller's deadline passed: take the call back, fail it with Timeout.

        The worker is killed as hung if it held the call for at least half
        the call's budget, answered nothing in that time, and no earlier
        call it still holds, with time left, could explain the silence.
        """
        with self._lock:
            if call.finished:
                return  # the reply won the race
            worker = call.worker
            now = time.monotonic()
            if worker is not None and worker.inflight.get(call.id) is call:
                busy_earlier = any(
                    other.sent_at < call.sent_at and other.deadline > now
                    for other in worker.inflight.values() if other is not call
                )
                del worker.inflight[call.id]
                where = f"on worker {worker.id} pid {worker.pid}"
                held = now - call.sent_at
                if (worker.last_reply < call.sent_at and held >= call.timeout / 2 and not busy_earlier
                        and not worker.doomed):
                    silent = now - worker.last_reply
                    self._kill(worker, f"no reply for {silent:.1f} s ({self._what(call)} timed out)")
            else:
                _discard(self._backlog, call)
                where = "waiting for a ready worker"
            self._counts["timeouts"] += 1
            self._complete(call, False, ("timeout", f"{self._what(call)} timed out after "
                                                    f"{call.timeout:.1f} s {where}"))

    def _kill(self, worker: _Worker, why: str) -> None:
        """SIGKILL a worker; the collector retires it when its pipe reports EOF. Lock held."""
        worker.doomed = why
        self._counts["killed"] += 1
        log.warning("worker %d pid %d: %s; killing it", worker.id, worker.pid, why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def _take_all_calls(self) -> list[_Call]:
        calls = list(self._backlog)
        self._backlog.clear()
        for slot in self._slots:
            if slot.worker is not None:
                calls.extend(slot.worker.inflight.values())
                slot.worker.inflight.clear()
        return calls

    @staticmethod
    def _what(call: _Call) -> str:
        return f"{call.op}({summarize(call.args)})"

    # -- the collector thread -------------------------------------------------------------

    def _collect(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        assert self._ctl is not None
        sel.register(self._ctl.fileno(), selectors.EVENT_READ, self._ctl)
        try:
            while not self._stopping:
                try:
                    for key, _ in sel.select(self._next_timer()):
                        if key.data is None:
                            _drain(self._wake_r)
                        elif key.data is self._ctl:
                            self._on_control(sel)
                        else:
                            self._on_replies(sel, key.data)
                    self._run_timers()
                except Exception:  # a bug here must not stop every reply from arriving
                    log.exception("worker pool collector failed; continuing")
                    time.sleep(0.1)
        finally:
            sel.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already awake) or closed
            os.write(self._wake_w, b"x")

    def _on_replies(self, sel: selectors.BaseSelector, worker: _Worker) -> None:
        try:
            messages = worker.reader.read()
        except protocol.ProtocolError as exc:
            with self._lock:
                self._kill(worker, f"sent a malformed frame ({exc})")
            self._retire(sel, worker)
            return
        except OSError as exc:
            with self._lock:
                worker.doomed = worker.doomed or f"reading its replies failed ({exc})"
            self._retire(sel, worker)
            return
        if messages is None:
            self._retire(sel, worker)
            return
        with self._lock:
            now = time.monotonic()
            for message in messages:
                try:
                    req_id, ok, value = protocol.decode_reply(message)
                    if req_id == protocol.HELLO_ID:
                        self._on_hello(worker, ok, value)
                        continue
                except protocol.ProtocolError as exc:
                    self._kill(worker, f"sent a malformed message ({exc})")
                    break
                worker.last_reply = now
                call = worker.inflight.pop(req_id, None)
                if call is None:
                    continue  # its caller gave up (timed out) before the reply came
                if not ok:
                    self._counts["errors"] += 1
                self._complete(call, ok, value)
            if self._backlog:
                self._drain_backlog()
        if worker.doomed:
            self._retire(sel, worker)

    def _on_hello(self, worker: _Worker, ok: bool, value: Any) -> None:
        slot = self._slots[worker.id]
        if not ok:
            worker.fatal = value[1]
            slot.last_error = value[1] if self._state == "starting" else None
            return
        worker_id, pid = protocol.decode_hello(value)
        if (worker_id, pid) != (worker.id, worker.pid):
            raise protocol.ProtocolError(f"hello from worker {worker_id} pid {pid}, expected "
                                         f"worker {worker.id} pid {worker.pid}")
        worker.ready = True
        worker.last_reply = time.monotonic()
        if slot.restarts:
            log.info("worker %d restarted as pid %d (restart %d)", worker.id, worker.pid, slot.restarts)
        self._changed.notify_all()

    def _retire(self, sel: selectors.BaseSelector, worker: _Worker) -> None:
        """Forget a dead (or killed) worker: re-send or fail its calls, schedule its replacement."""
        sel.unregister(worker.rep_fd)
        with self._lock:
            slot = self._slots[worker.id]
            if slot.worker is worker:
                slot.worker = None
            calls = list(worker.inflight.values())
            worker.inflight.clear()
            now = time.monotonic()
            if self._state in ("starting", "running"):
                self._log_death(worker, calls, now)
            resent = 0
            for call in calls:
                if call.idempotent and call.sends <= self.retries and call.deadline > now:
                    resent += 1
                    self._route(call, exclude=worker)
                else:
                    self._counts["lost"] += 1
                    log.warning("%s on worker %d pid %d failed: the worker died (%s)", self._what(call),
                                worker.id, worker.pid, "not idempotent" if not call.idempotent
                                else "already re-sent" if call.sends > self.retries else "deadline passed")
                    self._complete(call, False, ("worker_lost", f"{self._what(call)}: worker {worker.id} "
                                                                f"pid {worker.pid} died"))
            self._counts["resent"] += resent
            if self._state == "running" or (self._state == "starting" and worker.fatal is None):
                self._schedule_respawn(slot, worker, now)
            self._changed.notify_all()
        _close_fd(worker.req_fd)
        _close_fd(worker.rep_fd)

    def _log_death(self, worker: _Worker, calls: list[_Call], now: float) -> None:
        if worker.fatal is not None:
            if self._state == "running":
                log.warning("worker %d pid %d could not open %s: %s", worker.id, worker.pid,
                            describe(self.urls), worker.fatal)
            return
        why = worker.doomed or "its reply pipe closed"
        if worker.reader.pending:
            why += f", {worker.reader.pending} bytes of a reply unread"
        log.warning("worker %d pid %d is gone (%s) after %.1f s with %d requests in flight",
                    worker.id, worker.pid, why, now - worker.started, len(calls))

    def _schedule_respawn(self, slot: _Slot, worker: _Worker, now: float) -> None:
        fast = worker.fatal is not None or not worker.ready or now - worker.started < FAST_DEATH
        slot.fast_deaths = slot.fast_deaths + 1 if fast else 0
        delay = 0.0
        if slot.fast_deaths:
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.fast_deaths - 1)) * random.uniform(0.5, 1.5)
        slot.respawn_at = now + delay
        if delay >= 1.0:
            log.warning("worker %d (last pid %d) keeps dying; next start in %.1f s",
                        slot.id, worker.pid, delay)

    def _request_spawn(self, slot: _Slot) -> None:
        """Ask the zygote for a worker in ``slot``. Lock held."""
        slot.respawn_at = None
        if self._zygote_gone or self._ctl is None:
            return
        try:
            self._ctl.send(protocol.encode_control("spawn", slot.id))
        except OSError as exc:
            log.error("cannot reach the zygote pid %d: %s", self._zygote_pid, exc)
            return
        slot.spawning = True

    def _next_timer(self) -> float | None:
        """Seconds until the next respawn is due or a starting worker runs out of time."""
        with self._lock:
            times = [s.respawn_at for s in self._slots if s.respawn_at is not None]
            times += [s.worker.started + self.start_timeout for s in self._slots
                      if s.worker is not None and not s.worker.ready and not s.worker.doomed]
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _run_timers(self) -> None:
        with self._lock:
            if self._state not in ("starting", "running"):
                return
            now = time.monotonic()
            for slot in self._slots:
                worker = slot.worker
                if worker is None:
                    if slot.respawn_at is not None and slot.respawn_at <= now:
                        slot.restarts += 1
                        self._counts["restarts"] += 1
                        self._request_spawn(slot)
                elif not worker.ready and not worker.doomed and now - worker.started >= self.start_timeout:
                    self._kill(worker, f"not ready {self.start_timeout:.0f} s after it was started")

    def _on_control(self, sel: selectors.BaseSelector) -> None:
        assert self._ctl is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._ctl, 4096, 4)
        except OSError as exc:
            data, fds = b"", []
            log.error("reading from the zygote failed: %s", exc)
        if not data:
            self._on_zygote_gone(sel, fds)
            return
        try:
            message = protocol.decode_control(data)
        except protocol.ProtocolError as exc:
            log.error("zygote pid %d: %s", self._zygote_pid, exc)
            _close_fds(fds)
            return
        kind = message[0]
        if kind == "spawned":
            self._on_spawned(sel, message[1], message[2], fds)
            return
        _close_fds(fds)
        if kind == "spawn_failed":
            with self._lock:
                slot = self._slots[message[1]]
                slot.spawning = False
                log.error("zygote could not start worker %d: %s", slot.id, message[2])
                fake = _Worker(slot.id, 0, -1, -1)
                fake.fatal = message[2]
                self._schedule_respawn(slot, fake, time.monotonic())
        elif kind == "exited":
            _, worker_id, pid, how = message
            quiet = self._state != "running" or how == "exited with status 0"
            level = logging.DEBUG if quiet else logging.INFO
            log.log(level, "worker %d pid %d %s", worker_id, pid, how)

    def _on_spawned(self, sel: selectors.BaseSelector, worker_id: int, pid: int, fds: list[int]) -> None:
        if len(fds) != 2 or not 0 <= worker_id < self.size:
            log.error("zygote sent a bad spawn reply (worker %d pid %d, %d fds)", worker_id, pid, len(fds))
            _close_fds(fds)
            return
        req_fd, rep_fd = fds
        for fd in fds:
            os.set_inheritable(fd, False)  # SCM_RIGHTS fds arrive without close-on-exec
        os.set_blocking(req_fd, False)
        worker = _Worker(worker_id, pid, req_fd, rep_fd)
        with self._lock:
            slot = self._slots[worker_id]
            slot.spawning = False
            if slot.worker is not None or self._state not in ("starting", "running"):
                _close_fds(fds)
                return
            slot.worker = worker
        sel.register(rep_fd, selectors.EVENT_READ, worker)
        log.debug("worker %d started as pid %d", worker_id, pid)

    def _on_zygote_gone(self, sel: selectors.BaseSelector, fds: list[int]) -> None:
        _close_fds(fds)
        assert self._ctl is not None
        sel.unregister(self._ctl.fileno())
        with self._lock:
            self._zygote_gone = True
            if self._state in ("starting", "running"):
                log.error("zygote pid %d exited; workers that die can no longer be replaced",
                          self._zygote_pid)
            self._changed.notify_all()
            if self._backlog:
                self._drain_backlog()

    def _drain_backlog(self) -> None:
        """Route parked calls now that a worker may be ready. Lock held."""
        parked = list(self._backlog)
        self._backlog.clear()
        for call in parked:
            self._route(call)


# -- helpers ------------------------------------------------------------------------------


def summarize(args: Iterable[Any], limit: int = 120) -> str:
    """Arguments for a log line: digests in the notation their kind uses."""
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


def _discard(queue: deque[_Call], call: _Call) -> None:
    with contextlib.suppress(ValueError):
        queue.remove(call)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 4096)


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        _close_fd(fd)
