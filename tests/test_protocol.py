"""The dispatcher<->worker wire: round trips, framing across reads, garbage never escapes as anything
but ProtocolError."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvixmount import protocol
from tvixmount.castore.directory import Directory
from tvixmount.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvixmount.errors import IntegrityError, InvalidArgument, NotFound, TvixError, WorkerLost, from_code
from tvixmount.protocol import FrameReader, ProtocolError

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
    assert protocol.decode_node(protocol.unpack(protocol.pack(protocol.encode_node(node)))) == node


@given(directories)
def test_directory_round_trip(directory):
    wire = protocol.unpack(protocol.pack(protocol.encode_directory(directory)))
    assert protocol.decode_directory(wire) == directory


@given(st.integers(1, 1 << 62), st.sampled_from(sorted(protocol.OPS)), st.lists(wire_values, max_size=4),
       st.floats(0, 1e9))
def test_request_round_trip(req_id, op, args, deadline):
    body = protocol.encode_request(req_id, op, args, deadline)[protocol.HEADER_LEN:]
    assert protocol.decode_request(protocol.unpack(body)) == (req_id, op, args, deadline)


@given(st.integers(0, 1 << 62), wire_values)
def test_reply_round_trip(req_id, result):
    decoded = protocol.decode_reply(protocol.unpack(protocol.encode_reply(req_id, result)))
    assert decoded == (req_id, True, result)


@pytest.mark.parametrize("exc", [NotFound("directory b3:x not found"), IntegrityError("blob b3:y broken"),
                                 WorkerLost("gone"), ValueError("a bug")])
def test_errors_keep_their_class_across_the_wire(exc):
    req_id, ok, (code, message) = protocol.decode_reply(protocol.unpack(protocol.encode_error(7, exc)))
    assert (req_id, ok) == (7, False)
    rebuilt = from_code(code, message)
    if isinstance(exc, TvixError):
        assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    else:
        assert type(rebuilt) is TvixError and "ValueError: a bug" in str(rebuilt)


def test_op_results_round_trip_through_their_specs():
    d = Directory(files=(FileNode(b"a", b"\1" * 32, 3, True),))
    link = SymlinkNode(b"x" * 32 + b"-y", b"/t")
    cases = {
        "ping": ([3, 99], (3, 99)),
        "path_info": (link, link),
        "directory": (d, d),
        "directory_tree": ([(b"\2" * 32, d)], [(b"\2" * 32, d)]),
        "list_root": ([link], [link]),
        "blob_stat": (5, 5),
        "blob_read": (b"data", b"data"),
    }
    assert set(cases) == set(protocol.OPS)
    for op, (value, expected) in cases.items():
        spec = protocol.OPS[op]
        assert spec.decode(protocol.unpack(protocol.pack(spec.encode(value)))) == expected
    assert protocol.OPS["path_info"].decode(protocol.OPS["path_info"].encode(None)) is None
    assert protocol.OPS["blob_stat"].decode(None) is None


def test_check_args():
    assert protocol.check_args("blob_read", [b"d", 0, 1, -1]).name == "blob_read"
    with pytest.raises(InvalidArgument, match="unknown op 'nope'"):
        protocol.check_args("nope", [])
    with pytest.raises(InvalidArgument, match=r"takes \(bytes, int, int, int\), got \(bytes, str\)"):
        protocol.check_args("blob_read", [b"d", "x"])
    with pytest.raises(InvalidArgument):
        protocol.check_args("blob_read", [b"d", True, 1, -1])  # bool is not an offset


@pytest.mark.parametrize("kind,fields", [("spawn", (1,)), ("spawned", (1, 2)), ("spawn_failed", (0, "why")),
                                         ("exited", (3, 4, "killed by SIGKILL"))])
def test_control_round_trip(kind, fields):
    assert protocol.decode_control(protocol.encode_control(kind, *fields)) == (kind, *fields)


@pytest.mark.parametrize("data", [protocol.pack(["spawn"]), protocol.pack(["spawn", "1"]), protocol.pack({}),
                                  protocol.pack(["reboot", 1]), b"\xc1", b""])
def test_bad_control_messages(data):
    with pytest.raises(ProtocolError):
        protocol.decode_control(data)


@given(st.lists(wire_values, min_size=1, max_size=8), st.data())
@settings(max_examples=60)
def test_frames_survive_any_split_across_reads(values, data):
    stream = b"".join(protocol.frame(protocol.pack(v)) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]
    reader, w = _pipe_reader(size=data.draw(st.sampled_from([8, 64, 1 << 16])))
    try:
        assert _feed(reader, w, pieces) == values
        assert reader.pending == 0
    finally:
        _close(reader, w)


def test_big_frame_grows_the_buffer_and_write_frame_loops():
    body = protocol.pack([1, 0, os.urandom(3 << 20)])  # bigger than a pipe and than the reader's buffer
    reader, w = _pipe_reader(size=1024)
    writer = threading.Thread(target=protocol.write_frame, args=(w, body))
    writer.start()
    got: list = []
    try:
        while not got:
            chunk = reader.read()
            assert chunk is not None
            got.extend(chunk)
        writer.join()
        assert got == [protocol.unpack(body)]
    finally:
        writer.join()
        _close(reader, w)


def test_truncated_frame_then_eof_is_not_a_message():
    reader, w = _pipe_reader()
    body = protocol.frame(protocol.pack([1, 0, b"x" * 100]))
    os.write(w, body[:50])
    assert reader.read() == []
    os.close(w)
    assert reader.read() is None
    assert reader.pending == 50
    os.close(reader.fd)


def test_oversized_header_is_a_protocol_error():
    reader, w = _pipe_reader()
    try:
        os.write(w, (protocol.MAX_FRAME + 1).to_bytes(4, "big") + b"junk")
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
            messages = reader.read()
        except ProtocolError:
            return
        for message in messages or []:
            with contextlib.suppress(ProtocolError):
                protocol.decode_reply(message)
    finally:
        _close(reader, w)


@given(wire_values)
def test_shape_checks_reject_everything_malformed(value):
    for decode in (protocol.decode_reply, protocol.decode_request, protocol.decode_node,
                   protocol.decode_directory, protocol.decode_hello):
        with contextlib.suppress(ProtocolError):
            decode(value)


@pytest.mark.parametrize("result", [b"", b"x" * 10, os.urandom(4096), os.urandom(200_000), [1, b"y"]])
@pytest.mark.parametrize("req_id", [1, 127, 128, 70_000, 1 << 40])
def test_scattered_reply_decodes_like_a_packed_one(req_id, result):
    parts = protocol.encode_reply_parts(req_id, result)
    assert protocol.decode_reply(protocol.unpack(b"".join(parts))) == (req_id, True, result)
    reader, w = _pipe_reader()
    writer = threading.Thread(target=protocol.write_frame, args=(w, *parts))
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
    assert protocol.decode_reply(got[0]) == (req_id, True, result)
