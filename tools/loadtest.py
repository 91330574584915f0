#!/usr/bin/env python3
"""tools/loadtest: hammer a mounted store with parallel readers and check every byte.

    tools/loadtest MOUNTPOINT --readers 32 --duration 60s [--pattern seq|random|tree]
                   [--verify] [--json OUT] [--max-files N] [--paths NAME... | --from-file FILE]

What an operator runs before trusting a mount with a build farm: many
readers at once, for a bounded time, with each whole-file read checked
against the blob digest the mount itself publishes
(``user.tvix.castore.blob.digest``, blake3). It works on any mount that
shows store paths at its root, tvixmount or not.

Patterns:
  seq     whole files in 1 MiB reads, readers sharing one shuffled round of
          all files (so every file is read before any is read twice)
  random  128 KiB preads at random offsets of random files; with --verify
          each file is first read whole once, checked against its digest,
          and every range is compared with that verified copy
  tree    like a compiler: walk a store path, lstat everything, read
          symlinks, read small files (<= 64 KiB) whole

Exit status: 0 when every read succeeded and matched; 1 on any error,
wrong byte or hang (a read taking longer than --read-timeout); 2 on bad
arguments or when no files could be found.
"""

from __future__ import annotations

import argparse
import base64
import errno
import itertools
import json
import os
import random
import re
import stat
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from benchlib.stats import fmt_bytes, percentile  # noqa: E402

DIGEST_XATTR = "user.tvix.castore.blob.digest"
SEQ_BLOCK = 1 << 20
RANDOM_BLOCK = 128 * 1024
RANDOM_READS_PER_OPEN = 8
SMALL_FILE = 64 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_STORE_PREFIX = "/nix/store/"


def parse_duration(text: str) -> float:
    """'60s', '2m', '500ms', '1h' or plain seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 60s, 2m or 500ms")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return value


def store_path_name(text: str) -> str:
    """'/nix/store/<hash>-<name>' or '<hash>-<name>' (a trailing slash is fine) -> '<hash>-<name>'."""
    name = text.strip().rstrip("/")
    name = name.removeprefix(_STORE_PREFIX)
    if not name or "/" in name or name in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a store path name")
    return name


@dataclass(slots=True)
class FileEntry:
    path: str
    size: int


@dataclass(slots=True)
class Totals:
    """Everything the readers count; mutated under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    files: int = 0
    reads: int = 0
    bytes: int = 0
    stats: int = 0
    verified_files: int = 0
    wrong_files: int = 0
    wrong_bytes: int = 0
    hangs: int = 0
    errors: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def error(self, name: str, message: str) -> None:
        with self.lock:
            self.errors[name] += 1
            if len(self.samples) < 20 and message not in self.samples:
                self.samples.append(message)


class Slot:
    """What one reader is blocked in right now, for the hang watchdog."""

    __slots__ = ("flagged", "started", "what")

    def __init__(self) -> None:
        self.started = 0.0
        self.what = ""
        self.flagged = False


class LoadTest:
    def __init__(self, args: argparse.Namespace, files: list[FileEntry], roots: list[str]) -> None:
        self.args = args
        self.files = files
        self.roots = roots
        self.totals = Totals()
        self.stop = threading.Event()
        self.slots = [Slot() for _ in range(args.readers)]
        self.latencies: list[list[float]] = [[] for _ in range(args.readers)]
        self.stat_latencies: list[list[float]] = [[] for _ in range(args.readers)]
        self.order = list(files)
        random.Random(args.seed).shuffle(self.order)
        self.cursor = itertools.cycle(self.order)
        self.cursor_lock = threading.Lock()
        self.digests: dict[str, bytes] = {}
        self.refs: OrderedDict[str, bytes] = OrderedDict()
        self.refs_bytes = 0
        self.refs_lock = threading.Lock()
        self.started = 0.0

    # -- timed system calls -----------------------------------------------------------------

    def _timed(self, index: int, what: str, fn, *fn_args, stat_call: bool = False):
        slot = self.slots[index]
        slot.what, slot.flagged = what, False
        slot.started = t = time.monotonic()
        try:
            return fn(*fn_args)
        except OSError as exc:
            exc.loadtest_what = what  # type: ignore[attr-defined]
            raise
        finally:
            took = time.monotonic() - t
            slot.started = 0.0
            (self.stat_latencies if stat_call else self.latencies)[index].append(took)
            if took > self.args.read_timeout and not slot.flagged:
                self._hang(f"{what} took {took:.1f} s (deadline {self.args.read_timeout:g} s)")

    def _hang(self, message: str) -> None:
        with self.totals.lock:
            self.totals.hangs += 1
            if len(self.totals.samples) < 20:
                self.totals.samples.append("HANG: " + message)

    # -- verification --------------------------------------------------------------------------

    def expected_digest(self, path: str) -> bytes:
        digest = self.digests.get(path)
        if digest is None:
            raw = os.getxattr(path, DIGEST_XATTR)
            text = raw.decode("ascii", "replace")
            if not text.startswith("b3:"):
                raise ValueError(f"{path}: {DIGEST_XATTR} is {text!r}, not b3:<base64>")
            digest = base64.b64decode(text[3:], validate=True)
            self.digests[path] = digest
        return digest

    def _check_whole(self, entry: FileEntry, got: int, digest: bytes | None) -> bool:
        """Size and (with --verify) digest of a whole-file read; counts a wrong file."""
        if got != entry.size:
            self.totals.error("SHORT_READ", f"{entry.path}: read {got} bytes, the file has {entry.size}")
            return False
        if digest is None:
            return True
        want = self.expected_digest(entry.path)
        if digest != want:
            with self.totals.lock:
                self.totals.wrong_files += 1
                if len(self.totals.samples) < 20:
                    self.totals.samples.append(
                        f"WRONG: {entry.path}: blake3 b3:{base64.b64encode(digest).decode()} "
                        f"!= {DIGEST_XATTR} b3:{base64.b64encode(want).decode()}")
            return False
        with self.totals.lock:
            self.totals.verified_files += 1
        return True

    def read_whole(self, index: int, entry: FileEntry, keep: bool = False) -> bytes | None:
        """Read a file start to end in 1 MiB reads; its bytes when ``keep`` and it checked out."""
        import blake3

        hasher = blake3.blake3() if self.args.verify else None
        parts: list[bytes] = []
        got = 0
        fd = self._timed(index, f"open {entry.path}", os.open, entry.path, os.O_RDONLY, stat_call=True)
        try:
            while not self.stop.is_set() or keep:
                data = self._timed(index, f"read of {entry.path} at {got}", os.pread, fd, SEQ_BLOCK, got)
                if not data:
                    break
                got += len(data)
                if hasher is not None:
                    hasher.update(data)
                if keep:
                    parts.append(data)
                with self.totals.lock:
                    self.totals.reads += 1
                    self.totals.bytes += len(data)
            else:
                return None  # stopped half-way: neither a success nor a failure
        finally:
            os.close(fd)
        ok = self._check_whole(entry, got, hasher.digest() if hasher is not None else None)
        with self.totals.lock:
            self.totals.files += 1
        return b"".join(parts) if ok and keep else None

    def reference(self, index: int, entry: FileEntry) -> bytes | None:
        """A digest-verified copy of the file for checking random ranges (None: unusable)."""
        with self.refs_lock:
            ref = self.refs.get(entry.path)
            if ref is not None:
                self.refs.move_to_end(entry.path)
                return ref
        ref = self.read_whole(index, entry, keep=True)
        if ref is None:
            return None
        with self.refs_lock:
            if entry.path not in self.refs and len(ref) <= self.args.verify_cache:
                self.refs[entry.path] = ref
                self.refs_bytes += len(ref)
                while self.refs_bytes > self.args.verify_cache and self.refs:
                    _, old = self.refs.popitem(last=False)
                    self.refs_bytes -= len(old)
        return ref

    # -- patterns ------------------------------------------------------------------------------

    def next_file(self) -> FileEntry:
        with self.cursor_lock:
            return next(self.cursor)

    def run_seq(self, index: int, rng: random.Random) -> None:
        while not self.stop.is_set():
            entry = self.next_file()
            self._guard(entry.path, lambda e=entry: self.read_whole(index, e))

    def run_random(self, index: int, rng: random.Random) -> None:
        candidates = [f for f in self.files if f.size > 0] or self.files
        block = self.args.block
        while not self.stop.is_set():
            entry = rng.choice(candidates)
            self._guard(entry.path, lambda e=entry: self._random_file(index, rng, e, block))

    def _random_file(self, index: int, rng: random.Random, entry: FileEntry, block: int) -> None:
        ref = None
        if self.args.verify:
            ref = self.reference(index, entry)
            if ref is None:
                return
        fd = self._timed(index, f"open {entry.path}", os.open, entry.path, os.O_RDONLY, stat_call=True)
        try:
            for _ in range(RANDOM_READS_PER_OPEN):
                if self.stop.is_set():
                    break
                offset = rng.randrange(0, max(1, entry.size - block + 1))
                want = min(block, entry.size - offset)
                data = self._timed(index, f"read of {entry.path} at {offset}", os.pread, fd, block, offset)
                with self.totals.lock:
                    self.totals.reads += 1
                    self.totals.bytes += len(data)
                if len(data) != want:
                    self.totals.error("SHORT_READ", f"{entry.path}: {len(data)} bytes at {offset}, "
                                                    f"expected {want}")
                if ref is not None:
                    self._compare(entry.path, offset, data, ref[offset:offset + want])
        finally:
            os.close(fd)
        with self.totals.lock:
            self.totals.files += 1

    def _compare(self, path: str, offset: int, data: bytes, want: bytes) -> None:
        """Count the bytes that differ where both have one; a short read is counted as SHORT_READ."""
        if data == want[:len(data)]:
            return
        wrong = sum(1 for a, b in zip(data, want, strict=False) if a != b) + max(0, len(data) - len(want))
        with self.totals.lock:
            self.totals.wrong_bytes += wrong
            if len(self.totals.samples) < 20:
                self.totals.samples.append(f"WRONG: {path}: {wrong} wrong bytes in the {len(want)} at "
                                           f"{offset} (compared with a verified whole-file read)")

    def run_tree(self, index: int, rng: random.Random) -> None:
        while not self.stop.is_set():
            root = os.path.join(self.args.mountpoint, rng.choice(self.roots))
            self._guard(root, lambda r=root: self._walk(index, r))

    def _walk(self, index: int, top: str) -> None:
        pending = [top]
        while pending and not self.stop.is_set():
            directory = pending.pop()
            names = self._timed(index, f"listdir {directory}", os.listdir, directory, stat_call=True)
            for name in names:
                if self.stop.is_set():
                    return
                path = os.path.join(directory, name)
                self._guard(path, lambda p=path: self._visit(index, p, pending))

    def _visit(self, index: int, path: str, pending: list[str]) -> None:
        st = self._timed(index, f"lstat {path}", os.lstat, path, stat_call=True)
        with self.totals.lock:
            self.totals.stats += 1
        if stat.S_ISDIR(st.st_mode):
            pending.append(path)
        elif stat.S_ISLNK(st.st_mode):
            self._timed(index, f"readlink {path}", os.readlink, path, stat_call=True)
        elif stat.S_ISREG(st.st_mode) and st.st_size <= SMALL_FILE:
            self.read_whole(index, FileEntry(path, st.st_size))

    def _guard(self, what: str, fn) -> None:
        """Run one unit of work; an OSError is counted by errno name and the reader goes on."""
        try:
            fn()
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, f"errno{exc.errno}")
            self.totals.error(name, f"{getattr(exc, 'loadtest_what', what)}: {exc.strerror or exc}")
        except ValueError as exc:  # a malformed digest xattr
            self.totals.error("BAD_DIGEST_XATTR", str(exc))

    # -- running -----------------------------------------------------------------------------

    def reader(self, index: int) -> None:
        rng = random.Random(self.args.seed * 7919 + index)
        {"seq": self.run_seq, "random": self.run_random, "tree": self.run_tree}[self.args.pattern](index, rng)

    def watch(self, now: float) -> None:
        for slot in self.slots:
            started = slot.started
            if started and not slot.flagged and now - started > self.args.read_timeout:
                slot.flagged = True
                self._hang(f"{slot.what} blocked for more than {self.args.read_timeout:g} s")

    def progress(self, now: float) -> str:
        t = self.totals
        elapsed = max(now - self.started, 1e-9)
        errors = sum(t.errors.values())
        return (f"[{elapsed:5.1f}/{self.args.duration:g} s] files {t.files} ({t.files / elapsed:.1f}/s)  "
                f"{fmt_bytes(t.bytes)} ({t.bytes / elapsed / 1e6:.1f} MB/s)  errors {errors}  "
                f"wrong {t.wrong_files + (1 if t.wrong_bytes else 0)}  hangs {t.hangs}")

    def run(self) -> tuple[dict[str, Any], bool]:
        """Run for --duration; the summary and whether readers are still stuck in the kernel."""
        threads = [threading.Thread(target=self.reader, args=(i,), name=f"reader-{i}", daemon=True)
                   for i in range(self.args.readers)]
        live = sys.stderr.isatty()
        self.started = time.monotonic()
        for th in threads:
            th.start()
        end = self.started + self.args.duration
        while (now := time.monotonic()) < end:
            self.watch(now)
            if live:
                sys.stderr.write("\r" + self.progress(now) + "\033[K")
                sys.stderr.flush()
            time.sleep(min(0.5, max(0.0, end - now)))
        self.stop.set()
        elapsed = time.monotonic() - self.started
        # Readers finish the call they are in; one blocked past the deadline is a hang.
        grace_end = time.monotonic() + self.args.read_timeout + 1
        for th in threads:
            while th.is_alive() and time.monotonic() < grace_end:
                self.watch(time.monotonic())
                th.join(0.2)
        self.watch(time.monotonic())
        stuck = [th.name for th in threads if th.is_alive()]
        if live:
            sys.stderr.write("\r" + self.progress(self.started + elapsed) + "\033[K\n")
        return self.summary(elapsed, stuck), bool(stuck)

    def summary(self, elapsed: float, stuck: list[str]) -> dict[str, Any]:
        t = self.totals
        with t.lock:
            lat = [x for lst in self.latencies for x in lst]
            stat_lat = [x for lst in self.stat_latencies for x in lst]
            errors = dict(sorted(t.errors.items()))
            result: dict[str, Any] = {
                "mountpoint": str(self.args.mountpoint),
                "pattern": self.args.pattern,
                "readers": self.args.readers,
                "duration_s": self.args.duration,
                "elapsed_s": elapsed,
                "verify": self.args.verify,
                "store_paths": len(self.roots),
                "discovered_files": len(self.files),
                "discovered_bytes": sum(f.size for f in self.files),
                "files": t.files,
                "reads": t.reads,
                "bytes": t.bytes,
                "stats": t.stats,
                "files_per_s": t.files / elapsed,
                "mb_per_s": t.bytes / elapsed / 1e6,
                "latency_ms": {name: percentile(lat, q) * 1e3 for name, q in
                               (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
                "metadata_latency_ms": {name: percentile(stat_lat, q) * 1e3 for name, q in
                                        (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))},
                "verified_files": t.verified_files,
                "wrong_files": t.wrong_files,
                "wrong_bytes": t.wrong_bytes,
                "errors": errors,
                "error_count": sum(errors.values()),
                "hangs": t.hangs,
                "stuck_readers": stuck,
                "read_timeout_s": self.args.read_timeout,
                "messages": list(t.samples),
            }
        result["ok"] = not (result["error_count"] or t.wrong_files or t.wrong_bytes or t.hangs or stuck)
        return result


def discover(mountpoint: Path, names: list[str] | None, max_files: int) -> tuple[list[FileEntry], list[str]]:
    """Regular files under the store paths (all of them when the root can be listed)."""
    if not names:
        try:
            names = sorted(os.listdir(mountpoint))
        except OSError as exc:
            raise SystemExit(f"loadtest: cannot list {mountpoint} ({exc.strerror}): the root listing may be "
                             "disabled (tvixmount without --list-root); name store paths with --paths "
                             "or --from-file") from None
        if not names:
            raise SystemExit(f"loadtest: {mountpoint} lists no store paths: the root listing may be disabled "
                             "(tvixmount without --list-root); name store paths with --paths or --from-file")
    files: list[FileEntry] = []
    roots: list[str] = []
    for name in names:
        top = mountpoint / name
        try:
            st = os.lstat(top)
        except OSError as exc:
            raise SystemExit(f"loadtest: store path {name}: {exc.strerror}") from None
        roots.append(name)
        if stat.S_ISREG(st.st_mode):
            files.append(FileEntry(str(top), st.st_size))
        elif stat.S_ISDIR(st.st_mode):
            for dirpath, _dirs, filenames in os.walk(top):
                for fname in sorted(filenames):
                    path = os.path.join(dirpath, fname)
                    fst = os.lstat(path)
                    if stat.S_ISREG(fst.st_mode):
                        files.append(FileEntry(path, fst.st_size))
                        if len(files) >= max_files:
                            return files, roots
    return files, roots


def print_summary(s: dict[str, Any]) -> None:
    lat, meta = s["latency_ms"], s["metadata_latency_ms"]
    print(f"loadtest: {s['pattern']}, {s['readers']} readers, {s['elapsed_s']:.1f} s on {s['mountpoint']} "
          f"({s['store_paths']} store paths, {s['discovered_files']} files, "
          f"{fmt_bytes(s['discovered_bytes'])})")
    print(f"  files      {s['files']} ({s['files_per_s']:.1f}/s)")
    print(f"  bytes      {fmt_bytes(s['bytes'])} ({s['mb_per_s']:.1f} MB/s) in {s['reads']} reads")
    print(f"  read latency       p50 {lat['p50']:.3f} ms  p95 {lat['p95']:.3f} ms  p99 {lat['p99']:.3f} ms  "
          f"max {lat['max']:.1f} ms")
    print(f"  open/stat latency  p50 {meta['p50']:.3f} ms  p95 {meta['p95']:.3f} ms  "
          f"p99 {meta['p99']:.3f} ms  max {meta['max']:.1f} ms")
    verify = f"{s['verified_files']} files verified" if s["verify"] else "not verified (no --verify)"
    print(f"  checks     {verify}; wrong files {s['wrong_files']}, wrong bytes {s['wrong_bytes']}")
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    print(f"  errors     {s['error_count']} ({errors})")
    print(f"  hangs      {s['hangs']} (reads over {s['read_timeout_s']:g} s)"
          + (f"; still stuck: {', '.join(s['stuck_readers'])}" if s["stuck_readers"] else ""))
    for message in s["messages"][:10]:
        print(f"    {message}")
    print(f"  result     {'OK' if s['ok'] else 'FAILED'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/loadtest", description=__doc__.split("\n\n")[2],
                                epilog=__doc__.split("\n\n", 3)[3],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mountpoint", type=Path, help="a mounted store (store paths at its root)")
    p.add_argument("--readers", type=int, default=32, help="parallel reader threads (default 32)")
    p.add_argument("--duration", type=parse_duration, default=60.0, metavar="TIME",
                   help="how long to run: 60s, 2m, 500ms (default 60s); the tool always stops by itself")
    p.add_argument("--pattern", choices=("seq", "random", "tree"), default="seq", help="default seq")
    p.add_argument("--verify", action="store_true",
                   help=f"check whole-file reads against {DIGEST_XATTR} with blake3 (random: ranges "
                        "against a verified whole-file read)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary as JSON")
    p.add_argument("--max-files", type=int, default=100_000, metavar="N",
                   help="stop discovering files after N (default 100000)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--paths", nargs="+", type=store_path_name, metavar="NAME",
                       help="store paths to use (<hash>-<name> or /nix/store/<hash>-<name>) instead of "
                            "listing the root")
    names.add_argument("--from-file", type=Path, metavar="FILE",
                       help="read store path names from FILE, one a line ('-': stdin)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a read taking longer is a hang (default 30)")
    p.add_argument("--block", type=int, default=RANDOM_BLOCK, help="random read size (default 131072)")
    p.add_argument("--verify-cache", type=int, default=512 << 20, metavar="BYTES",
                   help="memory for verified copies in random mode (default 512 MiB)")
    p.add_argument("--seed", type=int, default=1, help="file order and offsets (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.readers < 1 or args.max_files < 1 or args.block < 1 or args.read_timeout <= 0:
        parser.error("--readers, --max-files, --block and --read-timeout must be positive")
    if not args.mountpoint.is_dir():
        parser.error(f"{args.mountpoint} is not a directory")
    if args.verify:
        try:
            import blake3  # noqa: F401
        except ImportError:
            parser.error("--verify needs the blake3 module (run with the project's .venv python)")
    names = args.paths
    if args.from_file is not None:
        try:
            text = sys.stdin.read() if str(args.from_file) == "-" else args.from_file.read_text()
            names = [store_path_name(line) for line in text.splitlines() if line.strip()
                     and not line.lstrip().startswith("#")]
        except (OSError, argparse.ArgumentTypeError) as exc:
            parser.error(f"--from-file {args.from_file}: {exc}")
    try:
        files, roots = discover(args.mountpoint, names, args.max_files)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print(f"loadtest: no regular files under the store paths of {args.mountpoint}", file=sys.stderr)
        return EXIT_USAGE
    test = LoadTest(args, files, roots)
    summary, stuck = test.run()
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    status = EXIT_OK if summary["ok"] else EXIT_FAILED
    if stuck:
        # Readers blocked in the kernel cannot be interrupted; don't wait for them at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
