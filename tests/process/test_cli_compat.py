"""tvix-store's command lines, with ``tvix-store`` replaced by ``tvixstore``, work unchanged.

Two tables. ``IMPORTS`` and ``COPIES`` (and the ``daemon`` line of the
fixture): lines as an operator writes them, with the flags or environment
variables (as a systemd unit sets them) tvix-store documents, run for real:
a real ``tvixstore daemon`` on IPv6 loopback, a tree imported and a real Nix
closure copied into it over gRPC. tests/mount/test_mount_compat.py mounts that
daemon with the ``mount`` lines. ``USAGE_ERRORS``: each command line exits 2
with one line naming the flag or variable, before anything starts (nothing
mounted, no process left behind, not even a log line).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.grpc_daemon import Daemon, free_port, scratch_dir
from tests.mounting import is_mounted
from tests.process.test_admin_copy import attrs_json, closure_paths  # noqa: F401 - a fixture: a real Nix closure

ROOT = Path(__file__).resolve().parent.parent
# The installed tvixstore script runs tvixmount.cli:tvixstore (setup.cfg); this is the same.
TVIXSTORE = [sys.executable, "-c", "import sys; from tvixmount.cli import tvixstore; sys.exit(tvixstore())"]
TVIXMOUNT = [sys.executable, "-m", "tvixmount.cli"]
ENV_NAMES = (
    "BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR", "THREADS", "ALLOW_OTHER",
    "NIX_ATTRS_JSON_FILE", "TVIXMOUNT_STORE_DIR", "TVIXMOUNT_WORKERS", "TVIXMOUNT_LOG_LEVEL",
    "TVIXMOUNT_REQUEST_TIMEOUT", "TVIXMOUNT_METRICS_LISTEN", "TVIXMOUNT_CACHE_DIR", "TVIXMOUNT_CACHE_SIZE",
    "TVIXMOUNT_READAHEAD_FILES", "RUST_LOG",
)


def command(line: str, **values: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=x tvixstore ARGS`` (with {placeholders}) -> (environment, argv to run)."""
    words = shlex.split(line.format(**values))
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    program, args = words[0], words[1:]
    return env, [*{"tvixstore": TVIXSTORE, "tvixmount": TVIXMOUNT}[program], *args]


def environment(extra: dict[str, str], store_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env.update(PYTHONPATH=str(ROOT), TVIXMOUNT_STORE_DIR=str(store_dir), **extra)
    return env


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """``tvix-store daemon -l [::1]:PORT`` (the store: the embedded default, here TVIXMOUNT_STORE_DIR)."""
    root = scratch_dir("tvx-compat-")
    port = free_port()
    d = Daemon(root, tcp=True, port=port)
    env, d.cmd = command("tvixstore daemon -l [::1]:{port}", port=str(port))
    d.listen, d.url = f"[::1]:{port}", f"grpc+http://[::1]:{port}"
    saved = dict(os.environ)
    os.environ.update(environment(env, root / "store"))
    try:
        d.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield d
    assert d.stop() == 0
    assert d.problems() == []
    assert f"blob service: local://{root}/store?create=1 (the embedded store: no service address given)" \
        in d.log()


def run_line(line: str, tmp_path: Path, **values: str) -> subprocess.CompletedProcess[str]:
    env, argv = command(line, **values)
    return subprocess.run(argv, env=environment(env, tmp_path / "unused-store"), capture_output=True,
                          text=True, timeout=120)


# -- the table of upstream command lines ---------------------------------------------------------

ADDRS = "--blob-service-addr {url} --directory-service-addr {url} --path-info-service-addr {url}"
ADDRS_ENV = "BLOB_SERVICE_ADDR={url} DIRECTORY_SERVICE_ADDR={url} PATH_INFO_SERVICE_ADDR={url}"


@dataclass(frozen=True)
class Line:
    text: str
    check: str = ""  # what else the test looks at: see each test


IMPORTS = [
    Line(f"tvixstore import {{tree}} {ADDRS}"),
    Line(f"{ADDRS_ENV} tvixstore --log-level info import {{tree}}"),
]
COPIES = [
    Line(f"tvixstore copy {{json}} {ADDRS}"),
    Line(f"NIX_ATTRS_JSON_FILE={{json}} {ADDRS_ENV} tvixstore --otlp=false copy"),
]


@dataclass(frozen=True)
class Filled:
    daemon: Daemon
    store_path: str  # the imported tree
    closure: dict[str, str]  # app, lib, dep.txt -> store path (copied from /nix/store)
    closure_json: Path


@pytest.fixture(scope="module")
def filled(daemon, attrs_json, tmp_path_factory) -> Filled:  # noqa: F811 - attrs_json: the imported fixture
    """The daemon after every import and copy line of the table."""
    tmp = tmp_path_factory.mktemp("filled")
    tree = tmp / "compat-tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    (tree / "bin" / "hello").chmod(0o755)
    (tree / "README").write_text("read me\n" * 1000)
    printed = set()
    for line in IMPORTS:
        done = run_line(line.text, tmp, tree=str(tree), url=daemon.url)
        assert done.returncode == 0, (line.text, done.stderr)
        printed.add(done.stdout.strip())
    assert len(printed) == 1
    store_path = printed.pop()
    assert store_path.startswith("/nix/store/") and store_path.endswith("-compat-tree")
    for line in COPIES:
        done = run_line(line.text, tmp, json=str(attrs_json), url=daemon.url)
        assert done.returncode == 0, (line.text, done.stderr)
    return Filled(daemon, store_path, closure_paths(attrs_json), attrs_json)


def test_import_and_copy_lines_fill_a_daemon(filled, tmp_path):
    url = filled.daemon.url
    done = run_line(f"{ADDRS_ENV} tvixstore list", tmp_path, url=url)
    assert sorted(done.stdout.split()) == sorted([filled.store_path, *filled.closure.values()])
    done = run_line(f"tvixstore info {filled.closure['app']} {ADDRS}", tmp_path, url=url)
    assert f'"{filled.closure["lib"]}"' in done.stdout  # app's reference, as Nix has it
    # The second copy line found everything there already.
    done = run_line(f"tvixstore copy {{json}} {ADDRS}", tmp_path, json=str(filled.closure_json), url=url)
    assert done.stdout.startswith("copied 0 paths (3 already present)"), done.stderr


# -- the table of usage errors -------------------------------------------------------------------

# (command line, what the one line must contain); {mnt} is an empty directory.
USAGE_ERRORS = [
    ("tvixmount {mnt} --request-timeout -5", "argument --request-timeout: '-5' is not a number of seconds"),
    ("TVIXMOUNT_REQUEST_TIMEOUT=nan tvixstore mount {mnt}",
     "TVIXMOUNT_REQUEST_TIMEOUT='nan' (--request-timeout)"),
    ("THREADS=abc tvixmount {mnt}", "THREADS='abc' (--threads): 'abc' is not a number"),
    ("THREADS=0 tvixstore mount {mnt}", "THREADS='0' (--threads): 0 must be at least 1"),
    ("tvixstore mount {mnt} --threads many", "argument --threads: 'many' is not a number"),
    ("ALLOW_OTHER=maybe tvixstore mount {mnt}",
     "ALLOW_OTHER='maybe' (--allow-other): 'maybe' is not a boolean"),
    ("tvixmount {mnt} --workers 0", "argument --workers: 0 must be at least 1"),
    ("TVIXMOUNT_WORKERS=lots tvixmount {mnt}", "TVIXMOUNT_WORKERS='lots' (--workers)"),
    ("tvixstore mount {mnt} --readahead-files -1", "argument --readahead-files: -1 must not be negative"),
    ("tvixmount {mnt} --blob-service-addr bogus://x", "argument --blob-service-addr: store URL 'bogus://x': "
                                                      "unknown scheme 'bogus'"),
    ("PATH_INFO_SERVICE_ADDR=nix+https://cache.nixos.org?compression=xz tvixstore mount {mnt}",
     "PATH_INFO_SERVICE_ADDR='nix+https://cache.nixos.org?compression=xz' (--path-info-service-addr): "
     "binary cache URL 'nix+https://cache.nixos.org?compression=xz': unknown parameter 'compression'"),
    ("tvixmount {mnt} --blob-service-addr nix+https://cache.nixos.org",
     "nix+https://cache.nixos.org is a Nix binary cache: it can only be the path-info service"),
    ("tvixmount {mnt} --path-info-service-addr nix+http://h --substitute-jobs 0",
     "argument --substitute-jobs: 0 must be at least 1"),
    ("tvixmount {mnt} --directory-service-addr grpc+http://host:99999",
     "argument --directory-service-addr: "),
    ("tvixmount {mnt} --cache-size 5G", "--cache-size needs --cache-dir"),
    ("TVIXMOUNT_CACHE_SIZE=huge tvixmount {mnt}", "TVIXMOUNT_CACHE_SIZE='huge' (--cache-size): not a size"),
    ("TVIXMOUNT_METRICS_LISTEN=localhost:http tvixmount {mnt}", "TVIXMOUNT_METRICS_LISTEN='localhost:http' "
                                                                 "(--metrics-listen)"),
    ("TVIXMOUNT_LOG_LEVEL=loud tvixmount {mnt}", "TVIXMOUNT_LOG_LEVEL='loud' (--log-level)"),
    ("tvixmount {mnt} -o rw", "-o rw: tvixmount mounts are always ro,nosuid,nodev"),
    ("tvixmount {mnt} -o kernel_cache", "-o kernel_cache: not a FUSE mount option"),
    ("tvixmount {mnt}", "env TVIXMOUNT_STORE_DIR: no embedded store in "),
    ("tvixstore mount {mnt} --store-dir {mnt}/none", "--store-dir: no embedded store in "),
    ("tvixmount {mnt} --blob-service-addr grpc+http://h --cache-dir /etc/hostname/blobs",
     "--cache-dir /etc/hostname/blobs: /etc/hostname is not a directory"),
    ("tvixstore daemon --read-only --store-dir {mnt}/none", "--store-dir: no embedded store in "),
    ("tvixstore daemon -l inetd", "inetd mode (one connection on stdin/stdout) is not supported"),
    ("tvixstore daemon -l sd-listen", "no socket passed (LISTEN_FDS is not set"),
    ("tvixmount {mnt}/missing", "mountpoint "),
    ("tvixstore --otlp=maybe mount {mnt}", "argument --otlp: 'maybe' is not a boolean"),
    ("tvixstore daemon --max-workers 0", "argument --max-workers: 0 must be at least 1"),
    ("tvixstore daemon --grace -1", "argument --grace: '-1' must be a finite number of seconds"),
    ("tvixstore import ./x --path-info-service-addr local:relative", "argument --path-info-service-addr: "),
    ("BLOB_SERVICE_ADDR=memory:///x tvixstore list", "BLOB_SERVICE_ADDR='memory:///x' (--blob-service-addr)"),
    ("tvixstore copy", "copy: no closure file: give NIX_ATTRS_JSON_FILE"),
    ("tvixstore sync --to-store-dir {mnt}/t -j 0 --all", "argument -j/--jobs: 0 must be at least 1"),
]


@pytest.mark.parametrize(("line", "message"), USAGE_ERRORS, ids=[u[0] for u in USAGE_ERRORS])
def test_usage_errors_exit_2_in_one_line_before_anything_starts(line, message, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = run_line(line, tmp_path, mnt=str(mnt))
    program = next(w for w in shlex.split(line) if "=" not in w)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{program}: error: "), done.stderr
    assert message in done.stderr, done.stderr
    assert not is_mounted(mnt) and not (tmp_path / "unused-store").exists()
    assert leftovers(str(tmp_path)) == []


def leftovers(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a worker would: forked from the command)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    for pid in found:
        os.kill(pid, signal.SIGKILL)  # none expected; do not leave one behind if the test fails
    return found
