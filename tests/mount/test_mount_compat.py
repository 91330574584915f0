"""tvix-store's ``mount`` lines, with ``tvix-store`` replaced by ``tvixstore`` (or by ``tvixmount``).

Each line mounts, for real, the daemon tests/process/test_cli_compat.py
starts and fills with tvix-store's import and copy lines; the test reads
the imported tree and the copied Nix closure through the mount and looks at
what the line asked for (root listing, allow_other, xattrs, the log level,
which address each service uses).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mounting import FUSE_MISSING, Mount
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


