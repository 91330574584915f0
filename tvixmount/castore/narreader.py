"""Streaming NAR reader for ``tvixstore import --nar`` (docs/protocol.md, 'NAR format').

A NAR may come from anywhere and be any size, so the reader is a pull
parser with bounded memory: it yields one event per node in NAR order and
hands file contents out as a length-limited reader over the input stream
instead of buffering them. Everything that would make the castore tree
invalid or differ from the NAR (bad framing, non-zero padding, unsorted or
duplicate names, illegal names or targets, truncation, trailing bytes) is
refused with the byte offset where it was found. Nesting is walked with an
explicit stack, not recursion, so a deep NAR cannot exhaust the C stack.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import InvalidData
from .directory import MAX_NAME_LEN, MAX_TARGET_LEN, check_name
from .nodes import display_name

MAGIC = b"nix-archive-1"
MAX_TOKEN_LEN = 64  # longest keyword is 13 bytes; anything longer is garbage
MAX_DEPTH = 4096  # nesting deeper than any path the kernel could resolve
_SKIP = 1 << 16

Path = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NarDirectoryStart:
    path: Path


@dataclass(frozen=True, slots=True)
class NarDirectoryEnd:
    path: Path


@dataclass(frozen=True, slots=True)
class NarFile:
    """A regular file; read ``reader`` to its end before pulling the next event.

    Bytes left unread when the next event is pulled are skipped (and still
    checked for truncation), so a consumer may ignore a file it does not want.
    """

    path: Path
    size: int
    executable: bool
    reader: BinaryIO


@dataclass(frozen=True, slots=True)
class NarSymlink:
    path: Path
    target: bytes


NarEvent = NarDirectoryStart | NarDirectoryEnd | NarFile | NarSymlink


class _Lazy:
    """A message fragment built only if an error needs it (paths can be deep)."""

    __slots__ = ("prefix", "subject")

    def __init__(self, prefix: str, subject: object) -> None:
        self.prefix = prefix
        self.subject = subject

    def __str__(self) -> str:
        subject = _where(self.subject) if isinstance(self.subject, tuple) else str(self.subject)
        return self.prefix + subject


class _Input:
    """The input stream with the offset of the next unread byte, for messages.

    Speed: a NAR is mostly framing for small files (a dozen tokens each),
    so the common cases take one read each: a keyword is compared with its
    whole encoding at once (``expect``), and a string's bytes and padding
    come in one read. Bytes read ahead by a failed comparison are kept in
    ``_pending`` and parsed the careful way, for the exact message.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.offset = 0
        self._pending = b""  # read from the stream, not yet consumed

    def fail(self, message: str, at: int | None = None) -> InvalidData:
        return InvalidData(f"NAR at byte {self.offset if at is None else at}: {message}")

    def _read(self, n: int) -> bytes:
        pending = self._pending
        if not pending:
            return self.stream.read(n)
        self._pending = pending[n:]
        if len(pending) >= n:
            return pending[:n]
        return pending + self.stream.read(n - len(pending))

    def read_exact(self, n: int, what: object, prefix: str = "") -> bytes:
        start = self.offset
        data = self._read(n)
        while len(data) < n:  # raw streams and pipes may return short reads
            more = self.stream.read(n - len(data))
            if not more:
                raise self.fail(f"truncated: input ends inside {prefix}{what} ({len(data)} of {n} bytes)",
                                start)
            data += more
        self.offset += n
        return data

    def read_some(self, n: int, what: object) -> bytes:
        data = self._read(n)
        if not data:
            raise self.fail(f"truncated: input ends inside {what}")
        self.offset += len(data)
        return data

    def u64(self, what: object) -> int:
        return int.from_bytes(self.read_exact(8, what, "the length of "), "little")

    def padding(self, length: int, what: object) -> None:
        pad = -length % 8
        if pad:
            start = self.offset
            if self.read_exact(pad, what, "the padding of ") != _ZEROS[pad]:
                raise self.fail(f"non-zero padding after {what}", start)

    def string(self, limit: int, what: object) -> bytes:
        start = self.offset
        length = self.u64(what)
        if length > limit:
            raise self.fail(f"{what} is {length} bytes long, more than {limit}", start)
        pad = -length % 8
        if not pad:
            return self.read_exact(length, what)
        data = self.read_exact(length + pad, what)
        if data[length:] != _ZEROS[pad]:
            raise self.fail(f"non-zero padding after {what}", start + 8 + length)
        return data[:length]

    def token(self) -> bytes:
        return self.string(MAX_TOKEN_LEN, "a token")

    def expect(self, token: bytes) -> None:
        encoded = _ENCODED.get(token) or _encode(token)
        if not self._pending:
            data = self.stream.read(len(encoded))
            if data == encoded:
                self.offset += len(encoded)
                return
            self._pending = data  # something else (or a short read): parse it for the message
        start = self.offset
        got = self.token()
        if got != token:
            raise self.fail(f"expected {token.decode()!r}, got {_show(got)}", start)

    def at_eof(self) -> bool:
        return not self._read(1)


_ZEROS = {pad: bytes(pad) for pad in range(8)}


def _encode(token: bytes) -> bytes:
    """A token as the NAR spells it: length, bytes, zero padding."""
    return len(token).to_bytes(8, "little") + token + bytes(-len(token) % 8)


_ENCODED = {token: _encode(token) for token in (MAGIC, b"(", b")", b"type", b"contents", b"", b"target",
                                                b"name", b"node", b"entry")}


def _show(token: bytes) -> str:
    return repr(token.decode("ascii", "backslashreplace"))


class _FileReader(io.RawIOBase):
    """Exactly one file's contents; consumes and checks the padding after the last byte."""

    def __init__(self, source: _Input, size: int, path: Path) -> None:
        self._source = source
        self._remaining = size
        self._size = size
        self._what = _Lazy("the contents of ", path)
        self._padded = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left for -1), as one read of the input gave them: no copy."""
        n = self._remaining if size is None or size < 0 else min(size, self._remaining)
        if n == 0:
            self._finish()
            return b""
        data = self._source.read_some(n, self._what)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._finish()
        return data

    def _finish(self) -> None:
        if not self._padded:
            self._padded = True
            self._source.padding(self._size, self._what)

    def skip_rest(self) -> None:
        while self._remaining:
            n = min(self._remaining, _SKIP)
            self._remaining -= len(self._source.read_some(n, self._what))
        self._finish()


def _where(path: Path) -> str:
    """The path for a message; very deep ones keep their two ends."""
    if len(path) > 16:
        head = "/".join(display_name(name) for name in path[:4])
        tail = "/".join(display_name(name) for name in path[-4:])
        return f"/{head}/...({len(path) - 8} more)/{tail}"
    return "/" + "/".join(display_name(name) for name in path)


def read_nar(stream: BinaryIO) -> Iterator[NarEvent]:
    """Parse a NAR from ``stream``, yielding events in NAR order.

    The root node has path ``()``. Raises InvalidData (with a byte offset)
    on the first violation; events already yielded describe a valid prefix.
    """
    src = _Input(stream)
    src.expect(MAGIC)
    # Open directories: (path, name of the previous entry).
    stack: list[tuple[Path, bytes | None]] = []
    path: Path = ()
    while True:
        src.expect(b"(")
        src.expect(b"type")
        start = src.offset
        kind = src.token()
        finished = True
        if kind == b"regular":
            executable = False
            start = src.offset
            token = src.token()
            if token == b"executable":
                src.expect(b"")
                executable = True
                start = src.offset
                token = src.token()
            if token != b"contents":
                raise src.fail(f"expected 'contents', got {_show(token)}", start)
            size = src.u64(_Lazy("the contents of ", path))
            reader = _FileReader(src, size, path)
            yield NarFile(path, size, executable, reader)  # type: ignore[arg-type]
            reader.skip_rest()
            src.expect(b")")
        elif kind == b"symlink":
            src.expect(b"target")
            start = src.offset
            target = src.string(MAX_TARGET_LEN, _Lazy("the symlink target of ", path))
            if not target:
                raise src.fail(f"symlink {_where(path)} has an empty target", start)
            if b"\0" in target:
                raise src.fail(f"symlink target of {_where(path)} contains a NUL byte", start)
            yield NarSymlink(path, target)
            src.expect(b")")
        elif kind == b"directory":
            if len(stack) >= MAX_DEPTH:
                raise src.fail(f"directories nested deeper than {MAX_DEPTH} levels at {_where(path)}")
            yield NarDirectoryStart(path)
            stack.append((path, None))
            finished = False
        else:
            raise src.fail(f"unknown node type {_show(kind)}", start)

        # Close what ended, then find the next entry to descend into.
        while True:
            if finished:
                if not stack:
                    if not src.at_eof():
                        raise src.fail("trailing data after the end of the archive")
                    return
                src.expect(b")")  # end of the entry
            dir_path, previous = stack[-1]
            start = src.offset
            token = src.token()
            if token == b")":
                stack.pop()
                yield NarDirectoryEnd(dir_path)
                finished = True
                continue
            if token != b"entry":
                raise src.fail(f"expected 'entry' or ')' in {_where(dir_path)}, got {_show(token)}", start)
            src.expect(b"(")
            src.expect(b"name")
            start = src.offset
            name = src.string(MAX_NAME_LEN, _Lazy("an entry name in ", dir_path))
            problem = check_name(name)
            if problem:
                raise src.fail(f"entry in {_where(dir_path)}: {problem}", start)
            if previous is not None and name <= previous:
                rule = "duplicate entry" if name == previous else "entries not sorted"
                raise src.fail(
                    f"{rule} in {_where(dir_path)}: {display_name(name)!r} after {display_name(previous)!r}",
                    start,
                )
            stack[-1] = (dir_path, name)
            src.expect(b"node")
            path = (*dir_path, name)
            break
