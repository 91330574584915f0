"""flags.py: a flag falls back to its environment variable, checked by the flag's own type.

Small parsers built here, so each rule is seen alone: which value wins
(command line, variable, default), how a bad variable is reported, how a
boolean variable reads, and that a subcommand's declaration of a flag its
parent also has is the one that counts.
"""

from __future__ import annotations

import argparse

import pytest

from tvixmount import flags


def parser() -> flags.Parser:
    p = flags.Parser(prog="prog")
    flags.add(p, "--threads", env="T_THREADS", type=flags.positive, default=8, help="h")
    flags.add(p, "--other", env="T_OTHER", action="store_true", help="h")
    flags.add(p, "--plain", env=None, default="d", help="h")
    return p


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("T_THREADS", "T_OTHER", "T_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_the_command_line_then_the_variable_then_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    args = flags.parse(parser(), [])
    assert (args.threads, args.other, args.plain) == (8, False, "d")
    assert flags.origin(args, "threads") is None
    monkeypatch.setenv("T_THREADS", "3")
    args = flags.parse(parser(), [])
    assert args.threads == 3 and flags.origin(args, "threads") == "env T_THREADS"
    args = flags.parse(parser(), ["--threads", "5"])
    assert args.threads == 5 and flags.origin(args, "threads") == "--threads"
    monkeypatch.setenv("T_THREADS", "")  # empty: unset
    assert flags.parse(parser(), []).threads == 8


@pytest.mark.parametrize(("text", "value"), [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                             ("0", False), ("false", False), ("no", False), ("off", False)])
def test_a_boolean_variable(text: str, value: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_OTHER", text)
    assert flags.parse(parser(), []).other is value


@pytest.mark.parametrize(
    ("env", "argv", "line"),
    [
        ({"T_THREADS": "abc"}, [], "prog: error: T_THREADS='abc' (--threads): 'abc' is not a number\n"),
        ({"T_THREADS": "0"}, [], "prog: error: T_THREADS='0' (--threads): 0 must be at least 1\n"),
        ({"T_OTHER": "maybe"}, [], "prog: error: T_OTHER='maybe' (--other): 'maybe' is not a boolean "
                                   "(true or false)\n"),
        ({}, ["--threads", "-2"], "prog: error: argument --threads: -2 must not be negative\n"),
        ({}, ["--nope"], "prog: error: unrecognized arguments: --nope\n"),
    ],
)
def test_a_bad_value_is_one_usage_line(env: dict[str, str], argv: list[str], line: str,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        flags.parse(parser(), argv)
    assert info.value.code == 2 and capsys.readouterr().err == line


def test_the_subcommands_declaration_counts_and_a_value_before_it_survives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = flags.Parser(prog="top")
    flags.add(top, "--level", env=None, type=str.lower, help="h")
    sub = top.add_subparsers(dest="command").add_parser("run")
    flags.add(sub, "--level", env="T_LEVEL", type=str.upper, default="INFO", help="h")
    assert flags.parse(top, ["run"]).level == "INFO"  # the subcommand's default, not the parent's None
    monkeypatch.setenv("T_LEVEL", "debug")
    assert flags.parse(top, ["run"]).level == "DEBUG"  # and its variable
    assert flags.parse(top, ["--level", "WARNING", "run"]).level == "warning"  # given before it: kept
    assert flags.parse(top, ["run", "--level", "error"]).level == "ERROR"


@pytest.mark.parametrize(("convert", "good", "bad"), [
    (flags.natural, {"0": 0, "7": 7}, ["-1", "x", "1.5"]),
    (flags.positive, {"1": 1}, ["0", "-3"]),
    (flags.seconds, {"0": 0.0, "2.5": 2.5}, ["-1", "nan", "inf", "soon"]),
    (flags.positive_seconds, {"0.1": 0.1}, ["0", "-5", "nan"]),
])
def test_value_types(convert, good: dict[str, object], bad: list[str]) -> None:
    for text, value in good.items():
        assert convert(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            convert(text)
