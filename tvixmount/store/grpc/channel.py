"""gRPC plumbing shared by the three client services: channels, deadlines, the stream watchdog.

One call, end to end::

    GrpcBlobService.stat(digest)
      -> Endpoint.unary(method, request bytes, what)      deadline: unary_timeout
           -> grpc channel (made lazily, in this process)  -> server
      <- response bytes, or grpc.RpcError -> translate() -> a tvixmount.errors class

    Endpoint.stream(...) yields raw response messages; a shared watchdog
    thread cancels a stream whose next message is more than ``stream_gap``
    seconds late, and the cancellation surfaces as Timeout.

Invariants:

* No ``grpc.RpcError`` (nor grpc's ValueError on a closed channel) leaves
  this module's callers: ``translate`` (status.py) turns every status into
  NotFound, Unavailable/Timeout, InvalidData, ReadOnly or TvixError, with a
  message naming what was asked for and which server answered.
* A channel belongs to the process that made it. An Endpoint used after a
  fork opens a fresh channel in the child and never touches the parent's.
* A failed call leaves the Endpoint usable: grpc reconnects its channel by
  itself (short back-off, see ``_OPTIONS``), and read-only methods are
  retried on UNAVAILABLE by grpc's retry policy within their deadline.
* A read-only call that fails because the *connection* is down (a daemon
  restarting) waits for the channel to reconnect, for a bounded patience,
  and is made again (``Endpoint._await_return``). The patience is a share
  of the time left in the caller's ``request_deadline`` scope
  (deadline.py: a mount worker serving a request), else
  ``ClientConfig.reconnect_wait``. An UNAVAILABLE the server answered on a
  connected channel is not waited for: it fails after grpc's retries, as
  before. A call never waits past its patience, so nothing hangs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.experimental

from ...errors import (
    InvalidArgument,
    Timeout,
    TvixError,
    Unavailable,
)
from .. import urls
from ..urls import StoreUrl
from .deadline import patience_until
from .status import trailer_code, translate, transport_words
from .wire import BLOB_BATCH_SERVICE, BLOB_SERVICE, DIRECTORY_SERVICE, MAX_MESSAGE, PATH_INFO_SERVICE

log = logging.getLogger(__name__)

UNARY_TIMEOUT = 30.0  # seconds for a whole unary call
STREAM_GAP = 30.0  # seconds a stream may go without a message before it is cancelled
CONNECT_TIMEOUT = 10.0  # seconds ?wait-connect=1 waits for the first connection
# Seconds a read waits for a reconnecting server outside any request_deadline
# scope. Small: a mount worker is declared hung after half its request's
# deadline (3 s in the fault tests), and it is the scope that should decide.
RECONNECT_WAIT = 0.5

_READ_METHODS = (
    (BLOB_SERVICE, "Stat"),
    (BLOB_SERVICE, "Read"),
    (DIRECTORY_SERVICE, "Get"),
    (PATH_INFO_SERVICE, "Get"),
    (PATH_INFO_SERVICE, "List"),
    (PATH_INFO_SERVICE, "CalculateNAR"),
    (BLOB_BATCH_SERVICE, "Read"),
)
_PATIENT = frozenset(f"/{service}/{method}" for service, method in _READ_METHODS)
_READY_CHECK = 0.05  # seconds to learn whether the channel is connected right now
# Reads are idempotent: let grpc retry them when the connection is not up
# (a daemon restarting). A stream is only retried before its first message.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": s, "method": m} for s, m in _READ_METHODS],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})

_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # Notice a dead peer during a long call within ~40 s. Pings only while
    # calls are active, so an idle mount does not keep waking the server.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # After a daemon restart, come back within seconds, not grpc's default 2 min.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    # 1 s: a read waiting for a restarted daemon notices it within about a second.
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    # Server streams driven by the calling thread: grpc otherwise starts a
    # thread per call when none is active, which was a third of the cost of
    # reading one 256 KiB chunk (measured: 3.8 -> see README).
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Deadlines of one client; the defaults are the module constants."""

    unary_timeout: float = UNARY_TIMEOUT
    stream_gap: float = STREAM_GAP
    connect_timeout: float = CONNECT_TIMEOUT
    reconnect_wait: float = RECONNECT_WAIT


# -- stream watchdog -----------------------------------------------------------------


class _Watched:
    """One call under watch: cancelled when ``due`` passes while ``armed``."""

    __slots__ = ("armed", "call", "due", "gap", "quiet", "timed_out", "what")

    def __init__(self, call: Any, gap: float, what: str, quiet: bool = False) -> None:
        self.call = call
        self.gap = gap
        self.what = what
        self.quiet = quiet  # an idle stream its reader parked: cancelling it is routine
        self.due = time.monotonic() + gap
        self.armed = True
        self.timed_out = False

    def progress(self) -> None:
        self.due = time.monotonic() + self.gap


class _Watchdog:
    """One thread per process that cancels calls whose next message is overdue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: set[_Watched] = set()
        self._pid = -1
        self._wake = threading.Event()

    def watch(self, call: Any, gap: float, what: str, quiet: bool = False) -> _Watched:
        watched = _Watched(call, gap, what, quiet)
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: the thread is not ours
                self._pid = os.getpid()
                self._calls = set()
                self._wake = threading.Event()
                threading.Thread(target=self._run, args=(self._wake,), name="grpc-stream-watchdog",
                                 daemon=True).start()
            self._calls.add(watched)
        return watched

    def forget(self, watched: _Watched) -> None:
        with self._lock:
            self._calls.discard(watched)

    def _run(self, wake: threading.Event) -> None:
        while True:
            wake.wait(0.1)
            now = time.monotonic()
            with self._lock:
                overdue = [w for w in self._calls if w.armed and w.due < now]
                for w in overdue:
                    self._calls.discard(w)
            for w in overdue:
                if w.call is None:  # not started yet; look again next round
                    with self._lock:
                        self._calls.add(w)
                    continue
                w.timed_out = True
                log.log(logging.DEBUG if w.quiet else logging.WARNING,
                        "%s: no progress for %.1f s; cancelling the call", w.what, w.gap)
                w.call.cancel()


_watchdog = _Watchdog()


# -- endpoint --------------------------------------------------------------------------


class Endpoint:
    """One server, as a service sees it: a lazily made channel and typed call helpers.

    Thread-safe: any number of threads may call through one Endpoint
    (grpc channels are thread-safe; the lazy creation is locked).
    """

    def __init__(self, url: StoreUrl, config: ClientConfig | None = None) -> None:
        self.url = url
        self.config = config or ClientConfig()
        self.server = urls.redact(url.text)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._pid = -1
        self._methods: dict[tuple[str, str], Callable[..., Any]] = {}
        self._lacking: set[str] = set()  # methods this channel's server answered UNIMPLEMENTED
        self._closed = False
        # The patience point of the last wait that ran out: other calls with the same point
        # (the same request) do not wait again, so one request waits at most once.
        self._gave_up_at: float | None = None
        if url.flag("wait-connect"):
            self.wait_connected()

    # channel --------------------------------------------------------------------------

    def target(self) -> str:
        if self.url.scheme == "grpc+unix":
            return "unix:" + self.url.path
        return self.url.host

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise InvalidArgument(f"gRPC client for {self.server} is closed")
            if self._channel is None or self._pid != os.getpid():
                # In a forked child the parent's channel is left alone: closing
                # it here would touch state the child does not own.
                self._channel = self._make_channel()
                self._pid = os.getpid()
                self._methods = {}
                self._lacking = set()
                log.debug("opened a gRPC channel to %s (pid %d)", self.server, self._pid)
            return self._channel

    def _make_channel(self) -> grpc.Channel:
        if self.url.scheme == "grpc+https":
            return grpc.secure_channel(self.target(), grpc.ssl_channel_credentials(), options=_OPTIONS)
        return grpc.insecure_channel(self.target(), options=_OPTIONS)

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; Unavailable after ``timeout``."""
        limit = self.config.connect_timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self.channel()).result(timeout=limit)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"cannot connect to {self.server} within {limit:g} s") from None
        log.debug("connected to %s", self.server)

    def _method(self, kind: str, path: str) -> Callable[..., Any]:
        channel = self.channel()
        with self._lock:
            method = self._methods.get((kind, path))
            if method is None:
                # No (de)serializers: we send and receive raw bytes and decode
                # them ourselves, so bad data becomes InvalidData, not a grpc error.
                method = getattr(channel, kind)(path, request_serializer=None, response_deserializer=None)
                self._methods[(kind, path)] = method
            return method

    def lacks(self, path: str) -> bool:
        """Whether this channel's server said it has no ``path`` (see ``lacking``)."""
        with self._lock:
            return path in self._lacking and self._pid == os.getpid()

    def lacking(self, path: str) -> bool:
        """Remember that the server answered UNIMPLEMENTED for ``path``; True the first time.

        Kept per channel: a new channel (a forked child's) asks again.
        """
        with self._lock:
            first = path not in self._lacking
            self._lacking.add(path)
            return first

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
            mine = self._pid == os.getpid()
        if channel is not None and mine:
            channel.close()

    # calls ------------------------------------------------------------------------------

    def unary(self, path: str, request: bytes, what: str) -> bytes:
        """One unary call within ``unary_timeout``; the raw response bytes.

        A read-only call that met a server being away is made again once
        the channel reconnects, within its patience (module doc).
        """
        method = self._method("unary_unary", path)
        until = patience_until(self.config.reconnect_wait) if path in _PATIENT else None
        while True:
            try:
                response: bytes = method(request, timeout=self.config.unary_timeout)
            except grpc.RpcError as exc:
                error = translate(exc, what, self.server)
                if until is None:
                    raise error from None
                self._await_return(exc, error, until)
            except ValueError as exc:  # grpc's "closed channel"
                raise Unavailable(f"{what}: channel to {self.server} unusable: {exc}") from None
            else:
                return response

    def stream(self, path: str, request: bytes, what: str, timeout: float | None = None,
               gap: float | None = None, quiet: bool = False) -> Generator[bytes, None, None]:
        """The raw messages of a server stream; cancelled if one is ``gap`` late.

        Closing the iterator early cancels the call (nothing keeps running).
        ``timeout`` bounds the whole call (for streams known to be short).
        ``gap`` defaults to ``stream_gap``; ``quiet`` logs its cancellation at
        DEBUG (a stream its reader left idle on purpose). A read-only stream
        that fails before its first message because the server is away is
        made again once the channel reconnects, within its patience.
        """
        method = self._method("unary_stream", path)
        until = patience_until(self.config.reconnect_wait) if path in _PATIENT else None
        while True:
            try:
                call = method(request, timeout=timeout)
            except ValueError as exc:
                raise Unavailable(f"{what}: channel to {self.server} unusable: {exc}") from None
            watched = _watchdog.watch(call, self.config.stream_gap if gap is None else gap,
                                      f"{what} from {self.server}", quiet)
            arrived = False
            try:
                while True:
                    try:
                        message = next(call)
                    except StopIteration:
                        return
                    except grpc.RpcError as exc:
                        error = translate(exc, what, self.server, watched.timed_out)
                        if arrived or until is None or watched.timed_out:
                            raise error from None
                        self._await_return(exc, error, until)
                        break  # the server is back: make the call again
                    watched.progress()
                    arrived = True
                    yield message
            finally:
                _watchdog.forget(watched)
                call.cancel()  # no-op when the call already ended

    def _await_return(self, exc: grpc.RpcError, error: TvixError, until: float) -> None:
        """Return when a call that failed with ``error`` should be made again; else raise.

        Made again: an UNAVAILABLE that came from the connection (grpc's
        words for it, or a channel that is not connected now), once the
        channel is connected again before ``until``. Raised: everything
        else, including an UNAVAILABLE our daemon or any server answered
        on a connected channel, and a server that stays away.
        """
        if type(error) is not Unavailable or trailer_code(exc) is not None:
            raise error from None  # not about the connection, or our daemon's own answer
        started = time.monotonic()
        if until <= started:
            raise error from None
        future = grpc.channel_ready_future(self.channel())
        try:
            try:
                future.result(timeout=min(until - started, _READY_CHECK))
            except grpc.FutureTimeoutError:
                if self._gave_up_at == until:  # this request already waited in vain
                    raise error from None
            else:
                if transport_words(error):
                    return  # the connection broke and is already back
                raise error from None  # connected all along: the server answered this
            log.debug("%s is away (%s); waiting up to %.1f s for it", self.server, error, until - started)
            try:
                future.result(timeout=max(0.0, until - time.monotonic()))
            except grpc.FutureTimeoutError:
                self._gave_up_at = until
                waited = time.monotonic() - started
                raise Unavailable(f"{error}; not back after waiting {waited:.1f} s") from None
            log.info("%s is back after %.1f s; making the call again (%s)", self.server,
                     time.monotonic() - started, str(error).split(":", 1)[0])
        finally:
            future.cancel()

    def client_stream(self, path: str, requests: Iterable[bytes], what: str) -> ClientStream:
        """Start a client-streaming call fed from ``requests``; see ClientStream."""
        method = self._method("stream_unary", path)
        return ClientStream(self, method, requests, what)


class ClientStream:
    """A running client-streaming call (Put).

    ``requests`` is consumed by a grpc thread, which asks for the next
    message only once the previous one was sent. The watchdog cancels the
    call when a message waits longer than ``stream_gap`` to be sent (a
    stalled server cannot block a writer forever); time the caller spends
    producing the next message does not count. Once everything is sent,
    the server has ``unary_timeout`` to answer.
    """

    def __init__(self, endpoint: Endpoint, method: Any, requests: Iterable[bytes], what: str) -> None:
        self._endpoint = endpoint
        self.what = what
        self._sent_at: float | None = None
        self._watched = _watchdog.watch(None, endpoint.config.stream_gap, f"{what} on {endpoint.server}")
        self._watched.armed = False
        try:
            self._future = method.future(self._tracked(requests))
        except ValueError as exc:
            _watchdog.forget(self._watched)
            raise Unavailable(f"{what}: channel to {endpoint.server} unusable: {exc}") from None
        self._watched.call = self._future

    def _tracked(self, requests: Iterable[bytes]) -> Iterator[bytes]:
        for message in requests:  # waiting here is the caller's time, not the server's
            self._watched.progress()
            self._watched.armed = True
            yield message  # grpc asks for the next one when this one is sent
            self._watched.armed = False
        self._sent_at = time.monotonic()

    def done(self) -> bool:
        return bool(self._future.done())

    def wait(self, timeout: float | None) -> bool:
        """Whether the call ended within ``timeout`` seconds (None: wait for it)."""
        ended = threading.Event()
        self._future.add_done_callback(lambda _future: ended.set())
        return ended.wait(timeout)

    def result(self) -> bytes:
        """The response, once every request was sent; errors translated."""
        answer_within = self._endpoint.config.unary_timeout
        try:
            while True:
                if self._sent_at is None:  # still sending: the watchdog guards that
                    wait = 0.5
                else:
                    wait = self._sent_at + answer_within - time.monotonic()
                    if wait <= 0:
                        self._future.cancel()
                        raise Timeout(
                            f"{self.what}: {self._endpoint.server} did not answer within {answer_within:g} s"
                        )
                try:
                    return self._future.result(timeout=wait)
                except grpc.FutureTimeoutError:
                    continue
        except grpc.RpcError as exc:
            raise translate(exc, self.what, self._endpoint.server, self._watched.timed_out) from None
        except grpc.FutureCancelledError:
            if self._watched.timed_out:
                raise Timeout(
                    f"{self.what}: {self._endpoint.server} took no data for {self._watched.gap:g} s; "
                    "upload cancelled"
                ) from None
            raise Unavailable(f"{self.what}: upload to {self._endpoint.server} was cancelled") from None
        finally:
            _watchdog.forget(self._watched)

    def cancel(self) -> None:
        _watchdog.forget(self._watched)
        self._future.cancel()
