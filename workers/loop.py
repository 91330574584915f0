"""The worker loop: read requests, call handlers, write replies, in order.

A worker is single-threaded and serves its requests one after another in
the order they arrive; many may be queued in its pipe. It opens its store
itself, after it was forked (a gRPC channel must never cross a fork), then
says hello; if the store does not open it says why and exits, and the pool
turns that into a clear start-up error or a backed-off restart.

It stops on EOF of its request pipe (the dispatcher closed it or died), or
when the reply pipe breaks. A request whose deadline has passed before it
is taken up is answered with Timeout without doing the work: its caller is
gone and the queue behind it should not wait for it.
"""

from __future__ import annotations

import logging
import os
import select
import time

from tvixmount.errors import InvalidData, Timeout, TvixError
from tvixmount.protocol import framing, messages, ops, readwire
from tvixmount.protocol.framing import FrameReader, ProtocolError, RingRef, write_frame
from tvixmount.protocol.ops import Handlers
from tvixmount.protocol.readwire import ReadRequest
from tvixmount.shmring import RingWriter
from tvixmount.store import StoreUrls, describe, open_store
from tvixmount.store.grpc.deadline import call_within, request_deadline

from .handlers import HANDLERS, Context

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_STORE = 3
EXIT_PROTOCOL = 4


def serve(worker_id: int, urls: StoreUrls, req_fd: int, rep_fd: int, ring: RingWriter | None = None, *,
          handlers: Handlers[Context] = HANDLERS) -> int:
    """Serve until EOF; return the process exit status.

    Blocks in reads of ``req_fd`` for the whole life of the worker. With
    ``ring`` (a pool worker), read replies carry their bytes through it.
    This is the worker entry point a pool is given (tvixmount.zygote.WorkerMain).
    """
    pid = os.getpid()
    try:
        store = open_store(urls)
    except Exception as exc:  # any failure to open is reported the same way, then we exit
        log.debug("worker %d pid %d could not open %s: %s", worker_id, pid, describe(urls), exc)
        _try_write(rep_fd, messages.encode_error(messages.HELLO_ID, exc))
        return EXIT_NO_STORE
    ctx = Context(worker_id, store, ring)
    try:
        log.debug("worker %d pid %d serving %s", worker_id, pid, describe(urls))
        if not _try_write(rep_fd, messages.encode_hello(worker_id, pid)):
            return EXIT_OK
        return _loop(ctx, handlers, req_fd, rep_fd)
    finally:
        ctx.close()


def _loop(ctx: Context, handlers: Handlers[Context], req_fd: int, rep_fd: int) -> int:
    reader = FrameReader(req_fd, 64 << 10, fixed=readwire.decode_request)
    while True:
        try:
            requests = reader.read()
        except ProtocolError as exc:
            log.error("worker %d pid %d: undecodable request stream: %s", ctx.worker_id, os.getpid(), exc)
            return EXIT_PROTOCOL
        if requests is None:
            log.debug("worker %d pid %d: request pipe closed; exiting", ctx.worker_id, os.getpid())
            return EXIT_OK
        for message in requests:
            try:
                parts = handle(ctx, message, handlers)
            except ProtocolError as exc:
                log.error("worker %d pid %d: %s", ctx.worker_id, os.getpid(), exc)
                return EXIT_PROTOCOL
            if parts and not _try_write(rep_fd, *parts):
                return EXIT_OK
        fill = ctx.fill_ahead
        while fill is not None and fill.todo and not _waiting(req_fd):  # idle: verify ahead of readers
            fill.step(ctx.readers.get)


def handle(ctx: Context, message: object, handlers: Handlers[Context] = HANDLERS) -> tuple[bytes, ...]:
    """The reply body (as parts for write_frame) for one decoded request; raises only ProtocolError."""
    if type(message) is ReadRequest:
        return _handle_read(ctx, message, handlers)
    req_id, name, args, deadline = messages.decode_request(message)
    if time.monotonic() > deadline:
        return (messages.encode_error(
            req_id, Timeout(f"{name}: deadline passed before worker {ctx.worker_id} took it up")),)
    try:
        op, handler = handlers.find(name, args)
        with request_deadline(deadline):  # a store call may wait for its server this long, no longer
            result = handler(ctx, *args)
        parts = messages.encode_reply_parts(req_id, op.encode(result))
        size = sum(len(p) for p in parts)
        if size > framing.MAX_FRAME:  # the dispatcher would take it for garbage and kill us
            raise InvalidData(f"{name}: the answer is {size} bytes, more than the {framing.MAX_FRAME} "
                              "a reply may carry")
        return parts
    except TvixError as exc:
        log.debug("worker %d: %s failed: %s", ctx.worker_id, name, exc)
        return (messages.encode_error(req_id, exc),)
    except Exception as exc:  # a bug or an unexpected library error: answer it, keep serving
        log.exception("worker %d pid %d: %s raised unexpectedly", ctx.worker_id, os.getpid(), name)
        return (messages.encode_error(req_id, exc),)


def _handle_read(ctx: Context, request: ReadRequest, handlers: Handlers[Context]) -> tuple[bytes, ...]:
    """``handle`` for a fixed ``blob_read`` request (readwire.py): its struct typed the arguments.

    A reply through the ring is a fixed frame too; an inline or error reply
    is msgpack, as for every op. A request that came on a lane is answered
    on that lane (``_answer_on_lane``; nothing for the reply pipe). Nothing
    is formatted unless it failed.
    """
    if request.lane != readwire.NO_LANE:
        _answer_on_lane(ctx, request, handlers)
        return ()
    result = _run_read(ctx, request, handlers)
    if isinstance(result, BaseException):
        return (messages.encode_error(request.req_id, result),)
    if type(result) is RingRef:
        return (readwire.encode_ring_reply(request.req_id, result),)
    return messages.encode_reply_parts(request.req_id, result)  # inline: at most MAX_READ, under MAX_FRAME


def _run_read(ctx: Context, request: ReadRequest, handlers: Handlers[Context]) -> bytes | RingRef | Exception:
    """The read's result, or the error to answer with."""
    _, deadline, digest, offset, length, size, _ = request
    if time.monotonic() > deadline:
        return Timeout(f"blob_read: deadline passed before worker {ctx.worker_id} took it up")
    try:
        result: bytes | RingRef = call_within(deadline, handlers.handler(ops.BLOB_READ), ctx, digest, offset,
                                              length, size)
        return result
    except TvixError as exc:
        log.debug("worker %d: blob_read failed: %s", ctx.worker_id, exc)
        return exc
    except Exception as exc:  # a bug or an unexpected library error: answer it, keep serving
        log.exception("worker %d pid %d: blob_read raised unexpectedly", ctx.worker_id, os.getpid())
        return exc


def _answer_on_lane(ctx: Context, request: ReadRequest, handlers: Handlers[Context]) -> None:
    """Read into the lane's buffer and answer on the lane's pipe (tvixmount/lanes.py).

    The bytes (or the error) are in the buffer before the reply is written,
    and the reply names this process, so the dispatcher takes an answer only
    from the worker that holds the call. A reply the lane's pipe cannot take
    has nobody waiting for it (the dispatcher gave the lane up): it is dropped.
    """
    lanes = ctx.ring.lanes if ctx.ring is not None else None
    if lanes is None or not 0 <= request.lane < len(lanes.buffers):
        raise ProtocolError(f"a read on lane {request.lane}, which this worker does not have")
    buffer = lanes.buffers[request.lane]
    ctx.lane_buffer = buffer
    try:
        result = _run_read(ctx, request, handlers)
    finally:
        ctx.lane_buffer = None
    if type(result) is bytes and len(result) <= len(buffer):  # an empty read at EOF, or a handler's own bytes
        buffer[:len(result)] = result
        result = RingRef(0, len(result))
    if type(result) is RingRef and result.start == 0 and 0 <= result.length <= len(buffer):
        body = readwire.encode_lane_reply(request.req_id, ctx.pid, result.length)
    else:
        if not isinstance(result, BaseException):
            result = InvalidData(f"blob_read: an answer of {_describe(result)} does not fit lane "
                                 f"{request.lane} ({len(buffer)} bytes)")
        error = messages.encode_error_value(result, len(buffer))
        buffer[:len(error)] = error
        body = readwire.encode_lane_reply(request.req_id, ctx.pid, len(error), ok=False)
    if not lanes.send(request.lane, body):
        log.warning("worker %d pid %d: lane %d is full; the reply to request %d is dropped", ctx.worker_id,
                    ctx.pid, request.lane, request.req_id)


def _describe(result: object) -> str:
    if type(result) is RingRef:
        return f"ring bytes [{result.start}+{result.length}]"
    return f"{len(result)} bytes" if isinstance(result, bytes) else type(result).__name__


def _waiting(fd: int) -> bool:
    """Whether a request is there to be read (without blocking)."""
    return bool(select.select([fd], [], [], 0)[0])


def _try_write(fd: int, *parts: bytes) -> bool:
    """Write one frame; False when the dispatcher is gone (broken pipe)."""
    try:
        write_frame(fd, *parts)
    except BrokenPipeError:
        return False
    return True
