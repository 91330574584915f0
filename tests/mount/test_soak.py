"""Soak: verified load on a gRPC-backed mount while workers die and the daemon restarts.

``test_soak_ci`` runs in the default suite (SOAK_SECONDS, default 60);
``test_soak_long`` is the same soak for longer (default 600 s), marked
slow and run on request::

    .venv/bin/python -m pytest -m slow tests/mount/test_soak.py
    SOAK_SECONDS=300 SOAK_REPORT=/tmp/soak.json .venv/bin/python -m pytest -m slow tests/mount/test_soak.py

What a run must show (docs/soak.md explains the numbers):

* every byte right: no wrong file (every whole-file read is checked
  against the blob digest the mount publishes), and no wrong byte in the
  random ranges other than the missing tail of a short read;
* no hang: no read(2) took longer than two request deadlines, no reader stuck;
* errors: none caused by a worker's death (each one is re-sent). A read
  that fails while the daemon is away is EIO (or short: see above), with an
  ERROR line in the mount's log that falls inside that outage and says the
  daemon was not there; there are no more failed reads than such lines,
  and none at all without a daemon restart. This is the client as it is
  today (docs/soak.md, "Findings"); SOAK_STRICT=1 asks for no error at all;
* the dispatcher's RSS grows at most 20 MiB over the second half, and its
  fd count stays within 5 of where the second half started;
* afterwards nothing is mounted and no process of the mount is left.

The figures are printed (always, not only on failure) and written as JSON
to $SOAK_REPORT when it is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import soak
from tests.mounting import FUSE_MISSING

pytestmark = [pytest.mark.mount, pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "")]

CI_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
LONG_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SEED = int(os.environ.get("SOAK_SEED", "1"))
# SOAK_STRICT=1: no failed read at all, daemon restarts included (see docs/soak.md: today
# a read that meets a restarting daemon fails with EIO, so this fails).
STRICT = os.environ.get("SOAK_STRICT") == "1"
RSS_GROWTH_MIB = 20
FD_DRIFT = 5
# Reads per second of soak below which the load did not really run (measured on
# 2 cores: ~150/s over the three loadtests; see docs/soak.md).
MIN_READS_PER_S = 30
RANDOM_BLOCK = 128 * 1024  # loadtest's random read size, the most a short read can miss


def _check(result: soak.SoakResult, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + soak.summary_text(result))
    report = os.environ.get("SOAK_REPORT")
    if report:
        soak.write_report(result, report)
    cfg = result.config
    where = f"(logs and loadtest JSON in {result.work})"

    # the harness itself did what it should
    assert result.chaos_error is None, f"the chaos thread failed: {result.chaos_error} {where}"
    assert set(result.loadtests) == {p for p, _ in cfg.readers}, f"a loadtest wrote no JSON {where}"
    kills = sum(1 for f in result.faults if f.kind == "worker_kill")
    restarts = sum(1 for f in result.faults if f.kind == "daemon_restart")
    outages = [f.ready_at - f.at for f in result.faults if f.kind == "daemon_restart" and f.ready_at]
    # The schedule's floors: a kill at least every kill_every[1] s while no restart is
    # under way, a restart at least every 1.2 x restart_every s after the previous one.
    active = cfg.seconds - cfg.quiet_tail
    assert kills >= int((active - sum(outages)) / cfg.kill_every[1]) - 1, f"only {kills} worker kills"
    assert restarts >= int(active / (cfg.restart_every * 1.2 + max(outages, default=0))), \
        f"only {restarts} daemon restarts"
    assert result.pool["restarts"] >= kills, result.pool  # every kill really killed a worker
    assert result.pool["resent"] >= 1, result.pool  # and some killed a worker in the middle of requests

    # the load ran, and every byte of it was right
    assert result.total("reads") >= MIN_READS_PER_S * cfg.seconds, f"too little load {where}"
    for pattern, s in result.loadtests.items():
        assert s["verify"] and s["verified_files"] > 0, f"{pattern}: nothing verified"
        assert s["wrong_files"] == 0, f"{pattern}: {s['messages']}"
        # A read(2) that meets a daemon outage part-way returns the pages it already
        # had (the kernel's partial-read rule; the next read would get the EIO), and
        # loadtest counts the missing tail of such a SHORT_READ as wrong bytes too.
        # So wrong bytes are allowed only as those tails (docs/soak.md, "Findings").
        short = s["errors"].get("SHORT_READ", 0)
        assert s["wrong_bytes"] <= (0 if STRICT else short * RANDOM_BLOCK), f"{pattern}: {s['messages']}"
        assert s["hangs"] == 0 and s["stuck_readers"] == [], f"{pattern}: {s['messages']}"

    # errors: only while the daemon was away, and each one accounted for
    assert max(outages, default=0) < cfg.request_timeout, f"a restart outlasted the deadline: {outages}"
    if STRICT:
        assert result.loadtest_errors() == {}, soak.figures(result)["errors"]
        assert result.error_lines == [], "\n".join(text for _, text in result.error_lines[:10])
    unexplained = result.unexplained_errors()
    assert not unexplained, "mount ERRORs outside a daemon outage:\n" + "\n".join(unexplained[:10])
    errors = result.loadtest_errors()
    assert set(errors) <= {"EIO", "SHORT_READ"}, f"errors other than EIO: {errors} {where}"
    if restarts == 0:
        assert not errors
    # every failed or short read(2) had at least one failed FUSE request, and each of those logged
    assert sum(errors.values()) <= len(result.error_lines), (errors, len(result.error_lines))
    for pattern, status in result.loadtest_status.items():
        ok = result.loadtests[pattern]["error_count"] == 0
        assert status == (0 if ok else 1), f"loadtest {pattern} exited {status} {where}"
    assert result.pool["lost"] == 0, f"calls lost with a worker despite the re-send: {result.pool}"

    # the dispatcher stays flat
    assert len(result.samples) >= cfg.seconds * 0.8, f"{len(result.samples)} samples in {cfg.seconds:g} s"
    assert result.rss_growth_kib() <= RSS_GROWTH_MIB * 1024, soak.figures(result)["dispatcher"]
    assert result.fd_drift() <= FD_DRIFT, [(s.t, s.fds) for s in result.second_half()]

    # and goes away cleanly
    assert result.mount_status == 0, f"tvixmount exited {result.mount_status} {where}"
    assert not result.stale_mount
    assert result.leftovers == []
    assert result.daemon_problems == []


@pytest.mark.timeout(CI_SECONDS + 300)
def test_soak_ci(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = soak.run(soak.SoakConfig(seconds=CI_SECONDS, seed=SEED), tmp_path)
    _check(result, capsys)


@pytest.mark.slow
@pytest.mark.timeout(LONG_SECONDS + 300)
def test_soak_long(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = soak.run(soak.SoakConfig(seconds=LONG_SECONDS, seed=SEED), tmp_path)
    _check(result, capsys)
