"""The store flags of every command, and the one rule that turns them into StoreUrls.

``tvixmount`` (and ``tvixstore mount``), ``tvixstore``'s other commands (and
``sync``'s target store) and the daemon name their store the way tvix-store
does: one URL per service (``--blob-service-addr``,
``--directory-service-addr``, ``--path-info-service-addr``, each also read
from its upstream environment variable), plus ``--store-dir`` for the
embedded store. A ``StoreFlags`` adds those flags to a parser and reads them
back, so every command spells, checks and reports them alike:

* no service address: the embedded store in ``--store-dir`` (default:
  store/location.py);
* all three: those URLs;
* some: the command's ``Partial`` rule gives the others a URL (tvix-store's
  own default, ``grpc+http://[::1]:8000``, for the commands that are clients
  of a daemon) or the embedded store (the daemon, ``sync``'s target);
* every URL is checked when the flag is parsed (flags.py), so a typo is a
  usage error naming the flag or variable, before anything is opened; a
  command that writes may create an embedded store it is pointed at
  (``local://...?create=1``).

``choice`` also says where each service's URL came from (flag, variable,
the rule's default, the embedded store), for the one log line per service a
command writes at start (``log_choice``).

Problems found after parsing are InvalidArgument: ``choice_or_exit`` turns
them into ``parser.error`` (exit 2); tvixstore reports them as its one-line
usage errors (exit 2 as well).

The blob cache flags (``--cache-dir``, ``--cache-size``) live here too, and
travel inside the StoreUrls to the processes that open the store.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import flags
from .errors import InvalidArgument
from .flags import ArgumentContainer
from .store import BlobCacheConfig, StoreUrls, urls
from .store.cache.config import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from .store.location import ENV_VAR as STORE_DIR_ENV
from .store.location import default_store_dir
from .units import format_size, size_argument

# Where tvix-store's clients (mount, import, copy) look for a daemon when not told.
UPSTREAM_DEFAULT = "grpc+http://[::1]:8000"


@dataclass(frozen=True, slots=True)
class Service:
    """One of the three services: how its flag and env variable are spelled."""

    flag_name: str  # "path-info" in --path-info-service-addr
    env: str  # the variable tvix-store reads it from
    label: str  # "path info", in log lines


SERVICES = (
    Service("blob", "BLOB_SERVICE_ADDR", "blob"),
    Service("directory", "DIRECTORY_SERVICE_ADDR", "directory"),
    Service("path-info", "PATH_INFO_SERVICE_ADDR", "path info"),
)


@dataclass(frozen=True, slots=True)
class Partial:
    """What a service without an address gets when another service has one.

    ``fallback`` is a URL, or None for the embedded store in ``--store-dir``.
    ``by_scheme`` overrides it when a given URL has one of its schemes, so a
    rule like "a path-info service over nix+https, the other two embedded
    unless given" is one more row, not another branch.
    """

    fallback: str | None
    by_scheme: tuple[tuple[str, str | None], ...] = ()

    def fallback_for(self, given: Sequence[str]) -> str | None:
        schemes = {url.partition("://")[0].lower() for url in given}
        for scheme, fallback in self.by_scheme:
            if scheme in schemes:
                return fallback
        return self.fallback


# A binary cache substitutes into a store: the services not given are the embedded one.
_CACHE_RULE = tuple((scheme, None) for scheme in urls.NIX_SCHEMES)
UPSTREAM = Partial(UPSTREAM_DEFAULT, by_scheme=_CACHE_RULE)  # as tvix-store's mount, import and copy
EMBEDDED = Partial(None)  # as tvix-store's daemon, whose defaults are local stores


@dataclass(frozen=True, slots=True)
class Choice:
    """The store the flags name, and where each service's URL came from (for the log)."""

    urls: StoreUrls
    origins: tuple[str, str, str]  # per service: "--blob-service-addr", "env X", "default ..."

    def lines(self) -> list[str]:
        chosen = (self.urls.blob, self.urls.directory, self.urls.path_info)
        return [f"{service.label} service: {urls.redact(url)} ({origin})"
                for service, url, origin in zip(SERVICES, chosen, self.origins, strict=True)]


@dataclass(frozen=True, slots=True)
class StoreFlags:
    """One command line's set of store flags and its rule for reading them."""

    partial: Partial
    prefix: str = ""  # "to-" for --to-store-dir and --to-*-service-addr
    env: bool = True  # an absent flag is read from its environment variable
    default_dir: bool = True  # without --store-dir, the default embedded store; else none
    cache: bool = False  # the blob cache flags go with these (add_cache_flags)
    command: str = ""  # prefix of error messages ("sync: ")
    role: str = ""  # what the store is, in error messages ("target ")
    target: bool = False  # help texts for a target store (sync)

    @property
    def dir_flag(self) -> str:
        return f"--{self.prefix}store-dir"

    def addr_flag(self, service: Service) -> str:
        return f"--{self.prefix}{service.flag_name}-service-addr"

    @staticmethod
    def _dest(flag: str) -> str:
        return flag.lstrip("-").replace("-", "_")

    def add_to(self, container: ArgumentContainer) -> None:
        """Add ``--store-dir`` and the three address flags (each absent one read from its variable).

        Absent flags leave no attribute until flags.resolve, so the same
        flags may sit on a parser and its subcommands and the value given on
        either wins (tvixstore accepts them before and after the command).
        """
        if self.target:
            dir_help = "target embedded store directory (created if needed)"
        else:
            dir_help = f"embedded store directory (default {default_store_dir()})"
        flags.add(container, self.dir_flag, env=STORE_DIR_ENV if self.env else None, type=Path,
                  metavar="DIR", help=dir_help)
        for service in SERVICES:
            flags.add(container, self.addr_flag(service), env=service.env if self.env else None,
                      type=url_argument, metavar="URL", help=self._addr_help(service))

    def _addr_help(self, service: Service) -> str:
        if self.target:
            return f"target {service.flag_name} service URL (default: the --{self.prefix}store-dir store)"
        if self.partial.fallback is None:
            return f"{service.flag_name} service URL (default: the embedded store)"
        return (f"{service.flag_name} service URL (default: the embedded store when no service address "
                f"is given, else {self.partial.fallback})")

    def urls(self, args: argparse.Namespace, create: bool = False) -> StoreUrls:
        """The store the parsed flags name; InvalidArgument naming the flag at fault.

        ``create``: the command writes, so an embedded store it names is
        made when missing.
        """
        return self.choice(args, create).urls

    def choice(self, args: argparse.Namespace, create: bool = False) -> Choice:
        """``urls`` with where each URL came from."""
        given = [self._given(args, service) for service in SERVICES]
        present = [url for url in given if url]
        origins = [flags.origin(args, self._dest(self.addr_flag(s))) or "" for s in SERVICES]
        if len(present) == len(SERVICES):
            chosen = present
        else:
            fallback = self.partial.fallback_for(present) if present else None
            if fallback is None:
                # substituted paths are written into it: a binary cache creates its store too
                writes = create or any(urls.is_cache(url) for url in present)
                url = urls.local_url(self._store_dir(args, given), create=writes)
                why = ("the embedded store, for a service not given" if present
                       else "the embedded store: no service address given")
            else:
                url, why = fallback, "the default for a service not given"
            chosen = [g or url for g in given]
            origins = [o if g else why for g, o in zip(given, origins, strict=True)]
        checked = [_checked(url, create) for url in chosen]
        cache = cache_config(args) if self.cache else None
        store_urls = StoreUrls(*checked, blob_cache=cache)  # refuses a cache for a local:// blob service
        return Choice(store_urls, (origins[0], origins[1], origins[2]))

    def choice_or_exit(self, parser: argparse.ArgumentParser, args: argparse.Namespace,
                       create: bool = False) -> Choice:
        """``choice``, with a problem reported by ``parser.error`` (usage, exit 2)."""
        try:
            return self.choice(args, create)
        except InvalidArgument as exc:
            parser.error(str(exc))

    def _given(self, args: argparse.Namespace, service: Service) -> str | None:
        return getattr(args, self._dest(self.addr_flag(service)), None) or None

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


def url_argument(text: str) -> str:
    """A service URL whose shape is valid (argparse type): a typo is a usage error naming the flag."""
    try:
        urls.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _checked(url: str, create: bool) -> str:
    """``url`` once its shape is valid; a writer may create the embedded store it names."""
    parsed = urls.parse(url)  # the fallbacks and --store-dir's URL are checked here
    if create and parsed.scheme == urls.LOCAL and not parsed.query:
        return url + "?create=1"
    return url


def missing_embedded(choice: Choice, dir_origin: str) -> str | None:
    """The usage message when a service names an embedded store that is not there; else None.

    For a command that only reads (the mount): without this, the workers
    would find out after the mount started. ``dir_origin`` says where
    ``--store-dir`` came from, for the message.
    """
    chosen = (choice.urls.blob, choice.urls.directory, choice.urls.path_info)
    for service, url, origin in zip(SERVICES, chosen, choice.origins, strict=True):
        parsed = urls.parse(url)
        if parsed.scheme != urls.LOCAL or parsed.flag("create") or os.path.isdir(parsed.path):
            continue
        where = dir_origin if origin.startswith("the embedded store") else origin
        return (f"{where}: no embedded store in {parsed.path} (fill it with `tvixstore import` first, "
                f"or give the {service.label} service's address)")
    return None


def log_choice(log: logging.Logger, choice: Choice) -> None:
    """One INFO line per service: its URL and why (flag, variable, default, embedded store)."""
    for line in choice.lines():
        log.info("%s", line)


# The store flags of each command.
MOUNT = StoreFlags(UPSTREAM, cache=True)  # tvixmount and tvixstore mount
ADMIN = StoreFlags(UPSTREAM)  # tvixstore's other commands: clients, like tvix-store import and copy
DAEMON = StoreFlags(EMBEDDED)  # tvixstore daemon: serves a store, never another daemon by default
SYNC_TARGET = StoreFlags(EMBEDDED, prefix="to-", env=False, default_dir=False, command="sync: ",
                         role="target ", target=True)


# -- the blob cache ----------------------------------------------------------------


def add_cache_flags(container: ArgumentContainer) -> None:
    """``--cache-dir`` and ``--cache-size``, read back by ``cache_config`` (and StoreFlags.urls)."""
    flags.add(
        container, "--cache-dir", env="TVIXMOUNT_CACHE_DIR", metavar="DIR",
        help="keep blobs read from a remote (grpc) blob service in DIR, so that they are read "
             "from the network once: shared by the worker processes, kept across remounts, "
             "verified before each use (created if missing; not for a local:// store)")
    flags.add(
        container, "--cache-size", env="TVIXMOUNT_CACHE_SIZE", metavar="SIZE", type=size_argument,
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
    cache_dir = Path(os.path.abspath(args.cache_dir))
    for part in (cache_dir, *cache_dir.parents):
        if part.exists():
            if not part.is_dir():
                origin = flags.origin(args, "cache_dir") or "--cache-dir"
                raise InvalidArgument(f"{origin} {args.cache_dir}: {part} is not a directory")
            break
    return BlobCacheConfig(cache_dir, size)
