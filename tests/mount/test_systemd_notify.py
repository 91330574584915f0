"""tvixmount under systemd's notify protocol, with a real mount and our own NOTIFY_SOCKET.

The socket is a datagram socket the test binds and reads (tests/notify_socket.py),
which is all systemd is to the service. READY=1 must come once the mount
answers, WATCHDOG=1 while the dispatcher and its pool are healthy and not
after the fork server is gone, STOPPING=1 when a stop begins.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.fs_fixtures import HELLOWORLD, HELLOWORLD_BLOB_NAME, Populate
from tests.mounting import descendants
from tests.notify_socket import NotifySocket
from tvixmount.mount_notify import SystemdLink
from tvixmount.sdnotify import Notifier


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_once_the_mount_answers_then_stopping(local_store, mount, monkeypatch, abstract):
    Populate(local_store).helloworld()
    with NotifySocket(abstract=abstract) as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        m = mount("-l")
        ready = notify.wait_for("READY=1")
        # The moment systemd hears READY=1 the files are there, through the kernel.
        assert os.stat(m.mountpoint).st_ino == 1
        assert (m.mountpoint / os.fsdecode(HELLOWORLD_BLOB_NAME)).read_bytes() == HELLOWORLD
        assert "workers ready" in ready["STATUS"] and str(m.mountpoint) in ready["STATUS"]
        assert notify.count("READY=1") == 1
        assert m.stop() == 0
        stopping = notify.wait_for("STOPPING=1", timeout=5)
        assert str(m.mountpoint) in stopping["STATUS"]
        assert notify.count("READY=1") == 1


def test_status_lines_count_requests(local_store, mount, monkeypatch):
    Populate(local_store).helloworld()
    with NotifySocket() as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("TVIXMOUNT_STATUS_INTERVAL", "0.2")
        m = mount("-l")
        notify.wait_for("READY=1")
        for _ in range(5):
            (m.mountpoint / os.fsdecode(HELLOWORLD_BLOB_NAME)).read_bytes()
        deadline = time.monotonic() + 10
        served = 0
        while time.monotonic() < deadline and served < 3:
            message = notify.read(1.0) or {}
            status = message.get("STATUS", "")
            if status.endswith("requests served") and "READY" not in message:
                served = int(status.split(", ")[-1].split()[0])
        assert served >= 3, notify.messages  # lookup + open + read at least


def test_watchdog_pings_while_healthy_and_stops_without_the_fork_server(local_store, mount, monkeypatch):
    Populate(local_store).helloworld()
    with NotifySocket() as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
        m = mount(expect_errors=True)
        notify.wait_for("READY=1")
        for _ in range(3):
            notify.wait_for("WATCHDOG=1", timeout=5)
        assert m.proc is not None
        zygote = descendants(m.proc.pid)[0]
        os.kill(zygote, signal.SIGKILL)  # no more worker restarts: the pool cannot heal
        for worker in descendants(m.proc.pid):
            os.kill(worker, signal.SIGKILL)
        time.sleep(1.0)
        notify.messages.clear()
        while notify.read(1.0) is not None:
            pass
        assert notify.count("WATCHDOG=1") == 0, notify.messages
        assert "withholding the watchdog ping" in m.log()


def test_watchdog_stops_while_every_fuse_thread_is_stuck(local_store, mount, monkeypatch):
    """One FUSE thread, held by a read whose worker is stopped: the probe queues behind it, no ping."""
    import threading

    Populate(local_store).helloworld()
    with NotifySocket() as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        m = mount("-l", "--threads", "1", "--request-timeout", "6", workers=1, expect_errors=True)
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=5)
        assert m.proc is not None
        worker = descendants(m.proc.pid)[1]  # [0] is the fork server
        os.kill(worker, signal.SIGSTOP)
        path = m.mountpoint / os.fsdecode(HELLOWORLD_BLOB_NAME)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(path.read_bytes()))
        try:
            reader.start()
            time.sleep(0.3)  # the read is on the only FUSE thread now, waiting for the stopped worker
            notify.messages.clear()
            deadline = time.monotonic() + 1.5
            while (left := deadline - time.monotonic()) > 0:
                notify.read(left)
            assert reader.is_alive() and notify.count("WATCHDOG=1") == 0, notify.messages
        finally:
            os.kill(worker, signal.SIGCONT)
        reader.join(20)
        assert got == [HELLOWORLD]
        notify.wait_for("WATCHDOG=1", timeout=5)  # healthy again: the pings come back


def test_a_watchdog_for_another_pid_is_not_ours(local_store, mount, monkeypatch):
    Populate(local_store).helloworld()
    with NotifySocket() as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", "1")
        mount()
        notify.wait_for("READY=1")
        while notify.read(0.5) is not None:
            pass
        assert notify.count("WATCHDOG=1") == 0


def test_no_ready_for_a_directory_that_is_not_the_mount(tmp_path: Path, caplog):
    """The readiness probe checks it reached our root (inode 1), not the directory under it."""
    with NotifySocket() as notify:
        link = SystemdLink(tmp_path, stats=lambda: None, pool_alive=lambda: True,  # type: ignore[arg-type]
                           notifier=Notifier(notify.path), watchdog=0.05)
        link.start()
        assert notify.read(0.5) is None
        link.close()
        assert notify.wait_for("STOPPING=1", timeout=2)
        assert notify.count("READY=1") == 0 and notify.count("WATCHDOG=1") == 0
    assert "is not our mount" in caplog.text
