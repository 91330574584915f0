"""NAR reader: round trips through the encoder, event order, and every rejection."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.castore_fixtures import Exe, Link, Store
from tvixmount.castore import nar
from tvixmount.castore.narreader import (
    MAX_DEPTH,
    NarDirectoryEnd,
    NarDirectoryStart,
    NarFile,
    NarSymlink,
    read_nar,
)
from tvixmount.errors import InvalidData


def s(data: bytes) -> bytes:
    """One NAR string: length, bytes, zero padding."""
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def tokens(*parts: bytes) -> bytes:
    return b"".join(s(p) for p in parts)


def encode(spec: object) -> tuple[Store, bytes]:
    store = Store()
    node = store.build(spec)
    return store, b"".join(nar.nar_chunks(node, store.get_directory, store.read_blob))


def events(data: bytes) -> list:
    """All events, with file contents read (and replaced by the bytes)."""
    out = []
    for event in read_nar(io.BytesIO(data)):
        if isinstance(event, NarFile):
            out.append(("file", event.path, event.size, event.executable, event.reader.read()))
        else:
            out.append(event)
    return out


def reject(data: bytes, fragment: str) -> str:
    with pytest.raises(InvalidData, match="NAR at byte") as info:
        events(data)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


SPEC = {
    b"bin": {b"tool": Exe(b"#!/bin/sh\n"), b"alias": Link(b"tool")},
    b"a": b"",
    b"doc": {b"empty": {}, b"README": b"0123456789" * 300},
    b"\xff": b"raw",
}


def test_event_order() -> None:
    _store, data = encode(SPEC)
    assert events(data) == [
        NarDirectoryStart(()),
        ("file", (b"a",), 0, False, b""),
        NarDirectoryStart((b"bin",)),
        NarSymlink((b"bin", b"alias"), b"tool"),
        ("file", (b"bin", b"tool"), 10, True, b"#!/bin/sh\n"),
        NarDirectoryEnd((b"bin",)),
        NarDirectoryStart((b"doc",)),
        ("file", (b"doc", b"README"), 3000, False, b"0123456789" * 300),
        NarDirectoryStart((b"doc", b"empty")),
        NarDirectoryEnd((b"doc", b"empty")),
        NarDirectoryEnd((b"doc",)),
        ("file", (b"\xff",), 3, False, b"raw"),
        NarDirectoryEnd(()),
    ]


@pytest.mark.parametrize(
    "spec", [SPEC, b"", b"Hello World!", Exe(b"x" * 17), Link(b"/nix/store/somewhereelse"), {}],
    ids=["tree", "empty-file", "file", "exe", "symlink", "empty-dir"],
)
def test_round_trip(spec: object) -> None:
    store, data = encode(spec)
    node = store.build(spec)
    assert Store().build_from_nar(read_nar(io.BytesIO(data))) == node


def test_unread_file_contents_are_skipped() -> None:
    _store, data = encode({b"a": b"x" * 100, b"b": Link(b"t")})
    seen = [e for e in read_nar(io.BytesIO(data)) if not isinstance(e, NarFile)]
    assert seen[1] == NarSymlink((b"b",), b"t")


def test_short_reads_from_a_pipe_like_stream() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # at most 3 bytes per call
            n = min(3, len(b), len(self.data))
            b[:n] = self.data[:n]
            self.data = self.data[n:]
            return n

    store, data = encode(SPEC)
    assert Store().build_from_nar(read_nar(Trickle(data))) == store.build(SPEC)


def test_deep_nesting_needs_no_recursion() -> None:
    depth = 1500
    data = tokens(b"nix-archive-1")
    for _ in range(depth):
        data += tokens(b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node")
    data += tokens(b"(", b"type", b"directory", b")")
    data += tokens(b")", b")") * depth
    evs = events(data)
    assert len(evs) == 2 * (depth + 1)
    assert evs[depth] == NarDirectoryStart((b"d",) * depth)


def test_too_deep_is_refused() -> None:
    data = tokens(b"nix-archive-1")
    for _ in range(MAX_DEPTH + 1):
        data += tokens(b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node")
    reject(data, f"deeper than {MAX_DEPTH} levels")


HEAD = tokens(b"nix-archive-1", b"(", b"type", b"directory")


def entry(name: bytes, *body: bytes) -> bytes:
    return tokens(b"entry", b"(", b"name") + s(name) + tokens(b"node", b"(", b"type", *body, b")", b")")


FILE = (b"regular", b"contents", b"")
LINK = (b"symlink", b"target", b"t")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "truncated"),
        (tokens(b"nix-archive-2"), "at byte 0: expected 'nix-archive-1', got 'nix-archive-2'"),
        (s(b"x" * 100), "at byte 0: a token is 100 bytes long, more than 64"),
        (tokens(b"nix-archive-1", b"(", b"type", b"fifo"), "at byte 56: unknown node type 'fifo'"),
        (tokens(b"nix-archive-1", b"[", b"type"), "expected '(', got '['"),
        (tokens(b"nix-archive-1", b"(", b"type", b"regular", b"contents"), "truncated"),
        (tokens(b"nix-archive-1", b"(", b"type", b"regular", b"executable", b"x"), "expected '', got 'x'"),
        (tokens(b"nix-archive-1", b"(", b"type", b"regular", b"data"), "expected 'contents', got 'data'"),
        (tokens(b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"abc") + s(b"("), "expected ')'"),
        (tokens(b"nix-archive-1", b"(", b"type", b"symlink", b"target", b"", b")"), "has an empty target"),
        (tokens(b"nix-archive-1", b"(", b"type", b"symlink", b"target", b"a\0b", b")"), "a NUL byte"),
        (tokens(b"nix-archive-1", b"(", b"type", b"symlink", b"target") + s(b"t" * 4096),
         "4096 bytes long, more than 4095"),
        (tokens(b"nix-archive-1", b"(", b"type", b"symlink", b"tarxet"), "expected 'target'"),
        (tokens(b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"", b")", b")"),
         "trailing data after the end of the archive"),
        (tokens(b"nix-archive-1", b"(", b"type", b"directory", b")") + b"\0", "trailing data"),
        (HEAD + entry(b"b", *FILE) + entry(b"a", *FILE) + s(b")"), "entries not sorted in /: 'a' after 'b'"),
        (HEAD + entry(b"a", *FILE) + entry(b"a", *LINK) + s(b")"), "duplicate entry in /: 'a' after 'a'"),
        (HEAD + entry(b"", *FILE) + s(b")"), "name is empty"),
        (HEAD + entry(b".", *FILE) + s(b")"), "name is '.'"),
        (HEAD + entry(b"..", *FILE) + s(b")"), "name is '..'"),
        (HEAD + entry(b"a/b", *FILE) + s(b")"), "contains '/'"),
        (HEAD + entry(b"a\0", *FILE) + s(b")"), "NUL"),
        (HEAD + entry(b"n" * 256, *FILE) + s(b")"), "256 bytes long, more than 255"),
        (HEAD + tokens(b"entry", b"(", b"nam"), "expected 'name', got 'nam'"),
        (HEAD + tokens(b"entri"), "expected 'entry' or ')' in /, got 'entri'"),
        (HEAD + entry(b"a", *FILE), "truncated"),
        (HEAD + tokens(b"entry", b"(", b"name", b"a", b"node", b"(", b"type", b"directory", b")", b"x"),
         "expected ')', got 'x'"),
    ],
)
def test_rejects(data: bytes, fragment: str) -> None:
    reject(data, fragment)


def test_nonzero_padding_in_token() -> None:
    data = tokens(b"nix-archive-1")[:-1] + b"\x01"
    reject(data, "at byte 21: non-zero padding after a token")


def test_nonzero_padding_after_file_contents() -> None:
    data = tokens(b"nix-archive-1", b"(", b"type", b"regular", b"contents") + (3).to_bytes(8, "little")
    data += b"abc\0\0\0\0\x01" + s(b")")
    message = reject(data, "non-zero padding after the contents of /")
    assert "at byte 99" in message


def test_truncated_file_contents_reports_offset() -> None:
    data = tokens(b"nix-archive-1", b"(", b"type", b"regular", b"contents") + (100).to_bytes(8, "little")
    reject(data + b"x" * 10, "truncated: input ends inside the contents of /")


def test_error_offsets_point_at_the_bad_token() -> None:
    data = HEAD + entry(b"b", *FILE) + entry(b"a", *FILE) + s(b")")
    bad_name_at = len(HEAD + entry(b"b", *FILE) + tokens(b"entry", b"(", b"name"))
    reject(data, f"at byte {bad_name_at}: entries not sorted")


names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n and n not in
                                                  (b".", b".."))
leaves = st.one_of(
    st.binary(max_size=40),
    st.builds(Exe, st.binary(max_size=40)),
    st.builds(Link, st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t)),
)
trees = st.recursive(leaves, lambda children: st.dictionaries(names, children, max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_round_trip_property(spec: object) -> None:
    store, data = encode(spec)
    node = store.build(spec)
    assert Store().build_from_nar(read_nar(io.BytesIO(data))) == node
    assert len(data) == nar.nar_size(node, store.get_directory)
