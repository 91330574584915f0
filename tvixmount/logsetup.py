"""Log levels as tvix-store names them, and log lines as journald wants them.

**Levels.** ``--log-level`` takes tvix-store's names in any case: ``trace``,
``debug``, ``info``, ``warn`` and ``error`` (and Python's ``warning`` and
``critical``). ``trace`` is a level of its own below DEBUG (5), for what
tvix traces; nothing here logs at it yet, so today it shows what debug shows.

Without the flag (and without ``TVIXMOUNT_LOG_LEVEL``), ``RUST_LOG`` is read
as tvix-store's users write it (``rust_log_level``): a comma-separated list
of ``LEVEL`` or ``TARGET=LEVEL`` directives. A directive whose target is one
of ours (``tvixmount``, ``tvixstore``, ``tvix_store``, ``tvix_castore``, or
any target starting with one of them followed by ``::``) wins; else the
bare ``LEVEL`` directive; directives for other targets are ignored (they
name crates we do not have). ``off`` means nothing but CRITICAL.

**Lines.** When ``JOURNAL_STREAM`` names our stderr (systemd sets it to the
``DEVICE:INODE`` of the stream it connected), journald stamps each line
itself and reads a leading ``<N>`` as its syslog priority: each line is then
``<N>LEVEL name[pid]: message`` with no timestamp, and every line of a
multi-line message (a traceback) carries the prefix, since journald makes
one entry per line. Otherwise lines are ``TIME LEVEL name[pid]: message``.
Worker processes log through multiprocessing-logging into the dispatcher's
handlers, so they get the same format.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# tvix-store's names and Python's, lower case -> the logging level name.
LEVELS = {
    "trace": "TRACE", "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
    "error": "ERROR", "critical": "CRITICAL",
}
UPSTREAM_LEVELS = ("trace", "debug", "info", "warn", "error")
OUR_TARGETS = ("tvixmount", "tvixstore", "tvix_store", "tvix_castore", "workers")

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s[%(process)d]: %(message)s"

# syslog priorities (RFC 5424) journald reads from a "<N>" line prefix.
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def level_name(text: str) -> str:
    """``--log-level``'s type: a level in any case, as logging's name (``warn`` -> ``WARNING``)."""
    name = LEVELS.get(text.strip().lower())
    if name is None:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a log level ({', '.join(UPSTREAM_LEVELS)})")
    return name


def rust_log_level(value: str) -> str | None:
    """The level ``RUST_LOG=value`` sets for us (see the module doc), as logging's name; None if none."""
    ours: str | None = None
    default: str | None = None
    for directive in value.split(","):
        directive = directive.strip()
        target, eq, level = directive.rpartition("=")
        name = "CRITICAL" if level.strip().lower() == "off" else LEVELS.get(level.strip().lower())
        if name is None:
            continue  # a target alone ("tvixmount") or a span filter: nothing we can honour
        if not eq:
            default = name
        elif target.strip() in OUR_TARGETS or target.strip().startswith(tuple(t + "::" for t in OUR_TARGETS)):
            ours = name
    return ours or default


def choose_level(flag: str | None, environ: Mapping[str, str] | None = None, default: str = "INFO") -> str:
    """The flag's level (it already includes TVIXMOUNT_LOG_LEVEL), else ``RUST_LOG``'s, else ``default``."""
    if flag:
        return level_name(flag)
    env = os.environ if environ is None else environ
    return rust_log_level(env.get("RUST_LOG", "")) or default


def journald_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal connection ``JOURNAL_STREAM`` names (device:inode)."""
    env = os.environ if environ is None else environ
    device, colon, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not colon:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical .. 7 debug (and trace)."""
    for threshold, value in _PRIORITY:
        if levelno >= threshold:
            return value
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record, no timestamp: journald adds its own."""

    def __init__(self, fmt: str = JOURNAL_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def formatter(stream: TextIO, plain_format: str = PLAIN_FORMAT) -> logging.Formatter:
    """journald's format when ``stream`` goes to the journal, else ``plain_format``."""
    return JournalFormatter() if journald_stream(stream) else logging.Formatter(plain_format)


def stream_handler(stream: TextIO | None = None, plain_format: str = PLAIN_FORMAT) -> logging.StreamHandler:
    """A handler writing to ``stream`` (stderr) in the format ``formatter`` picks for it."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(out, plain_format))
    return handler
