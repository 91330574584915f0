"""The store flags of tvixmount, tvixstore and the daemon: one table, every command's real parser.

Each row is a command line (and environment) given to every command; the
commands agree except where their rule says otherwise: a service not given
when another is takes tvix-store's default daemon address on the clients
(tvixmount, tvixstore mount, list, import) and the embedded store on the
daemon, and a command that writes creates the embedded store it names
(``?create=1``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tvixmount import cli as mount_cli
from tvixmount import flags, storeflags
from tvixmount.admin import cli as admin_cli
from tvixmount.admin import command
from tvixmount.errors import InvalidArgument
from tvixmount.server import daemon
from tvixmount.store import BlobCacheConfig, StoreUrls, urls
from tvixmount.units import format_size, parse_size, size_argument

ENV = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR", "TVIXMOUNT_STORE_DIR",
       "TVIXMOUNT_CACHE_DIR", "TVIXMOUNT_CACHE_SIZE")
UPSTREAM = "grpc+http://[::1]:8000"
EMB = object()  # the embedded store in the row's store directory
FB = object()  # what the command gives a service not given when another is (its Partial rule)


@dataclass(frozen=True)
class Command:
    label: str
    resolve: Callable[[list[str]], StoreUrls]  # store flags -> StoreUrls, or a usage error
    fallback: object = UPSTREAM  # FB on this command: a URL, or EMB
    creates: bool = False


def _mount(flags_: list[str]) -> StoreUrls:
    parser = mount_cli.build_parser()
    return storeflags.MOUNT.choice_or_exit(parser, flags.parse(parser, ["/mnt", *flags_])).urls


def _tvixstore_mount(flags_: list[str]) -> StoreUrls:
    argv = ["mount", "/mnt", *flags_]
    parser = admin_cli.build_parser(argv, extra=(mount_cli.MountCommand,))
    return storeflags.MOUNT.choice(flags.parse(parser, argv)).urls


def _tvixstore(argv: Callable[[list[str]], list[str]], writable: bool) -> Callable[[list[str]], StoreUrls]:
    def resolve(flags_: list[str]) -> StoreUrls:
        full = argv(flags_)
        return command.store_urls(flags.parse(admin_cli.build_parser(full), full), writable)

    return resolve


def _daemon(*extra: str) -> Callable[[list[str]], StoreUrls]:
    return lambda flags_: daemon.parse_args([*flags_, *extra])[1].urls


COMMANDS = [
    Command("tvixmount", _mount),
    Command("tvixstore mount", _tvixstore_mount),
    Command("tvixstore list", _tvixstore(lambda flags_: [*flags_, "list"], writable=False)),
    Command("tvixstore import", _tvixstore(lambda flags_: ["import", *flags_, "x"], writable=True),
            creates=True),
    Command("daemon --read-only", _daemon("--read-only"), fallback=EMB),
    Command("daemon", _daemon(), fallback=EMB, creates=True),
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
    ("one flag alone", ["--store-dir", "{D}", "--blob-service-addr", MEM], {}, (MEM, FB, FB)),
    ("one env alone", ["--store-dir", "{D}"], {"DIRECTORY_SERVICE_ADDR": MEM}, (FB, MEM, FB)),
    ("two of three", ["--store-dir", "{D}", "--blob-service-addr", SOCK, "--path-info-service-addr", MEM], {},
     (SOCK, FB, MEM)),
    ("grpc+http without a port", [f"--{s}-service-addr=grpc+http://store" for s in ("blob", "directory",
                                                                                     "path-info")], {},
     ("grpc+http://store",) * 3),
    ("local URLs", [f"--{s}-service-addr=local:///srv/other" for s in ("blob", "directory", "path-info")], {},
     ("local:///srv/other",) * 3),
    ("local URL with its own query", [f"--{s}-service-addr=local:///srv/o?create=0"
                                      for s in ("blob", "directory", "path-info")], {},
     ("local:///srv/o?create=0",) * 3),
    ("a bad URL", ["--blob-service-addr", "bogus://x"], {},
     "argument --blob-service-addr: store URL 'bogus://x': unknown scheme 'bogus'"),
    ("a bad URL from env", [], {**ALL_MEM_ENV, "PATH_INFO_SERVICE_ADDR": "grpc+http://"},
     "PATH_INFO_SERVICE_ADDR='grpc+http://' (--path-info-service-addr): store URL 'grpc+http://'"),
    ("a store dir that cannot be a store", ["--store-dir", "/"], {}, "refusing"),
]


def _expected(spec: object, store_dir: Path, cmd: Command) -> str:
    if spec is FB:
        spec = cmd.fallback
    if spec is EMB:
        return urls.local_url(store_dir, create=cmd.creates)
    assert isinstance(spec, str)
    if cmd.creates and spec.startswith("local://") and "?" not in spec:
        return spec + "?create=1"
    return spec


def outcome(cmd: Command, flags_: list[str], capsys: pytest.CaptureFixture[str]) -> StoreUrls | str:
    """The StoreUrls, or the usage error's one line (exit 2 on the commands that exit)."""
    try:
        return cmd.resolve(flags_)
    except InvalidArgument as exc:  # tvixstore: main prints it as one line, exit 2
        return str(exc)
    except SystemExit as exc:
        assert exc.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ": error: " in err, err
        return err.split(": error: ", 1)[1].strip()


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.label for c in COMMANDS])
@pytest.mark.parametrize(("flags_", "env", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_every_command_reads_its_store_flags_by_one_rule(
    cmd: Command, flags_: list[str], env: dict[str, str], expected: object, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    store_dir = tmp_path / "store"
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(D=store_dir))
    got = outcome(cmd, [f.format(D=store_dir) for f in flags_], capsys)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got, got
    else:
        assert isinstance(expected, tuple)
        assert got == StoreUrls(*(_expected(spec, store_dir, cmd) for spec in expected))


def test_a_grpc_http_url_without_a_port_dials_port_80() -> None:
    assert urls.parse("grpc+http://store").host == "store:80"
    assert urls.parse("grpc+http://[::1]").host == "[::1]:80"
    assert urls.parse("grpc+https://store").host == "store:443"
    assert urls.parse("grpc+http://store:8000").host == "store:8000"


def test_the_log_names_each_service_and_where_its_address_came_from(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIRECTORY_SERVICE_ADDR", SOCK)
    parser = mount_cli.build_parser()
    args = flags.parse(parser, ["/mnt", "--blob-service-addr", "grpc+http://u:pw@store:9000"])
    with caplog.at_level(logging.INFO, logger="t"):
        storeflags.log_choice(logging.getLogger("t"), storeflags.MOUNT.choice(args))
    assert [r.getMessage() for r in caplog.records] == [
        "blob service: grpc+http://***@store:9000 (--blob-service-addr)",
        f"directory service: {SOCK} (env DIRECTORY_SERVICE_ADDR)",
        f"path info service: {UPSTREAM} (the default for a service not given)",
    ]


def test_the_partial_rule_is_a_value_a_scheme_may_change() -> None:
    """What #12 needs: a path-info service over nix+https leaves the other two embedded."""
    rule = storeflags.Partial(UPSTREAM, by_scheme=(("nix+https", None),))
    assert rule.fallback_for(["nix+https://cache.nixos.org"]) is None
    assert rule.fallback_for(["grpc+unix:///s"]) == UPSTREAM
    assert storeflags.UPSTREAM.fallback_for(["nix+https://cache.nixos.org"]) is None
    assert storeflags.UPSTREAM.fallback_for(["nix+http://127.0.0.1:1", "grpc+unix:///s"]) is None
    assert storeflags.EMBEDDED.fallback_for([MEM]) is None


def test_a_binary_cache_substitutes_into_the_embedded_store_it_creates(tmp_path: Path) -> None:
    """A nix+http(s) path-info service alone: blobs and directories in --store-dir, made if missing."""
    cache = "nix+http://127.0.0.1:8080/c?trusted-public-keys=k:" + "A" * 43 + "="
    store = _mount(["--store-dir", str(tmp_path / "s"), "--path-info-service-addr", cache])
    local = urls.local_url(tmp_path / "s", create=True)
    assert store == StoreUrls(local, local, cache) and store.substitutes
    given = _mount(["--path-info-service-addr", cache, "--blob-service-addr", MEM,
                    "--directory-service-addr", MEM])
    assert given == StoreUrls(MEM, MEM, cache)
    with pytest.raises(InvalidArgument, match="can only be the path-info service"):
        StoreUrls(cache, MEM, MEM)


def test_store_flags_go_before_or_after_the_tvixstore_command(tmp_path: Path) -> None:
    for argv in (["--store-dir", str(tmp_path), "list"], ["list", "--store-dir", str(tmp_path)]):
        args = flags.parse(admin_cli.build_parser(argv), argv)
        assert command.store_urls(args) == StoreUrls.embedded(tmp_path)
    both = ["--store-dir", "/top", "list", "--store-dir", str(tmp_path)]
    assert command.store_urls(flags.parse(admin_cli.build_parser(both), both)) == StoreUrls.embedded(tmp_path)
    before_mount = ["--store-dir", str(tmp_path), "--log-level", "debug", "mount", "/mnt"]
    args = flags.parse(admin_cli.build_parser(before_mount, extra=(mount_cli.MountCommand,)), before_mount)
    assert storeflags.MOUNT.urls(args) == StoreUrls.embedded(tmp_path) and args.log_level == "debug"


# -- sync's target store ------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags_", "expected"),
    [
        ([], "sync: no target store: give --to-store-dir DIR or the three --to-*-service-addr URLs"),
        (["--to-blob-service-addr", MEM],
         "sync: --to-directory-service-addr, --to-path-info-service-addr not given (and no --to-store-dir to "
         "take it from)"),
        (["--to-store-dir", "{D}"], (EMB, EMB, EMB)),
        (["--to-store-dir", "{D}", "--to-blob-service-addr", MEM], (MEM, EMB, EMB)),
        ([f"--to-{s}-service-addr={MEM}" for s in ("blob", "directory", "path-info")], (MEM, MEM, MEM)),
    ],
)
def test_sync_target_flags(flags_: list[str], expected: object, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The target is always created, and never read from the environment."""
    for name in ENV[:3]:
        monkeypatch.setenv(name, MEM)
    argv = ["sync", "--all", *(f.format(D=tmp_path) for f in flags_)]
    args = flags.parse(admin_cli.build_parser(argv), argv)
    if isinstance(expected, str):
        with pytest.raises(InvalidArgument) as info:
            storeflags.SYNC_TARGET.urls(args, create=True)
        assert expected in str(info.value)
    else:
        assert isinstance(expected, tuple)
        got = storeflags.SYNC_TARGET.urls(args, create=True)
        target = Command("sync target", _mount, fallback=EMB, creates=True)
        assert got == StoreUrls(*(_expected(spec, tmp_path, target) for spec in expected))


# -- the blob cache (tvixmount only) ------------------------------------------------------


def _mount_args(*flags_: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = mount_cli.build_parser()
    return parser, flags.parse(parser, ["/mnt", *flags_])


def test_cache_flags_travel_in_the_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    remote = ALL_MEM
    parser, args = _mount_args(*remote, "--cache-dir", "rel/c")
    assert storeflags.MOUNT.choice_or_exit(parser, args).urls.blob_cache == \
        BlobCacheConfig(Path(os.path.abspath("rel/c")), 10 << 30)
    parser, args = _mount_args(*remote, "--cache-dir", "/c", "--cache-size", "5M")
    assert storeflags.MOUNT.urls(args).blob_cache == BlobCacheConfig(Path("/c"), 5 << 20)
    monkeypatch.setenv("TVIXMOUNT_CACHE_DIR", "/env-c")
    monkeypatch.setenv("TVIXMOUNT_CACHE_SIZE", "1G")
    parser, args = _mount_args(*remote)
    assert storeflags.MOUNT.urls(args).blob_cache == BlobCacheConfig(Path("/env-c"), 1 << 30)
    monkeypatch.delenv("TVIXMOUNT_CACHE_DIR")
    monkeypatch.delenv("TVIXMOUNT_CACHE_SIZE")
    parser, args = _mount_args(*remote)
    assert storeflags.MOUNT.choice_or_exit(parser, args).urls.blob_cache is None
    assert "--cache-size" in parser.format_help() and "local://" in parser.format_help()


@pytest.mark.parametrize(
    ("flags_", "env", "message"),
    [
        (["--cache-size", "5M"], {}, "--cache-size needs --cache-dir"),
        (["--store-dir", "/s", "--cache-dir", "/c"], {}, "drop --cache-dir"),
        (["--cache-dir", "/c", "--cache-size", "lots"], {}, "argument --cache-size: not a size: 'lots'"),
        (["--cache-dir", "/c", "--cache-size", "0"], {},
         "argument --cache-size: size '0' must be more than 0"),
        (["--cache-dir", "/c"], {"TVIXMOUNT_CACHE_SIZE": "lots"},
         "TVIXMOUNT_CACHE_SIZE='lots' (--cache-size): not a size: 'lots'"),
    ],
)
def test_cache_flag_problems_are_usage_errors(flags_: list[str], env: dict[str, str], message: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        parser, args = _mount_args(*flags_)
        storeflags.MOUNT.choice_or_exit(parser, args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tvixmount: error: ") and message in err, err


# -- the commands' own entry points -------------------------------------------------------


def test_daemon_reports_a_bad_url_as_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        daemon.main(["--blob-service-addr", "bogus://x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m tvixmount.server: error: argument --blob-service-addr: store URL 'bogus://x'")


def test_tvixstore_reports_a_bad_url_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--store-dir", str(tmp_path), "list", "--path-info-service-addr", "bogus://x"]
    assert admin_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tvixstore: error: argument --path-info-service-addr: store URL 'bogus://x'")


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
