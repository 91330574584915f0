"""The two checked layers a download passes through: the file, then the NAR.

::

    HTTP body --FileCheck--> decompressor --NarCheck--> buffer --> NAR parser
               sha256, size                sha256, size
               <= FileSize                 <= NarSize

Each layer hashes and counts what passes through it and refuses, as soon
as it shows, more than the narinfo announced: so a server streaming
forever costs at most FileSize bytes of download and NarSize bytes of
decompression (plus one, to see that there is more). ``finish`` is the
final word once the parser is done: sizes equal, hashes equal. The NAR's
check comes first, since NarHash and NarSize are what the signature covers.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

from ...castore import nixbase32
from ...errors import IntegrityError, InvalidData
from .decompress import Readable


class FileCheck:
    """The compressed bytes as downloaded: at most ``size`` of them, hashing to ``sha256``."""

    def __init__(self, source: Readable, size: int | None, sha256: bytes | None, what: str) -> None:
        self._source = source
        self._size = size
        self._expected = sha256
        self._sha = hashlib.sha256()
        self._what = what
        self.count = 0

    def read(self, n: int) -> bytes:
        if self._size is not None:
            n = min(n, self._size - self.count + 1)  # one more than allowed shows a longer file
        data = self._source.read(n)
        self.count += len(data)
        if self._size is not None and self.count > self._size:
            raise InvalidData(f"{self._what}: the download is longer than its FileSize {self._size}")
        self._sha.update(data)
        return data

    def finish(self) -> None:
        """After the NAR is complete: nothing follows it, and FileSize/FileHash match."""
        if self.read(1):
            raise InvalidData(f"{self._what}: data follows the end of the compressed NAR")
        if self._size is not None and self.count != self._size:
            raise InvalidData(f"{self._what}: the download is {self.count} bytes, FileSize says {self._size}")
        digest = self._sha.digest()
        if self._expected is not None and digest != self._expected:
            raise IntegrityError(
                f"{self._what}: the download hashes to sha256:{nixbase32.encode(digest)}, "
                f"FileHash says sha256:{nixbase32.encode(self._expected)}"
            )


class NarCheck(io.RawIOBase):
    """The NAR as decompressed: never more than ``size`` bytes handed on, hashing to ``sha256``.

    A raw stream, to be wrapped in an ``io.BufferedReader``: it is read in
    big pieces, so hashing and counting cost one call per piece.
    """

    def __init__(self, source: Readable, size: int, sha256: bytes, what: str,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._expected = sha256
        self._sha = hashlib.sha256()
        self._what = what
        self._on_bytes = on_bytes
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        remaining = self._size - self.count
        if remaining == 0:
            if self._source.read(1):
                raise InvalidData(f"{self._what}: the NAR is longer than its NarSize {self._size}")
            return 0
        data = self._source.read(min(len(buffer), remaining))
        n = len(data)
        if n:
            memoryview(buffer)[:n] = data
            self._sha.update(data)
            self.count += n
            if self._on_bytes is not None:
                self._on_bytes(n)
        return n

    def finish(self) -> None:
        """After the parser is done: the NAR was exactly NarSize bytes and hashes to NarHash."""
        if self.count != self._size:
            raise InvalidData(
                f"{self._what}: the NAR ends after {self.count} bytes, NarSize says {self._size}"
            )
        if self._source.read(1):
            raise InvalidData(f"{self._what}: the NAR is longer than its NarSize {self._size}")
        digest = self._sha.digest()
        if digest != self._expected:
            raise IntegrityError(
                f"{self._what}: the NAR hashes to sha256:{nixbase32.encode(digest)}, "
                f"NarHash says sha256:{nixbase32.encode(self._expected)}"
            )
