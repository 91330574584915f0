"""``tvixstore daemon``: serve a store over gRPC until SIGTERM/SIGINT.

``tvixstore daemon`` adds these flags to its subcommand with
``add_arguments(parser)`` and calls ``run(args, store_from(args))``; the
store flags are tvixstore's, read by the daemon's rule (storeflags.DAEMON:
a service not given is the embedded store, as tvix-store's daemon defaults
to local stores). ``python -m tvixmount.server`` runs the same daemon
standalone (``main``), with the same store flags on its own parser.

Lifecycle: log which address each service uses, open the store, bind, log
one INFO line saying where (and
whether that is loopback only), then log a summary of the calls served
every ``--stats-interval`` seconds when there were any. The first
SIGTERM/SIGINT stops accepting calls, lets calls in flight finish for
``--grace`` seconds, closes the store and returns 0; a second signal
during the grace period ends the process at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from .. import flags, logsetup
from ..castore.directory import SizeConvention
from ..errors import InvalidArgument, TvixError
from ..store import StoreUrls, describe
from ..storeflags import DAEMON, Choice, log_choice, missing_embedded
from . import DEFAULT_LISTEN_TEXT, DEFAULT_WORKERS, StoreServer, serve
from .batch import BLOB_BATCH_SERVICE
from .listen import SYNTAX, check_syntax, listen_addresses
from .metrics import RpcMetrics, serve_metrics
from .metrics import add_arguments as add_metrics_arguments
from .servicers import SERVICES
from .systemd import DaemonLink

log = logging.getLogger("tvixmount.server")

GRACE = 5.0
STATS_INTERVAL = 60.0
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_POLL = 0.5

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's own flags (the store flags come from the caller)."""
    parser.add_argument("-l", "--listen-address", default=None, metavar="ADDR", type=_listen_argument,
                        help=f"{SYNTAX} (tvix-store's syntax; sd-listen: the socket systemd passes, "
                             f"relayed to the daemon's own). Default {DEFAULT_LISTEN_TEXT}: loopback only, "
                             "where tvix-store's clients look; the store is served unauthenticated, so "
                             "bind elsewhere only on a trusted network")
    parser.add_argument("--read-only", action="store_true",
                        help="refuse every upload (Put answers PERMISSION_DENIED)")
    parser.add_argument("--added-latency", type=flags.seconds, default=0.0, metavar="SECONDS",
                        help="testing: sleep this long at the start of every call, like a network hop")
    parser.add_argument("--max-workers", type=flags.positive, default=DEFAULT_WORKERS, metavar="N",
                        help="threads serving calls; each streaming read holds one "
                             f"(default {DEFAULT_WORKERS})")
    parser.add_argument("--check-dir-sizes", choices=[c.value for c in SizeConvention], default=None,
                        help="make directory uploads check DirectoryNode.size in this convention "
                             "(default: sizes are not checked)")
    parser.add_argument("--grace", type=flags.seconds, default=GRACE, metavar="SECONDS",
                        help=f"on SIGTERM/SIGINT, let calls in flight finish this long (default {GRACE:g})")
    # Hidden, for tests and A/B runs: serve only tvix's services, as a tvix-store does.
    parser.add_argument("--no-blob-batch", dest="blob_batch", action="store_false", help=argparse.SUPPRESS)
    add_metrics_arguments(parser)
    parser.add_argument("--stats-interval", type=flags.seconds, default=STATS_INTERVAL, metavar="SECONDS",
                        help="log a summary of calls served this often "
                             f"(default {STATS_INTERVAL:g}; 0: never)")


def _listen_argument(text: str) -> str:
    try:
        return check_syntax(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def store_from(args: argparse.Namespace) -> Choice:
    """The store to serve; a writable daemon makes its embedded store, as tvix-store does."""
    return DAEMON.choice(args, create=not args.read_only)


def run(args: argparse.Namespace, store: Choice) -> int:
    """Serve until a stop signal; 0 after a clean stop. Store and address errors raise TvixError."""
    addresses = listen_addresses(args.listen_address)  # sd-listen's sockets: a usage error before any line
    # A read-only daemon cannot make its embedded store: one that is not there is a usage error.
    missing = args.read_only and missing_embedded(store, flags.origin(args, "store_dir") or "--store-dir")
    if missing:
        raise InvalidArgument(missing)
    log_choice(log, store)
    store_urls = store.urls
    convention = SizeConvention(args.check_dir_sizes) if args.check_dir_sizes else None
    stop = threading.Event()
    got: list[int] = []
    restore = _install_signals(stop, got)
    metrics = RpcMetrics((*SERVICES, BLOB_BATCH_SERVICE)) if args.metrics_listen is not None else None
    try:
        # grpc's threads are made with SIGTERM/SIGINT blocked, so the kernel
        # delivers those to the main thread, whose wait they interrupt.
        with _signals_blocked():
            server = serve(store_urls, addresses, read_only=args.read_only,
                           added_latency=args.added_latency, max_workers=args.max_workers,
                           check_dir_sizes=convention, interceptors=[metrics] if metrics else (),
                           blob_batch=args.blob_batch)
        try:
            if metrics is not None:
                serve_metrics(metrics, args.metrics_listen)
            _announce(server, args, store_urls)
            systemd = DaemonLink(server.shown(), server.stats.total)
            systemd.ready()
            _serve_until(stop, server, args.stats_interval, systemd.tick)
            systemd.stopping()
            log.info("got %s; letting calls in flight finish for up to %g s",
                     signal.Signals(got[0]).name if got else "a stop request", args.grace)
            server.stop(args.grace).wait()
        finally:
            server.stop(0).wait()  # no-op after a clean stop; closes everything on an exception
    finally:
        if metrics is not None:
            metrics.close()
        restore()
    log.info("stopped; served %s", server.stats.total())
    return EXIT_OK


def _announce(server: StoreServer, args: argparse.Namespace, store_urls: StoreUrls) -> None:
    mode = "read-only" if args.read_only else "read-write"
    clients = " or ".join(server.urls())
    if server.is_loopback():
        log.info("serving %s (%s) on %s (loopback only); clients use %s",
                 describe(store_urls), mode, server.shown(), clients)
    else:
        log.info("serving %s (%s) on %s; clients use %s", describe(store_urls), mode, server.shown(),
                 clients)
        log.warning("listening on %s, which is not loopback: the store is served UNAUTHENTICATED to "
                    "anyone who can reach it", server.shown())
    if args.added_latency:
        log.info("adding %.3f s of latency to every call", args.added_latency)


def _serve_until(stop: threading.Event, server: StoreServer, stats_interval: float,
                 tick: Callable[[], None] = lambda: None) -> None:
    """Wait for ``stop``, logging a summary every ``stats_interval`` seconds (0: never).

    ``tick`` runs on every wake-up (systemd's watchdog and status, server/systemd.py).
    """
    next_stats = time.monotonic() + stats_interval
    # Also wake up now and then in case a signal landed on a thread we did
    # not create: Python runs handlers only when the main thread runs.
    while not stop.wait(_POLL):
        tick()
        if stats_interval and time.monotonic() >= next_stats:
            next_stats += stats_interval
            summary = server.stats.take()
            if summary:
                log.info("last %g s: %s", stats_interval, summary)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread (and so in threads started meanwhile)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _install_signals(stop: threading.Event, got: list[int]) -> Callable[[], None]:
    """First SIGTERM/SIGINT sets ``stop``; a second one during the grace period exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # embedded in a test or another program: the caller stops us
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            os._exit(EXIT_ERROR)
        got.append(signum)
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# -- standalone ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(
        prog="python -m tvixmount.server",
        description="Serve a tvixmount store (embedded by default) over tvix's gRPC protocol.",
    )
    DAEMON.add_to(parser)
    parser.add_argument("--log-level", type=logsetup.level_name, default=None, metavar="LEVEL",
                        help="trace, debug, info, warn or error (default: RUST_LOG's level, else info)")
    add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Choice]:
    """The standalone command line and the store it names; a usage error exits 2 (parser.error)."""
    parser = build_parser()
    args = flags.parse(parser, argv)
    try:
        return args, store_from(args)
    except InvalidArgument as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args, store = parse_args(argv)
    logging.basicConfig(level=logsetup.choose_level(args.log_level), handlers=[logsetup.stream_handler()])
    try:
        return run(args, store)
    except TvixError as exc:
        log.error("%s", exc)
        return EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
