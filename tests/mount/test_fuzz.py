"""Bad input to every entry point: property-based fuzzing, and inputs too big to take whole.

Every decoder of untrusted bytes is fed arbitrary bytes and mutations of
valid encodings (bytes flipped, cut, inserted, deleted): the protobuf
Directory and PathInfo decoders, directory validation, the NAR reader,
nixbase32 and store-path parsing, the worker pipe's frame reader and
message shape checks, and a worker's request handler. Each may only
answer with its one error class (InvalidData, ProtocolError), must not
hang (hypothesis' per-example deadline), and must never accept an invalid
object: what a decoder accepts is checked against an independent statement
of the rules, or must re-encode to exactly the bytes it came from.

Then inputs beyond the stated bounds, against a real mount where it
matters: a directory of two million entries is refused unread (EIO and a
WARNING naming it, not a worker decoding it for minutes), a name of 1 MiB
never reaches the kernel, and blobs of 10 GiB (embedded and over gRPC) are
read in place with the workers' memory unchanged; the NAR reader streams a
file past 2 GiB without holding it.

A coverage-guided harness for the same decoders is tests/fuzz/fuzz_decoders.py
(atheris; see its docstring for how to run it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import itertools
import os
import re
import sqlite3
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.castore_fixtures import Store as NarStore
from tests.faults import (
    READ,
    STAT,
    LogCursor,
    ScriptedStore,
    attempt,
    b3,
    direct_read,
    path_info,
    serving,
    store_path,
)
from tests.mounting import FUSE_MISSING, Mount
from tests.unit.test_castore_narreader import trees
from tvixmount.castore import nar, nixbase32, storepath
from tvixmount.castore.directory import (
    MAX_ENCODED_LEN,
    MAX_NAME_LEN,
    MAX_TARGET_LEN,
    Directory,
    decode_directory,
    validate,
)
from tvixmount.castore.narreader import NarFile, read_nar
from tvixmount.castore.nodes import DIGEST_LEN, DirectoryNode, FileNode, SymlinkNode
from tvixmount.castore.pathinfo import NarInfo, PathInfo, validate_pathinfo
from tvixmount.castore.wire import decode_pathinfo, encode_pathinfo
from tvixmount.errors import InvalidData
from tvixmount.proto import rpc_blobstore_pb2 as blob_pb
from tvixmount.protocol import framing, messages, ops
from tvixmount.protocol.framing import ProtocolError, pack, unpack
from tvixmount.store import StoreUrls, memory, open_store

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
U64 = (1 << 64) - 1

# -- mutations ------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with one to four edits: flip, overwrite, insert, delete, cut."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[at:]
    return bytes(data)


def mutations_of(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, bytes]]:
    """(original, mutated) pairs."""
    return strategy.flatmap(lambda original: st.tuples(st.just(original), mutated(original)))


# -- directories: an independent statement of the rules (docs/protocol.md, 'Directory validation') ---

# Names and targets drawn to hit every rule: empty, ".", "..", "/", NUL, too long, fine.
odd_names = st.one_of(
    st.sampled_from([b"", b".", b"..", b"a/b", b"/", b"nul\0", b"x" * 255, b"x" * 256, b"..."]),
    st.binary(min_size=1, max_size=6),
)
odd_targets = st.one_of(st.sampled_from([b"", b"\0", b"t" * 4095, b"t" * 4096, b"/abs", b"../up"]),
                        st.binary(min_size=1, max_size=8))
digests = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
sizes = st.one_of(st.integers(0, 1000), st.just(U64), st.just(U64 + 1), st.just(-1))

raw_directories = st.builds(
    Directory,
    st.lists(st.builds(DirectoryNode, odd_names, digests, sizes), max_size=4).map(tuple),
    st.lists(st.builds(FileNode, odd_names, digests, sizes, st.booleans()), max_size=4).map(tuple),
    st.lists(st.builds(SymlinkNode, odd_names, odd_targets), max_size=4).map(tuple),
)


def breaks_a_rule(d: Directory) -> bool:
    names: list[bytes] = []
    for group in (d.directories, d.files, d.symlinks):
        listed = [n.name for n in group]
        if any(a >= b for a, b in itertools.pairwise(listed)):
            return True  # unsorted or duplicate within a kind
        names += listed
    if len(set(names)) != len(names):
        return True  # one name used by two kinds
    for n in (*d.directories, *d.files, *d.symlinks):
        name = n.name
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME_LEN:
            return True
        if isinstance(n, SymlinkNode):
            if not n.target or b"\0" in n.target or len(n.target) > MAX_TARGET_LEN:
                return True
        elif len(n.digest) != DIGEST_LEN or not 0 <= n.size <= U64:
            return True
    return len(d) + sum(n.size for n in d.directories) > U64  # the descendant count


def is_valid(d: Directory) -> bool:
    try:
        validate(d)
    except InvalidData:
        return False
    return True


good_names = st.binary(min_size=1, max_size=10).filter(lambda n: b"/" not in n and b"\0" not in n
                                                      and n not in (b".", b".."))
good_targets = st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t)
b3s = st.binary(min_size=32, max_size=32)


def _directory_of(nodes: list[Any]) -> Directory:
    unique = {n.name: n for n in nodes}  # one entry per name, across kinds
    return Directory.from_entries(unique.values())


valid_directories = st.lists(st.one_of(
    st.builds(DirectoryNode, good_names, b3s, st.integers(0, 1 << 40)),
    st.builds(FileNode, good_names, b3s, st.integers(0, 1 << 40), st.booleans()),
    st.builds(SymlinkNode, good_names, good_targets),
), max_size=6).map(_directory_of)


@FUZZ
@given(raw_directories)
def test_validation_refuses_exactly_what_breaks_a_rule(directory: Directory) -> None:
    assert is_valid(directory) is not breaks_a_rule(directory)


def _accepted_directory(data: bytes, expected: bytes | None) -> Directory | None:
    try:
        found = decode_directory(data, expected)
    except InvalidData:
        return None
    assert not breaks_a_rule(found)
    assert decode_directory(found.encode(), found.digest()) == found  # canonical: re-decodes to itself
    if expected is not None:
        assert found.digest() == expected
    return found


@FUZZ
@given(st.binary(max_size=600))
def test_directory_decoder_on_arbitrary_bytes(data: bytes) -> None:
    _accepted_directory(data, None)


@FUZZ
@given(mutations_of(valid_directories.map(lambda d: d.encode())))
def test_directory_decoder_on_damaged_encodings(pair: tuple[bytes, bytes]) -> None:
    original, damaged = pair
    digest = blake3.blake3(original).digest()
    found = _accepted_directory(damaged, digest)
    assert found is None or found == decode_directory(original, digest)  # only ever the original
    _accepted_directory(damaged, None)


def test_directory_decoder_refuses_oversized_input_unparsed() -> None:
    data = b"\x12\x00" * (MAX_ENCODED_LEN // 2 + 1)  # empty FileNodes: would decode fine but for size
    with pytest.raises(InvalidData, match=rf"is {len(data)} bytes encoded, more than the {MAX_ENCODED_LEN}"):
        decode_directory(data)


# -- path infos -----------------------------------------------------------------------------------

root_nodes = st.one_of(
    st.builds(FileNode, st.just(b""), st.binary(min_size=32, max_size=32), st.integers(0, 10**9),
              st.booleans()),
    st.builds(DirectoryNode, st.just(b""), st.binary(min_size=32, max_size=32), st.integers(0, 10**6)),
    st.builds(SymlinkNode, st.just(b""), st.binary(min_size=1, max_size=30).filter(lambda t: b"\0" not in t)),
)
valid_infos = st.builds(
    lambda node, digest, name, size, sha: PathInfo(
        node=dataclasses.replace(node, name=f"{nixbase32.encode(digest)}-{name}".encode()),
        narinfo=NarInfo(nar_size=size, nar_sha256=sha)),
    root_nodes, st.binary(min_size=20, max_size=20), st.from_regex(r"[a-z0-9+._?=-]{1,30}", fullmatch=True)
    .filter(lambda n: not n.startswith(".")), st.integers(0, 10**9), st.binary(min_size=32, max_size=32),
)


def _accepted_info(data: bytes) -> PathInfo | None:
    try:
        info = decode_pathinfo(data)
    except InvalidData:
        return None
    validate_pathinfo(info, require_narinfo=False)  # what is accepted is valid
    assert decode_pathinfo(encode_pathinfo(info)) == info
    return info


@FUZZ
@given(st.binary(max_size=400))
def test_pathinfo_decoder_on_arbitrary_bytes(data: bytes) -> None:
    _accepted_info(data)


@FUZZ
@given(mutations_of(valid_infos.map(encode_pathinfo)))
def test_pathinfo_decoder_on_damaged_encodings(pair: tuple[bytes, bytes]) -> None:
    _accepted_info(pair[1])


# -- the NAR reader -------------------------------------------------------------------------------


def _nar_of(spec: object) -> bytes:
    store = NarStore()
    node = store.build(spec)
    return b"".join(nar.nar_chunks(node, store.get_directory, store.read_blob))


def _accepted_nar(data: bytes) -> bool:
    """Parse ``data`` whole; if the reader accepts it, it must be the canonical NAR of its tree."""
    store = NarStore()
    try:
        node = store.build_from_nar(read_nar(io.BytesIO(data)))
    except InvalidData:
        return False
    assert b"".join(nar.nar_chunks(node, store.get_directory, store.read_blob)) == data
    return True


@FUZZ
@given(st.binary(max_size=300))
def test_nar_reader_on_arbitrary_bytes(data: bytes) -> None:
    assert not _accepted_nar(data) or data.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")
    _accepted_nar(_nar_of({})[:24] + data)  # past the magic, into the grammar


@FUZZ
@given(mutations_of(trees.map(_nar_of)))
def test_nar_reader_on_damaged_archives(pair: tuple[bytes, bytes]) -> None:
    original, damaged = pair
    assert _accepted_nar(original)
    _accepted_nar(damaged)


def test_nar_reader_refuses_a_1_mib_name_without_reading_it() -> None:
    def s(data: bytes) -> bytes:
        return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)

    head = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name"))
    stream = io.BytesIO(head + (1 << 20).to_bytes(8, "little") + b"n" * (1 << 20))
    with pytest.raises(InvalidData, match=r"is 1048576 bytes long, more than 255"):
        list(read_nar(stream))
    assert stream.tell() == len(head) + 8  # refused on its length alone


class _Zeros(io.RawIOBase):
    """A NAR of one regular file of ``size`` zero bytes, generated as it is read."""

    def __init__(self, size: int) -> None:
        def s(data: bytes) -> bytes:
            return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)

        self.head = b"".join(s(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
        self.head += size.to_bytes(8, "little")
        self.tail = bytes(-size % 8) + s(b")")
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    _ZERO = bytes(4 << 20)

    def readinto(self, buffer: Any) -> int:
        total = len(self.head) + self.size + len(self.tail)
        n = min(len(buffer), total - self.pos, len(self._ZERO))
        view = memoryview(buffer)[:n]
        view[:] = self._ZERO[:n]  # zeros everywhere, then the framing bytes where they belong
        for part, at in ((self.head, 0), (self.tail, len(self.head) + self.size)):
            lo, hi = max(at, self.pos), min(at + len(part), self.pos + n)
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = part[lo - at : hi - at]
        self.pos += n
        return n


def test_nar_reader_streams_a_big_file_in_bounded_memory() -> None:
    size = (2 << 30) + 3  # past 2**31, and padded
    tracemalloc.start()
    try:
        events = read_nar(io.BufferedReader(_Zeros(size), 1 << 20))
        event = next(events)
        assert isinstance(event, NarFile) and event.size == size
        assert event.reader.read(1 << 20) == bytes(1 << 20)  # contents are handed out as they come
        assert event.reader.read(1 << 20) == bytes(1 << 20)
        assert list(events) == []  # the rest skipped through, a piece at a time; padding checked
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, peak  # a few pieces, whatever the file's size


# -- nixbase32 and store paths --------------------------------------------------------------------

base32ish = st.text(alphabet="0123456789abcdfghijklmnpqrsvwxyzeotuAZ-_. /\0é", max_size=60)


@FUZZ
@given(st.one_of(base32ish, st.binary(max_size=60)))
def test_nixbase32_accepts_only_canonical_text(text: str | bytes) -> None:
    try:
        data = nixbase32.decode(text)
    except InvalidData:
        return
    assert nixbase32.encode(data) == (text.decode() if isinstance(text, bytes) else text)


@FUZZ
@given(st.one_of(
    st.builds(lambda h, rest: nixbase32.encode(h) + rest, st.binary(min_size=20, max_size=20),
              st.text(max_size=40)),
    base32ish, st.binary(max_size=80),
))
def test_store_path_parser_accepts_only_what_it_can_print_back(text: str | bytes) -> None:
    for parse, prefix in ((storepath.parse_basename, ""), (storepath.parse_absolute, "/nix/store/")):
        candidate = (prefix.encode() + text) if isinstance(text, bytes) else prefix + text
        try:
            path = parse(candidate)
        except InvalidData:
            continue
        shown = candidate.decode() if isinstance(candidate, bytes) else candidate
        assert (path.absolute if prefix else path.basename) == shown
        assert storepath.check_name(path.name) is None and len(path.digest) == 20


# -- the worker pipe ------------------------------------------------------------------------------

wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), U64) | st.binary(max_size=40) | st.text(max_size=12)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=5),
    max_leaves=16,
)
packed = wire_values.map(lambda v: framing.frame(pack(v)))
frames = st.lists(st.one_of(st.binary(max_size=64), packed), max_size=6)


@settings(FUZZ, max_examples=100)
@given(frames, st.integers(8, 64))
def test_frame_reader_yields_values_or_protocol_error(pieces: list[bytes], split: int) -> None:
    """Any byte stream, split anyhow: values, then EOF, or ProtocolError; never another exception."""
    stream = b"".join(pieces)
    r, w = os.pipe()
    reader = framing.FrameReader(r, 32)
    try:
        for start in range(0, len(stream), split):
            os.write(w, stream[start : start + split])
            try:
                reader.read()
            except ProtocolError:
                return
        os.close(w)
        w = -1
        with contextlib.suppress(ProtocolError):
            for _ in range(len(stream) + 2):  # what is left in the pipe, then EOF: no endless loop
                if reader.read() is None:
                    return
            raise AssertionError("the reader never reported EOF")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@FUZZ
@given(st.sampled_from(sorted(ops.OPS)), wire_values)
def test_op_result_decoders_raise_only_protocol_error(op: str, value: Any) -> None:
    """Nothing but ProtocolError escapes a decoder (tests/unit/test_protocol.py: what each must reject)."""
    with contextlib.suppress(ProtocolError):
        ops.OPS[op].decode(value)
    for shape_check in (messages.decode_reply, messages.decode_request, messages.decode_hello,
                        ops.decode_node, ops.decode_directory):
        with contextlib.suppress(ProtocolError):
            shape_check(value)


@pytest.fixture(scope="module")
def worker_context() -> Iterator[Any]:
    from workers.handlers import Context

    memory.reset()
    store = open_store(StoreUrls.single("memory://"))
    store.blobs.put(b"a blob")
    yield Context(0, store)
    store.close()
    memory.reset()


requests = st.one_of(
    wire_values,
    st.builds(lambda i, op, args: [i, op, args, 1e12], st.integers(1, 1000),
              st.sampled_from([*sorted(ops.OPS), "nope"]), st.lists(wire_values, max_size=4)),
)


@FUZZ
@given(requests)
def test_worker_answers_every_request_or_calls_it_a_protocol_error(worker_context: Any, message: Any) -> None:
    """A worker never dies of a request: a reply (result or error) for its id, or ProtocolError."""
    from workers.loop import handle

    try:
        parts = handle(worker_context, message)
    except ProtocolError:
        assert not (type(message) is list and len(message) == 4 and type(message[0]) is int and message[0] > 0
                    and type(message[1]) is str and type(message[2]) is list
                    and type(message[3]) in (int, float))
        return
    req_id, _, _ = messages.decode_reply(unpack(b"".join(parts)))
    assert req_id == message[0]


def test_worker_answers_an_error_rather_than_a_reply_larger_than_a_frame(
        worker_context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.loop import handle

    listing = Directory(files=tuple(FileNode(b"f%04d" % i, b3(b""), 0) for i in range(100)))
    worker_context.store.directories.put(listing)
    monkeypatch.setattr(framing, "MAX_FRAME", 1000)  # the listing is ~5 kB on the wire
    reply = messages.decode_reply(unpack(b"".join(
        handle(worker_context, [7, "directory_tree", [listing.digest(), 1000], 1e12]))))
    assert reply[:2] == (7, False)
    assert reply[2][0] == "invalid"
    assert re.search(r"directory_tree: the answer is \d+ bytes, more than the 1000", reply[2][1])


# -- the coverage-guided harness, briefly, when atheris is installed -----------------------------

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_decoders.py"


@pytest.mark.parametrize("target", ["directory", "pathinfo", "nar", "storepath", "frames", "request"])
def test_atheris_harness_finds_nothing_quickly(tmp_path: Path, target: str) -> None:
    pytest.importorskip("atheris", reason="atheris is optional (pip install atheris); see tests/fuzz/")
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(HARNESS), "--seed", str(corpus), target], check=True, timeout=60)
    runs = "100" if target == "frames" else "1000"  # frames opens a pipe per input
    done = subprocess.run([sys.executable, str(HARNESS), target, str(corpus), f"-runs={runs}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))


# -- too big for one piece: against a real mount ---------------------------------------------------

HUGE_ENTRIES = 2_000_000
TEN_GIB = 10 << 30
SEGMENT = 256 * 1024
# blake3 of 10 GiB of zeros: the digest of the sparse blob below (computed once; 10 GiB of hashing).
TEN_GIB_ZEROS_B3 = bytes.fromhex("28960eef7d587ab6d1627b7efe30c7a07ce2dce4871d339fdfb607cb0776e064")
HUGE = store_path("huge-directory")
LONG = store_path("long-name")
SPARSE = store_path("ten-gib")


def _huge_directory_row(entries: int) -> bytes:
    """The canonical encoding of ``entries`` empty files f0000000.. (fast: no Directory object)."""
    empty = b3(b"")
    one = [b"\x12\x2d\x0a\x09f%08d\x12\x20" % i + empty for i in range(entries)]  # FileNode{name, digest}
    return b"".join(one)


@pytest.fixture(scope="module")
def oversized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Path]]:
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    base = tmp_path_factory.mktemp("oversized")
    store_dir = base / "store"
    huge = _huge_directory_row(HUGE_ENTRIES)
    huge_digest = b3(huge)
    assert len(huge) > MAX_ENCODED_LEN
    long_named = Directory(files=(FileNode(b"n" * (1 << 20), b3(b""), 0),)).encode()
    with open_store(StoreUrls.embedded(store_dir, create=True)) as store:
        store.blobs.put(b"")
        store.path_infos.put(path_info(DirectoryNode(HUGE.basename.encode(), huge_digest, 2 * HUGE_ENTRIES)))
        store.path_infos.put(path_info(DirectoryNode(LONG.basename.encode(), b3(long_named), 2)))
        store.path_infos.put(path_info(FileNode(SPARSE.basename.encode(), TEN_GIB_ZEROS_B3, TEN_GIB)))
    segment = b3(bytes(SEGMENT))
    blob_file = store_dir / "blobs" / TEN_GIB_ZEROS_B3.hex()[:2] / TEN_GIB_ZEROS_B3.hex()
    with open(blob_file, "wb") as f:
        f.truncate(TEN_GIB)  # sparse: 10 GiB of zeros that take no disk
    db = sqlite3.connect(store_dir / "store.sqlite")
    try:
        db.executemany("INSERT INTO directories (digest, data) VALUES (?, ?)",
                       [(huge_digest, huge), (b3(long_named), long_named)])
        db.execute("INSERT INTO blobs (digest, size, chunk_size, chunks) VALUES (?, ?, ?, ?)",
                   (TEN_GIB_ZEROS_B3, TEN_GIB, SEGMENT, segment * (TEN_GIB // SEGMENT)))
        db.commit()
    finally:
        db.close()
    del huge
    with serving(base / "mnt", store_dir, "--request-timeout", "3") as m:
        yield m, store_dir


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _pool_pids(m: Mount) -> list[int]:
    from tests.faults import workers

    assert m.proc is not None
    return [m.proc.pid, *workers(m).values()]


@pytest.mark.mount
def test_directory_of_two_million_entries_is_refused_unread(oversized: tuple[Mount, Path]) -> None:
    m, _ = oversized
    cursor = LogCursor(m)
    code, took = attempt(lambda: os.listdir(m.path(HUGE.basename)))
    assert code == errno.EIO and took < 2.0  # refused on its size, not decoded for minutes
    line = cursor.wait_for(r"WARNING .*directory b3:\S+ is \d+ bytes encoded, more than the 33554432")
    assert "not decoded" in line
    assert cursor.lines("ERROR") == []


@pytest.mark.mount
def test_a_1_mib_name_never_reaches_the_kernel(oversized: tuple[Mount, Path]) -> None:
    m, _ = oversized
    cursor = LogCursor(m)
    assert attempt(lambda: os.listdir(m.path(LONG.basename)))[0] == errno.EIO
    line = cursor.wait_for(r"WARNING .*directory b3:\S+: files\[0\] 'n{64}\.\.\.\(1048576 bytes\)': name is "
                           r"1048576 bytes long, more than 255")
    assert len(line) < 1000  # the name is shown cut: a log line, not a megabyte
    assert attempt(lambda: os.stat(m.path("x" * 300)))[0] == errno.ENOENT  # no store path is named so
    assert attempt(lambda: os.stat(m.path("x" * (1 << 20))))[0] == errno.ENAMETOOLONG  # the kernel's limit


@pytest.mark.mount
def test_a_10_gib_blob_is_read_in_place(oversized: tuple[Mount, Path]) -> None:
    m, _ = oversized
    target = m.path(SPARSE.basename)
    assert os.stat(target).st_size == TEN_GIB
    before = {pid: _rss_kib(pid) for pid in _pool_pids(m)}
    with open(target, "rb", buffering=0) as f:
        for offset in (0, 5 << 30, TEN_GIB - (8 << 20)):
            for step in range(0, 8 << 20, 1 << 20):
                assert os.pread(f.fileno(), 1 << 20, offset + step) == bytes(1 << 20)
        assert os.pread(f.fileno(), 100, TEN_GIB - 10) == bytes(10)
    after = {pid: _rss_kib(pid) for pid in _pool_pids(m) if pid in before}
    grown = max(after[pid] - before[pid] for pid in after)
    assert grown < 64 << 10, (before, after)  # KiB: no process held more than a few segments


@pytest.mark.mount
def test_a_10_gib_blob_over_grpc_is_read_chunk_by_chunk(tmp_path: Path) -> None:
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    fake = ScriptedStore()
    chunk = bytes(1 << 20)
    fake.blobs[b3(chunk)] = chunk
    listing = blob_pb.StatBlobResponse()
    chunk_digest = b3(chunk)
    for _ in range(TEN_GIB // len(chunk)):
        listing.chunks.add(digest=chunk_digest, size=len(chunk))
    stat = listing.SerializeToString()
    fake.faults[STAT] = lambda digest: ("bytes", stat) if digest == TEN_GIB_ZEROS_B3 else None
    fake.add_root(FileNode(SPARSE.basename.encode(), TEN_GIB_ZEROS_B3, TEN_GIB))
    try:
        with serving(tmp_path / "mnt", None, "--request-timeout", "5", urls=(fake.url,) * 3) as m:
            target = m.path(SPARSE.basename)
            before = {pid: _rss_kib(pid) for pid in _pool_pids(m)}
            for offset in (0, 7 << 30, TEN_GIB - (4 << 20)):
                assert direct_read(target, offset, 128 << 10) == bytes(128 << 10)
            after = {pid: _rss_kib(pid) for pid in _pool_pids(m) if pid in before}
            assert max(after[p] - before[p] for p in after) < 64 << 10, (before, after)
            reads = sum(1 for method, _ in fake.calls if method == READ)
            assert reads <= 3 * 3  # the chunks read (and a little read-ahead), not 10 GiB
    finally:
        fake.close()
