"""Where the daemon listens: tvix-store's ``--listen-address`` syntax, read once.

tvix-store parses its listen address with tokio-listener; the same texts
mean the same here:

* ``HOST:PORT``, ``[V6]:PORT``: a TCP socket (a host name is bound as grpc
  resolves it);
* a path starting with ``/`` or ``.`` (and, ours, ``unix:///PATH``): a unix
  socket;
* ``@NAME``: a Linux abstract unix socket;
* ``sd-listen`` (also ``sd_listen``, ``sd-listen-unix``, any case): the
  first socket systemd passed (``LISTEN_FDS``, fd 3); ``sd-listen:NAME`` the
  one ``LISTEN_FDNAMES`` names so; ``sd-listen:*`` every one.

With no address the daemon listens where tvix-store's clients look by
default, ``[::1]:8000``, and on ``127.0.0.1:8000`` too: loopback of both
families, never every interface unless told. A family this host does not
have (no IPv6 in a container) is left out with one log line; the other
suffices (``usable``).

An inherited socket cannot be handed to grpc python (it binds its own
sockets only), so the daemon relays it (relay.py). Everything about the
environment is checked here, before anything binds: a missing or stale
``LISTEN_FDS`` is a usage error.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_LISTEN_TEXT = f"[::1]:{DEFAULT_PORT} and 127.0.0.1:{DEFAULT_PORT}"
SD_LISTEN_FDS_START = 3  # systemd's first passed descriptor
_SD_LISTEN = ("sd-listen", "sd_listen", "sd-listen-unix", "sd_listen_unix")
_SD_NAMED = ("sd-listen:", "sd_listen:")
SYNTAX = ("HOST:PORT, [V6]:PORT, a unix socket path (/... or ./...; unix:///PATH), @ABSTRACT, "
          "sd-listen, sd-listen:NAME or sd-listen:*")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One place to listen: TCP host and port, a unix socket (path or abstract), or an inherited fd."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None
    abstract: str | None = None  # a Linux abstract socket name, without the leading @
    fd: int | None = None  # a listening socket systemd passed (sd-listen)
    optional: bool = False  # the default's: left out with a log line when its family is missing

    @property
    def target(self) -> str:
        """The address as grpc binds it (an inherited fd has none: it is relayed)."""
        if self.unix_path is not None:
            return "unix:" + self.unix_path
        if self.abstract is not None:
            return "unix-abstract:" + self.abstract
        if self.fd is not None:
            return f"fd:{self.fd}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def is_loopback(self) -> bool:
        """True when nothing beyond this host can connect (a unix socket or a loopback host)."""
        if self.fd is not None:
            return inherited_address(self.fd).is_loopback()
        if self.unix_path is not None or self.abstract is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: may resolve to anything
            return False

    def url(self, port: int | None = None) -> str:
        """The store URL a client opens to reach this address."""
        if self.fd is not None:
            return inherited_address(self.fd).url()
        if self.unix_path is not None:
            return "grpc+unix://" + self.unix_path
        if self.abstract is not None:  # no store URL names one: this is grpc's own target
            return "unix-abstract:" + self.abstract
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"grpc+http://{host}:{self.port if port is None else port}"

    def shown(self, port: int | None = None) -> str:
        """The address for log lines, with the real port once bound."""
        if self.fd is not None:
            return f"systemd's socket (fd {self.fd}, {inherited_address(self.fd).shown()})"
        if self.unix_path is not None:
            return f"unix socket {self.unix_path}"
        if self.abstract is not None:
            return f"abstract unix socket @{self.abstract}"
        return ListenAddress(self.host, self.port if port is None else port).target


def default_addresses(port: int = DEFAULT_PORT) -> tuple[ListenAddress, ...]:
    """Loopback of both families, each optional (the daemon's default)."""
    return (ListenAddress("::1", port, optional=True), ListenAddress("127.0.0.1", port, optional=True))


def check_syntax(text: str) -> str:
    """``text`` when it is a listen address (argparse type; sd-listen is resolved later)."""
    if not _is_sd_listen(text):
        parse_listen(text)
    return text


def listen_addresses(text: str | None, environ: Mapping[str, str] | None = None) -> tuple[ListenAddress, ...]:
    """The addresses ``--listen-address`` names (None: the default); InvalidArgument when it cannot be.

    sd-listen reads ``environ``; when that is the process's own environment
    (None), the ``LISTEN_*`` variables are removed once read, as
    sd_listen_fds(3) does, so nothing started later takes the sockets for its own.
    """
    if text is None:
        return default_addresses()
    if _is_sd_listen(text):
        addresses = _systemd_sockets(text, os.environ if environ is None else environ)
        if environ is None:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
        return addresses
    return (parse_listen(text),)


def parse_listen(text: str) -> ListenAddress:
    """One listen address (not sd-listen); InvalidArgument naming the problem."""
    if not text:
        raise InvalidArgument(f"listen address is empty; use {SYNTAX}")
    if text.lower() in ("inetd", "stdio", "-"):
        raise InvalidArgument(f"listen address {text!r}: tvix-store's inetd mode (one connection on stdin/"
                              "stdout) is not supported; use sd-listen with a systemd socket unit")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise InvalidArgument(f"listen address {text!r}: a unix socket needs an absolute path (unix:///a/b)")
        return ListenAddress(unix_path=path)
    if text.startswith(("/", ".")):
        return ListenAddress(unix_path=os.path.abspath(text))
    if text.startswith("@"):
        if len(text) == 1:
            raise InvalidArgument(f"listen address {text!r}: an abstract socket needs a name (@name)")
        return ListenAddress(abstract=text[1:])
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise InvalidArgument(f"listen address {text!r}: write IPv6 as [addr]:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise InvalidArgument(f"listen address {text!r}: expected {SYNTAX}")
        if ":" in host:
            raise InvalidArgument(f"listen address {text!r}: write IPv6 addresses in brackets, [addr]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidArgument(f"listen address {text!r}: port {port_text!r} is not a number in 0..65535")
    return ListenAddress(host=host, port=int(port_text))


def usable(addresses: tuple[ListenAddress, ...]) -> tuple[ListenAddress, ...]:
    """``addresses`` without the optional ones whose family this host lacks (one INFO line each)."""
    kept = []
    for address in addresses:
        missing = address.optional and _family_missing(address.host)
        if missing:
            log.info("not listening on %s: this host has no %s; the other loopback address suffices",
                     address.shown(), missing)
        else:
            kept.append(address)
    return tuple(kept)


def _family_missing(host: str) -> str | None:
    """Why ``host`` (an IP literal) cannot be bound here, when its family is absent; else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return f"{'IPv6' if family == socket.AF_INET6 else 'IPv4'} ({exc.strerror})"
        return None  # another problem: binding will say what
    return None


# -- systemd socket activation ---------------------------------------------------------------


def _is_sd_listen(text: str) -> bool:
    return text.lower() in _SD_LISTEN or text.startswith(_SD_NAMED)


def _systemd_sockets(text: str, environ: Mapping[str, str]) -> tuple[ListenAddress, ...]:
    """The sockets ``text`` picks from those systemd passed; InvalidArgument when there are none."""
    fds = passed_fds(environ, text)
    if text.lower() in _SD_LISTEN:
        return (ListenAddress(fd=fds[0]),)
    name = text.split(":", 1)[1]
    if name == "*":
        return tuple(ListenAddress(fd=fd) for fd in fds)
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    chosen = [fd for fd, fd_name in zip(fds, names, strict=False) if fd_name == name]
    if not chosen:
        raise InvalidArgument(f"listen address {text!r}: no socket named {name!r} in LISTEN_FDNAMES "
                              f"({environ.get('LISTEN_FDNAMES', 'not set')})")
    return tuple(ListenAddress(fd=fd) for fd in chosen)


def passed_fds(environ: Mapping[str, str], text: str = "sd-listen") -> list[int]:
    """The listening sockets systemd passed this process (``LISTEN_PID``, ``LISTEN_FDS``)."""
    where = f"listen address {text!r}"
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    if not count:
        raise InvalidArgument(f"{where}: no socket passed (LISTEN_FDS is not set: start the daemon from a "
                              "systemd .socket unit or systemd-socket-activate)")
    if not count.isdigit() or int(count) < 1:
        raise InvalidArgument(f"{where}: LISTEN_FDS={count!r} is not a number of sockets")
    if pid and pid != str(os.getpid()):
        raise InvalidArgument(f"{where}: LISTEN_PID={pid} is not this process ({os.getpid()}): the sockets "
                              "were passed to another one")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise InvalidArgument(f"{where}: LISTEN_FDS={count} but fd {fd} is not open") from None
        if not stat.S_ISSOCK(mode):
            raise InvalidArgument(f"{where}: fd {fd} (LISTEN_FDS={count}) is not a socket")
        if not _listening(fd):
            raise InvalidArgument(f"{where}: fd {fd} is not a listening stream socket (a connection, as "
                                  "Accept=yes passes, is not supported: use Accept=no)")
    return fds


def _listening(fd: int) -> bool:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        return sock.type == socket.SOCK_STREAM and bool(accepting)
    finally:
        sock.close()


def inherited_address(fd: int) -> ListenAddress:
    """What an inherited socket is bound to, as a ListenAddress (for logs and the client URL)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        name = sock.getsockname()
        family = sock.family
    finally:
        sock.close()
    if family == socket.AF_UNIX:
        if isinstance(name, bytes) or name.startswith("\0"):
            text = name.decode(errors="replace") if isinstance(name, bytes) else name
            return ListenAddress(abstract=text.lstrip("\0"))
        return ListenAddress(unix_path=name)
    return ListenAddress(host=name[0], port=name[1])
