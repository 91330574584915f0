#!/usr/bin/env python3
"""Generate a deterministic, Nix-closure-like file tree for import benchmarks and tests.

Why a generator and not a real closure: a benchmark must be reproducible on a
machine without a Nix store, and its numbers must be comparable between runs.
The same ``--seed`` and options always give a byte-identical tree (names,
contents, modes, symlink targets), so two machines can compare files/s and
MB/s on exactly the same input.

What makes it "closure-like" (the shapes an importer must be fast and correct on):

* several top-level "store paths" ``<name>-<version>``, a few large and many
  small (heavy-tailed), each with ``bin/ lib/ include/ share/``;
* most files small, some hundreds of KiB, a few MiB (``SIZE_CLASSES``);
* executables (everything in ``bin/``, shared objects, some scripts);
* symlinks: relative (``libz.so -> libz.so.1``), absolute
  (``/nix/store/<hash>-<other>/...``, dangling here, kept verbatim), to
  directories and dangling;
* duplicate contents across files and packages (licences, shared headers);
* empty files and empty directories; about ten entries per directory.

``--files`` counts regular files exactly; symlinks and directories come on
top. ``--big N --big-size 128M`` adds N large files in a separate package.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tvixmount next to this script

from tvixmount.units import size_argument

# (weight, min bytes, max bytes): most files small, a tail of big ones.
# Mean is about 27 KiB, close to what real closures show (median a few KiB).
SIZE_CLASSES = (
    (0.55, 1, 2 * 1024),
    (0.30, 2 * 1024, 16 * 1024),
    (0.12, 16 * 1024, 128 * 1024),
    (0.027, 128 * 1024, 768 * 1024),
    (0.003, 1024 * 1024, 6 * 1024 * 1024),
)
EMPTY_FILE_RATE = 0.01
DUPLICATE_RATE = 0.08
SYMLINK_RATE = 0.03
EMPTY_DIR_RATE = 0.01
FILES_PER_PACKAGE = 1500
CHUNK = 1 << 20

PACKAGE_NAMES = (
    "glibc", "zlib", "openssl", "python3", "perl", "ncurses", "readline", "bash",
    "coreutils", "gcc-lib", "libffi", "sqlite", "curl", "xz", "bzip2", "expat",
    "gettext", "icu4c", "libxml2", "gmp", "mpfr", "libidn2", "nghttp2", "brotli",
    "zstd", "util-linux", "systemd-minimal", "dbus", "glib", "pcre2", "gnugrep",
    "gnused", "gawk", "findutils", "diffutils", "tzdata", "iana-etc", "attr", "acl",
    "libcap", "keyutils", "krb5", "openldap", "libssh2", "lz4", "libarchive",
)
NIXBASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
LANGS = ("de", "es", "fr", "it", "ja", "nl", "pl", "pt_BR", "ru", "sv", "uk", "zh_CN")


@dataclass(slots=True)
class Stats:
    files: int = 0
    bytes: int = 0
    executables: int = 0
    empty_files: int = 0
    duplicates: int = 0
    symlinks: int = 0
    directories: int = 0
    empty_directories: int = 0
    packages: list[str] = field(default_factory=list)


class Generator:
    """Writes one tree; every random choice comes from one seeded Random, in a fixed order."""

    def __init__(self, out: Path, seed: int) -> None:
        self.out = out
        self.rnd = random.Random(seed)
        self.stats = Stats()
        self.shared: list[bytes] = []  # contents that later files may duplicate
        self.store_hashes: dict[str, str] = {}

    # -- contents -------------------------------------------------------------

    def _size(self) -> int:
        r = self.rnd.random()
        for weight, low, high in SIZE_CLASSES:
            if r < weight:
                # log-uniform inside the class: small sizes more frequent
                return int(low * (high / low) ** self.rnd.random())
            r -= weight
        return SIZE_CLASSES[0][1]

    def _contents(self) -> bytes:
        rnd = self.rnd
        r = rnd.random()
        if r < EMPTY_FILE_RATE:
            self.stats.empty_files += 1
            return b""
        if r < EMPTY_FILE_RATE + DUPLICATE_RATE and self.shared:
            self.stats.duplicates += 1
            return rnd.choice(self.shared)
        data = rnd.randbytes(self._size())
        if len(data) <= 64 * 1024 and len(self.shared) < 256 and rnd.random() < 0.05:
            self.shared.append(data)
        return data

    def write_file(self, path: Path, data: bytes, executable: bool) -> None:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if executable else 0o644)
        self.stats.files += 1
        self.stats.bytes += len(data)
        self.stats.executables += executable

    def write_big(self, path: Path, size: int) -> None:
        """A large file written in 1 MiB pieces, so memory stays flat."""
        with open(path, "wb") as f:
            left = size
            while left:
                piece = self.rnd.randbytes(min(CHUNK, left))
                f.write(piece)
                left -= len(piece)
        os.chmod(path, 0o644)
        self.stats.files += 1
        self.stats.bytes += size

    def mkdir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.stats.directories += 1
        return path

    def symlink(self, target: str, path: Path) -> None:
        os.symlink(target, path)
        self.stats.symlinks += 1

    def fake_store_path(self, name: str) -> str:
        """A stable made-up /nix/store path for absolute symlink targets."""
        if name not in self.store_hashes:
            self.store_hashes[name] = "".join(self.rnd.choice(NIXBASE32) for _ in range(32))
        return f"/nix/store/{self.store_hashes[name]}-{name}"

    # -- shapes ---------------------------------------------------------------

    def package_budgets(self, total: int) -> list[tuple[str, int]]:
        """Split ``total`` files over packages with heavy-tailed weights (a few big ones)."""
        # at least a few packages once there are enough files, so small trees are closures too
        count = max(1, min(3, total // 50), min(len(PACKAGE_NAMES), round(total / FILES_PER_PACKAGE)))
        names = self.rnd.sample(PACKAGE_NAMES, count)
        weights = [self.rnd.paretovariate(1.2) for _ in names]
        scale = total / sum(weights)
        budgets = [max(1, int(w * scale)) for w in weights]
        # settle rounding so the sum is exact; the biggest package absorbs it
        biggest = max(range(count), key=budgets.__getitem__)
        budgets[biggest] += total - sum(budgets)  # stays >= 1: it holds at least total/count
        result = []
        for name, budget in zip(names, budgets, strict=True):
            version = f"{self.rnd.randint(0, 12)}.{self.rnd.randint(0, 40)}.{self.rnd.randint(0, 9)}"
            result.append((f"{name}-{version}", budget))
        return result

    def tree(self, path: Path, budget: int, exec_rate: float, suffixes: tuple[str, ...]) -> None:
        """Fill ``path`` with ``budget`` files, about ten per directory, nested as needed."""
        self.mkdir(path)
        rnd = self.rnd
        here = min(budget, rnd.randint(5, 22))
        names: list[str] = []
        for i in range(here):
            name = f"{_word(rnd)}{i}{rnd.choice(suffixes)}"
            self.write_file(path / name, self._contents(), rnd.random() < exec_rate)
            names.append(name)
        if names and rnd.random() < SYMLINK_RATE * 4:
            self.symlink(rnd.choice(names), path / f"alias-{_word(rnd)}")
        if rnd.random() < EMPTY_DIR_RATE * 3:
            self.mkdir(path / f"empty-{_word(rnd)}")
            self.stats.empty_directories += 1
        left = budget - here
        if left <= 0:
            return
        subdirs = max(1, min(left // 12 + 1, rnd.randint(1, 5)))
        cuts = sorted(rnd.randint(0, left) for _ in range(subdirs - 1))
        parts = [b - a for a, b in zip([0, *cuts], [*cuts, left], strict=True)]
        for i, part in enumerate(parts):
            if part:
                self.tree(path / f"{_word(rnd)}_{i}", part, exec_rate, suffixes)

    def package(self, name: str, budget: int, others: list[str]) -> None:
        rnd = self.rnd
        root = self.mkdir(self.out / name)
        short = name.rsplit("-", 1)[0]
        # fixed-size corners first, then the bulk into deep lib/ and include/ trees
        n_bin = min(budget, max(1, budget // 25))
        n_so = min(budget - n_bin, max(0, budget // 60))
        n_doc = min(budget - n_bin - n_so, 2)
        bulk = budget - n_bin - n_so - n_doc

        bindir = self.mkdir(root / "bin")
        bins = []
        for i in range(n_bin):
            b = f"{short}-{_word(rnd)}{i}" if i else short
            self.write_file(bindir / b, self._contents(), True)
            bins.append(b)
        if bins and rnd.random() < 0.5:
            self.symlink(bins[0], bindir / f"{short}-{name.rsplit('-', 1)[1]}")

        libdir = self.mkdir(root / "lib")
        for i in range(n_so):
            real = f"lib{short}{i}.so.{rnd.randint(0, 9)}.{rnd.randint(0, 30)}.{rnd.randint(0, 9)}"
            self.write_file(libdir / real, self._contents(), True)
            major = real.rsplit(".", 2)[0]
            self.symlink(real, libdir / major)  # libx.so.1 -> libx.so.1.2.3
            self.symlink(major, libdir / (major.split(".so")[0] + ".so"))
        if rnd.random() < 0.7 or not self.stats.packages:  # the first package always has one
            dep = rnd.choice(others) if others else f"{rnd.choice(PACKAGE_NAMES)}-1.0"
            self.symlink(f"{self.fake_store_path(dep)}/lib/lib{dep.rsplit('-', 1)[0]}.so", libdir / "dep.so")

        docdir = self.mkdir(root / "share" / "doc" / short)
        for i in range(n_doc):
            shared_licence = self.shared[0] if self.shared else b""
            data = shared_licence if i == 0 and shared_licence else self._contents()
            self.write_file(docdir / ("COPYING" if i == 0 else "README"), data, False)
        if rnd.random() < 0.3:
            self.symlink("../../../nonexistent/manual.html", docdir / "manual.html")  # dangling

        n_include = bulk // 4
        n_locale = min(bulk - n_include, len(LANGS) if rnd.random() < 0.4 else 0)
        n_lib = bulk - n_include - n_locale
        if n_include:
            self.tree(root / "include" / short, n_include, 0.0, (".h", ".h", ".hpp", ".inc"))
        if n_lib:
            subtree = libdir / short
            self.tree(subtree, n_lib, 0.03, (".py", ".pyc", ".so", ".pm", ".a", ".la", ".dat", ""))
            self.symlink(short, libdir / "current")  # symlink to a directory
        for lang in LANGS[:n_locale]:
            msgs = self.mkdir(root / "share" / "locale" / lang / "LC_MESSAGES")
            self.write_file(msgs / f"{short}.mo", self._contents(), False)
        if rnd.random() < 0.5:
            self.mkdir(root / "share" / "empty")
            self.stats.empty_directories += 1

    def big_package(self, count: int, size: int) -> None:
        root = self.mkdir(self.out / "bigdata-1.0")
        data = self.mkdir(root / "share" / "data")
        for i in range(count):
            self.write_big(data / f"blob-{i:03d}.bin", size)
        self.stats.packages.append("bigdata-1.0")

    def run(self, files: int, big: int, big_size: int) -> Stats:
        plan = self.package_budgets(files)
        names = [n for n, _ in plan]
        for name, budget in plan:
            self.package(name, budget, [n for n in names if n != name])
            self.stats.packages.append(name)
        if big:
            self.big_package(big, big_size)
        return self.stats


def _word(rnd: random.Random) -> str:
    syll = ("ba", "ce", "di", "fo", "gu", "ka", "le", "mi", "no", "pu", "ra", "se", "ti", "vo", "xu", "zy")
    return "".join(rnd.choice(syll) for _ in range(rnd.randint(1, 3)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/gen_tree.py /tmp/closure --files 40000 --big 2 --big-size 128M",
    )
    parser.add_argument("outdir", type=Path, help="directory to create (must not exist or be empty)")
    parser.add_argument("--files", type=int, default=40000, help="number of regular files (default 40000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--big", type=int, default=0, metavar="N", help="add N big files (default 0)")
    parser.add_argument("--big-size", type=size_argument, default=128 << 20, metavar="SIZE",
                        help="size of each big file (default 128M)")
    args = parser.parse_args(argv)
    if args.files < 1 or args.big < 0 or args.big_size < 0:
        parser.error("--files must be >= 1, --big and --big-size >= 0")
    out: Path = args.outdir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"gen_tree: error: {out}: exists and is not an empty directory", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stats = Generator(out, args.seed).run(args.files, args.big, args.big_size)
    elapsed = time.monotonic() - started
    print(
        f"{out}: {len(stats.packages)} packages, {stats.files} files ({stats.executables} executable, "
        f"{stats.empty_files} empty, {stats.duplicates} duplicates), {stats.symlinks} symlinks, "
        f"{stats.directories} directories ({stats.empty_directories} empty), "
        f"{stats.bytes / 1e6:.1f} MB in {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
