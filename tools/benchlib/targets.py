"""The ways the same tree is read: native disk, squashfuse, a bare llfuse passthrough, tvixmount.

``prepare(cold=True)`` gives a cold start the way an operator's first
build after a boot sees it: page cache, dentries and inodes dropped, and
for a FUSE target a fresh mount (a FUSE filesystem keeps its own caches;
for gRPC also a fresh daemon, which has caches of its own).
``prepare(cold=False)`` keeps whatever is there: the warm re-run.
``warm_backing()`` reads what a FUSE target serves from (image, source
files, blob files) into the page cache, so that a fresh mount after it
measures the filesystem and not the disk.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .dataset import BIG_PACKAGE, Dataset
from .procs import FuseMount, GrpcDaemon, Registry, drop_caches, tvixmount_cmd

PASSTHROUGH = Path(__file__).resolve().parent.parent / "passthrough.py"
GRPC_PASSTHROUGH = PASSTHROUGH.with_name("grpc_passthrough.py")
# the floors of the gRPC sequential read: tools/grpc_passthrough.py's flags by name ("N": --mount-workers,
# "T": the FUSE threads of tvixmount over gRPC at N workers)
GRPC_FLOORS = {"passthrough-grpc": [], "passthrough-grpc-hop": ["--verify", "--hop", "N", "--threads", "T"]}


def tvixmount_threads(workers: int, remote: bool) -> int:
    """The FUSE threads tvixmount runs at ``workers``: ``THREADS`` (its --threads) if set, else its default.

    The hop floors run as many. Hand-offs between llfuse's threads cost a
    read served from memory 10-30 % (docs/performance.md, "Warm O_DIRECT
    and the FUSE threads"): a cost of the thread count, which the floor
    and tvixmount should pay alike, so that what differs is the read path.
    """
    from tvixmount.cli import default_threads
    from tvixmount.flags import positive
    from tvixmount.store import StoreUrls

    if os.environ.get("THREADS"):
        return positive(os.environ["THREADS"])  # the mount's own rule for --threads

    return default_threads(workers, StoreUrls.single("grpc+http://[::1]:8000" if remote else "memory://"))


class Target:
    name = ""
    description = ""

    has_backing = True  # a FUSE target reading other files: seq_cached measures it

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.caches_dropped = True

    def package_dir(self, package: str) -> str:
        """The name ``package`` has at this target's root."""
        return package

    def root(self) -> Path:
        raise NotImplementedError

    def prepare(self, cold: bool) -> Path:
        raise NotImplementedError

    def close(self) -> None:
        """Stop whatever this target started (idempotent)."""

    def big_files(self) -> list[tuple[Path, int]]:
        base = self.root() / self.package_dir(BIG_PACKAGE)
        return [(base / rel, size) for rel, size in self.ds.big_files]

    def small_packages(self) -> list[str]:
        return [self.package_dir(p) for p in self.ds.small_packages]

    def backing_files(self) -> list[Path]:
        """The files this target's mount reads from when the big files are read."""
        raise NotImplementedError

    def warm_backing(self) -> None:
        """Read every backing file once, so that it is in the page cache."""
        buf = bytearray(1 << 20)
        for path in self.backing_files():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    def _drop(self) -> None:
        self.caches_dropped = drop_caches() and self.caches_dropped

    def mount_pid(self) -> int | None:
        return None


class Native(Target):
    name = "native"
    description = "the tree on the local disk"
    has_backing = False

    def root(self) -> Path:
        return self.ds.tree

    def prepare(self, cold: bool) -> Path:
        if cold:
            self._drop()
        return self.ds.tree


class Squashfuse(Target):
    name = "squashfuse"

    def __init__(self, ds: Dataset, workdir: Path, registry: Registry) -> None:
        super().__init__(ds)
        self.mountpoint = workdir / "mnt-squashfuse"
        self.registry = registry
        self.mount: FuseMount | None = None
        self.description = f"squashfuse -f on a mksquashfs -comp {ds.compression} image"
        self.log = workdir / "logs" / "squashfuse.log"

    def root(self) -> Path:
        return self.mountpoint

    def backing_files(self) -> list[Path]:
        return [self.ds.image]

    def prepare(self, cold: bool) -> Path:
        if cold or self.mount is None:
            self.close()
            if cold:
                self._drop()
            mount = FuseMount(self.name, self.command(), self.mountpoint, self.log, self.registry)
            self.mount = mount.start()
        return self.mountpoint

    def command(self) -> list[str]:
        return ["squashfuse", "-f", str(self.ds.image), str(self.mountpoint)]

    def close(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None

    def mount_pid(self) -> int | None:
        return self.mount.pid if self.mount else None


class Passthrough(Squashfuse):
    """tools/passthrough.py on the source tree: one Python thread, one system call per request."""

    name = "passthrough"

    def __init__(self, ds: Dataset, workdir: Path, registry: Registry) -> None:
        super().__init__(ds, workdir, registry)
        self.mountpoint = workdir / "mnt-passthrough"
        self.description = "tools/passthrough.py (bare llfuse, workers=1) on the source tree"
        self.log = workdir / "logs" / "passthrough.log"

    def backing_files(self) -> list[Path]:
        return [self.ds.tree / BIG_PACKAGE / rel for rel, _ in self.ds.big_files]

    def command(self) -> list[str]:
        return [sys.executable, str(PASSTHROUGH), str(self.ds.tree), str(self.mountpoint)]


class VerifyingPassthrough(Passthrough):
    """tools/passthrough.py --verify: the passthrough plus blake3 of every 256 KiB segment it serves."""

    name = "passthrough-verify"

    def __init__(self, ds: Dataset, workdir: Path, registry: Registry) -> None:
        super().__init__(ds, workdir, registry)
        self.mountpoint = workdir / "mnt-passthrough-verify"
        self.description = "tools/passthrough.py --verify (+ blake3 per segment) on the source tree"
        self.log = workdir / "logs" / "passthrough-verify.log"

    def command(self) -> list[str]:
        return [sys.executable, str(PASSTHROUGH), "--verify", str(self.ds.tree), str(self.mountpoint)]


class HopPassthrough(Passthrough):
    """tools/passthrough.py --verify --hop N: the verifying passthrough reading in N worker processes.

    The floor of tvixmount's own shape: the FUSE threads do no file I/O and
    each read is one round trip to a worker that preads and verifies. What
    tvixmount spends above it on a read that misses the arena is its own.
    """

    name = "passthrough-hop"

    def __init__(self, ds: Dataset, workdir: Path, registry: Registry, workers: int) -> None:
        super().__init__(ds, workdir, registry)
        self.workers = workers
        self.mountpoint = workdir / "mnt-passthrough-hop"
        self.threads = tvixmount_threads(workers, remote=False)
        self.description = (f"tools/passthrough.py --verify --hop {workers} (blake3 per segment in "
                            f"{workers} worker processes, {self.threads} FUSE threads as tvixmount's) "
                            "on the source tree")
        self.log = workdir / "logs" / "passthrough-hop.log"

    def command(self) -> list[str]:
        return [sys.executable, str(PASSTHROUGH), "--verify", "--hop", str(self.workers), "--threads",
                str(self.threads), str(self.ds.tree), str(self.mountpoint)]


class Tvixmount(Target):
    """tvixmount on the embedded store, or (``grpc``) on a daemon serving that store on loopback."""

    def __init__(self, ds: Dataset, workdir: Path, registry: Registry, workers: int, grpc: bool = False,
                 added_latency: float = 0.0, name: str | None = None,
                 daemon: GrpcDaemon | None = None) -> None:
        super().__init__(ds)
        self.shared_daemon = daemon  # started and stopped by the caller: only the mount is fresh
        self.grpc = grpc or daemon is not None
        self.added_latency = added_latency
        self.workers = workers
        self.name = name or ("tvix-grpc" if grpc else "tvix-embedded")
        self.mountpoint = workdir / f"mnt-{self.name}"
        self.registry = registry
        self.mount: FuseMount | None = None
        self.daemon: GrpcDaemon | None = None
        self.logs = workdir / "logs"
        if self.grpc:
            lat = f", --added-latency {added_latency:g}" if added_latency else ""
            self.description = f"tvixmount --workers {workers} over gRPC (loopback daemon{lat})"
        else:
            self.description = f"tvixmount --workers {workers} on the embedded store"

    def package_dir(self, package: str) -> str:
        return self.ds.store_names[package]

    def root(self) -> Path:
        return self.mountpoint

    def backing_files(self) -> list[Path]:
        """The big files' blobs, and the store's own files (its database, which every lookup reads)."""
        blobs = [self.ds.store / "blobs" / d.hex()[:2] / d.hex() for d in self.ds.big_digests]
        return blobs + [p for p in self.ds.store.iterdir() if p.is_file()]

    def prepare(self, cold: bool) -> Path:
        if cold or self.mount is None:
            self.close()
            if cold:
                self._drop()
            self.start()
        return self.mountpoint

    def start(self, workers: int | None = None) -> None:
        """A fresh daemon (gRPC) and mount, without touching the page cache."""
        if workers is not None:
            self.workers = workers
        if self.shared_daemon is not None:
            store_args = self.shared_daemon.urls()
        elif self.grpc:
            self.daemon = GrpcDaemon(self.ds.store, self.logs / f"{self.name}-daemon.log", self.registry,
                                     self.added_latency).start()
            store_args = self.daemon.urls()
        else:
            store_args = ["--store-dir", str(self.ds.store)]
        self.mount = FuseMount(f"tvixmount ({self.name})",
                               tvixmount_cmd(self.mountpoint, self.workers, store_args),
                               self.mountpoint, self.logs / f"{self.name}.log", self.registry).start()

    def close(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def mount_pid(self) -> int | None:
        return self.mount.pid if self.mount else None


def grpc_floor_cmd(ds: Dataset, name: str, listen: str, workers: int, mountpoint: Path) -> list[str]:
    """tools/grpc_passthrough.py as GRPC_FLOORS[name]: the big files read from the daemon on ``listen``."""
    blobs = mountpoint.parent / "grpc-blobs.json"
    blobs.write_text(json.dumps({f"{BIG_PACKAGE}/{rel}": digest.hex()
                                 for (rel, _), digest in zip(ds.big_files, ds.big_digests, strict=True)}))
    values = {"N": str(workers), "T": str(tvixmount_threads(workers, remote=True))}
    flags = [values.get(flag, flag) for flag in GRPC_FLOORS[name]]
    return [sys.executable, str(GRPC_PASSTHROUGH), *flags, "--listen", listen, "--blobs", str(blobs),
            str(ds.tree), str(mountpoint)]
