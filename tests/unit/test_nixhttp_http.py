"""The HTTP client against a real server on loopback: answers, retries, deadlines, reuse."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nixhttp_fixtures import CacheServer, closed_port
from tvixmount.errors import InvalidData, Timeout, Unavailable
from tvixmount.store.nixhttp.http import HttpClient, HttpConfig

FAST = HttpConfig(connect_timeout=2.0, read_timeout=2.0, first_backoff=0.05, max_backoff=0.2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CacheServer]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.narinfo").write_bytes(b"A" * 1000)
    (tmp_path / "sub" / "big").write_bytes(bytes(range(256)) * 4096)
    found = CacheServer(tmp_path)
    yield found
    found.stop()


def client(server: CacheServer, config: HttpConfig = FAST) -> HttpClient:
    return HttpClient(server.url + "/sub/", config)


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def test_fetch_reuses_one_connection(server: CacheServer) -> None:
    http = client(server)
    for _ in range(5):
        assert http.fetch("a.narinfo", soon(), 4096) == b"A" * 1000
        assert http.fetch("absent.narinfo", soon(), 4096) is None
    assert server.count("/sub/a.narinfo") == 5
    assert server.connections == 1


@pytest.mark.parametrize("status", [403, 404, 410])
def test_not_there_answers_are_none(server: CacheServer, status: int) -> None:
    server.fault("sub/a.narinfo", status=status)
    assert client(server).fetch("a.narinfo", soon(), 4096) is None
    assert server.count("a.narinfo") == 1


def test_server_errors_are_retried_with_back_off(server: CacheServer) -> None:
    server.fault("sub/a.narinfo", status=503, times=2)
    assert client(server).fetch("a.narinfo", soon(), 4096) == b"A" * 1000
    assert server.count("a.narinfo") == 3


def test_persistent_server_errors_give_up_at_the_deadline(server: CacheServer) -> None:
    server.fault("sub/a.narinfo", status=500)
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"a.narinfo: HTTP 500.*gave up after \d+ attempts"):
        client(server).fetch("a.narinfo", soon(1.0), 4096)
    assert 0.5 < time.monotonic() - started < 1.5
    assert server.count("a.narinfo") >= 3


def test_client_errors_are_not_retried(server: CacheServer) -> None:
    server.fault("sub/a.narinfo", status=401)
    with pytest.raises(Unavailable, match=r"HTTP 401.*not retried"):
        client(server).fetch("a.narinfo", soon(), 4096)
    assert server.count("a.narinfo") == 1


def test_refused_connection_is_unavailable_within_the_deadline() -> None:
    http = HttpClient(f"http://127.0.0.1:{closed_port()}", FAST)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"NewConnectionError|refused"):
        http.fetch("a.narinfo", soon(0.8), 4096)
    assert time.monotonic() - started < 1.5


def test_a_hanging_server_costs_the_deadline(server: CacheServer) -> None:
    server.fault("sub/a.narinfo", delay=5.0)
    started = time.monotonic()
    with pytest.raises(Timeout):
        client(server).fetch("a.narinfo", soon(0.7), 4096)
    assert time.monotonic() - started < 1.5


def test_a_trickling_body_costs_the_deadline(server: CacheServer) -> None:
    server.fault("sub/big", trickle=0.05)
    started = time.monotonic()
    with pytest.raises(Timeout), client(server).open("big", soon(0.8)) as stream:
        while stream.read(1 << 16):
            pass
    assert time.monotonic() - started < 1.5


def test_a_hang_up_mid_body_is_unavailable(server: CacheServer) -> None:
    server.fault("sub/big", hangup_after=100_000)
    broken = r"after 100000 bytes of the body: ProtocolError.*IncompleteRead"
    with pytest.raises(Unavailable, match=broken) as caught, client(server).open("big", soon()) as stream:
        while stream.read(1 << 16):
            pass
    assert not isinstance(caught.value, Timeout)


def test_streams_are_read_whole_and_missing_ones_are_unavailable(server: CacheServer) -> None:
    http = client(server)
    with http.open("big", soon()) as stream:
        assert stream.length == 256 * 4096
        data = b"".join(iter(lambda: stream.read(100_000), b""))
    assert data == bytes(range(256)) * 4096
    with pytest.raises(Unavailable, match="says it is not there"):
        http.open("nar/absent.nar", soon())
    assert server.connections == 1  # the 404 page was read, the connection kept


def test_oversized_bodies_are_refused(server: CacheServer) -> None:
    with pytest.raises(InvalidData, match="1000 bytes, more than 999"):
        client(server).fetch("a.narinfo", soon(), 999)


def test_absolute_urls_must_stay_on_the_cache_host(server: CacheServer) -> None:
    http = client(server)
    assert http.url("nar/x.nar") == f"{server.url}/sub/nar/x.nar"
    assert http.fetch(server.url + "/sub/a.narinfo", soon(), 4096) == b"A" * 1000
    with pytest.raises(InvalidData, match="is not on the cache's host"):
        http.fetch("http://169.254.169.254/latest/meta-data", soon(), 4096)


def test_credentials_in_the_url_are_sent_as_basic_auth(server: CacheServer) -> None:
    seen: list[str | None] = []
    server.on_request = lambda handler: seen.append(handler.headers.get("Authorization"))
    http = HttpClient(server.url.replace("http://", "http://farm:s%40cret@") + "/sub", FAST)
    assert http.base_url == server.url + "/sub"
    assert http.fetch("a.narinfo", soon(), 4096) == b"A" * 1000
    assert seen == ["Basic " + base64.b64encode(b"farm:s@cret").decode()]
