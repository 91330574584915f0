"""The dispatcher<->worker wire: round trips, framing across reads, the op and handler tables, garbage
never escapes as anything but ProtocolError."""

from __future__ import annotations

import contextlib
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
    unanswered = "blob_read, directory_tree, list_root, path_info"
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


@pytest.mark.parametrize("data", [pack(["spawn"]), pack(["spawn", "1"]), pack({}),
                                  pack(["reboot", 1]), b"\xc1", b""])
def test_bad_control_messages(data):
    with pytest.raises(ProtocolError):
        messages.decode_control(data)


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


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=200)
def test_garbage_raises_protocol_error_or_decodes_to_a_shape_check(garbage):
    """Whatever a broken worker writes, the dispatcher sees values or ProtocolError, nothing else."""
    reader, w = _pipe_reader(size=128)
    try:
        os.write(w, garbage)
        try:
            values = reader.read()
        except ProtocolError:
            return
        for message in values or []:
            with contextlib.suppress(ProtocolError):
                messages.decode_reply(message)
    finally:
        _close(reader, w)


@given(wire_values)
def test_shape_checks_reject_everything_malformed(value):
    for decode in (messages.decode_reply, messages.decode_request, ops.decode_node,
                   ops.decode_directory, messages.decode_hello):
        with contextlib.suppress(ProtocolError):
            decode(value)


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
