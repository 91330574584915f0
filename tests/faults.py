"""Shared helpers of the fault-injection tests (tests/test_faults_*.py, test_security.py).

Each fault test injects a fault into a REAL mount and checks three things:
the errno a reader sees, the log line the mount wrote about it, and the
recovery. These helpers make the three checks short:

* ``serving``: a mount for a whole test module (one start-up for many
  faults). At the end it must exit 0, and every ERROR line it logged must
  match one of the patterns the module declared: an ERROR nobody expected
  fails the module's last test, as the ``mount`` fixture does per test.
* ``LogCursor``: the part of a mount's log written since a point in time,
  and waiting for a line to appear in it.
* ``attempt``: run one file-system call, return (errno or 0, seconds taken).
* ``workers``/``zygote``: the mount's processes, found by the names the
  zygote gives them (``tvix-zygote``, ``tvix-worker-N``).
* ``ScriptedStore``: an in-test gRPC server that serves a small store and
  can be told to be slow, answer UNAVAILABLE, cut streams short, send
  garbage or wrong bytes, per call.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import grpc

from tests.grpc_daemon import FakeServer
from tests.mounting import Mount, children
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import Node
from tvixmount.castore.pathinfo import NarInfo, PathInfo
from tvixmount.castore.storepath import StorePath
from tvixmount.castore.wire import encode_pathinfo
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.proto import rpc_directory_pb2 as dir_pb
from tvixmount.proto import rpc_pathinfo_pb2 as info_pb

ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) .*$", re.M)


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def store_path(name: str) -> StorePath:
    return StorePath(hashlib.sha256(name.encode()).digest()[:20], name)


def path_info(node: Node) -> PathInfo:
    """A PathInfo for a root node named as a store path basename (NAR fields of the right shape)."""
    return PathInfo(node=node, narinfo=NarInfo(nar_size=1, nar_sha256=hashlib.sha256(node.name).digest()))


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# -- the mount -------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(mountpoint: Path, store_dir: Path | None, *args: str, allowed_errors: tuple[str, ...] = (),
            urls: tuple[str, str, str] | None = None, workers: int = 2) -> Iterator[Mount]:
    """A mount for a whole module; on exit: status 0 and no ERROR line outside ``allowed_errors``."""
    m = Mount(mountpoint, store_dir, *args, urls=urls, workers=workers)
    m.start()
    try:
        yield m
    finally:
        status = m.stop()
    log = m.log()
    unexpected = [match.group(0) for match in ERROR_LINE.finditer(log)
                  if not any(re.search(p, match.group(0)) for p in allowed_errors)]
    assert status == 0, f"tvixmount exited with {status}:\n{log[-3000:]}"
    assert not unexpected, "unexpected ERROR lines in the mount log:\n" + "\n".join(unexpected[:20])


def stats(mountpoint: Path) -> dict:
    """``getfattr -n user.tvixmount.stats MNT``, as the operator would run it."""
    return json.loads(os.getxattr(mountpoint, "user.tvixmount.stats"))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def zygote(m: Mount) -> int:
    assert m.proc is not None
    found = [p for p in children(m.proc.pid) if _comm(p) == "tvix-zygote"]
    assert len(found) == 1, found
    return found[0]


def workers(m: Mount) -> dict[int, int]:
    """Worker id -> pid of the mount's live (not zombie) workers."""
    out = {}
    for pid in children(zygote(m)):
        name = _comm(pid)
        if name.startswith("tvix-worker-") and _state(pid) not in ("Z", "X", ""):
            out[int(name.rsplit("-", 1)[1])] = pid
    return out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def stopped(pid: int) -> bool:
    return _state(pid) == "T"


def wait_workers(m: Mount, count: int, timeout: float = 15.0,
                 exclude: tuple[int, ...] = ()) -> dict[int, int]:
    """Wait until ``count`` workers run (none of them a pid in ``exclude``) and the pool says ready."""
    def ready() -> dict[int, int] | None:
        found = workers(m)
        if len(found) != count or set(found.values()) & set(exclude):
            return None
        pool = stats(m.mountpoint)["fetcher"]["workers"]
        if not all(w["ready"] for w in pool.values()):
            return None
        return found

    found = wait_until(ready, timeout)
    assert found, f"workers not back: {workers(m)} {stats(m.mountpoint)['fetcher']}"
    return found


def reply_pipe_writer(worker_pid: int, dispatcher_pid: int) -> int:
    """A new write end of a worker's reply pipe, as if the worker wrote to it.

    The reply pipe is the one pipe the worker holds write-only whose other
    end only the dispatcher holds, read-only (the logging queue's write end
    is in the dispatcher too, so it cannot be confused with it), and which
    its zygote does not hold (every lane's pipe looks the same from here,
    but the zygote and every worker hold its write end).
    """
    def pipes(pid: int) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("pipe:"):
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        flags = int(f.read().split("flags:")[1].split()[0], 8)
                    mode = "w" if flags & os.O_ACCMODE == os.O_WRONLY else "r"
                    out.setdefault(target, set()).add(mode + ":" + fd)
        return out

    with open(f"/proc/{worker_pid}/stat") as stat:
        zygote = int(stat.read().rsplit(")", 1)[1].split()[1])
    mine, theirs, shared = pipes(worker_pid), pipes(dispatcher_pid), pipes(zygote)
    for target, modes in mine.items():
        ends = {m.split(":")[0] for m in theirs.get(target, set())}
        if {m.split(":")[0] for m in modes} == {"w"} and ends == {"r"} and target not in shared:
            fd = next(m.split(":")[1] for m in modes)
            return os.open(f"/proc/{worker_pid}/fd/{fd}", os.O_WRONLY)
    raise AssertionError(f"no reply pipe found for worker pid {worker_pid}")


# -- the reader's side -----------------------------------------------------------------------


def attempt(fn: Callable[[], Any]) -> tuple[int, float]:
    """Run one file-system call; (0 or the errno it failed with, seconds it took)."""
    started = time.monotonic()
    try:
        fn()
        code = 0
    except OSError as exc:
        code = exc.errno or -1
    return code, time.monotonic() - started


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def direct_read(path: Path, offset: int = 0, length: int = 64 * 1024) -> bytes:
    """One read past the page cache (O_DIRECT): one FUSE read request, never retried by the kernel.

    A buffered read whose readahead fails is retried by the kernel with a
    second, synchronous FUSE read, so it can wait two deadlines and hide an
    EIO; this is the read to use where one request's outcome is asserted.
    """
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, max(length, mmap.PAGESIZE)) as buf:  # page-aligned, as O_DIRECT wants
            got = os.preadv(fd, [buf], offset)
            return bytes(buf[:got])
    finally:
        os.close(fd)


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "OK"


class LogCursor:
    """The log a mount wrote after this cursor was made (or last moved), or all of it (``from_start``)."""

    def __init__(self, m: Mount, from_start: bool = False) -> None:
        self.m = m
        self.start = len(m.log_path.read_bytes()) if m.log_path.exists() and not from_start else 0

    def text(self) -> str:
        with open(self.m.log_path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    def lines(self, level: str | None = None, containing: str = "") -> list[str]:
        return [line for line in self.text().splitlines()
                if (level is None or f" {level} " in line) and containing in line]

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        """The first new line matching ``pattern`` (regex), waiting for it to be written."""
        def find() -> str | None:
            return next((line for line in self.text().splitlines() if re.search(pattern, line)), None)

        line = wait_until(find, timeout)
        assert line, f"no log line matching {pattern!r} within {timeout} s; new log:\n{self.text()[-3000:]}"
        return line


# -- a scriptable gRPC store -----------------------------------------------------------------

STAT = "/tvix.castore.v1.BlobService/Stat"
READ = "/tvix.castore.v1.BlobService/Read"
GET_DIR = "/tvix.castore.v1.DirectoryService/Get"
GET_INFO = "/tvix.store.v1.PathInfoService/Get"
LIST_INFO = "/tvix.store.v1.PathInfoService/List"


class ScriptedStore:
    """A small store served by a real gRPC server in this process, with faults on request.

    Blobs are served as one chunk (as tvix does for small blobs) unless
    ``chunked`` lists them in pieces. ``faults`` maps a method path (or
    ``"*"``) to a function ``(request digest) -> action`` consulted on every
    call; an action is None (serve normally) or one of:

    * ``("sleep", s)``: sleep s seconds, then serve normally;
    * ``("status", code)``: fail the call with that grpc.StatusCode;
    * ``("bytes", data)``: serve ``data`` as the blob / raw message instead;
    * ``("cut", n)``: a Read stream that ends cleanly after n bytes;
    * ``("drop", n)``: a Read stream that fails UNAVAILABLE after n bytes;
    * ``("raw", data)``: a Read stream of one message of exactly these bytes.
    """

    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.chunked: dict[bytes, list[bytes]] = {}  # blob digest -> its pieces (listed by Stat)
        self.directories: dict[bytes, bytes] = {}
        self.infos: dict[bytes, bytes] = {}
        self.faults: dict[str, Callable[[bytes], tuple[str, Any] | None]] = {}
        self.calls: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.server = FakeServer({STAT: self._stat, READ: self._read, GET_DIR: self._get_dir,
                                  GET_INFO: self._get_info, LIST_INFO: self._list_info})
        self.url = self.server.url

    # filling -------------------------------------------------------------------------------

    def add_blob(self, data: bytes, chunk: int | None = None) -> bytes:
        digest = b3(data)
        self.blobs[digest] = data
        if chunk is not None and len(data) > chunk:
            pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
            self.chunked[digest] = pieces
            for piece in pieces:
                self.blobs[b3(piece)] = piece
        return digest

    def add_directory(self, directory: Directory) -> bytes:
        self.directories[directory.digest()] = directory.encode()
        return directory.digest()

    def add_root(self, node: Node) -> None:
        info = path_info(node)
        from tvixmount.castore.storepath import parse_basename

        self.infos[parse_basename(node.name).digest] = encode_pathinfo(info)

    def close(self) -> None:
        self.server.close()

    # serving -------------------------------------------------------------------------------

    def _fault(self, method: str, digest: bytes, context: grpc.ServicerContext) -> tuple[str, Any] | None:
        with self._lock:
            self.calls.append((method, digest))
            rule = self.faults.get(method) or self.faults.get("*")
        action = rule(digest) if rule else None
        if action is None:
            return None
        kind, arg = action
        if kind == "sleep":
            time.sleep(arg)
            return None
        if kind == "status":
            context.abort(arg, f"scripted {arg.name}")
        return action

    def _stat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        digest = blob_pb.StatBlobRequest.FromString(request).digest
        action = self._fault(STAT, digest, context)
        if action and action[0] == "bytes":
            return action[1]  # type: ignore[no-any-return]
        if digest not in self.blobs:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        msg = blob_pb.StatBlobResponse()
        for piece in self.chunked.get(digest, []):
            msg.chunks.add(digest=b3(piece), size=len(piece))
        return msg.SerializeToString()

    def _read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        digest = blob_pb.ReadBlobRequest.FromString(request).digest
        action = self._fault(READ, digest, context)
        if action and action[0] == "raw":
            yield action[1]
            return
        data = self.blobs.get(digest)
        if action and action[0] == "bytes":
            data = action[1]
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        limit = action[1] if action and action[0] in ("cut", "drop") else len(data)
        for start in range(0, min(limit, len(data)), 64 * 1024):
            yield blob_pb.BlobChunk(data=data[start : min(start + 64 * 1024, limit)]).SerializeToString()
        if action and action[0] == "drop":
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: connection lost mid-stream")

    def _get_dir(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        msg = dir_pb.GetDirectoryRequest.FromString(request)
        action = self._fault(GET_DIR, msg.digest, context)
        if action and action[0] == "bytes":
            yield action[1]
            return
        data = self.directories.get(msg.digest)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such directory")
        yield data

    def _get_info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        digest = info_pb.GetPathInfoRequest.FromString(request).by_output_hash
        action = self._fault(GET_INFO, digest, context)
        if action and action[0] == "bytes":
            return action[1]  # type: ignore[no-any-return]
        if digest not in self.infos:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such path info")
        return self.infos[digest]

    def _list_info(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._fault(LIST_INFO, b"", context)
        yield from self.infos.values()
