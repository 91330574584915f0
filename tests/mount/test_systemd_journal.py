"""Log lines under journald (JOURNAL_STREAM naming our stderr) and the log-level sources.

A real mount and a real ``tvixstore daemon`` write to a file whose
device:inode the test puts in JOURNAL_STREAM, as systemd does for the
stream it connects: every line, the workers' records included (they reach
the dispatcher through multiprocessing-logging), starts with its syslog
priority and carries no timestamp.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.fs_fixtures import HELLOWORLD_BLOB_NAME, Populate
from tests.grpc_daemon import free_port
from tests.mounting import Mount, descendants

JOURNAL_LINE = re.compile(r"^<([2-7])>(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+)\[(\d+)\]: ")
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+\[\d+\]: ")
PRIORITY = {"TRACE": "7", "DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}


def _journal_env(log_path: Path) -> str:
    log_path.touch()
    st = os.stat(log_path)
    return f"{st.st_dev}:{st.st_ino}"


def _check_journal_lines(text: str) -> list[re.Match]:
    matches = []
    for line in text.splitlines():
        match = JOURNAL_LINE.match(line)
        assert match, f"not a journal line: {line!r}"
        assert match[1] == PRIORITY[match[2]], line
        matches.append(match)
    return matches


def test_mount_and_worker_lines_carry_journal_priorities(tmp_path, local_store, store_dir, monkeypatch):
    Populate(local_store).helloworld()
    log_path = tmp_path / "mnt.log"
    monkeypatch.setenv("JOURNAL_STREAM", _journal_env(log_path))
    m = Mount(tmp_path / "mnt", store_dir, "--substitute-jobs", "5", log_path=log_path)
    with m:
        assert m.proc is not None
        worker_pids = {str(p) for p in descendants(m.proc.pid)}
        (m.mountpoint / os.fsdecode(HELLOWORLD_BLOB_NAME)).read_bytes()
        time.sleep(0.3)
    matches = _check_journal_lines(m.log())
    pids = {match[4] for match in matches}
    assert str(m.proc.pid) in pids and pids & worker_pids, (pids, worker_pids)
    assert any(match[2] == "INFO" for match in matches)


def test_mount_log_level_from_rust_log_and_trace(tmp_path, local_store, store_dir, monkeypatch):
    Populate(local_store).helloworld()
    monkeypatch.setenv("RUST_LOG", "hyper=debug,tvix_store=warn")
    m = Mount(tmp_path / "mnt", store_dir)
    m.cmd.remove("DEBUG")
    m.cmd.remove("--log-level")
    with m:
        pass
    text = m.log()
    assert " INFO " not in text and " DEBUG " not in text, text
    monkeypatch.delenv("RUST_LOG")
    m = Mount(tmp_path / "mnt2", store_dir)
    m.cmd[m.cmd.index("DEBUG")] = "trace"
    with m:
        pass
    assert " DEBUG " in m.log()
    assert all(PLAIN_LINE.match(line) for line in m.log().splitlines() if " tvixmount" in line)


def _run_daemon(tmp_path: Path, env: dict[str, str], log_path: Path, *args: str) -> str:
    """Run ``tvixstore daemon`` until it accepts a connection, stop it; its log."""
    cmd = [sys.executable, "-c", "import sys; from tvixmount.cli import tvixstore; sys.exit(tvixstore())"]
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*cmd, "--store-dir", str(tmp_path / "s"), "daemon", "-l",
                                 f"127.0.0.1:{port}", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
        try:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    return log_path.read_text()


def test_daemon_lines_have_timestamps_or_journal_priorities(tmp_path):
    text = _run_daemon(tmp_path, {}, tmp_path / "plain.log")
    lines = text.splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), text
    journal = tmp_path / "journal.log"
    text = _run_daemon(tmp_path, {"JOURNAL_STREAM": _journal_env(journal)}, journal, "--log-level", "WARN")
    assert text == ""  # only INFO lines happen: WARN hides them
    journal = tmp_path / "journal2.log"
    text = _run_daemon(tmp_path, {"JOURNAL_STREAM": _journal_env(journal), "RUST_LOG": "info"}, journal)
    assert any(m[2] == "INFO" for m in _check_journal_lines(text))
