"""HTTP for a binary cache: small files with retries, NARs as bounded streams.

One ``urllib3.PoolManager`` per client keeps connections alive between
requests (a lookup is a narinfo and a NAR from the same host), so a
second request costs no handshake. Every call carries a deadline
(``time.monotonic()``) and never waits past it:

* a request that fails before its answer (refused, reset, timed out, a 5xx
  or 429 answer) is retried with jittered exponential back-off while the
  deadline allows, then ``Unavailable`` (``Timeout`` when the deadline was
  what ran out) naming the URL and the last failure;
* 404, 403 and 410 are an answer, "not here" (403: S3 buckets without list
  permission say it for absent keys, and Nix reads it the same way);
* other 4xx (401, 400...) will not get better by asking again and fail at once;
* a stream's reads each wait at most the read timeout and never past the
  deadline: the socket's timeout is re-armed before every read, so a server
  that trickles bytes costs the deadline and no more. A connection that
  breaks mid-body is ``Unavailable`` and is not resumed: the caller starts
  over (the substituter's next lookup).

Bodies are taken as the server sends them (no ``Content-Encoding``
decoding): a NAR's FileHash is over the file's own bytes.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.parse
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util import Retry
from urllib3.util import Timeout as Urllib3Timeout

from ... import __version__
from ...errors import InvalidData, Timeout, Unavailable
from ..urls import redact

log = logging.getLogger(__name__)

NOT_THERE = (403, 404, 410)
RETRY_STATUS = (429, 500, 502, 503, 504)
SHORT_BODY = 64 * 1024
USER_AGENT = f"tvixmount/{__version__}"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # one read of a body; the deadline bounds the whole
    first_backoff: float = 0.1
    max_backoff: float = 5.0
    pool_size: int = 4
    max_redirects: int = 5


class Stream:
    """A response body read front to back with ``read(n)``; close it when done.

    ``read`` returns what one receive brought (at most ``n`` bytes; empty
    only at the end), so a trickling server cannot hold one call past the
    deadline. Failures are ``Unavailable``; reading past the deadline is
    ``Timeout``.
    """

    def __init__(
        self, response: urllib3.BaseHTTPResponse, url: str, deadline: float, config: HttpConfig
    ) -> None:
        self._response = response
        self.url = url
        self._deadline = deadline
        self._config = config
        length = response.headers.get("Content-Length")
        self.length = int(length) if length is not None and length.isdigit() else None
        self.received = 0

    def read(self, n: int) -> bytes:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{redact(self.url)}: deadline passed after {self.received} bytes of the body")
        _arm(self._response, min(self._config.read_timeout, remaining))
        try:
            data = self._response.read1(n, decode_content=False)
        except (HTTPError, OSError) as exc:
            when = f"after {self.received} bytes of the body"
            raise _failure(self.url, when, exc, self._deadline) from None
        self.received += len(data)
        return data

    def close(self) -> None:
        """Give the connection back when the body was read to its end, else drop it."""
        response = self._response
        if response.closed or (self.length is not None and self.received != self.length):
            response.close()
        else:
            response.release_conn()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpClient:
    """Requests below one base URL (``http(s)://host[:port][/path]``); thread-safe."""

    def __init__(self, base_url: str, config: HttpConfig | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidData(f"binary cache URL {redact(base_url)!r} is not http(s)://host[/path]")
        headers = {"User-Agent": USER_AGENT}
        if parts.username is not None:  # user:password@ in the URL: basic authentication
            user, password = (urllib.parse.unquote(part or "") for part in (parts.username, parts.password))
            headers.update(urllib3.make_headers(basic_auth=f"{user}:{password}"))
        self._origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self.base_url = (self._origin + parts.path).rstrip("/")
        self.config = config or HttpConfig()
        self._pool = urllib3.PoolManager(
            num_pools=self.config.pool_size,
            maxsize=self.config.pool_size,
            block=False,
            headers=headers,
            retries=Retry(total=None, connect=0, read=0, status=0, other=0,
                          redirect=self.config.max_redirects, raise_on_status=False),
        )

    def url(self, path: str) -> str:
        """``path`` below the base URL; an absolute URL must be on the cache's own origin.

        A narinfo's URL is not signed: an absolute one elsewhere would let
        whoever can alter narinfos make us request any address. Redirects
        the cache's server answers with are still followed (CDNs).
        """
        parts = urllib.parse.urlsplit(path)
        if parts.scheme:
            if f"{parts.scheme}://{parts.netloc}" != self._origin:
                raise InvalidData(f"NAR URL {path!r} is not on the cache's host ({self._origin})")
            return path
        return f"{self.base_url}/{urllib.parse.quote(path.lstrip('/'), safe='/:@-._~!$&()*+,;=%')}"

    def fetch(self, path: str, deadline: float, limit: int) -> bytes | None:
        """The whole body at ``path`` (at most ``limit`` bytes); None when the server says it is not there."""
        with _Opened(self._open(path, deadline)) as stream:
            if stream is None:
                return None
            if stream.length is not None and stream.length > limit:
                raise InvalidData(f"{redact(stream.url)}: {stream.length} bytes, more than {limit}")
            data = bytearray()
            while piece := stream.read(limit + 1 - len(data)):
                data += piece
                if len(data) > limit:
                    raise InvalidData(f"{redact(stream.url)}: more than {limit} bytes")
            return bytes(data)

    def open(self, path: str, deadline: float) -> Stream:
        """A stream of the body at ``path``; "not there" is Unavailable here (the caller knew it was)."""
        stream = self._open(path, deadline)
        if stream is None:
            raise Unavailable(f"{redact(self.url(path))}: the server says it is not there")
        return stream

    def _open(self, path: str, deadline: float) -> Stream | None:
        url = self.url(path)
        delay = self.config.first_backoff
        attempt = 0
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{redact(url)}: deadline passed after {attempt} attempts; last: {last}")
            attempt += 1
            timeout = Urllib3Timeout(connect=min(self.config.connect_timeout, remaining),
                                     read=min(self.config.read_timeout, remaining))
            try:
                response = self._pool.request("GET", url, preload_content=False, decode_content=False,
                                              timeout=timeout)
            except (HTTPError, OSError) as exc:
                last = _describe(exc)
            else:
                status = response.status
                if status == 200:
                    return Stream(response, url, deadline, self.config)
                if status in NOT_THERE:
                    log.debug("%s: HTTP %d, not there", redact(url), status)
                    _finish(response)
                    return None
                response.close()
                last = f"HTTP {status} {response.reason or ''}".strip()
                if status not in RETRY_STATUS:
                    raise Unavailable(f"{redact(url)}: {last}; not retried")
            pause = delay * random.uniform(0.5, 1.0)
            if time.monotonic() + pause >= deadline:
                raise Timeout(f"{redact(url)}: {last} (gave up after {attempt} attempts: deadline near)")
            log.debug("%s: %s; retrying in %.2f s (attempt %d)", redact(url), last, pause, attempt)
            time.sleep(pause)
            delay = min(delay * 2, self.config.max_backoff)

    def close(self) -> None:
        self._pool.clear()


class _Opened:
    """``with`` support for "a stream or None"."""

    def __init__(self, stream: Stream | None) -> None:
        self.stream = stream

    def __enter__(self) -> Stream | None:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.close()


def _finish(response: urllib3.BaseHTTPResponse) -> None:
    """Read a short error page so its connection can be reused; drop the connection otherwise."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) <= SHORT_BODY:
        try:
            response.drain_conn()
        except (HTTPError, OSError):
            response.close()
            return
        response.release_conn()
    else:
        response.close()


def _arm(response: urllib3.BaseHTTPResponse, timeout: float) -> None:
    """Set the read timeout of the socket under ``response`` (best effort: it may be gone)."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(max(timeout, 0.001))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"


def _failure(url: str, when: str, exc: BaseException, deadline: float) -> Unavailable:
    cls = Timeout if time.monotonic() >= deadline else Unavailable
    return cls(f"{redact(url)}: {when}: {_describe(exc)}")
