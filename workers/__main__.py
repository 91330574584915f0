"""Run one worker on stdin/stdout: ``python -m workers [--id N] URL [DIR_URL PATHINFO_URL]``.

For benchmarks and debugging the protocol without a pool: frames are read
from fd 0 and replies written to fd 1; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tvixmount.store import StoreUrls

from .loop import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("--id", type=int, default=0, help="worker id reported by ping")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("urls", nargs="+", metavar="URL",
                        help="one store URL, or three: blob, directory and path-info service URLs")
    args = parser.parse_args(argv)
    if len(args.urls) not in (1, 3):
        parser.error("give one URL or three")
    urls = StoreUrls.single(args.urls[0]) if len(args.urls) == 1 else StoreUrls(*args.urls)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker[%(process)d] %(message)s")
    return serve(args.id, urls, sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
