"""The soak: a real mount under load for minutes while its workers are killed and its daemon restarts.

One run, as the reliability issue asked for it::

    data     tools/gen_tree.py (300 files and 2 of 8 MiB), `tvixstore import`ed into a
             local:// store in RAM
    daemon   `tvixstore daemon --read-only` serving that store on a unix socket
    mount    tvixmount over grpc+unix, --workers 3, --list-root, --request-timeout 10,
             --segment-cache 8M (a third of the data, so reads keep reaching the workers)
    load     tools/loadtest --verify --json, three processes at once (seq, random, tree)
    chaos    a seeded thread: SIGKILL a worker every 2-5 s (one with calls in flight
             when the mount's stats show one within a second, else any); every ~15 s stop the
             daemon (SIGTERM or SIGKILL, drawn) and start it again on the same socket
             after a 0.2-1 s gap; nothing in the last few seconds
    sampler  every second: the dispatcher's VmRSS and open fds, every process below it,
             and a drop of the kernel's caches

Why the caches are dropped: the mount lets the kernel keep file pages and
entries (keep_cache, long timeouts), so after one pass over 26 MB every
read would be served by the page cache and the soak would test nothing.
Dropping them every second sends reads, lookups and forgets to the mount.

``run()`` returns a ``SoakResult`` holding everything observed; what must
hold of it is asserted in tests/mount/test_soak.py, and ``figures()`` is what is
printed and written to $SOAK_REPORT.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.faults import stats as mount_stats
from tests.faults import workers as worker_pids
from tests.grpc_daemon import Daemon, scratch_dir
from tests.mounting import Mount, descendants, is_mounted
from tvixmount.store import StoreUrls

ROOT = Path(__file__).resolve().parent.parent
GEN_TREE = ROOT / "tools" / "gen_tree.py"
LOADTEST = ROOT / "tools" / "loadtest.py"

# After the daemon answers again, a worker's channel may still be backing off
# (grpc reconnect back-off, at most 2 s plus 20 % jitter; store/grpc/channel.py), and
# a failing call takes its three attempts (~0.3 s) before it is logged.
RECONNECT_SLACK = 3.0
# Seconds between samples of the dispatcher, each with a drop of the kernel's
# page, dentry and inode caches.
SAMPLE_EVERY = 1.0
# How long a worker kill waits for a worker with calls in flight before it takes any.
AIM_WAIT = 1.0
# What a failure caused by the daemon being away says (store/grpc/status.py translate).
DAEMON_AWAY = re.compile(r"answered (UNAVAILABLE|CANCELLED)")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (ERROR|CRITICAL) (.*)$", re.M)


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """One soak's knobs; the defaults are the issue's."""

    seconds: float
    seed: int = 1
    workers: int = 3
    # Well above a daemon restart (SIGTERM drain or SIGKILL, the gap, ~0.5-1.5 s of
    # start-up under this load): a restart must be over within one request deadline.
    request_timeout: float = 10.0
    # A buffered read whose readahead failed is retried by the kernel with a
    # second FUSE read, so one read(2) may wait two request deadlines.
    read_timeout: float = 20.0
    readers: tuple[tuple[str, int], ...] = (("seq", 3), ("random", 3), ("tree", 2))
    kill_every: tuple[float, float] = (2.0, 5.0)
    restart_every: float = 15.0
    restart_gap: tuple[float, float] = (0.2, 1.0)
    quiet_tail: float = 5.0  # no fault this long before the load ends
    files: int = 300
    big: int = 2
    big_size: str = "8M"


@dataclass(slots=True)
class Fault:
    """One injected fault; times are wall-clock (the mount's log has wall-clock times)."""

    kind: str  # "worker_kill" | "daemon_restart"
    at: float
    detail: str
    ready_at: float | None = None  # daemon_restart: when it answered health checks again

    def window(self) -> tuple[float, float] | None:
        """The time a daemon restart may explain a failed read in (see RECONNECT_SLACK)."""
        if self.kind != "daemon_restart" or self.ready_at is None:
            return None
        return self.at, self.ready_at + RECONNECT_SLACK


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    fds: int


@dataclass(slots=True)
class SoakResult:
    config: SoakConfig
    work: Path
    loadtests: dict[str, dict[str, Any]] = field(default_factory=dict)
    loadtest_status: dict[str, int | None] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    pool: dict[str, Any] = field(default_factory=dict)
    error_lines: list[tuple[float, str]] = field(default_factory=list)
    mount_status: int | None = None
    stale_mount: bool = False
    leftovers: list[str] = field(default_factory=list)
    daemon_problems: list[str] = field(default_factory=list)
    chaos_error: str | None = None

    # -- derived -------------------------------------------------------------------------

    def windows(self) -> list[tuple[float, float]]:
        return [w for f in self.faults if (w := f.window()) is not None]

    def explained(self, at: float, text: str) -> bool:
        """Whether a failure logged at ``at`` is the daemon being away (by time and by wording)."""
        return bool(DAEMON_AWAY.search(text)) and any(a <= at <= b for a, b in self.windows())

    def unexplained_errors(self) -> list[str]:
        return [text for at, text in self.error_lines if not self.explained(at, text)]

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.loadtests.values())

    def loadtest_errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.loadtests.values():
            for name, count in s.get("errors", {}).items():
                out[name] = out.get(name, 0) + count
        return out

    def second_half(self) -> list[Sample]:
        half = self.config.seconds / 2
        return [s for s in self.samples if s.t >= half]

    def rss_growth_kib(self) -> int:
        """Largest RSS in the second half minus the RSS at its start."""
        late = self.second_half()
        return max(s.rss_kib for s in late) - late[0].rss_kib if late else 0

    def fd_drift(self) -> int:
        """Largest distance of a second-half fd count from the count at its start."""
        late = self.second_half()
        return max(abs(s.fds - late[0].fds) for s in late) if late else 0


def figures(result: SoakResult) -> dict[str, Any]:
    """What a soak run is summed up by (printed by the test, written to $SOAK_REPORT)."""
    kills = [f for f in result.faults if f.kind == "worker_kill"]
    restarts = [f for f in result.faults if f.kind == "daemon_restart"]
    late = result.second_half()
    return {
        "duration_s": result.config.seconds,
        "seed": result.config.seed,
        "workers": result.config.workers,
        "request_timeout_s": result.config.request_timeout,
        "read_timeout_s": result.config.read_timeout,
        "reads": result.total("reads"),
        "bytes": result.total("bytes"),
        "files_read": result.total("files"),
        "files_verified": result.total("verified_files"),
        "stats": result.total("stats"),
        "wrong_files": result.total("wrong_files"),
        "wrong_bytes": result.total("wrong_bytes"),
        "hangs": result.total("hangs"),
        "stuck_readers": sum(len(s.get("stuck_readers", [])) for s in result.loadtests.values()),
        "errors": result.loadtest_errors(),
        "error_count": result.total("error_count"),
        "faults": {
            "worker_kills": len(kills),
            "worker_kills_busy": sum(1 for f in kills if "in flight" in f.detail),
            "daemon_restarts": len(restarts),
            "daemon_sigterm": sum(1 for f in restarts if f.detail.startswith("SIGTERM")),
            "daemon_sigkill": sum(1 for f in restarts if f.detail.startswith("SIGKILL")),
            "daemon_outage_s": [round(f.ready_at - f.at, 2) for f in restarts if f.ready_at is not None],
        },
        "mount_error_lines": len(result.error_lines),
        "mount_error_lines_unexplained": len(result.unexplained_errors()),
        "pool": {k: result.pool.get(k) for k in ("requests", "errors", "timeouts", "lost", "resent",
                                                 "restarts", "killed")},
        "dispatcher": {
            "rss_mib_start": round(result.samples[0].rss_kib / 1024, 1) if result.samples else None,
            "rss_mib_half": round(late[0].rss_kib / 1024, 1) if late else None,
            "rss_mib_end": round(result.samples[-1].rss_kib / 1024, 1) if result.samples else None,
            "rss_growth_second_half_mib": round(result.rss_growth_kib() / 1024, 2),
            "fds_min": min((s.fds for s in result.samples), default=None),
            "fds_max": max((s.fds for s in result.samples), default=None),
            "fd_drift_second_half": result.fd_drift(),
            "samples": len(result.samples),
        },
        "latency_ms": {p: s.get("latency_ms") for p, s in result.loadtests.items()},
        "mount_status": result.mount_status,
        "stale_mount": result.stale_mount,
        "leftover_processes": result.leftovers,
        "loadtest_status": result.loadtest_status,
    }


def summary_text(result: SoakResult) -> str:
    f = figures(result)
    faults, disp = f["faults"], f["dispatcher"]
    lines = [
        f"soak: {f['duration_s']:g} s, seed {f['seed']}, {f['workers']} workers, request timeout "
        f"{f['request_timeout_s']:g} s, hang deadline {f['read_timeout_s']:g} s",
        f"  load       {f['reads']} reads, {f['bytes'] / 1e6:.1f} MB, {f['files_read']} files "
        f"({f['files_verified']} verified whole), {f['stats']} lstats",
        f"  faults     {faults['worker_kills']} worker SIGKILLs ({faults['worker_kills_busy']} with calls in "
        f"flight), {faults['daemon_restarts']} daemon restarts "
        f"({faults['daemon_sigterm']} SIGTERM, {faults['daemon_sigkill']} SIGKILL; outages "
        f"{faults['daemon_outage_s']} s)",
        f"  checks     wrong files {f['wrong_files']}, wrong bytes {f['wrong_bytes']}, hangs {f['hangs']}, "
        f"stuck readers {f['stuck_readers']}",
        f"  errors     {f['error_count']} {f['errors'] or ''}; mount ERROR lines {f['mount_error_lines']} "
        f"({f['mount_error_lines_unexplained']} outside a daemon outage)",
        f"  pool       {f['pool']}",
        f"  dispatcher RSS {disp['rss_mib_start']} -> {disp['rss_mib_half']} -> {disp['rss_mib_end']} MiB "
        f"(second half +{disp['rss_growth_second_half_mib']} MiB), fds {disp['fds_min']}..{disp['fds_max']} "
        f"(second half drift {disp['fd_drift_second_half']})",
        f"  teardown   mount exit {f['mount_status']}, stale mount {f['stale_mount']}, leftover processes "
        f"{f['leftover_processes'] or 'none'}",
    ]
    return "\n".join(lines)


def write_report(result: SoakResult, path: str | os.PathLike[str]) -> None:
    data = figures(result)
    data["fault_log"] = [asdict(fault) for fault in result.faults]
    data["unexplained_errors"] = result.unexplained_errors()[:50]
    data["loadtests"] = result.loadtests
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


# -- the parts ------------------------------------------------------------------------------------


def build_store(root: Path, config: SoakConfig) -> tuple[Path, list[str]]:
    """Generate the tree and import it; (store dir, store path basenames)."""
    tree = root / "tree"
    subprocess.run([sys.executable, str(GEN_TREE), str(tree), "--files", str(config.files), "--big",
                    str(config.big), "--big-size", config.big_size, "--seed", str(config.seed)],
                   check=True, capture_output=True, timeout=120)
    store_dir = root / "store"
    out = subprocess.run([*tvixstore(), "--store-dir", str(store_dir), "--quiet", "import",
                          *map(str, sorted(tree.iterdir()))],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    shutil.rmtree(tree)
    return store_dir, [line.rsplit("/", 1)[1] for line in out.split() if line.startswith("/nix/store/")]


def tvixstore() -> list[str]:
    """The `tvixstore` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "tvixstore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tvixmount.admin.cli"]


class StoreDaemon(Daemon):
    """`tvixstore daemon --read-only` on a unix socket in ``root``, as an operator starts it."""

    def __init__(self, root: Path, store_dir: Path) -> None:
        super().__init__(root, store_urls=StoreUrls.embedded(store_dir), log_level="info")
        self.cmd = [*tvixstore(), "--store-dir", str(store_dir), "daemon", "--log-level", "info",
                    "--listen-address", self.listen, "--read-only", "--stats-interval", "0"]


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (tells a process from a later one with its number)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"pid {pid} has no VmRSS")


class Sampler(threading.Thread):
    """Every second: the dispatcher's RSS and fds, the processes below it, and a drop of the caches."""

    def __init__(self, pid: int, started: float, result: SoakResult) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid = pid
        self.started = started
        self.result = result
        self.seen: dict[int, str] = {}  # pid -> start time, every process ever below the dispatcher
        self.stop = threading.Event()

    def run(self) -> None:
        tick = time.monotonic() + SAMPLE_EVERY
        # The wait is to the next tick, not a fixed second: a cache drop can take
        # a good part of a second on a busy host.
        while not self.stop.wait(max(0.0, tick - time.monotonic())):
            tick = max(tick + SAMPLE_EVERY, time.monotonic() + SAMPLE_EVERY / 4)
            with contextlib.suppress(OSError):
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            try:
                rss, fds = _rss_kib(self.pid), len(os.listdir(f"/proc/{self.pid}/fd"))
            except OSError:
                return  # the dispatcher is gone: the test will say why
            self.result.samples.append(Sample(round(time.monotonic() - self.started, 2), rss, fds))
            for child in descendants(self.pid):
                start = _proc_start(child)
                if start is not None:
                    self.seen.setdefault(child, start)


class Chaos(threading.Thread):
    """Kills workers and restarts the daemon on a seeded schedule until ``until`` (monotonic)."""

    def __init__(self, config: SoakConfig, mount: Mount, daemon: StoreDaemon, until: float,
                 result: SoakResult) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.config = config
        self.mount = mount
        self.daemon = daemon
        self.until = until
        self.result = result
        self.rng = random.Random(config.seed)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test, not lost in a thread
            self.result.chaos_error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        rng, cfg = self.rng, self.config
        now = time.monotonic()
        next_kill = now + rng.uniform(*cfg.kill_every)
        next_restart = now + cfg.restart_every * rng.uniform(0.8, 1.2)
        while not self.stop.wait(0.05):
            now = time.monotonic()
            if now >= self.until:
                return
            if now >= next_restart:
                self.restart_daemon()
                next_restart = time.monotonic() + cfg.restart_every * rng.uniform(0.8, 1.2)
            elif now >= next_kill:
                self.kill_worker()
                next_kill = time.monotonic() + rng.uniform(*cfg.kill_every)

    def kill_worker(self) -> None:
        """SIGKILL a worker: one with calls in flight if one shows within AIM_WAIT, else any.

        Once the mount's caches hold most of the data set a worker is idle most of
        the time, and a kill at a random instant meets no request (the CI soak once
        saw 14 such kills and nothing to re-send). Aiming at a busy worker is what
        makes the re-send path run under load.
        """
        found = worker_pids(self.mount)
        if not found:
            return  # all being replaced; the next turn will find one
        busy = self._busy(found)
        worker_id = self.rng.choice(sorted(busy or found))
        pid = found[worker_id]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            aim = f", {busy[worker_id]} calls in flight" if busy else ", idle"
            self.result.faults.append(Fault("worker_kill", time.time(), f"worker {worker_id} pid {pid}{aim}"))

    def _busy(self, found: dict[int, int]) -> dict[int, int]:
        """Worker id -> calls in flight, for the workers of ``found`` the mount shows busy."""
        deadline = time.monotonic() + AIM_WAIT
        while True:
            with contextlib.suppress(OSError, ValueError):
                workers = mount_stats(self.mount.mountpoint)["fetcher"]["workers"]
                busy = {int(i): w["inflight"] for i, w in workers.items()
                        if w["inflight"] > 0 and found.get(int(i)) == w["pid"]}
                if busy:
                    return busy
            if time.monotonic() >= deadline or self.stop.wait(0.01):
                return {}

    def restart_daemon(self) -> None:
        sig = self.rng.choice((signal.SIGTERM, signal.SIGKILL))
        gap = self.rng.uniform(*self.config.restart_gap)
        fault = Fault("daemon_restart", time.time(), f"{sig.name}, gap {gap:.2f} s")
        self.result.faults.append(fault)
        status = self.daemon.stop(sig)
        if sig == signal.SIGTERM and status != 0:
            self.result.daemon_problems.append(f"daemon exited {status} after SIGTERM")
        time.sleep(gap)
        self.daemon.start()
        fault.ready_at = time.time()


def _log_errors(text: str) -> list[tuple[float, str]]:
    """(wall time, line) of every ERROR and CRITICAL line of a mount log."""
    out = []
    for m in _LOG_LINE.finditer(text):
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append((at, m.group(0)))
    return out


def _alive(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (and not a zombie)."""
    if _proc_start(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def run(config: SoakConfig, work: Path) -> SoakResult:
    """One soak; logs and loadtest JSON stay in ``work``. Always leaves nothing running or mounted."""
    result = SoakResult(config, work)
    ram = scratch_dir("tvx-soak-")  # the store and the socket (short path) in RAM
    daemon: StoreDaemon | None = None
    mount: Mount | None = None
    loads: dict[str, subprocess.Popen] = {}
    sampler: Sampler | None = None
    chaos: Chaos | None = None
    try:
        store_dir, names = build_store(ram, config)
        assert names, "the import printed no store paths"
        daemon = StoreDaemon(ram / "daemon", store_dir).start()
        mount = Mount(work / "mnt", None, "--list-root", "--log-level", "INFO", "--segment-cache", "8M",
                      "--request-timeout", str(config.request_timeout),
                      urls=(daemon.url,) * 3, workers=config.workers, log_path=work / "mount.log").start()
        assert mount.proc is not None
        started = time.monotonic()
        for pattern, readers in config.readers:
            with open(work / f"loadtest-{pattern}.out", "wb") as out:
                loads[pattern] = subprocess.Popen(
                    [sys.executable, str(LOADTEST), str(mount.mountpoint), "--pattern", pattern,
                     "--readers", str(readers), "--duration", f"{config.seconds}s", "--verify",
                     "--read-timeout", str(config.read_timeout), "--seed", str(config.seed),
                     "--json", str(work / f"loadtest-{pattern}.json")],
                    stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(mount.proc.pid, started, result)
        sampler.start()
        chaos = Chaos(config, mount, daemon, started + config.seconds - config.quiet_tail, result)
        chaos.start()
        limit = started + config.seconds + config.read_timeout + 60
        for pattern, proc in loads.items():
            try:
                result.loadtest_status[pattern] = proc.wait(max(1.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                result.loadtest_status[pattern] = None
            json_path = work / f"loadtest-{pattern}.json"
            if json_path.exists():
                result.loadtests[pattern] = json.loads(json_path.read_text())
        chaos.stop.set()
        chaos.join(60)
        sampler.stop.set()
        sampler.join(10)
        result.pool = mount_stats(mount.mountpoint)["fetcher"]
    finally:
        for proc in loads.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if chaos is not None:
            chaos.stop.set()
            chaos.join(60)
        if sampler is not None:
            sampler.stop.set()
            sampler.join(10)
        if mount is not None:
            result.mount_status = mount.stop()
            result.stale_mount = is_mounted(mount.mountpoint)
            result.error_lines = _log_errors(mount.log())
        if daemon is not None:
            daemon.stop()
            result.daemon_problems += daemon.problems()
        shutil.rmtree(ram, ignore_errors=True)
    if sampler is not None:
        deadline = time.monotonic() + 10
        while True:
            result.leftovers = [f"pid {pid}" for pid, start in sorted(sampler.seen.items())
                                if _alive(pid, start)]
            if not result.leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return result
