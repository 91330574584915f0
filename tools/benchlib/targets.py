"""The four ways the same tree is read: native disk, squashfuse, tvixmount (embedded, gRPC).

``prepare(cold=True)`` gives a cold start the way an operator's first
build after a boot sees it: page cache, dentries and inodes dropped, and
for a FUSE target a fresh mount (a FUSE filesystem keeps its own caches;
for gRPC also a fresh daemon, which has caches of its own).
``prepare(cold=False)`` keeps whatever is there: the warm re-run.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import BIG_PACKAGE, Dataset
from .procs import FuseMount, GrpcDaemon, Registry, drop_caches, tvixmount_cmd


class Target:
    name = ""
    description = ""

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

    def _drop(self) -> None:
        self.caches_dropped = drop_caches() and self.caches_dropped

    def mount_pid(self) -> int | None:
        return None


class Native(Target):
    name = "native"
    description = "the tree on the local disk"

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

    def prepare(self, cold: bool) -> Path:
        if cold or self.mount is None:
            self.close()
            self._drop()
            cmd = ["squashfuse", "-f", str(self.ds.image), str(self.mountpoint)]
            self.mount = FuseMount("squashfuse", cmd, self.mountpoint, self.log, self.registry).start()
        return self.mountpoint

    def close(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None

    def mount_pid(self) -> int | None:
        return self.mount.pid if self.mount else None


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

    def prepare(self, cold: bool) -> Path:
        if cold or self.mount is None:
            self.close()
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
