"""tvix-store's ``mount`` lines, with ``tvix-store`` replaced by ``tvixstore`` (or by ``tvixmount``).

Each line mounts, for real, the daemon tests/process/test_cli_compat.py
starts and fills with tvix-store's import and copy lines; the test reads
the imported tree and the copied Nix closure through the mount and looks at
what the line asked for (root listing, allow_other, xattrs, the log level,
which address each service uses).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.mounting import FUSE_MISSING, Mount
from tests.netns import MISSING as NETNS_MISSING
from tests.netns import NetNs
from tests.process.test_admin_copy import attrs_json  # noqa: F401 - fixtures, used through ``filled``
from tests.process.test_cli_compat import (  # noqa: F401 - daemon and filled are fixtures
    ADDRS,
    ADDRS_ENV,
    ENV_NAMES,
    Line,
    command,
    daemon,
    environment,
    filled,
)

MOUNTS = [
    Line(f"tvixstore mount {{mnt}} {ADDRS}", "flags"),
    Line("tvixstore --log-level debug mount -l {mnt} --blob-service-addr={url} "
         "--directory-service-addr={url} --path-info-service-addr={url} --threads 4", "list"),
    Line(f"{ADDRS_ENV} THREADS=2 ALLOW_OTHER=true tvixstore mount --list-root {{mnt}}", "env"),
    Line(f"tvixstore --otlp=false mount {{mnt}} {ADDRS} --show-xattr --allow-other", "xattr"),
    Line("tvixstore mount {mnt} --path-info-service-addr {url}", "partial"),
]


needs_fuse = pytest.mark.skipif(FUSE_MISSING is not None, reason=FUSE_MISSING or "")


# Each line as tvixstore's, and as tvixmount's where it has no tvixstore option before ``mount``.
CASES = [(line, "tvixstore mount") for line in MOUNTS] + [
    (line, "tvixmount") for line in MOUNTS if line.text.startswith(("tvixstore mount", "BLOB"))]


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize(("line", "program"), CASES, ids=[f"{p}-{line.check}" for line, p in CASES])
def test_mount_lines(filled, line, program, tmp_path, monkeypatch):  # noqa: F811 - the imported fixture
    url, store_path, closure = filled.daemon.url, filled.store_path, filled.closure
    text = line.text.replace("tvixstore mount", program)
    mnt = tmp_path / "mnt"
    env, argv = command(text, mnt=str(mnt), url=url)
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment(env, tmp_path / "unused-store").items():
        monkeypatch.setenv(name, value)
    mount = Mount(mnt)
    mount.cmd = argv
    with mount:
        log = mount.log()
        if line.check == "partial":
            # Blobs and directories at tvix-store's default, the path infos at the daemon.
            assert "blob service: grpc+http://[::1]:8000 (the default for a service not given)" in log
            assert "directory service: grpc+http://[::1]:8000 (the default for a service not given)" in log
            assert f"path info service: {url} (--path-info-service-addr)" in log
            return
        origin = "env PATH_INFO_SERVICE_ADDR" if line.check == "env" else "--path-info-service-addr"
        assert f"path info service: {url} ({origin})" in log
        hello = mount.path(Path(store_path).name, "bin", "hello")
        assert hello.read_text() == "#!/bin/sh\necho hello\n" and os.access(hello, os.X_OK)
        app = mount.path(Path(closure["app"]).name)
        assert app.read_bytes() == Path(closure["app"]).read_bytes()
        if line.check in ("list", "env"):
            assert Path(store_path).name in os.listdir(mnt)
        else:
            with pytest.raises(PermissionError):
                os.listdir(mnt)
        if line.check in ("env", "xattr"):
            assert "allow_other" in mount_options(mnt)
        if line.check == "xattr":
            assert os.getxattr(hello, "user.tvix.castore.blob.digest")
        if line.check == "list":
            assert " DEBUG " in mount.log()
        assert [ln for ln in mount.log().splitlines() if " ERROR " in ln] == []
    assert mount.proc is not None and mount.proc.returncode == 0


def mount_options(mnt: Path) -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mnt):
            return fields[3]
    raise AssertionError(f"{mnt} is not mounted")




# -- mounts of a daemon at tvix-store's default address ------------------------------------------

# tvix-store's own flow: `tvix-store daemon`, then a mount that names one service (or none of
# the addresses it reaches): the services not given are grpc+http://[::1]:8000, where the
# default daemon listens. Run in a private network namespace, so port 8000 is ours.
DEFAULT_DAEMON_MOUNTS = [
    Line("tvixstore mount -l {mnt} --path-info-service-addr grpc+http://[::1]:8000", "path-info"),
    Line("BLOB_SERVICE_ADDR=grpc+http://localhost:8000 tvixstore mount {mnt} --list-root", "env"),
    Line("tvixmount {mnt} -l --directory-service-addr grpc+http://127.0.0.1:8000 --workers 2", "directory"),
]


@needs_fuse
@pytest.mark.mount
@pytest.mark.skipif(NETNS_MISSING is not None, reason=NETNS_MISSING or "")
def test_mount_lines_reach_the_default_daemon(filled, tmp_path, monkeypatch):  # noqa: F811 - fixture
    store_path = filled.store_path
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    with NetNs() as ns:
        daemon_env, daemon_argv = command("tvixstore daemon")
        daemon_log = tmp_path / "daemon.log"
        with open(daemon_log, "wb") as out:
            # The store the compat daemon filled, served again by a default daemon.
            env = environment(daemon_env, filled.daemon.root / "store")
            daemon = subprocess.Popen(ns.wrap(daemon_argv), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            for i, line in enumerate(DEFAULT_DAEMON_MOUNTS):
                mnt = tmp_path / f"mnt{i}"
                env, argv = command(line.text, mnt=str(mnt))
                # No embedded store to fall back on: every service must be the daemon.
                for name, value in environment(env, tmp_path / "no-store").items():
                    monkeypatch.setenv(name, value)
                mount = Mount(mnt, log_path=tmp_path / f"mount{i}.log")
                mount.cmd = ns.wrap(argv)
                with mount:
                    assert Path(store_path).name in os.listdir(mnt), line.text
                    hello = mount.path(Path(store_path).name, "bin", "hello")
                    assert hello.read_text() == "#!/bin/sh\necho hello\n"
                    log = mount.log()
                    assert "(the default for a service not given)" in log and "grpc+http://[::1]:8000" in log
                    assert "local://" not in log
                assert mount.proc is not None and mount.proc.returncode == 0, mount.log()
        finally:
            daemon.terminate()
            assert daemon.wait(30) == 0, daemon_log.read_text()
    assert "on [::1]:8000 and 127.0.0.1:8000 (loopback only)" in daemon_log.read_text()
