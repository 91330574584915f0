#!/usr/bin/env python3
"""Issue 12's bench: a path from a binary cache, tvixmount's lazy substitution against ``nix copy``.

What is timed, per compression (zstd, xz), on the same cache, server and run:

* **tvixmount**: a fresh embedded store, a mount with the cache as its
  path-info service; the clock runs from ``stat`` of the unsubstituted
  path to the end of a full read of every file under it (the mount start
  is not counted: it happens once per boot, a lookup once per path);
* **nix**: ``nix copy --from http://127.0.0.1:PORT --to 'local?root=DIR'
  STOREPATH`` into a fresh chroot store, signatures checked as ours are
  (the cache's key in ``trusted-public-keys``);
* **ingestion**: the same substitution in this process (no FUSE, no
  workers) into a fresh embedded store: MB/s of NAR; ``--profile`` runs it
  under cProfile and prints where the time goes.

The runs are interleaved (tvix, nix, tvix, nix, ...) so that drift of the
machine falls on both alike; medians are reported. The data: one store
path holding a closure-like tree (tools/gen_tree.py, ``--files``), added
with ``nix-store --add-fixed --recursive`` and copied to ``file://``
caches by Nix itself; built once per ``--workdir`` and reused.

Needs root (FUSE), Nix (``nix-bin``) and a few GB in ``--workdir``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import http.server
import io
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tvixmount next to this script

COMPRESSIONS = ("zstd", "xz")
KEY_NAME = "bench-1"


# -- the data ----------------------------------------------------------------------------


class Data:
    """The tree, the Nix chroot store it was added to, the key, and one cache per compression."""

    def __init__(self, workdir: Path, files: int) -> None:
        self.workdir = workdir
        self.files = files
        self.conf = workdir / "nix-conf"
        self.home = workdir / "nix-home"
        self.nixroot = workdir / "nix-root"
        self.source = workdir / "tree"
        self.secret = workdir / "secret-key"
        self.env = {**os.environ, "NIX_CONF_DIR": str(self.conf), "HOME": str(self.home)}
        self.store_path = ""
        self.public_key = ""

    def cache(self, compression: str) -> Path:
        return self.workdir / f"cache-{compression}"

    def nix(self, *args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run(args, env=self.env, input=stdin, capture_output=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout.decode().strip()

    def build(self, compressions: tuple[str, ...]) -> None:
        marker = self.workdir / "data.json"
        wanted = {"files": self.files, "compressions": sorted(compressions)}
        if marker.exists():
            found = json.loads(marker.read_text())
            if found["spec"] == wanted:
                self.store_path, self.public_key = found["store_path"], found["public_key"]
                self._write_conf()
                return
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.home.mkdir()
        self.conf.mkdir()
        (self.conf / "nix.conf").write_text("experimental-features = nix-command\nsubstituters =\n")
        say(f"generating a closure-like tree of {self.files} files in {self.source}")
        subprocess.run([sys.executable, str(ROOT / "tools" / "gen_tree.py"), str(self.source),
                        "--files", str(self.files)], check=True, capture_output=True)
        store = f"local?root={self.nixroot}"
        self.store_path = self.nix("nix-store", "--store", store, "--add-fixed", "--recursive", "sha256",
                                   str(self.source))
        self.secret.write_text(self.nix("nix", "key", "generate-secret", "--key-name", KEY_NAME))
        self.public_key = self.nix("nix", "key", "convert-secret-to-public", stdin=self.secret.read_bytes())
        for compression in compressions:
            say(f"nix copy --to file://{self.cache(compression)}?compression={compression}")
            self.nix("nix", "copy", "--store", store, "--to",
                     f"file://{self.cache(compression)}?compression={compression}&secret-key={self.secret}",
                     self.store_path)
        self._write_conf()
        marker.write_text(json.dumps({"spec": wanted, "store_path": self.store_path,
                                      "public_key": self.public_key}))

    def _write_conf(self) -> None:
        (self.conf / "nix.conf").write_text(
            "experimental-features = nix-command\nsubstituters =\n"
            f"trusted-public-keys = {self.public_key}\nrequire-sigs = true\n")

    def nar_size(self, compression: str) -> tuple[int, int]:
        """(NarSize, FileSize) of the path in one cache."""
        text = (self.cache(compression) / f"{Path(self.store_path).name[:32]}.narinfo").read_text()
        fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        return int(fields["NarSize"]), int(fields["FileSize"])


# -- the server --------------------------------------------------------------------------


class Server:
    """The cache directories over HTTP/1.1 keep-alive on loopback, streamed from disk."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def url(self, compression: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/cache-{compression}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return None


# -- the contenders ----------------------------------------------------------------------


def run_tvix(data: Data, server: Server, compression: str, scratch: Path, workers: int) -> dict[str, float]:
    """One lazy substitution through a fresh mount: seconds from stat to the end of the full read."""
    store, mnt = scratch / "tvix-store", scratch / "tvix-mnt"
    shutil.rmtree(store, ignore_errors=True)
    mnt.mkdir(parents=True, exist_ok=True)
    url = f"nix+{server.url(compression)}?trusted-public-keys={data.public_key}"
    log_path = scratch / "tvix-mount.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tvixmount.cli", str(mnt), "--store-dir", str(store),
                                 "--path-info-service-addr", url, "--workers", str(workers)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_mounted(mnt, proc, log_path)
        started = time.perf_counter()
        path = mnt / Path(data.store_path).name
        os.stat(path)
        looked_up = time.perf_counter()
        read = _read_all(path)
        ended = time.perf_counter()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
    logged = log_path.read_text(errors="replace")
    line = re.search(r"substituted \S+: NAR (\d+) bytes .* in ([\d.]+) s", logged)
    return {"seconds": ended - started, "lookup": looked_up - started, "read": ended - looked_up,
            "bytes_read": read, "ingest_seconds": float(line.group(2)) if line else float("nan")}


def run_nix(data: Data, server: Server, compression: str, scratch: Path) -> dict[str, float]:
    """``nix copy --from`` the same cache into a fresh chroot store."""
    target = scratch / "nix-target"
    if target.exists():
        subprocess.run(["chmod", "-R", "u+w", str(target)], check=False)
        shutil.rmtree(target)
    started = time.perf_counter()
    data.nix("nix", "copy", "--from", server.url(compression), "--to", f"local?root={target}",
             data.store_path)
    return {"seconds": time.perf_counter() - started}


def run_ingest(data: Data, server: Server, compression: str, scratch: Path,
               profile: Path | None = None) -> dict[str, float]:
    """The substitution alone, in this process, into a fresh embedded store: MB/s of NAR."""
    from tvixmount.castore.storepath import parse_absolute
    from tvixmount.store import StoreUrls, open_store
    from tvixmount.store.nixhttp import open_path_info_service

    store_dir = scratch / "ingest-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    url = f"nix+{server.url(compression)}?trusted-public-keys={data.public_key}"
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        service = open_path_info_service(url, store.blobs, store.directories, store.path_infos)
        profiler = cProfile.Profile(time.process_time) if profile is not None else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        info = service.substitute(parse_absolute(data.store_path))
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - started
        service.client.close()
    assert info is not None and info.narinfo is not None
    if profiler is not None and profile is not None:
        profiler.dump_stats(str(profile))
    return {"seconds": seconds, "mb_s": info.narinfo.nar_size / seconds / 1e6}


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    target = os.path.realpath(mnt)
    while True:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == target for line in f):
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tvixmount did not mount:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


def _read_all(path: Path) -> int:
    """Every file under ``path`` read to its end (1 MiB reads), as a build reading its inputs would."""
    total = 0
    buf = bytearray(1 << 20)
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            with open(full, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


# -- the report --------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def profile_summary(path: Path, limit: int = 18) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.rstrip() for line in lines[start:] if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/bench-substitute"))
    parser.add_argument("--files", type=int, default=7500,
                        help="files in the generated tree (default 7500: about 200 MiB of NAR)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per contender (default 3)")
    parser.add_argument("--compressions", default=",".join(COMPRESSIONS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="profile one zstd ingestion with cProfile into FILE and print its summary")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    compressions = tuple(c for c in args.compressions.split(",") if c)
    data = Data(args.workdir, args.files)
    data.build(compressions)
    scratch = args.workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    server = Server(args.workdir)
    results: dict[str, dict[str, list[dict[str, float]]]] = {c: {"tvix": [], "nix": [], "ingest": []}
                                                              for c in compressions}
    try:
        for run in range(args.runs):
            for compression in compressions:
                say(f"run {run + 1}/{args.runs} {compression}: tvixmount, nix copy, in-process ingestion")
                got = results[compression]
                got["tvix"].append(run_tvix(data, server, compression, scratch, args.workers))
                got["nix"].append(run_nix(data, server, compression, scratch))
                got["ingest"].append(run_ingest(data, server, compression, scratch))
        if args.profile is not None:
            run_ingest(data, server, "zstd" if "zstd" in compressions else compressions[0], scratch,
                       args.profile)
    finally:
        server.stop()
    report = {"store_path": data.store_path, "files": args.files, "runs": args.runs, "results": {}}
    print(f"path {data.store_path} ({args.files} files), {args.runs} interleaved runs, medians")
    print("| compression | NAR MiB | download MiB | tvixmount stat->read end s | (lookup s) | nix copy s "
          "| ratio tvix/nix | ingestion MB/s (in-process) |")
    print("|---|---|---|---|---|---|---|---|")
    for compression in compressions:
        nar, download = data.nar_size(compression)
        got = results[compression]
        tvix = statistics.median(r["seconds"] for r in got["tvix"])
        lookup = statistics.median(r["lookup"] for r in got["tvix"])
        nix = statistics.median(r["seconds"] for r in got["nix"])
        ingest = statistics.median(r["mb_s"] for r in got["ingest"])
        print(f"| {compression} | {nar / 2**20:.0f} | {download / 2**20:.0f} | {tvix:.2f} | {lookup:.2f} "
              f"| {nix:.2f} | {tvix / nix:.2f}x | {ingest:.0f} |")
        report["results"][compression] = {"nar_bytes": nar, "file_bytes": download, "tvix_s": tvix,
                                          "lookup_s": lookup, "nix_s": nix, "ratio": tvix / nix,
                                          "ingest_mb_s": ingest, "raw": got}
    if args.profile is not None:
        print("\ncProfile of one in-process zstd ingestion, by own time:\n")
        print(profile_summary(args.profile))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
