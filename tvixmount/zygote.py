"""The fork server: one small single-threaded process that forks every worker.

Why a zygote: workers must be forked (multiprocessing-logging hands log
records from children to the dispatcher's handlers only through a forked
queue), but the dispatcher becomes multi-threaded once llfuse starts, and a
fork from a threaded process copies whatever locks other threads held at
that instant. So the pool forks this process once, before ``llfuse.init``,
and asks it for workers — at start and whenever one dies::

    pool ──["spawn", id]──────────────────────> zygote ── fork ──> worker id
      ▲                                            │   (request pipe: pool writes,
      ├──["spawned", id, pid] + 2 fds (SCM_RIGHTS)─┘    reply pipe: worker writes)
      ├──["spawn_failed", id, why]
      └──["exited", id, pid, how]   after reaping it

Invariants:

* The zygote runs one thread. It never logs (logging is disabled in it and
  re-enabled in each worker), because a log record would start the
  multiprocessing queue's feeder thread here and every later fork would
  copy that thread's locks.
* After "spawned" the zygote holds no fd of that worker's pipes, and a
  worker inherits none of another's: EOF on a reply pipe means that worker
  is dead, and EOF on a request pipe means the dispatcher is.
* Every child is reaped (polled; the status goes to the pool for its log).
* EOF on the control socket (the pool closed it, or the dispatcher died)
  ends the zygote: it gives workers a moment to see their own EOF, then
  SIGKILLs and reaps the rest. Workers get PR_SET_PDEATHSIG=SIGKILL, so
  they also die if the zygote is killed outright.
* At start the zygote points every inherited fd it does not need at
  /dev/null (the numbers stay taken, so a stale inherited object can never
  close a number that was reused): no worker inherits /dev/fuse, another
  pool's pipes, or the dispatcher's sockets. It keeps the write ends of its
  pool's lanes (lanes.py), which every worker shares by design; their read
  ends are the dispatcher's alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import logging
import multiprocessing
import multiprocessing.queues
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .protocol.messages import decode_control, encode_control
from .shmring import Arena, RingWriter
from .store import StoreUrls

REPLY_PIPE_SIZE = 1 << 20  # a 128 KiB reply fits in one write and one read
REAP_INTERVAL = 0.2
SHUTDOWN_GRACE = 2.0
EXIT_CRASH = 70

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1

# The whole life of one worker process, forked by the zygote: (worker id, store URLs, request
# fd, reply fd, its ring or None) -> exit status. The pool's owner hands it down (workers.loop.serve
# in a mount): this package never imports the workers.
WorkerMain = Callable[[int, StoreUrls, int, int, RingWriter | None], int]


def start(urls: StoreUrls, worker_main: WorkerMain,
          arena: Arena | None = None) -> tuple[multiprocessing.process.BaseProcess, socket.socket]:
    """Fork the zygote; return it and the pool's end of its control socket.

    Call before any thread that may hold locks in a forked child exists
    (before ``llfuse.init``), after logging (and multiprocessing-logging)
    is configured. Each worker runs ``worker_main``, inherited through the
    fork (never pickled); every worker inherits ``arena`` and writes read
    replies into the ring of its slot.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_main, args=(theirs, urls, worker_main, arena), name="tvixmount-zygote",
                              daemon=True)
    try:
        process.start()
    finally:
        theirs.close()
    return process, ours


# -- inside the zygote ---------------------------------------------------------------


def _main(sock: socket.socket, urls: StoreUrls, worker_main: WorkerMain, arena: Arena | None) -> None:
    logging.disable(logging.CRITICAL)
    _reset_signals()
    _set_name("tvix-zygote")
    lanes = set(arena.lanes.write_fds()) if arena is not None and arena.lanes is not None else set()
    _neutralise_fds({0, 1, 2, sock.fileno()} | _logging_fds() | lanes)
    gc.freeze()  # inherited objects are never collected here or in workers (no stale finalizers)
    _Zygote(sock, urls, worker_main, arena).run()


class _Zygote:
    def __init__(self, sock: socket.socket, urls: StoreUrls, worker_main: WorkerMain,
                 arena: Arena | None) -> None:
        self.sock = sock
        self.urls = urls
        self.worker_main = worker_main
        self.arena = arena
        self.children: dict[int, int] = {}  # pid -> worker id

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            if poller.poll(REAP_INTERVAL * 1000):
                data = self.sock.recv(4096)
                if not data:
                    break
                message = decode_control(data)
                if message[0] == "spawn":
                    self.spawn(message[1])
            self.reap()
        self.shutdown()

    def spawn(self, worker_id: int) -> None:
        fds: list[int] = []
        try:
            fds += os.pipe()
            fds += os.pipe()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.send(encode_control("spawn_failed", worker_id, f"pipe: {exc}"))
            return
        req_r, req_w, rep_r, rep_w = fds
        try:
            _grow_pipe(rep_w)
            pid = os.fork()
            if pid == 0:
                _worker_child(self.sock, self.urls, self.worker_main, self.arena, worker_id, req_r, rep_w,
                              (req_w, rep_r))
        except OSError as exc:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            self.send(encode_control("spawn_failed", worker_id, f"fork: {exc}"))
            return
        os.close(req_r)
        os.close(rep_w)
        self.children[pid] = worker_id
        try:
            socket.send_fds(self.sock, [encode_control("spawned", worker_id, pid)], [req_w, rep_r])
        except OSError:
            pass  # the pool is gone; the worker sees EOF at once
        finally:
            os.close(req_w)
            os.close(rep_r)

    def reap(self, block: bool = False) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            worker_id = self.children.pop(pid, -1)
            self.send(encode_control("exited", worker_id, pid, describe_status(status)))

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # nobody listens any more (shutting down)
            self.sock.send(data)

    def shutdown(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reap(block=True)


def _worker_child(sock: socket.socket, urls: StoreUrls, worker_main: WorkerMain, arena: Arena | None,
                  worker_id: int, req_r: int, rep_w: int, others: tuple[int, ...]) -> None:
    """The life of a freshly forked worker; never returns."""
    code = EXIT_CRASH
    try:
        zygote_pid = os.getppid()
        sock.close()
        for fd in others:
            os.close(fd)
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != zygote_pid:
            os._exit(0)  # the zygote died before the death signal was armed
        _set_name(f"tvix-worker-{worker_id}")
        multiprocessing.current_process().name = f"tvixmount-worker-{worker_id}"  # for %(processName)s
        logging.disable(logging.NOTSET)
        code = worker_main(worker_id, urls, req_r, rep_w, None if arena is None else arena.writer(worker_id))
    except BaseException:
        try:
            import traceback

            traceback.print_exc(file=sys.stderr)
        except BaseException:
            pass
    finally:
        _flush_logging()
        os._exit(code)


def _reset_signals() -> None:
    """Default signal handling here and in workers, whatever the dispatcher had set up.

    Stop signals are the dispatcher's to handle: Ctrl-C reaches the whole
    process group and systemd sends SIGTERM to the whole cgroup, and a
    worker dying first would fail reads during an orderly unmount. So the
    zygote and the workers ignore SIGINT, SIGTERM and SIGHUP and follow the
    dispatcher through EOF (and PR_SET_PDEATHSIG). SIGPIPE stays ignored
    (Python's default), so a vanished reader is a BrokenPipeError, not a
    silent death.
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def describe_status(status: int) -> str:
    """A wait status in words: 'exited with status 3', 'killed by SIGKILL'."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}"


# -- process hygiene ------------------------------------------------------------------


def _grow_pipe(fd: int) -> None:
    # Over /proc/sys/fs/pipe-max-size for this user, the default size works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, REPLY_PIPE_SIZE)


def _logging_fds() -> set[int]:
    """Fds the inherited logging set-up writes to (streams, multiprocessing-logging queues)."""
    fds: set[int] = set()
    loggers: list[Any] = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            for obj in (handler, getattr(handler, "sub_handler", None)):
                fds.add(_fileno(getattr(obj, "stream", None)))
            queue = getattr(handler, "queue", None)  # multiprocessing-logging keeps a multiprocessing.Queue
            for end in ("_reader", "_writer"):
                fds.add(_fileno(getattr(queue, end, None)))
    fds.discard(-1)
    return fds


def _fileno(obj: Any) -> int:
    try:
        return int(obj.fileno())
    except Exception:
        return -1


def _neutralise_fds(keep: set[int]) -> None:
    """Point every open fd outside ``keep`` at /dev/null (see the module docstring)."""
    fds = [int(name) for name in os.listdir("/proc/self/fd")]
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd in keep or fd == devnull:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # the directory listing's own fd, already closed
        os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def _flush_logging() -> None:
    """Push this process's queued log records to the dispatcher, waiting at most a second.

    multiprocessing-logging queues records through a feeder thread, which
    ``os._exit`` would kill with records still in it.
    """
    for handler in logging.getLogger().handlers:
        queue = getattr(handler, "queue", None)
        if isinstance(queue, multiprocessing.queues.Queue):
            with contextlib.suppress(Exception):
                queue.close()
    deadline = time.monotonic() + 1.0
    for thread in threading.enumerate():
        if "QueueFeederThread" in thread.name:
            thread.join(max(0.0, deadline - time.monotonic()))


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    _libc().prctl(option, value, 0, 0, 0)


def _set_name(name: str) -> None:
    """Set the process name shown by ps/top (15 bytes at most)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc().prctl(_PR_SET_NAME, buf, 0, 0, 0)
