"""What the mount's and the daemon's /metrics both carry, and the HTTP endpoint serving them.

Each program has a ``CollectorRegistry`` of its own (never prometheus_client's
global one, so two exporters in one test process do not collide), with:

* ``<program>_build_info{version, python} 1``: which release answers, as
  Prometheus conventions have it (``tvixmount_build_info``,
  ``tvixstore_build_info``);
* the standard ``process_*`` families (CPU seconds, resident memory, open
  file descriptors, start time) from prometheus_client's process collector.

``serve_http`` starts prometheus_client's server thread on a parsed
``--metrics-listen`` address and turns a busy port into ListenError.
"""

from __future__ import annotations

import logging
import platform
import threading
from http.server import HTTPServer

from prometheus_client import CollectorRegistry, Info, ProcessCollector, start_http_server

from . import __version__
from .metrics import ListenAddress, ListenError

log = logging.getLogger(__name__)


def registry_for(program: str) -> CollectorRegistry:
    """A new registry holding ``<program>_build_info`` and the process families."""
    registry = CollectorRegistry()
    Info(f"{program}_build", f"the {program} release serving these metrics", registry=registry).info(
        {"version": __version__, "python": platform.python_version()})
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """prometheus_client's HTTP server for ``registry`` in a daemon thread, on ``address``."""

    def __init__(self, address: ListenAddress, registry: CollectorRegistry, what: str) -> None:
        try:
            started = start_http_server(address.port, address.host, registry=registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ListenError(f"--metrics-listen {address}: cannot listen: {reason}") from None
        self._server: HTTPServer = started[0]
        self._thread: threading.Thread = started[1]
        self.address = ListenAddress(address.host, self._server.server_port)
        log.info("%s metrics on http://%s/metrics", what, self.address)

    def close(self) -> None:
        """Stop serving and free the port; bounded (the serve loop polls every 0.5 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
