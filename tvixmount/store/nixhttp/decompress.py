"""Streaming decompression of a downloaded NAR, with bounded memory.

A binary cache may compress NARs with xz, bzip2, gzip or zstd (``nix copy
--to '...?compression=...'``), or not at all. Each decompressor here is a
``read(n)`` reader over the compressed ``read(n)`` source that never
returns more than ``n`` bytes, and asks the source for one ``CHUNK`` at a
time, so memory stays flat however far a NAR expands (a few bytes of zstd
can claim gigabytes): the caller decides how much it pulls, and the
substituter pulls no more than NarSize.

Strictness: input that ends inside a compressed stream, or is followed by
anything that is not another complete stream, is InvalidData (the stdlib
codecs say where their stream ended; zstd does not, so there the NAR's
own size and hash checks catch a cut). Concatenated streams are read on,
as ``xz``, ``bzip2`` and ``gzip`` do (parallel compressors write them).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Protocol

import zstandard

from ...errors import InvalidData

CHUNK = 1 << 20
SUPPORTED = ("none", "xz", "bzip2", "gzip", "zstd")


class Readable(Protocol):
    def read(self, n: int) -> bytes: ...


class _Codec(Protocol):
    """The stdlib decompressor objects' common shape (lzma, bz2; zlib is adapted)."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Zlib:
    """zlib's gzip decompressor in the shape of lzma's (it keeps unconsumed input itself)."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    @property
    def eof(self) -> bool:
        return self._obj.eof

    @property
    def needs_input(self) -> bool:
        return not self._obj.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._obj.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._obj.decompress(self._obj.unconsumed_tail + data, max(max_length, 0))


_FACTORIES: dict[str, Callable[[], _Codec]] = {
    "xz": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
    "bzip2": bz2.BZ2Decompressor,
    "gzip": _Zlib,
}
_ERRORS = (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError)


class _StdlibReader:
    """One of the stdlib codecs over a source, stream after stream until the source ends."""

    def __init__(self, name: str, source: Readable) -> None:
        self._name = name
        self._source = source
        self._codec: _Codec = _FACTORIES[name]()
        self._source_done = False
        self._started = False  # the current stream has consumed input

    def read(self, n: int) -> bytes:
        while True:
            codec = self._codec
            if codec.eof:
                leftover = codec.unused_data
                if not leftover:
                    leftover = self._pull()
                    if not leftover:
                        return b""  # the source ended right after a complete stream
                self._codec = _FACTORIES[self._name]()  # the next concatenated stream
                self._started = False
                data = self._decompress(leftover, n)
            elif codec.needs_input:
                chunk = self._pull()
                data = self._decompress(chunk, n)
                if not chunk and not data and not self._codec.eof:
                    if self._started:
                        raise InvalidData(f"{self._name} stream is cut short (input ends inside it)")
                    raise InvalidData(f"{self._name} input is empty")
            else:
                data = self._decompress(b"", n)
            if data:
                return data

    def _decompress(self, data: bytes, n: int) -> bytes:
        if data:
            self._started = True
        try:
            return self._codec.decompress(data, n)
        except _ERRORS as exc:
            raise InvalidData(f"{self._name} data does not decompress: {exc}") from None

    def _pull(self) -> bytes:
        if self._source_done:
            return b""
        chunk = self._source.read(CHUNK)
        if not chunk:
            self._source_done = True
        return chunk


class _ZstdReader:
    """zstd through ``zstandard``'s stream reader (bounded by the size asked for)."""

    def __init__(self, source: Readable) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            source, read_size=CHUNK, read_across_frames=True  # type: ignore[arg-type]
        )

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise InvalidData(f"zstd data does not decompress: {exc}") from None


def check_compression(name: str) -> None:
    """InvalidData naming ``name`` and what is supported, when it is not."""
    if name not in SUPPORTED:
        raise InvalidData(f"compression {name!r} is not supported (only {', '.join(SUPPORTED)})")


def decompressing(name: str, source: Readable) -> Readable:
    """A reader of the decompressed bytes of ``source`` compressed with ``name``."""
    check_compression(name)
    if name == "none":
        return source
    if name == "zstd":
        return _ZstdReader(source)
    return _StdlibReader(name, source)
