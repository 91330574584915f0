"""``tvixstore daemon`` and the other commands pointed at it over gRPC.

One real daemon subprocess on a unix socket (checking directory sizes the way
a current tvix-store does), then ``import``, ``ls``, ``cat`` and ``verify``
through ``grpc+unix://`` URLs: the default size convention is accepted, the
documented one is refused by the server, and verify checks what the path
infos reach although gRPC cannot list blobs or directories.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.process.test_admin_import import make_import_fixtures
from tvixmount.admin import cli

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("grpc")


@pytest.fixture
def daemon(tmp_path):
    """A running daemon on a short unix socket path; yields its client URL."""
    sockdir = tempfile.mkdtemp(prefix="tvs-", dir="/tmp")  # socket paths are limited to 108 bytes
    sock = Path(sockdir) / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvixmount.admin.cli", "--store-dir", str(tmp_path / "served"), "daemon",
         "-l", f"unix://{sock}", "--check-dir-sizes", "doubled"],
        env=env, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        yield f"grpc+unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(sockdir, ignore_errors=True)
    assert proc.returncode == 0


def _remote(url: str) -> list[str]:
    return ["--blob-service-addr", url, "--directory-service-addr", url, "--path-info-service-addr", url]


def test_import_browse_and_verify_over_grpc(daemon, tmp_path, capsysbinary):
    tree = make_import_fixtures(tmp_path)
    (tree / "a_dir" / "a_file").write_bytes(b"over the wire\n" * 1000)
    remote = _remote(daemon)

    assert cli.main([*remote, "import", "--dir-size-convention", "documented", str(tree)]) == 1
    _, err = capsysbinary.readouterr()
    assert err.decode().startswith(f"tvixstore: error: import {tree}: ") and "size" in err.decode()

    assert cli.main([*remote, "import", str(tree)]) == 0
    out, err = capsysbinary.readouterr()
    path = out.decode().strip()
    assert path.startswith("/nix/store/") and path.endswith("-import_fixtures") and err == b""

    assert cli.main([*remote, "cat", f"{path}/a_dir/a_file"]) == 0
    assert capsysbinary.readouterr()[0] == b"over the wire\n" * 1000
    assert cli.main([*remote, "ls", path]) == 0
    assert capsysbinary.readouterr()[0].split() == [b"a_dir", b"a_file", b"b_dir", b"c_dir", b"d_dir",
                                                      b"symlink_to_a_dir"]
    assert cli.main([*remote, "verify", "--nar"]) == 0
    summary = capsysbinary.readouterr()[0].decode()
    assert summary.startswith("checked 2 blobs (14000 bytes), 6 directories, 1 path infos (the store cannot")
    assert summary.endswith(": OK\n")
