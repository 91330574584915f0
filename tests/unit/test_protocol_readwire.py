"""blob_read's fixed frames (protocol/readwire.py): round trips through a FrameReader beside msgpack
frames, the worker's handling of one (on the reply pipe and on a lane), and every malformed frame
rejected as ProtocolError."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvixmount.errors import InvalidArgument
from tvixmount.protocol import framing, messages, ops, readwire
from tvixmount.protocol.framing import FrameReader, ProtocolError, RingRef
from tvixmount.protocol.readwire import ReadRequest

DIGEST = bytes(range(32))
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
ids = st.integers(1, (1 << 64) - 1)


def _read_all(data: bytes, fixed=None) -> list:
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        reader = FrameReader(r, 64, fixed=fixed)
        out: list = []
        while (got := reader.read()) is not None:
            out += got
        assert reader.pending == 0
        return out
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@given(ids, st.floats(allow_nan=False), st.binary(min_size=32, max_size=32), i64, i64, i64,
       st.integers(0, readwire.NO_LANE))
def test_request_round_trip(req_id, deadline, digest, offset, length, size, lane):
    frame = readwire.encode_request(req_id, deadline, digest, offset, length, size, lane=lane)
    assert int.from_bytes(frame[:framing.HEADER_LEN], "big") == len(frame) - framing.HEADER_LEN
    assert readwire.decode_request(frame[framing.HEADER_LEN:]) == (req_id, deadline, digest, offset, length,
                                                                   size, lane)


def test_a_request_without_a_lane_names_none():
    frame = readwire.encode_request(7, 1.0, DIGEST, 0, 1, -1)
    assert readwire.decode_request(frame[framing.HEADER_LEN:]).lane == readwire.NO_LANE


@given(ids, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_ring_reply_stands_for_the_msgpack_reply(req_id, start, length):
    body = readwire.encode_ring_reply(req_id, RingRef(start, length))
    assert readwire.decode_reply(body) == [req_id, messages.OK, RingRef(start, length)]
    assert messages.decode_reply(readwire.decode_reply(body)) == (req_id, True, RingRef(start, length))


def test_fixed_and_msgpack_frames_interleave_on_one_pipe():
    request = readwire.encode_request(7, 12.5, DIGEST, 4096, 131072, -1)
    other = messages.encode_request(8, "ping", [], 12.5)
    got = _read_all(other + request + other, fixed=readwire.decode_request)
    assert got[0] == [8, "ping", [], 12.5] and got[2] == got[0]
    assert got[1] == ReadRequest(7, 12.5, DIGEST, 4096, 131072, -1)
    assert type(got[1]) is ReadRequest


def test_a_reader_without_the_fixed_codec_rejects_a_fixed_frame():
    with pytest.raises(ProtocolError, match="undecodable"):
        _read_all(readwire.encode_request(7, 1.0, DIGEST, 0, 1, -1))


def _frame(body: bytes) -> bytes:
    return framing.frame(body)


REQUEST = readwire.encode_request(7, 1.0, DIGEST, 0, 1, -1)[framing.HEADER_LEN:]
REPLY = readwire.encode_ring_reply(7, RingRef(0, 1))


@pytest.mark.parametrize("body", [
    REQUEST[:-1],  # short
    REQUEST + b"\0",  # long
    REQUEST[:1],  # the mark alone
    bytes([readwire.MARK, readwire.RING]) + REQUEST[2:],  # a reply's kind in a request's shape
    bytes([readwire.MARK, 0]) + REQUEST[2:],  # no kind
    REQUEST[:2] + bytes(8) + REQUEST[10:],  # id 0: never a request's
    REPLY,  # a reply where a request belongs
], ids=["short", "long", "mark-only", "reply-kind", "kind-0", "id-0", "a-reply"])
def test_malformed_fixed_requests_are_protocol_errors(body):
    with pytest.raises(ProtocolError, match="fixed request"):
        _read_all(_frame(body), fixed=readwire.decode_request)


@pytest.mark.parametrize("body", [
    REPLY[:-1],
    REPLY + b"\0",
    bytes([readwire.MARK, readwire.READ]) + REPLY[2:],
    REPLY[:2] + bytes(8) + REPLY[10:],
    REQUEST,
], ids=["short", "long", "request-kind", "id-0", "a-request"])
def test_malformed_fixed_replies_are_protocol_errors(body):
    with pytest.raises(ProtocolError, match="fixed reply"):
        _read_all(_frame(body), fixed=readwire.decode_reply)


LANE_REPLY = readwire.encode_lane_reply(7, 1234, 10)


@pytest.mark.parametrize("body", [
    LANE_REPLY[:-1],
    LANE_REPLY + b"\0",
    bytes([readwire.MARK, readwire.RING]) + LANE_REPLY[2:],
    LANE_REPLY[:2] + bytes(8) + LANE_REPLY[10:],
    LANE_REPLY[:10] + bytes(4) + LANE_REPLY[14:],  # pid 0: no process
], ids=["short", "long", "ring-kind", "id-0", "pid-0"])
def test_malformed_lane_replies_are_protocol_errors(body):
    with pytest.raises(ProtocolError, match="fixed lane reply frame"):
        readwire.decode_lane_frame(_frame(body))


@given(ids, st.integers(1, (1 << 32) - 1), st.integers(0, (1 << 64) - 1), st.booleans())
def test_lane_reply_round_trip(req_id, pid, length, ok):
    frame = _frame(readwire.encode_lane_reply(req_id, pid, length, ok=ok))
    assert len(frame) == readwire.LANE_FRAME
    assert readwire.decode_lane_frame(frame) == (req_id, pid, length, ok)


@pytest.mark.parametrize("frame", [
    b"",
    _frame(LANE_REPLY)[:-1],
    (readwire.LANE_BODY + 1).to_bytes(4, "big") + LANE_REPLY[:-1],  # another header, the same size
    _frame(b"\x93\x07\xc3\xc4" + bytes(readwire.LANE_BODY - 4)),  # msgpack, not a fixed frame
], ids=["empty", "short", "header", "msgpack"])
def test_bytes_on_a_lane_that_are_no_lane_frame_are_protocol_errors(frame):
    with pytest.raises(ProtocolError, match="fixed lane reply frame"):
        readwire.decode_lane_frame(frame)


@pytest.mark.parametrize("args, match", [
    ((DIGEST[:31], 0, 1, -1), "blob digest is 31 bytes"),
    ((DIGEST + b"x", 0, 1, -1), "blob digest is 33 bytes"),
    ((bytearray(DIGEST), 0, 1, -1), r"takes \(bytes, int, int, int\), got \(bytearray"),
    ((DIGEST, True, 1, -1), r"got \(bytes, bool"),
    ((DIGEST, 0, 1.0, -1), r"got \(bytes, int, float"),
    ((DIGEST, 1 << 63, 1, -1), "out of range"),
    ((DIGEST, 0, 1, -(1 << 63) - 1), "out of range"),
    ((DIGEST, 0, 1, -1, 1 << 16), "lane 65536 out of range"),
])
def test_arguments_a_fixed_request_cannot_hold_are_invalid(args, match):
    with pytest.raises(InvalidArgument, match=match):
        readwire.encode_request(1, 1.0, *args)


def test_blob_read_is_the_op_with_a_fixed_request():
    assert ops.BLOB_READ.fixed is readwire.encode_request
    assert [op.name for op in ops.OPS.values() if op.fixed is not None] == ["blob_read"]


def test_the_mark_starts_no_msgpack_value():
    with pytest.raises(ProtocolError):
        framing.unpack(bytes([readwire.MARK]))
    assert struct.calcsize(">BBQd32sqqqH") == readwire.REQUEST_BODY


@pytest.fixture
def worker_context():
    from tests.worker_fixtures import populate
    from tvixmount.store import StoreUrls, memory, open_store
    from workers.handlers import Context

    memory.reset()
    store = open_store(StoreUrls.single("memory://"))
    populate(store)
    ctx = Context(0, store)
    yield ctx
    ctx.close()
    memory.reset()


def _reply(parts: tuple[bytes, ...]) -> tuple:
    return messages.decode_reply(framing.unpack(b"".join(parts)))


def test_a_worker_answers_a_fixed_request_like_the_msgpack_one(worker_context):
    from tests.worker_fixtures import BIG, b3
    from workers.loop import handle

    fixed = handle(worker_context, ReadRequest(9, 1e12, b3(BIG), 1000, 131072, len(BIG)))
    plain = handle(worker_context, [9, "blob_read", [b3(BIG), 1000, 131072, len(BIG)], 1e12])
    assert _reply(fixed) == _reply(plain) == (9, True, BIG[1000:1000 + 131072])


def test_a_worker_answers_a_bad_or_late_fixed_request_with_an_error(worker_context):
    from tests.worker_fixtures import BIG, b3
    from workers.loop import handle

    req_id, ok, (code, _) = _reply(handle(worker_context, ReadRequest(3, 1e12, b3(BIG), -1, 10, -1)))
    assert (req_id, ok, code) == (3, False, "invalid_argument")
    assert _reply(handle(worker_context, ReadRequest(4, 1e12, bytes(32), 0, 10, -1)))[2][0] == "not_found"
    code, message = _reply(handle(worker_context, ReadRequest(5, 1.0, b3(BIG), 0, 10, -1)))[2]
    assert code == "timeout" and "deadline passed before worker 0 took it up" in message


@pytest.fixture
def lane_context(worker_context):
    """The worker context with a ring and two lanes, and the dispatcher's end of lane 1."""
    from tvixmount.lanes import Lanes
    from tvixmount.shmring import Arena
    from workers.handlers import Context

    arena = Arena(1, 1 << 20, lanes=Lanes(2))
    ctx = Context(0, worker_context.store, arena.writer(0))
    assert arena.lanes is not None
    arena.lanes.take()
    lane = arena.lanes.take()
    yield ctx, lane
    arena.close()


def test_a_worker_answers_a_lane_request_in_the_lanes_buffer_naming_itself(lane_context):
    from tests.worker_fixtures import BIG, b3
    from workers.loop import handle

    ctx, lane = lane_context
    assert handle(ctx, ReadRequest(9, 1e12, b3(BIG), 1000, 131072, len(BIG), 1)) == ()  # nothing on the pipe
    reply = lane.next_reply()
    assert reply == readwire.LaneReply(9, os.getpid(), 131072, True)
    assert lane.copy(reply.length) == BIG[1000:1000 + 131072]
    with pytest.raises(BlockingIOError):
        lane.next_reply()  # one reply per request
    assert handle(ctx, ReadRequest(10, 1e12, b3(BIG), len(BIG), 10, len(BIG), 1)) == ()  # at EOF: no bytes
    assert lane.next_reply() == readwire.LaneReply(10, os.getpid(), 0, True)


def test_a_worker_answers_a_failed_lane_request_with_the_error_in_the_buffer(lane_context):
    from tests.worker_fixtures import BIG, b3
    from workers.loop import handle

    ctx, lane = lane_context
    handle(ctx, ReadRequest(4, 1e12, bytes(32), 0, 10, -1, 1))
    handle(ctx, ReadRequest(5, 1.0, b3(BIG), 0, 10, -1, 1))
    first, second = lane.next_reply(), lane.next_reply()  # one frame per read
    assert (first.req_id, first.ok, second.req_id, second.ok) == (4, False, 5, False)
    code, message = messages.decode_error_value(lane.copy(second.length))  # the later one is in the buffer
    assert code == "timeout" and "deadline passed before worker 0 took it up" in message


def test_a_request_on_a_lane_the_worker_lacks_is_a_protocol_error(lane_context, worker_context):
    from tests.worker_fixtures import BIG, b3
    from workers.loop import handle

    ctx, _ = lane_context
    with pytest.raises(ProtocolError, match="lane 2, which this worker does not have"):
        handle(ctx, ReadRequest(9, 1e12, b3(BIG), 0, 10, len(BIG), 2))
    with pytest.raises(ProtocolError, match="lane 0, which this worker does not have"):
        handle(worker_context, ReadRequest(9, 1e12, b3(BIG), 0, 10, len(BIG), 0))  # no ring, no lanes


def test_an_error_value_is_cut_to_fit():
    from tvixmount.errors import NotFound

    data = messages.encode_error_value(NotFound("ü" * 10_000), 2048)
    assert len(data) <= 2048
    code, message = messages.decode_error_value(data)
    assert code == "not_found" and message.endswith("...")
