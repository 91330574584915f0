"""tools/bench --quick: CI's smoke run of the benchmark (every workload, every target, no mount left)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import FUSE_MISSING

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench"
TARGETS = ("native", "squashfuse", "tvix-embedded", "tvix-grpc")
WORKLOADS = {"seq_read": "mb_s", "find": "seconds", "stat_walk": "seconds", "tar": "seconds",
             "random_read": "mb_s"}

pytestmark = [pytest.mark.mount, pytest.mark.timeout(240)]


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    return tmp_path_factory.mktemp("bench")


def test_quick_run_measures_every_workload_on_every_target(workdir):
    out = workdir / "out"
    out.mkdir()
    start = time.monotonic()
    proc = subprocess.run([str(BENCH), "--quick", "--workdir", str(workdir), "--json", str(out / "b.json"),
                           "--markdown", str(out / "b.md"), "--plot", str(out / "b.png")],
                          capture_output=True, text=True, timeout=200)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # ~35 s on an idle 2-CPU machine; the margin is for a machine shared with other jobs
    assert took < 150, f"the quick run took {took:.0f} s"
    assert mounts_under(workdir) == []

    report = json.loads((out / "b.json").read_text())
    assert report["errors"] == []
    assert report["meta"]["quick"] is True and report["meta"]["caches_dropped"] is True
    assert report["meta"]["dataset"]["squashfs_compression"] in ("lz4", "gzip")
    for target in TARGETS:
        for workload, key in WORKLOADS.items():
            for mode in ("cold", "warm"):
                value = report["summary"][target][workload][mode][key]
                assert math.isfinite(value) and value > 0, (target, workload, mode, value)
        latency = report["summary"][target]["random_read"]["cold"]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        # the same tree everywhere: every target shows every entry
        entries = report["meta"]["dataset"]["entries"]
        assert report["summary"][target]["stat_walk"]["cold"]["entries"] == entries
    assert report["grpc"]["plain"]["cold"]["mb_s"] > 0
    assert {"1", "8"} <= set(report["grpc"]["latency"])
    assert {"1", "8"} <= set(report["sweeps"]["workers"]["tvix-embedded"])
    goals = report["goals"]
    assert len(goals) == 9
    assert all(math.isfinite(g["ratio"]) and g["met"] in (True, False) for g in goals), goals

    table = (out / "b.md").read_text()
    assert "| workload | mode | native | squashfuse | tvix-embedded | tvix-grpc |" in table
    assert "gRPC +20 ms" in table
    assert "run 1/1 tvix-grpc" in proc.stdout  # progress lines
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in proc.stdout
    else:
        assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_leaves_no_mount(workdir):
    """Ctrl-C in the middle of a tvixmount measurement: everything is unmounted and stopped."""
    proc = subprocess.Popen([str(BENCH), "--quick", "--workdir", str(workdir), "--targets", "tvix-grpc",
                             "--json", str(workdir / "i.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        for line in proc.stdout:
            if "tvix-grpc" in line and "seq_read" in line:
                break
            assert time.monotonic() < deadline, "no tvix-grpc progress line"
        # between two workloads the mount is being replaced: wait until one is up
        while not mounts_under(workdir):
            assert time.monotonic() < deadline, "the bench never had a mount up"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    assert mounts_under(workdir) == []
    ps = subprocess.run(["pgrep", "-f", f"{workdir}/(mnt-|store)"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a tvixmount or daemon process survived"
