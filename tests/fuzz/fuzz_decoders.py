"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of every decoder of untrusted bytes.

tests/mount/test_fuzz.py covers the same entry points with hypothesis on every
test run; this harness is for long runs that follow coverage into corners
random mutation does not reach. Each target takes the fuzzer's bytes,
feeds them to one decoder, and fails (the fuzzer keeps the input as a
crash file) when the decoder raises anything but its one error class or
accepts an invalid object.

How to run (atheris is optional and not in setup.cfg)::

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_decoders.py --seed /tmp/corpus-directory directory
    .venv/bin/python tests/fuzz/fuzz_decoders.py directory /tmp/corpus-directory -max_total_time=600
    .venv/bin/python tests/fuzz/fuzz_decoders.py --list        # the targets

Any libFuzzer flag works after the target (-runs=N, -jobs=N, -dict=...).
A crash leaves ``crash-<sha1>`` in the working directory; replay it with
``fuzz_decoders.py TARGET crash-<sha1>``. tests/mount/test_fuzz.py runs each
target for a few thousand inputs when atheris is installed.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from tvixmount.castore import nar, nixbase32, storepath
    from tvixmount.castore.directory import Directory, decode_directory, validate
    from tvixmount.castore.narreader import NarDirectoryEnd, NarDirectoryStart, NarFile, NarSymlink, read_nar
    from tvixmount.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
    from tvixmount.castore.pathinfo import validate_pathinfo
    from tvixmount.castore.wire import decode_pathinfo, encode_pathinfo
    from tvixmount.errors import InvalidData
    from tvixmount.protocol import framing, messages

import blake3


def fuzz_directory(data: bytes) -> None:
    try:
        found = decode_directory(data)
    except InvalidData:
        return
    validate(found)  # accepted means valid: raises (a finding) if not
    assert decode_directory(found.encode(), found.digest()) == found


def fuzz_pathinfo(data: bytes) -> None:
    try:
        info = decode_pathinfo(data)
    except InvalidData:
        return
    validate_pathinfo(info, require_narinfo=False)
    assert decode_pathinfo(encode_pathinfo(info)) == info


def fuzz_nar(data: bytes) -> None:
    """An accepted NAR must be the canonical NAR of the tree it describes."""
    directories: dict[bytes, Directory] = {}
    blobs: dict[bytes, bytes] = {}
    open_dirs: list[list[Node]] = []
    root: list[Node] = []
    try:
        for event in read_nar(io.BytesIO(data)):
            name = event.path[-1] if event.path else b""
            node: Node | None = None
            if isinstance(event, NarDirectoryStart):
                open_dirs.append([])
            elif isinstance(event, NarDirectoryEnd):
                d = Directory.from_entries(open_dirs.pop())
                directories[d.digest()] = d
                node = DirectoryNode(name, d.digest(), d.size())
            elif isinstance(event, NarFile):
                contents = event.reader.read()
                blobs[blake3.blake3(contents).digest()] = contents
                node = FileNode(name, blake3.blake3(contents).digest(), event.size, event.executable)
            elif isinstance(event, NarSymlink):
                node = SymlinkNode(name, event.target)
            if node is not None:
                (open_dirs[-1] if open_dirs else root).append(node)
    except InvalidData:
        return
    rendered = b"".join(nar.nar_chunks(root[0], directories.__getitem__,
                                       lambda digest, size: iter([blobs[digest]])))
    assert rendered == data


def fuzz_storepath(data: bytes) -> None:
    for parse, show in ((storepath.parse_basename, "basename"), (storepath.parse_absolute, "absolute")):
        try:
            path = parse(data)
        except InvalidData:
            continue
        assert getattr(path, show) == data.decode("ascii")
    try:
        decoded = nixbase32.decode(data)
    except InvalidData:
        return
    assert nixbase32.encode(decoded).encode() == data


def fuzz_frames(data: bytes) -> None:
    """The dispatcher's side of a worker pipe: values or ProtocolError, whatever arrives."""
    import os

    r, w = os.pipe()
    try:
        reader = framing.FrameReader(r, 64)
        os.write(w, data[:65536])
        os.close(w)
        w = -1
        for _ in range(len(data) + 2):
            try:
                values = reader.read()
            except framing.ProtocolError:
                return
            if values is None:
                return
            for message in values:
                for check in (messages.decode_reply, messages.decode_request):
                    with contextlib.suppress(framing.ProtocolError):
                        check(message)
        raise AssertionError("no EOF")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def fuzz_request(data: bytes) -> None:
    """A worker's handler: a reply for any decodable request, or ProtocolError."""
    from workers.handlers import Context
    from workers.loop import handle

    try:
        message = framing.unpack(data)
    except framing.ProtocolError:
        return
    try:
        parts = handle(_context(), message)
    except framing.ProtocolError:
        return
    messages.decode_reply(framing.unpack(b"".join(parts)))
    del Context


_CTX: list = []


def _context():  # type: ignore[no-untyped-def] - a workers.handlers.Context, made once
    if not _CTX:
        from tvixmount.store import StoreUrls, open_store
        from workers.handlers import Context

        store = open_store(StoreUrls.single("memory://"))
        store.blobs.put(b"a blob")
        _CTX.append(Context(0, store))
    return _CTX[0]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "directory": fuzz_directory,
    "pathinfo": fuzz_pathinfo,
    "nar": fuzz_nar,
    "storepath": fuzz_storepath,
    "frames": fuzz_frames,
    "request": fuzz_request,
}


def seeds() -> dict[str, list[bytes]]:
    """A few valid inputs per target, to start a corpus from (``--seed DIR TARGET``)."""
    from tvixmount.castore.pathinfo import NarInfo, PathInfo

    b3 = blake3.blake3(b"x").digest()
    d = Directory(directories=(DirectoryNode(b"d", b3, 3),), files=(FileNode(b"f", b3, 1, True),),
                  symlinks=(SymlinkNode(b"l", b"../t"),))
    path = storepath.StorePath(bytes(range(20)), "hello-1.0")
    info = PathInfo(node=FileNode(path.basename.encode(), b3, 1), narinfo=NarInfo(1, bytes(32)))
    blobs = {b3: b"x"}
    tree = {d.digest(): Directory(files=(FileNode(b"a", b3, 1),), symlinks=(SymlinkNode(b"b", b"a"),))}
    root = DirectoryNode(b"", next(iter(tree)), 4)
    rendered = b"".join(nar.nar_chunks(root, tree.__getitem__, lambda digest, size: iter([blobs[digest]])))
    request = framing.pack([1, "blob_read", [b3, 0, 10, -1], 1e12])
    return {
        "directory": [d.encode(), Directory().encode()],
        "pathinfo": [encode_pathinfo(info)],
        "nar": [rendered],
        "storepath": [path.basename.encode(), path.absolute.encode(), nixbase32.encode(b3).encode()],
        "frames": [framing.frame(framing.pack([1, 0, b"ok"])) + framing.frame(request)],
        "request": [request, framing.pack([2, "directory_tree", [b3, 100], 1e12])],
    }


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[1] == "--seed" and argv[3] in TARGETS:
        corpus = Path(argv[2])
        corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seeds()[argv[3]]):
            (corpus / f"seed-{i}").write_bytes(data)
        return
    if len(argv) < 2 or argv[1] not in TARGETS:
        print("usage: fuzz_decoders.py TARGET [libFuzzer flags and corpus dirs]\n"
              "       fuzz_decoders.py --seed CORPUS_DIR TARGET\ntargets: "
              + ", ".join(TARGETS), file=sys.stderr)
        sys.exit(0 if len(argv) > 1 and argv[1] == "--list" else 2)
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
