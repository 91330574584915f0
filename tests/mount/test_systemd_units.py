"""The shipped systemd units: written by ``tvixstore systemd-units``, checked by
``systemd-analyze verify``, and their Type=notify contract run end to end.

PID 1 here is not systemd, so the end-to-end test plays systemd's part
itself: it instantiates ``tvixmount@.service`` for a mountpoint the way
systemd does (``systemd-escape --path``, ``%f``), runs its ExecStart with our
own NOTIFY_SOCKET, and checks the mount is up when READY=1 arrives, that
SIGTERM (systemd's stop) brings STOPPING=1 and exit 0, and that ExecStopPost
clears the dead mount a killed service leaves, so a restart works.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fs_fixtures import HELLOWORLD, HELLOWORLD_BLOB_NAME, Populate
from tests.mounting import FUSE_MISSING, is_mounted
from tests.notify_socket import NotifySocket
from tvixmount import systemd

BIN = Path(sys.executable).parent
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
               "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "MountFlags",
               "BindPaths", "BindReadOnlyPaths")


def values(text: str, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file's text, in order."""
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    out = tmp_path / "units"
    result = subprocess.run([str(BIN / "tvixstore"), "systemd-units", "-o", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(str(out / name) for name in systemd.UNITS)
    return out


def test_units_name_this_installation_and_ship_in_the_package(units):
    for name in systemd.UNITS:
        text = (units / name).read_text()
        for command in values(text, "ExecStart"):
            program = shlex.split(command)[0]
            assert Path(program).is_absolute() and os.access(program, os.X_OK), command
        assert systemd.render(name, None) == systemd.shipped(name)
    shipped = systemd.shipped("tvixmount@.service")
    assert values(shipped, "ExecStart") == ["tvixmount %f"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["tvixmount@mnt-store.service", "tvixmount@.service",
                                  "tvixstore-daemon.service", "tvixstore-daemon.socket"])
def test_systemd_analyze_verify(units, name):
    if name == "tvixmount@mnt-store.service":
        (units / name).symlink_to("tvixmount@.service")
    # --man=no: the man pages are generated (tools/gen_manpages.py), not installed here.
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / name)],
                            capture_output=True, text=True, timeout=60, cwd=units)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_a_broken_unit_fails_verify(units, tmp_path):
    """The check above can fail: verify reports a bad value on stderr, a missing binary by exit status."""
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (units / "tvixstore-daemon.service").read_text()
    (broken / "tvixstore-daemon.socket").write_text((units / "tvixstore-daemon.socket").read_text())
    service = broken / "tvixstore-daemon.service"
    service.write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(service)],
                            capture_output=True, text=True, timeout=60)
    assert "Failed to parse boolean value" in result.stderr, result.stderr
    service.write_text(text.replace(str(BIN / "tvixstore"), "/nonexistent/tvixstore"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(service)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not executable" in result.stderr, result.stderr


def test_hardening():
    mount = systemd.shipped("tvixmount@.service")
    assert values(mount, "Type") == ["notify"] and values(mount, "WatchdogSec")
    assert values(mount, "CapabilityBoundingSet") == ["CAP_SYS_ADMIN"]
    assert values(mount, "DeviceAllow") == ["/dev/fuse rw"] and values(mount, "DevicePolicy") == ["closed"]
    assert values(mount, "NoNewPrivileges") == ["yes"]
    # A private mount namespace would hide the mount from everyone else.
    assert not [key for key in NAMESPACING if values(mount, key)]
    daemon = systemd.shipped("tvixstore-daemon.service")
    assert values(daemon, "Type") == ["notify"]
    assert values(daemon, "CapabilityBoundingSet") == [""]
    assert values(daemon, "ProtectSystem") == ["strict"] and values(daemon, "PrivateTmp") == ["yes"]
    assert values(daemon, "ProtectHome") == ["yes"] and values(daemon, "StateDirectory") == ["tvixmount"]
    assert values(daemon, "RuntimeDirectory") == ["tvixstore-daemon"]  # sd-listen's private socket
    assert "--listen-address sd-listen:*" in values(daemon, "ExecStart")[0]  # both sockets, not the first
    socket = systemd.shipped("tvixstore-daemon.socket")
    assert values(socket, "ListenStream") == ["[::1]:8000", "127.0.0.1:8000"]


# -- the Type=notify contract, end to end -----------------------------------------------------


def _escape(mountpoint: Path) -> str:
    return subprocess.run(["systemd-escape", "--path", str(mountpoint)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _command(unit_text: str, key: str, instance: str) -> list[str]:
    """``key``'s command line with the specifiers systemd would fill in (%f, %i), prefix dropped."""
    path = subprocess.run(["systemd-escape", "--unescape", "--path", instance], capture_output=True,
                          text=True, check=True).stdout.strip()
    line = values(unit_text, key)[0].lstrip("-@:+!")
    return [arg.replace("%f", path).replace("%i", instance) for arg in shlex.split(line)]


@pytest.mark.skipif(bool(FUSE_MISSING) or shutil.which("systemd-escape") is None,
                    reason=FUSE_MISSING or "systemd-escape is not installed")
def test_type_notify_contract_end_to_end(units, tmp_path, local_store, store_dir):
    Populate(local_store).helloworld()
    mountpoint = tmp_path / "mnt point"  # a space: %f must carry it as one argument
    mountpoint.mkdir()
    instance = _escape(mountpoint)
    assert "\\x20" in instance
    unit = (units / "tvixmount@.service").read_text()
    start, stop_post = _command(unit, "ExecStart", instance), _command(unit, "ExecStopPost", instance)
    assert start[-1] == str(mountpoint)
    log = open(tmp_path / "unit.log", "wb")  # noqa: SIM115 - closed below
    with NotifySocket(abstract=True) as notify:
        # What /etc/tvixmount/<instance>.env would hold for this store.
        env = {**os.environ, **notify.env, "TVIXMOUNT_STORE_DIR": str(store_dir), "TVIXMOUNT_WORKERS": "2",
               "WATCHDOG_USEC": "2000000"}

        def service() -> subprocess.Popen:
            proc = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT)
            notify.wait_for("READY=1")
            # "started" in systemd's eyes: a unit ordered after it finds the files.
            assert is_mounted(mountpoint)
            assert (mountpoint / os.fsdecode(HELLOWORLD_BLOB_NAME)).read_bytes() == HELLOWORLD
            notify.wait_for("WATCHDOG=1", timeout=5)
            return proc

        proc = service()
        try:
            proc.send_signal(signal.SIGTERM)  # systemctl stop
            notify.wait_for("STOPPING=1", timeout=10)
            assert proc.wait(30) == 0
            assert not is_mounted(mountpoint)
            subprocess.run(stop_post, capture_output=True, timeout=30)  # "-": its failure is ignored
            # A crash (or a watchdog kill) leaves a dead FUSE mount; ExecStopPost clears it.
            proc = service()
            proc.kill()
            proc.wait(10)
            deadline = time.monotonic() + 10
            while not is_mounted(mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert is_mounted(mountpoint)
            assert subprocess.run(stop_post, capture_output=True, timeout=30).returncode == 0
            assert not is_mounted(mountpoint)
            proc = service()  # Restart=on-failure: it starts again
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if is_mounted(mountpoint):
                subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], check=False)
            log.close()


_ACTIVATE = r"""
import os, sys
# systemd's side of socket activation: the sockets at fd 3.., LISTEN_PID this very process.
fds = [int(fd) for fd in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_daemon_units_socket_activation_and_notify_end_to_end(units, tmp_path):
    """The .socket's addresses bound as systemd would (on free ports), the .service's ExecStart
    started with them: READY=1 comes when both answer gRPC health, STOPPING=1 and exit 0 on SIGTERM."""
    import grpc

    pytest.importorskip("tvixmount.server.listen", reason="sd-listen comes with the daemon's listen module")
    from tvixmount.server import health

    socket_unit = (units / "tvixstore-daemon.socket").read_text()
    service_unit = (units / "tvixstore-daemon.service").read_text()
    listeners, targets = [], []
    for spec in values(socket_unit, "ListenStream"):
        host = spec.rsplit(":", 1)[0].strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))  # the unit's host, a free port (8000 may be taken on this machine)
        except OSError:
            continue  # no IPv6 loopback in this container
        sock.listen(64)
        listeners.append(sock)
        port = sock.getsockname()[1]
        targets.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    assert listeners
    environment = dict(line.split("=", 1) for line in values(service_unit, "Environment"))
    exec_start = shlex.split(values(service_unit, "ExecStart")[0])
    command = [arg for arg in exec_start if arg != "$TVIXSTORE_DAEMON_ARGS"]  # an unset variable: no word
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    with NotifySocket(abstract=True) as notify:
        env = {**os.environ, **environment, **notify.env, "LISTEN_FDS": str(len(listeners)),
               # what /etc/tvixmount/tvixstore-daemon.env would set for this test
               "TVIXMOUNT_STORE_DIR": str(tmp_path / "store")}
        fds = [s.fileno() for s in listeners]
        proc = subprocess.Popen([sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds)), *command],
                                env=env, pass_fds=fds, stdout=log, stderr=subprocess.STDOUT)
        try:
            for s in listeners:
                s.close()  # the daemon holds them now, as systemd hands them over
            notify.wait_for("READY=1")
            for target in targets:  # every socket of the .socket unit is served
                with grpc.insecure_channel(target) as channel:
                    assert health.check(channel, timeout=5) == health.SERVING
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", timeout=10)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
    assert (tmp_path / "store").is_dir()  # the service's store is the embedded one it was given
