"""systemd's notify protocol: datagrams to a path or abstract socket, the watchdog interval."""

from __future__ import annotations

import logging
import os

import pytest

from tests.notify_socket import NotifySocket
from tvixmount.sdnotify import Notifier, watchdog_interval


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_one_datagram_per_call(abstract):
    with NotifySocket(abstract=abstract) as sock:
        notifier = Notifier.from_environment(sock.env)
        assert notifier.ready("mounted /mnt")
        assert sock.read(1) == {"READY": "1", "STATUS": "mounted /mnt"}
        assert notifier.watchdog() and sock.read(1) == {"WATCHDOG": "1"}
        assert notifier.stopping() and sock.read(1) == {"STOPPING": "1"}
        notifier.close()


def test_without_a_socket_nothing_is_sent():
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and not notifier.ready() and not notifier.watchdog()
    assert not Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled


def test_a_line_with_a_newline_is_refused():
    with NotifySocket() as sock, pytest.raises(ValueError):
        Notifier(sock.path).status("two\nlines")


def test_a_gone_socket_warns_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "nobody"))
    with caplog.at_level(logging.DEBUG, logger="tvixmount.sdnotify"):
        assert not notifier.ready() and not notifier.watchdog()
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG], caplog.text


@pytest.mark.parametrize("env, interval", [
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout(env, interval):
    assert watchdog_interval(env) == interval
