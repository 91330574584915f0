"""Log levels by tvix-store's names and RUST_LOG, and journald's line format."""

from __future__ import annotations

import argparse
import io
import logging
import os

import pytest

from tvixmount import logsetup


@pytest.mark.parametrize("text, name", [
    ("trace", "TRACE"), ("TRACE", "TRACE"), ("Debug", "DEBUG"), ("info", "INFO"), ("warn", "WARNING"),
    ("WARN", "WARNING"), ("warning", "WARNING"), ("error", "ERROR"), ("ERROR", "ERROR"),
])
def test_level_names_any_case(text, name):
    assert logsetup.level_name(text) == name
    assert logging.getLevelName(name) <= logging.getLevelName(logsetup.level_name("error"))


def test_trace_is_below_debug_and_an_unknown_level_is_a_usage_error():
    assert logging.getLevelName("TRACE") < logging.DEBUG
    with pytest.raises(argparse.ArgumentTypeError, match="'loud' is not a log level"):
        logsetup.level_name("loud")


@pytest.mark.parametrize("value, level", [
    ("info", "INFO"),
    ("WARN", "WARNING"),
    ("debug,h2=warn,tonic=info", "DEBUG"),
    ("warn,tvix_store=debug", "DEBUG"),
    ("tvix_castore::blobservice=trace,info", "TRACE"),
    ("tvixmount=error,debug", "ERROR"),
    ("hyper=debug", None),
    ("tvix_store", None),
    ("off", "CRITICAL"),
    ("", None),
])
def test_rust_log(value, level):
    assert logsetup.rust_log_level(value) == level


def test_the_flag_wins_over_rust_log():
    assert logsetup.choose_level("error", {"RUST_LOG": "debug"}) == "ERROR"
    assert logsetup.choose_level(None, {"RUST_LOG": "debug"}) == "DEBUG"
    assert logsetup.choose_level(None, {}, default="WARNING") == "WARNING"


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError as e:
            exc_info = (type(e), e, e.__traceback__)
    return logging.LogRecord("tvixmount.x", level, __file__, 1, msg, (), exc_info)


def test_journal_lines_carry_their_priority_and_no_timestamp():
    fmt = logsetup.JournalFormatter()
    line = fmt.format(_record(logging.WARNING, "careful"))
    assert line == f"<4>WARNING tvixmount.x[{os.getpid()}]: careful"
    assert fmt.format(_record(logging.ERROR, "bad")).startswith("<3>ERROR ")
    assert fmt.format(_record(logging.INFO, "fyi")).startswith("<6>INFO ")
    assert fmt.format(_record(logging.DEBUG, "dbg")).startswith("<7>DEBUG ")
    assert fmt.format(_record(logsetup.TRACE, "t")).startswith("<7>TRACE ")
    assert fmt.format(_record(logging.CRITICAL, "c")).startswith("<2>CRITICAL ")
    lines = fmt.format(_record(logging.ERROR, "two\nlines", exc=True)).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert any("ValueError: boom" in line for line in lines)


def test_journal_format_only_when_journal_stream_names_our_stream(tmp_path, monkeypatch):
    path = tmp_path / "err"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert isinstance(logsetup.formatter(stream), logsetup.JournalFormatter)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not isinstance(logsetup.formatter(stream), logsetup.JournalFormatter)
        monkeypatch.delenv("JOURNAL_STREAM")
        plain = logsetup.formatter(stream)
        assert not isinstance(plain, logsetup.JournalFormatter)
        assert plain.format(_record(logging.WARNING, "w"))[:4].isdigit()  # starts with the year
    assert not logsetup.journald_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_mount_flag_and_variable_take_upstream_levels(monkeypatch):
    from tvixmount import cli, flags

    args = flags.parse(cli.build_parser(), ["/mnt", "--log-level", "Warn"])
    assert logsetup.choose_level(args.log_level) == "WARNING"
    monkeypatch.setenv("TVIXMOUNT_LOG_LEVEL", "TRACE")
    monkeypatch.setenv("RUST_LOG", "error")
    args = flags.parse(cli.build_parser(), ["/mnt"])
    assert logsetup.choose_level(args.log_level) == "TRACE"  # the variable is the flag's, before RUST_LOG
    monkeypatch.delenv("TVIXMOUNT_LOG_LEVEL")
    args = flags.parse(cli.build_parser(), ["/mnt"])
    assert args.log_level is None and logsetup.choose_level(args.log_level) == "ERROR"


def test_tvixstore_takes_upstream_levels_before_and_after_the_command():
    from tvixmount.admin import cli as admin_cli
    from tvixmount.flags import parse

    args = parse(admin_cli.build_parser(["list"]), ["--log-level", "WARN", "list"])
    assert args.log_level == "warning"
    args = parse(admin_cli.build_parser(["list"]), ["list", "--log-level", "trace"])
    assert args.log_level == "trace"
    with pytest.raises(SystemExit):
        parse(admin_cli.build_parser(["list"]), ["--log-level", "loud", "list"])
