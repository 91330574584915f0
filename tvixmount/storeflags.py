"""The store flags of every command, and the one rule that turns them into StoreUrls.

``tvixmount``, ``tvixstore`` (each subcommand, and ``copy``'s target store)
and the daemon name their store the way tvix-store does: ``--store-dir`` for
the embedded store and one URL per service (``--blob-service-addr``,
``--directory-service-addr``, ``--path-info-service-addr``, each also read
from its upstream environment variable). A ``StoreFlags`` adds those flags
to a parser and reads them back, so every command spells, checks and
reports them alike:

* no service address: the embedded store in ``--store-dir`` (default:
  store/location.py);
* all three: those URLs;
* some: the command's ``Partial`` rule says whether the others are the
  embedded store or the flags are refused;
* every URL is checked before anything is opened, so a typo is a usage error
  naming the URL; a command that writes (``create``) may create an embedded
  store it is pointed at (``local://...?create=1``).

Problems are InvalidArgument: ``urls_or_exit`` turns them into
``parser.error`` (exit 2); tvixstore reports them as its one-line usage
errors (exit 2 as well).

The blob cache flags (``--cache-dir``, ``--cache-size``) live here too, and
travel inside the StoreUrls to the processes that open the store.
"""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument
from .store import BlobCacheConfig, StoreUrls, urls
from .store.cache.config import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from .store.location import ENV_VAR as STORE_DIR_ENV
from .store.location import default_store_dir
from .units import format_size, size_argument

ArgumentContainer = argparse._ActionsContainer  # a parser or an argument group


@dataclass(frozen=True, slots=True)
class Service:
    """One of the three services: how its flag and env variable are spelled."""

    flag_name: str  # "path-info" in --path-info-service-addr
    env: str  # the variable tvix-store reads it from


SERVICES = (
    Service("blob", "BLOB_SERVICE_ADDR"),
    Service("directory", "DIRECTORY_SERVICE_ADDR"),
    Service("path-info", "PATH_INFO_SERVICE_ADDR"),
)


class Partial(enum.Enum):
    """What a service without an address gets when another service has one."""

    REFUSED = "refused"  # all three addresses or none (tvixmount)
    EMBEDDED = "embedded"  # the embedded store in --store-dir (tvixstore, the daemon)


@dataclass(frozen=True, slots=True)
class StoreFlags:
    """One command line's set of store flags and its rule for reading them."""

    partial: Partial
    prefix: str = ""  # "to-" for --to-store-dir and --to-*-service-addr
    env: bool = True  # an absent address flag is read from its environment variable
    default_dir: bool = True  # without --store-dir, the default embedded store; else none
    cache: bool = False  # the blob cache flags go with these (add_cache_flags)
    command: str = ""  # prefix of error messages ("copy: ")
    role: str = ""  # what the store is, in error messages ("target ")
    dir_help: str = "embedded store directory (env {env}; default {default})"
    addr_help: str = "{service} service URL (env {env}; default: the embedded store)"

    @property
    def dir_flag(self) -> str:
        return f"--{self.prefix}store-dir"

    def addr_flag(self, service: Service) -> str:
        return f"--{self.prefix}{service.flag_name}-service-addr"

    @staticmethod
    def _dest(flag: str) -> str:
        return flag.lstrip("-").replace("-", "_")

    def add_to(self, container: ArgumentContainer, suppress: bool = False) -> None:
        """Add ``--store-dir`` and the three address flags.

        With ``suppress`` an absent flag leaves no attribute, so the same
        flags may sit on a parser and its subcommands and the value given
        on either wins (tvixstore accepts them before and after the command).
        """
        default = argparse.SUPPRESS if suppress else None
        container.add_argument(
            self.dir_flag, type=Path, default=default, metavar="DIR",
            help=self.dir_help.format(env=STORE_DIR_ENV, default=default_store_dir()))
        for service in SERVICES:
            container.add_argument(
                self.addr_flag(service), metavar="URL", default=default,
                help=self.addr_help.format(service=service.flag_name, env=service.env))

    def urls(self, args: argparse.Namespace, create: bool = False) -> StoreUrls:
        """The store the parsed flags name; InvalidArgument naming the flag or URL at fault.

        ``create``: the command writes, so an embedded store it names is
        made when missing.
        """
        given = [self._given(args, service) for service in SERVICES]
        chosen: list[str]
        if all(given):
            chosen = [url for url in given if url]
        else:
            if any(given) and self.partial is Partial.REFUSED:
                raise InvalidArgument(f"{self.command}give all three --{self.prefix}*-service-addr flags, "
                                      "or none for the embedded store")
            embedded = StoreUrls.embedded(self._store_dir(args, given), create=create)
            fallback = (embedded.blob, embedded.directory, embedded.path_info)
            chosen = [url or default for url, default in zip(given, fallback, strict=True)]
        checked = [_checked(url, create) for url in chosen]
        cache = cache_config(args) if self.cache else None
        return StoreUrls(*checked, blob_cache=cache)  # refuses a cache for a local:// blob service

    def urls_or_exit(self, parser: argparse.ArgumentParser, args: argparse.Namespace,
                     create: bool = False) -> StoreUrls:
        """``urls``, with a problem reported by ``parser.error`` (usage, exit 2)."""
        try:
            return self.urls(args, create)
        except InvalidArgument as exc:
            parser.error(str(exc))

    def _given(self, args: argparse.Namespace, service: Service) -> str | None:
        value = getattr(args, self._dest(self.addr_flag(service)), None)
        if not value and self.env:
            value = os.environ.get(service.env)
        return value or None

    def _store_dir(self, args: argparse.Namespace, given: list[str | None]) -> Path:
        """The embedded store that stands in for the services not given."""
        store_dir = getattr(args, self._dest(self.dir_flag), None)
        if store_dir:
            return Path(store_dir)
        if self.default_dir:
            return default_store_dir()
        if any(given):
            missing = ", ".join(self.addr_flag(s) for s, url in zip(SERVICES, given, strict=True) if not url)
            raise InvalidArgument(
                f"{self.command}{missing} not given (and no {self.dir_flag} to take it from)")
        raise InvalidArgument(f"{self.command}no {self.role}store: give {self.dir_flag} DIR or the three "
                              f"--{self.prefix}*-service-addr URLs")


def _checked(url: str, create: bool) -> str:
    """``url`` once its shape is valid; a writer may create the embedded store it names."""
    parsed = urls.parse(url)  # a bad URL is a usage error, before anything is opened
    if create and parsed.scheme == urls.LOCAL and not parsed.query:
        return url + "?create=1"
    return url


# The store flags of each command.
MOUNT = StoreFlags(Partial.REFUSED, cache=True)
ADMIN = StoreFlags(Partial.EMBEDDED)  # tvixstore's commands and the daemon
COPY_TARGET = StoreFlags(
    Partial.EMBEDDED, prefix="to-", env=False, default_dir=False, command="copy: ", role="target ",
    dir_help="target embedded store directory (created if needed)", addr_help="target {service} service URL",
)


# -- the blob cache ----------------------------------------------------------------


def add_cache_flags(container: ArgumentContainer) -> None:
    """``--cache-dir`` and ``--cache-size``, read back by ``cache_config`` (and StoreFlags.urls)."""
    container.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="keep blobs read from a remote (grpc) blob service in DIR, so that they are read "
             "from the network once: shared by the worker processes, kept across remounts, "
             "verified before each use (created if missing; not for a local:// store)")
    container.add_argument(
        "--cache-size", metavar="SIZE", type=size_argument, default=None,
        help=f"how big the blob cache may grow, in bytes or with a K, M, G or T suffix; least "
             f"recently used blobs are removed beyond it (default {format_size(DEFAULT_CACHE_SIZE)}; "
             f"needs --cache-dir)")


def cache_config(args: argparse.Namespace) -> BlobCacheConfig | None:
    """The cache the parsed flags ask for, or None; InvalidArgument for --cache-size alone."""
    if args.cache_dir is None:
        if args.cache_size is not None:
            raise InvalidArgument("--cache-size needs --cache-dir")
        return None
    size = DEFAULT_CACHE_SIZE if args.cache_size is None else args.cache_size
    return BlobCacheConfig(Path(os.path.abspath(args.cache_dir)), size)
