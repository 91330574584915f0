"""A/B of gRPC cold sequential reads, with the CPU seconds of each process (daemon, dispatcher, workers).

    ab_cpu.py DATASET_DIR ROUNDS TREE...   (as root; DATASET_DIR made by tools/bench)

For each round and each checkout in turn: a fresh daemon and the plain client
(tools/benchlib/grpcplain.py) reading the big blobs cold; then a fresh daemon
and mount, caches dropped, the big files read with 1 MiB reads; the CPU time
of each process from /proc/PID/stat around the read, and the mount's
segment-arena hits and misses (misses are worker requests). AB_ENV="VAR=value
..." goes into the mount's environment. On a shared 2-CPU machine the MB/s move
2x between rounds; the CPU seconds and the request counts move much less.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from benchlib.grpcplain import stream_blobs

MNT = Path("/var/tmp/grpcseq/m")
TICK = os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += tree_pids(int(child))
    return out


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpus(root: int) -> dict[int, float]:
    return {pid: cpu(pid) for pid in tree_pids(root)}


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def arena_stats() -> dict:
    out = subprocess.run(["getfattr", "-n", "user.tvixmount.stats", "--only-values", str(MNT)],
                         capture_output=True, check=False)
    try:
        return json.loads(out.stdout)["segment_cache"]
    except (ValueError, KeyError):
        return {}


def daemon(tree: str, ds: str, port: int) -> subprocess.Popen:
    cmd = [f"{tree}/.venv/bin/python", "-m", "tvixmount.server", "--listen-address", f"127.0.0.1:{port}",
           "--store-dir", f"{ds}/store", "--read-only", "--stats-interval", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)
    return proc


def one(tree: str, ds: str, meta: dict, env: dict[str, str]) -> str:
    digests = [bytes.fromhex(d) for d in meta["big_digests"]]
    port = random.randint(20000, 30000)
    drop_caches()
    d = daemon(tree, ds, port)
    try:
        plain = stream_blobs(f"127.0.0.1:{port}", digests, [meta["spec"]["big_size"]] * len(digests))["mb_s"]
    finally:
        d.terminate()
        d.wait()
    drop_caches()
    d = daemon(tree, ds, port)
    url = f"grpc+http://127.0.0.1:{port}"
    m = subprocess.Popen([f"{tree}/.venv/bin/python", "-m", "tvixmount.cli", str(MNT), "--workers", "2",
                          "--list-root", "--log-level", "WARNING", "--blob-service-addr", url,
                          "--directory-service-addr", url, "--path-info-service-addr", url],
                         cwd=tree, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if MNT.is_mount():
                break
            time.sleep(0.1)
        package = next(p for p in MNT.iterdir() if "bigdata" in p.name)
        files = sorted((package / "share" / "data").iterdir())
        drop_caches()
        d0, m0 = cpus(d.pid), cpus(m.pid)
        started, total = time.perf_counter(), 0
        view = memoryview(bytearray(1 << 20))
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        elapsed = time.perf_counter() - started
        d1, m1 = cpus(d.pid), cpus(m.pid)
        arena = arena_stats()
    finally:
        subprocess.run(["fusermount", "-u", str(MNT)], check=False)
        m.wait()
        d.terminate()
        d.wait()
    mb_s = total / elapsed / 1e6
    workers = sum(v - m0.get(p, 0.0) for p, v in m1.items() if p != m.pid)
    return (f"{tree:22s} mount {mb_s:6.0f} MB/s plain {plain:6.0f} ratio {mb_s / plain:.2f} | cpu s: "
            f"daemon {sum(d1.values()) - sum(d0.values()):.2f} dispatcher {m1[m.pid] - m0.get(m.pid, 0):.2f} "
            f"workers {workers:.2f} | hits {arena.get('hits')} misses {arena.get('misses')} | "
            f"load {os.getloadavg()[0]:.1f}")


def main() -> None:
    ds, rounds, trees = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    meta = json.loads(Path(ds, "dataset.json").read_text())
    env = dict(kv.split("=", 1) for kv in os.environ.get("AB_ENV", "").split() if "=" in kv)
    MNT.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        for tree in trees:
            print(f"round {r} {one(tree, ds, meta, env)}", flush=True)


if __name__ == "__main__":
    main()
