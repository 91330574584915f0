"""The dispatcher<->worker wire: round trips, framing across reads, the op and handler tables, and
malformed input rejected by each decoder."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.errors import IntegrityError, InvalidArgument, NotFound, TvixError, WorkerLost, from_code
from tvixmount.protocol import framing, messages, ops
from tvixmount.protocol.framing import FrameReader, ProtocolError, pack, unpack

names = st.binary(min_size=1, max_size=40)
digests = st.binary(min_size=32, max_size=32)
sizes = st.integers(min_value=0, max_value=(1 << 64) - 1)
file_nodes = st.builds(FileNode, names, digests, sizes, st.booleans())
dir_nodes = st.builds(DirectoryNode, names, digests, sizes)
link_nodes = st.builds(SymlinkNode, names, st.binary(min_size=1, max_size=100))
nodes = st.one_of(file_nodes, dir_nodes, link_nodes)
directories = st.builds(
    Directory,
    st.lists(dir_nodes, max_size=4).map(tuple),
    st.lists(file_nodes, max_size=4).map(tuple),
    st.lists(link_nodes, max_size=4).map(tuple),
)
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=50)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def _pipe_reader(size: int = 64) -> tuple[FrameReader, int]:
    r, w = os.pipe()
    return FrameReader(r, size), w


def _close(reader: FrameReader, w: int) -> None:
    os.close(reader.fd)
    os.close(w)


def _feed(reader: FrameReader, w: int, pieces: list[bytes]) -> list:
    """Write each piece, then read until the pipe is empty (as the collector does on readiness)."""
    os.set_blocking(reader.fd, False)
    out: list = []
    for piece in pieces:
        os.write(w, piece)
        while True:
            try:
                got = reader.read()
            except BlockingIOError:
                break
            assert got is not None
            out.extend(got)
    return out


@given(nodes)
def test_node_round_trip(node):
    assert ops.decode_node(unpack(pack(ops.encode_node(node)))) == node


@given(directories)
def test_directory_round_trip(directory):
    assert ops.decode_directory(unpack(pack(ops.encode_directory(directory)))) == directory


@given(st.integers(1, 1 << 62), st.sampled_from(sorted(ops.OPS)), st.lists(wire_values, max_size=4),
       st.floats(0, 1e9))
def test_request_round_trip(req_id, op, args, deadline):
    body = messages.encode_request(req_id, op, args, deadline)[framing.HEADER_LEN:]
    assert messages.decode_request(unpack(body)) == (req_id, op, args, deadline)


@given(st.integers(0, 1 << 62), wire_values)
def test_reply_round_trip(req_id, result):
    assert messages.decode_reply(unpack(messages.encode_reply(req_id, result))) == (req_id, True, result)


@pytest.mark.parametrize("exc", [NotFound("directory b3:x not found"), IntegrityError("blob b3:y broken"),
                                 WorkerLost("gone"), ValueError("a bug")])
def test_errors_keep_their_class_across_the_wire(exc):
    req_id, ok, (code, message) = messages.decode_reply(unpack(messages.encode_error(7, exc)))
    assert (req_id, ok) == (7, False)
    rebuilt = from_code(code, message)
    if isinstance(exc, TvixError):
        assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    else:
        assert type(rebuilt) is TvixError and "ValueError: a bug" in str(rebuilt)


def test_op_results_round_trip_through_their_ops():
    d = Directory(files=(FileNode(b"a", b"\1" * 32, 3, True),))
    link = SymlinkNode(b"x" * 32 + b"-y", b"/t")
    cases = [
        (ops.PING, (3, 99)),
        (ops.PATH_INFO, link),
        (ops.PATH_INFO, None),
        (ops.DIRECTORY_TREE, [(b"\2" * 32, d)]),
        (ops.LIST_ROOT, [link]),
        (ops.BLOB_READ, b"data"),
        (ops.HELD_PATH_INFO, link),
        (ops.HELD_PATH_INFO, None),
        (ops.BLOB_BATCH, b"\1\0\0\0" + b"\xff" * 8),  # packed (protocol/batch.py): one failed blob
    ]
    assert {op.name for op, _ in cases} == set(ops.OPS)
    for op, value in cases:
        assert op.decode(unpack(pack(op.encode(value)))) == value


def test_arguments_must_be_exactly_the_declared_types():
    ops.BLOB_READ.check_args([b"d", 0, 1, -1])
    with pytest.raises(InvalidArgument, match=r"takes \(bytes, int, int, int\), got \(bytes, str\)"):
        ops.BLOB_READ.check_args([b"d", "x"])
    with pytest.raises(InvalidArgument):
        ops.BLOB_READ.check_args([b"d", True, 1, -1])  # bool is not an offset
    with pytest.raises(InvalidArgument):
        ops.PING.check_args([1])


def test_handler_table():
    """One handler per op, registered against the op object; requests find it by name."""
    table: ops.Handlers[str] = ops.Handlers()

    @table.handles(ops.PING)
    def ping(ctx: str) -> tuple[int, int]:
        return len(ctx), 7

    with pytest.raises(ValueError, match="already has a handler"):
        table.handles(ops.PING)(ping)
    impostor = ops.Op("ping", (), list, list)
    with pytest.raises(ValueError, match="not an op of this protocol"):
        table.handles(impostor)
    unanswered = ", ".join(sorted(set(ops.OPS) - {"ping"}))
    with pytest.raises(RuntimeError, match=f"no handler for op {unanswered}$"):
        table.check_complete()
    assert table.find("ping", []) == (ops.PING, ping)
    with pytest.raises(InvalidArgument, match="unknown op 'nope'"):
        table.find("nope", [])
    with pytest.raises(InvalidArgument, match="unknown op 'list_root'"):  # declared, but not answered here
        table.find("list_root", [])
    with pytest.raises(InvalidArgument, match=r"takes \(\), got \(int\)"):
        table.find("ping", [1])
    assert table.run("abc", ops.PING) == (3, 7)

    @table.handles(ops.BLOB_READ)
    def ring_read(ctx: str, digest: bytes, offset: int, length: int, size: int) -> framing.RingRef:
        return framing.RingRef(0, length)

    with pytest.raises(ProtocolError, match="ring reference"):  # in-process there is no ring to name
        table.run("abc", ops.BLOB_READ, b"d", 0, 5, -1)


def test_the_workers_answer_every_op():
    from workers.handlers import HANDLERS

    HANDLERS.check_complete()
    assert {op.name for op, _ in HANDLERS.items()} == set(ops.OPS)


@pytest.mark.parametrize("kind,fields", [("spawn", (1,)), ("spawned", (1, 2)), ("spawn_failed", (0, "why")),
                                         ("exited", (3, 4, "killed by SIGKILL"))])
def test_control_round_trip(kind, fields):
    assert messages.decode_control(messages.encode_control(kind, *fields)) == (kind, *fields)


@given(st.lists(wire_values, min_size=1, max_size=8), st.data())
@settings(max_examples=60)
def test_frames_survive_any_split_across_reads(values, data):
    stream = b"".join(framing.frame(pack(v)) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]
    reader, w = _pipe_reader(size=data.draw(st.sampled_from([8, 64, 1 << 16])))
    try:
        assert _feed(reader, w, pieces) == values
        assert reader.pending == 0
    finally:
        _close(reader, w)


def test_big_frame_grows_the_buffer_and_write_frame_loops():
    body = pack([1, 0, os.urandom(3 << 20)])  # bigger than a pipe and than the reader's buffer
    reader, w = _pipe_reader(size=1024)
    writer = threading.Thread(target=framing.write_frame, args=(w, body))
    writer.start()
    got: list = []
    try:
        while not got:
            chunk = reader.read()
            assert chunk is not None
            got.extend(chunk)
        writer.join()
        assert got == [unpack(body)]
    finally:
        writer.join()
        _close(reader, w)


def test_truncated_frame_then_eof_is_not_a_message():
    reader, w = _pipe_reader()
    body = framing.frame(pack([1, 0, b"x" * 100]))
    os.write(w, body[:50])
    assert reader.read() == []
    os.close(w)
    assert reader.read() is None
    assert reader.pending == 50
    os.close(reader.fd)


def test_oversized_header_is_a_protocol_error():
    reader, w = _pipe_reader()
    try:
        os.write(w, (framing.MAX_FRAME + 1).to_bytes(4, "big") + b"junk")
        with pytest.raises(ProtocolError, match="more than"):
            reader.read()
    finally:
        _close(reader, w)


# -- malformed input is rejected, decoder by decoder ------------------------------------------------
#
# tests/mount/test_fuzz.py feeds every decoder arbitrary values and checks that nothing but
# ProtocolError escapes; here each decoder must reject concrete malformed inputs, and
# accept the well-formed neighbour that shows it is not rejecting everything.

_FILE = [1, b"f", b"d" * 32, 3, False]
_DIR = [[[b"d", b"d" * 32, 1]], [[b"f", b"d" * 32, 3, True]], [[b"l", b"t"]]]

MALFORMED = {
    "request": (messages.decode_request, [1, "ping", [], 1.0], [
        None, [], {}, [1, "ping", []], [1, "ping", [], 1.0, 0],
        [0, "ping", [], 1.0],  # id 0 is the hello's
        [-1, "ping", [], 1.0], [True, "ping", [], 1.0], [1.0, "ping", [], 1.0],
        [1, b"ping", [], 1.0], [1, "ping", b"", 1.0], [1, "ping", None, 1.0],
        [1, "ping", [], "soon"], [1, "ping", [], None], [1, "ping", [], True],
    ]),
    "reply": (messages.decode_reply, [1, messages.OK, b"x"], [
        None, [], b"abc", [1, 0], [1, 0, b"x", 1], [-1, 0, b"x"], ["1", 0, b"x"], [1.0, 0, b"x"],
        [1, 2, b"x"],  # neither OK nor ERR
        [1, messages.ERR, "oops"], [1, messages.ERR, ["notfound"]], [1, messages.ERR, ["notfound", b"m"]],
        [1, messages.ERR, [7, "m"]], [1, messages.ERR, ["a", "b", "c"]],
    ]),
    "hello": (messages.decode_hello, [0, 123], [
        None, [], [1], [1, 2, 3], [1, "2"], [True, 1], [1.0, 2], "ab", b"ab",
    ]),
    "control": (messages.decode_control, pack(["exited", 1, 2, "killed by SIGKILL"]), [
        pack(["spawn"]), pack(["spawn", "1"]), pack(["spawn", True]), pack({}), pack([]), pack([1, 2]),
        pack(["reboot", 1]), pack(["spawned", 1]), pack(["exited", 1, 2, 3]), pack("spawn"),
        b"\xc1", b"",
    ]),
    "node": (ops.decode_node, _FILE, [
        None, [], b"", [9, b"n", b"d", 1],  # unknown tag
        [1, b"n", b"d", 3],  # a file without its executable bit
        [1, "n", b"d", 3, False], [1, b"n", b"d", -1, False], [1, b"n", b"d", 3, 0],
        [1, b"n", b"d", 3.0, False], [0, b"n", b"d", True], [0, b"n", b"d", 1, 2],
        [2, b"n", "t"], [2, b"n"], [2, b"n", b"t", b"x"],
    ]),
    "directory": (ops.decode_directory, _DIR, [
        None, [], b"abc", "abc", [[], []], [[], [], [], []],
        [[[b"d", b"d" * 32]], [], []],  # a directory entry without its size
        [[[b"d", b"d" * 32, -1]], [], []], [[], [[b"f", b"d" * 32, 3, 0]], []],
        [[], [[b"f", b"d" * 32, 3]], []], [[], [], [[b"l", "t"]]], [[], [], [[b"l"]]],
        [None, [], []],
    ]),
    "ping result": (ops.PING.decode, [0, 123], [None, [1], [1, 2, 3], ["0", 1]]),
    "path_info result": (ops.PATH_INFO.decode, [2, b"n", b"t"], [[], [9], "x", 5, [_FILE]]),
    "directory_tree result": (ops.DIRECTORY_TREE.decode, [[b"d" * 32, _DIR]], [
        None, 5, b"x", [[b"d" * 32]], [["digest", _DIR]], [[b"d" * 32, None]], [[b"d" * 32, _DIR, 1]],
    ]),
    "list_root result": (ops.LIST_ROOT.decode, [_FILE], [None, {}, b"", [None], [[9]], _FILE]),
    "blob_read result": (ops.BLOB_READ.decode, b"bytes", [None, "text", [b"x"], 5]),
    "msgpack": (unpack, pack([1, b"x"]), [
        b"", b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # an array cut short
        pack(1) + b"\x00",  # two values where one is allowed
        b"\xd4\x09\x00",  # an extension of an unknown type
        b"\xd4\x01\x00",  # a ring reference of 1 byte, not 12
    ]),
}


@pytest.mark.parametrize("decode, value", [
    pytest.param(decode, value, id=f"{name}-{i}")
    for name, (decode, _, values) in MALFORMED.items() for i, value in enumerate(values)
])
def test_each_decoder_rejects_malformed_input(decode, value):
    with pytest.raises(ProtocolError):
        decode(value)


@pytest.mark.parametrize("decode, value", [pytest.param(decode, good, id=name)
                                           for name, (decode, good, _) in MALFORMED.items()])
def test_each_decoder_accepts_the_well_formed_neighbour(decode, value):
    decode(value)


@pytest.mark.parametrize("stream", [
    framing.frame(b"\xc1"),
    framing.frame(pack(1) + pack(2)),
    framing.frame(pack([1, 0, b"fine"])) + framing.frame(b"\xd4\x09\x00"),
])
def test_frame_reader_rejects_malformed_frames(stream):
    reader, w = _pipe_reader()
    try:
        os.write(w, stream)
        with pytest.raises(ProtocolError):
            reader.read()
    finally:
        _close(reader, w)


@pytest.mark.parametrize("result", [b"", b"x" * 10, os.urandom(4096), os.urandom(200_000), [1, b"y"]])
@pytest.mark.parametrize("req_id", [1, 127, 128, 70_000, 1 << 40])
def test_scattered_reply_decodes_like_a_packed_one(req_id, result):
    parts = messages.encode_reply_parts(req_id, result)
    assert messages.decode_reply(unpack(b"".join(parts))) == (req_id, True, result)
    reader, w = _pipe_reader()
    writer = threading.Thread(target=framing.write_frame, args=(w, *parts))
    writer.start()
    got: list = []
    try:
        while not got:
            chunk = reader.read()
            assert chunk is not None
            got.extend(chunk)
    finally:
        writer.join()
        _close(reader, w)
    assert messages.decode_reply(got[0]) == (req_id, True, result)
