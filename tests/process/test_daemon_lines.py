"""tvix-store's ``daemon`` lines, with ``tvix-store`` replaced by ``tvixstore``, serve for real.

A table of command lines as an operator writes them (upstream's flags, its
environment variables, its tokio-listener address syntax, systemd socket
activation through ``systemd-socket-activate``), each run in a private
network namespace (tests/netns.py), so tvix-store's own port 8000 is free
and a host without IPv6 can be had. Each daemon serves an embedded store a
real ``tvixstore import`` filled; a client in the namespace lists its path
infos over gRPC at each address the line promises and must see the imported
path; then SIGTERM, exit 0, and nothing left behind (the relay's private
socket directory is gone).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.grpc_daemon import scratch_dir
from tests.netns import MISSING, NetNs
from tests.process.test_cli_compat import ENV_NAMES, ROOT, TVIXSTORE

pytestmark = pytest.mark.skipif(MISSING is not None or shutil.which("systemd-socket-activate") is None,
                                reason=MISSING or "needs systemd-socket-activate")

# A real gRPC client: PathInfoService/List at a grpc target, retried while the daemon starts.
CLIENT = r"""
import sys, grpc
from tvixmount.proto import rpc_pathinfo_pb2, rpc_pathinfo_pb2_grpc
target = sys.argv[1]
with grpc.insecure_channel(target) as channel:
    stub = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(channel)
    infos = list(stub.List(rpc_pathinfo_pb2.ListPathInfoRequest(), timeout=30, wait_for_ready=True))
for info in infos:
    node = info.node
    print((node.directory.name or node.file.name or node.symlink.name).decode())
"""

STORE_ENV = ("BLOB_SERVICE_ADDR=local://{store} DIRECTORY_SERVICE_ADDR=local://{store} "
             "PATH_INFO_SERVICE_ADDR=local://{store}")


@dataclass(frozen=True)
class Line:
    text: str
    targets: tuple[str, ...]  # grpc targets a client reaches it at
    ipv6: bool = True
    listening: frozenset[tuple[str, int]] | None = None  # exactly these TCP sockets, when given
    log: str = ""  # a line its log must have


LOOPBACKS = frozenset({("::1", 8000), ("127.0.0.1", 8000)})
LINES = [
    Line("tvixstore daemon", ("[::1]:8000", "127.0.0.1:8000"), listening=LOOPBACKS,
         log="on [::1]:8000 and 127.0.0.1:8000 (loopback only); clients use grpc+http://[::1]:8000 or "
             "grpc+http://127.0.0.1:8000"),
    Line("tvixstore daemon", ("127.0.0.1:8000",), ipv6=False, listening=frozenset({("127.0.0.1", 8000)}),
         log="not listening on [::1]:8000: this host has no IPv6"),
    Line("tvixstore --log-level debug daemon -l [::1]:8000", ("[::1]:8000",),
         listening=frozenset({("::1", 8000)})),
    Line("tvixstore --otlp=false daemon --listen-address 127.0.0.1:8000", ("127.0.0.1:8000",),
         listening=frozenset({("127.0.0.1", 8000)})),
    Line("tvixstore daemon -l 0.0.0.0:8000", ("127.0.0.1:8000",),
         log="which is not loopback: the store is served UNAUTHENTICATED"),
    Line(f"{STORE_ENV} tvixstore daemon -l [::1]:8000", ("[::1]:8000",), log="(env BLOB_SERVICE_ADDR)"),
    Line("tvixstore daemon -l {dir}/tvix.sock", ("unix:{dir}/tvix.sock",), listening=frozenset()),
    Line("tvixstore daemon -l ./tvix.sock", ("unix:{dir}/tvix.sock",), log="on unix socket {dir}/tvix.sock"),
    Line("tvixstore daemon -l @tvixstore-test-{tag}", ("unix-abstract:tvixstore-test-{tag}",)),
    Line("systemd-socket-activate -l 8000 tvixstore daemon -l sd-listen", ("[::1]:8000", "127.0.0.1:8000"),
         log="systemd's socket (fd 3, [::]:8000)"),
    Line("systemd-socket-activate -l 127.0.0.1:8000 tvixstore daemon --listen-address SD_LISTEN",
         ("127.0.0.1:8000",), log="(loopback only); clients use grpc+http://127.0.0.1:8000"),
    Line("systemd-socket-activate -l {dir}/act.sock --fdname=store tvixstore daemon -l sd-listen:store",
         ("unix:{dir}/act.sock",)),
    Line("systemd-socket-activate -l 8000 -l {dir}/act.sock tvixstore daemon -l sd-listen:*",
         ("127.0.0.1:8000", "unix:{dir}/act.sock")),
]


# systemd-socket-activate passes its children no environment but what -E names.
PASSED = ("PYTHONPATH", "PYTHONUNBUFFERED", "TVIXMOUNT_STORE_DIR", "RUNTIME_DIRECTORY")


def argv_of(words: list[str]) -> list[str]:
    """``tvixstore`` anywhere in the line (after systemd-socket-activate too) is our program."""
    out: list[str] = []
    if words[0] == "systemd-socket-activate":
        out += [words[0], *(f"-E{name}" for name in PASSED)]
        words = words[1:]
    for word in words:
        out.extend(TVIXSTORE if word == "tvixstore" else [word])
    return out


@pytest.fixture(scope="module")
def filled() -> Iterator[tuple[Path, str]]:
    """An embedded store with one imported path: (store directory, the path's name)."""
    root = scratch_dir("tvx-lines-")
    tree = root / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hello\n")
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    done = subprocess.run([*TVIXSTORE, "--store-dir", str(root / "store"), "import", str(tree)],
                          env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    yield root / "store", Path(done.stdout.strip()).name
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    """A short-named scratch directory (unix socket paths are short), removed whatever the outcome."""
    path = scratch_dir("tvx-line-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("line", LINES, ids=[f"{i}:{line.text}" for i, line in enumerate(LINES)])
def test_daemon_line_serves(line: Line, filled: tuple[Path, str], tmp_path: Path, work: Path) -> None:
    store, name = filled
    run_dir = work / "run"
    run_dir.mkdir()
    values = {"dir": str(work), "store": str(store), "tag": str(os.getpid())}
    words = shlex.split(line.text.format(**values))
    extra = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        extra[key] = value
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TVIXMOUNT_STORE_DIR=str(store),
               RUNTIME_DIRECTORY=str(run_dir), **extra)
    log_path = tmp_path / "daemon.log"
    with NetNs(ipv6=line.ipv6) as ns, open(log_path, "wb") as log_file:
        proc = subprocess.Popen(ns.wrap(argv_of(words)), env=env, cwd=work, stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            for target in line.targets:
                done = subprocess.run(ns.wrap([sys.executable, "-c", CLIENT, target.format(**values)]),
                                      env=env, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (target, done.stderr, log_path.read_text())
                assert name in done.stdout.split(), (target, done.stdout)
            if line.listening is not None:
                assert ns.listening() == set(line.listening), log_path.read_text()
        finally:
            proc.terminate()
            status = proc.wait(30)
    log = log_path.read_text()
    assert status == 0, log
    assert line.log.format(**values) in log
    assert "Traceback" not in log and " ERROR " not in log
    assert "stopped; served" in log
    assert list(run_dir.iterdir()) == []  # the relay's private socket directory is gone


@pytest.mark.parametrize(("line", "message"), [
    ("tvixstore daemon -l sd-listen", "listen address 'sd-listen': no socket passed (LISTEN_FDS is not set"),
    ("tvixstore daemon -l sd-listen:other", "no socket passed"),
    ("tvixstore daemon -l host", "argument -l/--listen-address: listen address 'host': expected"),
    ("tvixstore daemon -l [::1]:99999", "port '99999' is not a number in 0..65535"),
    ("systemd-socket-activate -l {dir}/a.sock --fdname=one tvixstore daemon -l sd-listen:two",
     "no socket named 'two' in LISTEN_FDNAMES (one)"),
])
def test_listen_usage_errors_exit_2_before_binding(line: str, message: str, work: Path) -> None:
    words = shlex.split(line.format(dir=work))
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), TVIXMOUNT_STORE_DIR=str(work / "store"))
    with NetNs() as ns:
        proc = subprocess.Popen(ns.wrap(argv_of(words)), env=env, cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if words[0] == "systemd-socket-activate":  # it starts the daemon on the first connection
            _poke(ns, work / "a.sock")
        out, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if not ln.startswith(("Listening on", "Communication", "Execing"))]
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("tvixstore: error: ") and message in lines[0], err
    assert out == ""
    assert not (work / "store").exists()  # nothing started: no store made


def test_a_connection_from_accept_yes_is_a_usage_error(work: Path) -> None:
    """systemd-socket-activate --accept (Accept=yes) passes a connection, not a listener: exit 2, one line."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), TVIXMOUNT_STORE_DIR=str(work / "store"))
    words = ["systemd-socket-activate", "--accept", "-l", str(work / "a.sock"), "tvixstore", "daemon", "-l",
             "sd-listen"]
    with NetNs() as ns:
        # The activator forks a daemon per connection and stays: read its report of the child's exit.
        proc = subprocess.Popen(ns.wrap(argv_of(words)), env=env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            _poke(ns, work / "a.sock")
            assert proc.stderr is not None
            ours = []
            for line in proc.stderr:
                if line.startswith("tvixstore"):
                    ours.append(line)
                if line.startswith("Child ") and "died" in line:
                    break
        finally:
            proc.kill()
            proc.wait(10)
    assert line.rstrip().endswith("died with code 2"), line
    assert ours == ["tvixstore: error: listen address 'sd-listen': fd 3 is not a listening stream socket (a "
                    "connection, as Accept=yes passes, is not supported: use Accept=no)\n"]
    assert not (work / "store").exists()


def _poke(ns: NetNs, path: Path) -> None:
    code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); s.close()"
    deadline = time.monotonic() + 20
    while subprocess.run(ns.wrap([sys.executable, "-c", code]), capture_output=True).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_blobs_through_systemds_socket_are_byte_exact(tmp_path: Path, work: Path) -> None:
    """A 6 MiB file read by four clients at once through the relay, each byte as imported."""
    tree = work / "tree"
    tree.mkdir()
    big = os.urandom(6 << 20)
    (tree / "big").write_bytes(big)
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TVIXMOUNT_STORE_DIR=str(work / "store"),
               RUNTIME_DIRECTORY=str(work))
    done = subprocess.run([*TVIXSTORE, "import", str(tree)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    store_path = done.stdout.strip()
    sock = work / "act.sock"
    url = f"grpc+unix://{sock}?wait-connect=1"  # the first client waits for the daemon systemd starts
    client_env = dict(env, BLOB_SERVICE_ADDR=url, DIRECTORY_SERVICE_ADDR=url, PATH_INFO_SERVICE_ADDR=url,
                      TVIXMOUNT_STORE_DIR=str(work / "none"))
    with open(tmp_path / "daemon.log", "wb") as log_file:
        daemon = subprocess.Popen(argv_of(["systemd-socket-activate", "-l", str(sock), "tvixstore", "daemon",
                                           "-l", "sd-listen"]), env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline and daemon.poll() is None
                time.sleep(0.05)
            readers = [subprocess.Popen([*TVIXSTORE, "cat", f"{store_path}/big"], env=client_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
            for reader in readers:
                out, err = reader.communicate(timeout=120)
                assert reader.returncode == 0, err
                assert out == big
        finally:
            daemon.terminate()
            status = daemon.wait(30)
    log = (tmp_path / "daemon.log").read_text()
    assert status == 0, log
    assert "systemd's socket (fd 3, unix socket" in log and "BlobService/Read" in log
    assert [p.name for p in work.iterdir() if p.name.startswith("tvixstore-daemon-")] == []


def test_a_call_in_flight_through_the_relay_finishes_after_sigterm(filled: tuple[Path, str],
                                                                   tmp_path: Path, work: Path) -> None:
    """SIGTERM stops accepting on systemd's socket, but a relayed call already made gets its answer."""
    store, name = filled
    sock = work / "act.sock"
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TVIXMOUNT_STORE_DIR=str(store),
               RUNTIME_DIRECTORY=str(work))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(argv_of(["systemd-socket-activate", "-l", str(sock), "tvixstore", "daemon",
                                           "-l", "sd-listen", "--added-latency", "2"]),
                                  env=env, stdout=log_file, stderr=subprocess.STDOUT)
        client: subprocess.Popen[str] | None = None
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline and daemon.poll() is None
                time.sleep(0.05)
            client = subprocess.Popen([sys.executable, "-c", CLIENT, f"unix:{sock}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while "(loopback only)" not in log_path.read_text():  # the daemon the client woke is serving
                assert time.monotonic() < deadline and daemon.poll() is None, log_path.read_text()
                time.sleep(0.05)
            time.sleep(0.5)  # the call is in the daemon's added latency now
            daemon.terminate()
            out, err = client.communicate(timeout=30)
        finally:
            if daemon.poll() is None and (client is None or client.returncode is None):  # failed early
                daemon.terminate()
            status = daemon.wait(30)
    log = log_path.read_text()
    assert client is not None and client.returncode == 0, (err, log)
    assert name in out.split()
    assert status == 0, log
    assert "got SIGTERM" in log and "PathInfoService/List 1" in log


def test_the_default_with_one_loopback_port_taken_fails_whole(filled: tuple[Path, str]) -> None:
    """A family that is there but whose port 8000 is taken is an error (exit 1), not half a daemon."""
    store, _ = filled
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("LISTEN_")}
    env.update(PYTHONPATH=str(ROOT), TVIXMOUNT_STORE_DIR=str(store))
    holder = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 8000)); s.listen(); " \
             "print('held', flush=True); time.sleep(60)"
    with NetNs() as ns:
        held = subprocess.Popen(ns.wrap([sys.executable, "-c", holder]), stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout is not None and held.stdout.readline().strip() == "held"
            done = subprocess.run(ns.wrap(argv_of(["tvixstore", "daemon"])), env=env, capture_output=True,
                                  text=True, timeout=60)
            listening = ns.listening()
        finally:
            held.kill()
            held.wait(10)
    assert done.returncode == 1, done.stderr
    assert "cannot listen on 127.0.0.1:8000" in done.stderr
    assert listening == {("127.0.0.1", 8000)}  # the holder's: the daemon left nothing listening
