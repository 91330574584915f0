"""The store flags of tvixmount, tvixstore and the daemon: one table, every command's real parser.

Each row is a command line (and environment) given to every command; the
commands agree except where their rule says otherwise: tvixmount refuses
some-but-not-all service addresses (Partial.REFUSED), and a command that
writes creates the embedded store it names (``?create=1``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvixmount import cli as mount_cli
from tvixmount import storeflags
from tvixmount.admin import cli as admin_cli
from tvixmount.admin import command
from tvixmount.errors import InvalidArgument
from tvixmount.server import daemon
from tvixmount.store import BlobCacheConfig, StoreUrls, urls
from tvixmount.units import format_size, parse_size, size_argument

ENV = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR", "TVIXMOUNT_STORE_DIR")
REFUSED = "give all three --*-service-addr flags, or none for the embedded store"
EMB = object()  # the embedded store in the row's store directory


@dataclass(frozen=True)
class Command:
    label: str
    resolve: Callable[[list[str]], StoreUrls]  # store flags -> StoreUrls, or a usage error
    refuses_partial: bool = False
    creates: bool = False


def _mount(flags: list[str]) -> StoreUrls:
    parser = mount_cli.build_parser()
    return storeflags.MOUNT.urls_or_exit(parser, parser.parse_args(["/mnt", *flags]))


def _tvixstore(argv: Callable[[list[str]], list[str]], writable: bool) -> Callable[[list[str]], StoreUrls]:
    def resolve(flags: list[str]) -> StoreUrls:
        full = argv(flags)
        return command.store_urls(admin_cli.build_parser(full).parse_args(full), writable)

    return resolve


def _daemon(*extra: str) -> Callable[[list[str]], StoreUrls]:
    return lambda flags: daemon.parse_args([*flags, *extra])[1]


COMMANDS = [
    Command("tvixmount", _mount, refuses_partial=True),
    Command("tvixstore list", _tvixstore(lambda flags: [*flags, "list"], writable=False)),
    Command("tvixstore import", _tvixstore(lambda flags: ["import", *flags, "x"], writable=True),
            creates=True),
    Command("daemon --read-only", _daemon("--read-only")),
    Command("daemon", _daemon(), creates=True),
]

MEM = "memory://"
SOCK = "grpc+unix:///run/env.sock"
ALL_MEM = ["--blob-service-addr", MEM, "--directory-service-addr", MEM, "--path-info-service-addr", MEM]
ALL_MEM_ENV = {"BLOB_SERVICE_ADDR": MEM, "DIRECTORY_SERVICE_ADDR": MEM, "PATH_INFO_SERVICE_ADDR": MEM}
# (id, flags ({D} = a store directory), environment, expected: three services or an error fragment)
ROWS = [
    ("none: the embedded store", ["--store-dir", "{D}"], {}, (EMB, EMB, EMB)),
    ("store dir from env", [], {"TVIXMOUNT_STORE_DIR": "{D}"}, (EMB, EMB, EMB)),
    ("all three", ALL_MEM, {}, (MEM, MEM, MEM)),
    ("all three from env", ["--store-dir", "{D}"], ALL_MEM_ENV, (MEM, MEM, MEM)),
    ("a flag beats its env", ["--blob-service-addr", MEM],
     {"BLOB_SERVICE_ADDR": SOCK, "DIRECTORY_SERVICE_ADDR": SOCK, "PATH_INFO_SERVICE_ADDR": SOCK},
     (MEM, SOCK, SOCK)),
    ("an empty env is absent", ["--store-dir", "{D}"], {"BLOB_SERVICE_ADDR": ""}, (EMB, EMB, EMB)),
    ("one flag alone", ["--store-dir", "{D}", "--blob-service-addr", MEM], {}, (MEM, EMB, EMB)),
    ("one env alone", ["--store-dir", "{D}"], {"DIRECTORY_SERVICE_ADDR": MEM}, (EMB, MEM, EMB)),
    ("local URLs", [f"--{s}-service-addr=local:///srv/other" for s in ("blob", "directory", "path-info")], {},
     ("local:///srv/other",) * 3),
    ("local URL with its own query", [f"--{s}-service-addr=local:///srv/o?create=0"
                                      for s in ("blob", "directory", "path-info")], {},
     ("local:///srv/o?create=0",) * 3),
    ("a bad URL", [f"--{s}-service-addr=bogus://x" for s in ("blob", "directory", "path-info")], {},
     "unknown scheme 'bogus'"),
    ("a bad URL from env", [], {**ALL_MEM_ENV, "PATH_INFO_SERVICE_ADDR": "grpc+http://"}, "grpc+http://"),
    ("a store dir that cannot be a store", ["--store-dir", "/"], {}, "refusing"),
]


def _expected(spec: object, store_dir: Path, creates: bool) -> str:
    if spec is EMB:
        return urls.local_url(store_dir, create=creates)
    assert isinstance(spec, str)
    if creates and spec.startswith("local://") and "?" not in spec:
        return spec + "?create=1"
    return spec


def outcome(cmd: Command, flags: list[str], capsys: pytest.CaptureFixture[str]) -> StoreUrls | str:
    """The StoreUrls, or the usage error's message (exit 2 on the commands that exit)."""
    try:
        return cmd.resolve(flags)
    except InvalidArgument as exc:  # tvixstore: main prints it as one line, exit 2
        return str(exc)
    except SystemExit as exc:
        assert exc.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in last
        return last.split(": error: ", 1)[1]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.label for c in COMMANDS])
@pytest.mark.parametrize(("flags", "env", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_every_command_reads_its_store_flags_by_one_rule(
    cmd: Command, flags: list[str], env: dict[str, str], expected: object, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    store_dir = tmp_path / "store"
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(D=store_dir))
    got = outcome(cmd, [f.format(D=store_dir) for f in flags], capsys)
    partial = isinstance(expected, tuple) and EMB in expected and any(e is not EMB for e in expected)
    if partial and cmd.refuses_partial:
        assert got == REFUSED
    elif isinstance(expected, str):
        assert isinstance(got, str) and expected in got, got
    else:
        assert isinstance(expected, tuple)
        assert got == StoreUrls(*(_expected(spec, store_dir, cmd.creates) for spec in expected))


def test_store_flags_go_before_or_after_the_tvixstore_command(tmp_path: Path) -> None:
    for argv in (["--store-dir", str(tmp_path), "list"], ["list", "--store-dir", str(tmp_path)]):
        args = admin_cli.build_parser(argv).parse_args(argv)
        assert command.store_urls(args) == StoreUrls.embedded(tmp_path)
    both = ["--store-dir", "/top", "list", "--store-dir", str(tmp_path)]
    assert command.store_urls(admin_cli.build_parser(both).parse_args(both)) == StoreUrls.embedded(tmp_path)


# -- copy's target store ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "copy: no target store: give --to-store-dir DIR or the three --to-*-service-addr URLs"),
        (["--to-blob-service-addr", MEM],
         "copy: --to-directory-service-addr, --to-path-info-service-addr not given (and no --to-store-dir to "
         "take it from)"),
        (["--to-store-dir", "{D}"], (EMB, EMB, EMB)),
        (["--to-store-dir", "{D}", "--to-blob-service-addr", MEM], (MEM, EMB, EMB)),
        ([f"--to-{s}-service-addr={MEM}" for s in ("blob", "directory", "path-info")], (MEM, MEM, MEM)),
        (["--to-store-dir", "{D}", "--to-path-info-service-addr", "bogus://x"], "unknown scheme 'bogus'"),
    ],
)
def test_copy_target_flags(flags: list[str], expected: object, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is always created, and never read from the environment."""
    for name in ENV[:3]:
        monkeypatch.setenv(name, MEM)
    argv = ["copy", "--all", *(f.format(D=tmp_path) for f in flags)]
    args = admin_cli.build_parser(argv).parse_args(argv)
    if isinstance(expected, str):
        with pytest.raises(InvalidArgument) as info:
            storeflags.COPY_TARGET.urls(args, create=True)
        assert expected in str(info.value)
    else:
        assert isinstance(expected, tuple)
        got = storeflags.COPY_TARGET.urls(args, create=True)
        assert got == StoreUrls(*(_expected(spec, tmp_path, True) for spec in expected))


# -- the blob cache (tvixmount only) ------------------------------------------------------


def _mount_args(*flags: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = mount_cli.build_parser()
    return parser, parser.parse_args(["/mnt", *flags])


def test_cache_flags_travel_in_the_store_urls(tmp_path: Path) -> None:
    remote = ALL_MEM
    parser, args = _mount_args(*remote, "--cache-dir", "rel/c")
    assert storeflags.MOUNT.urls_or_exit(parser, args).blob_cache == \
        BlobCacheConfig(Path(os.path.abspath("rel/c")), 10 << 30)
    parser, args = _mount_args(*remote, "--cache-dir", "/c", "--cache-size", "5M")
    assert storeflags.MOUNT.urls_or_exit(parser, args).blob_cache == BlobCacheConfig(Path("/c"), 5 << 20)
    parser, args = _mount_args(*remote)
    assert storeflags.MOUNT.urls_or_exit(parser, args).blob_cache is None
    assert "--cache-size" in parser.format_help() and "local://" in parser.format_help()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-size", "5M"], "--cache-size needs --cache-dir"),
        (["--store-dir", "/s", "--cache-dir", "/c"], "drop --cache-dir"),
        (["--cache-dir", "/c", "--cache-size", "lots"], "argument --cache-size: not a size: 'lots'"),
        (["--cache-dir", "/c", "--cache-size", "0"], "argument --cache-size: size '0' must be more than 0"),
    ],
)
def test_cache_flag_problems_are_usage_errors(flags: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser, args = _mount_args(*flags)
        storeflags.MOUNT.urls_or_exit(parser, args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- the commands' own entry points -------------------------------------------------------


def test_tvixmount_refuses_partial_addresses_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        mount_cli.main([str(tmp_path / "nowhere"), "--blob-service-addr", MEM])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"tvixmount: error: {REFUSED}"


def test_daemon_reports_a_bad_url_as_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        daemon.main(["--blob-service-addr", "bogus://x"])
    assert info.value.code == 2
    assert "python -m tvixmount.server: error: store URL 'bogus://x'" in capsys.readouterr().err


def test_tvixstore_reports_a_bad_url_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--store-dir", str(tmp_path), "list", "--path-info-service-addr", "bogus://x"]
    assert admin_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tvixstore: error: store URL 'bogus://x'")


# -- sizes ------------------------------------------------------------------------------


def test_sizes() -> None:
    assert [parse_size(t) for t in ("123", "512K", "64m", "10G", "1T", "10GiB", "2gb", " 3 M ")] == [
        123, 512 << 10, 64 << 20, 10 << 30, 1 << 40, 10 << 30, 2 << 30, 3 << 20]
    for bad in ("", "G", "1.5G", "-1", "0", "10X", "ten", "1e3"):
        with pytest.raises(InvalidArgument):
            parse_size(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: 'lots'"):
        size_argument("lots")
    for size in (1, 1000, 1 << 10, 3 << 20, 10 << 30, 1 << 40, (1 << 30) + 1):
        text = format_size(size)
        assert text.endswith(" bytes") or parse_size(text) == size
    assert format_size(10 << 30) == "10G" and format_size(1536) == "1536 bytes"
