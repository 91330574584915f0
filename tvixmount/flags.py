"""What every command line here shares: flags that fall back to an environment
variable, the value types they are checked with, and usage errors as one line.

tvix-store reads many of its flags from an environment variable of the same
name (``--threads`` from ``THREADS``), and a systemd unit or a container sets
those rather than editing a command line. ``add`` declares such a flag once:
its help says which variable, and ``parse`` (argparse, then ``resolve``) fills
in, for each flag not on the command line, the variable's value checked by the
flag's own type, else the default. A bad value is a usage error naming the
variable and the flag (``THREADS='abc' (--threads): 'abc' is not a number``),
exit 2, before anything starts; an empty variable counts as unset.

An absent flag leaves no attribute until ``resolve`` runs (argparse.SUPPRESS),
so the same flag may sit on a parser and on its subcommand and the value given
on either wins (``tvixstore --log-level debug mount ...``). ``origin`` says where
a value came from, for log lines such as which address each service uses.

The type functions raise ArgumentTypeError with a message that reads well after
``argument --flag:``; argparse and ``resolve`` both report it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

ArgumentContainer = argparse._ActionsContainer  # a parser or an argument group
EXIT_USAGE = 2
_ORIGINS = "_flag_origins"  # namespace attribute: dest -> where its value came from


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``PROG: error: MESSAGE``, exit 2.

    A subcommand's parser (prog ``tvixstore mount``) reports as its program
    when ``program`` is set (``tvixstore: error:``). The usage synopsis is
    left out: tvixmount's is a dozen lines that would bury the one that
    matters in a journal.
    """

    program: str | None = None

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.program or self.prog}: error: {message}\n")


@dataclass(frozen=True, slots=True)
class EnvFallback:
    """Where an absent flag's value comes from: an environment variable, else a default."""

    env: str | None  # None: the flag has no variable, only the default
    convert: Callable[[str], Any]  # the flag's own type, applied to the variable's text
    default: Any


def add(container: ArgumentContainer, *names: str, env: str | None, help: str,
        type: Callable[[str], Any] = str, default: Any = None, **kwargs: Any) -> argparse.Action:
    """Add a flag whose absent value comes from ``env`` (when set and not empty), else ``default``.

    ``help`` gets `` [env NAME]`` appended. ``type`` checks the flag and the
    variable alike. For ``action="store_true"`` the variable is read as a
    boolean (``boolean``) and ``type`` is not used.
    """
    flag_action = kwargs.get("action")
    if flag_action == "store_true":
        convert: Callable[[str], Any] = boolean
        default = bool(default)
    else:
        kwargs["type"] = type
        convert = type
    text = f"{help} [env {env}]" if env else help
    action = container.add_argument(*names, default=argparse.SUPPRESS, help=text, **kwargs)
    action.env_fallback = EnvFallback(env, convert, default)  # type: ignore[attr-defined]
    return action


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with every absent flag resolved (see ``resolve``)."""
    args = parser.parse_args(argv)
    resolve(parser, args)
    return args


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Give each flag ``add`` declared and the command line left out its variable's value or default.

    The subcommand chosen, if any, first: where it and its parent declare the
    same flag, its declaration (type, variable, default) is the one that
    counts. A bad variable is ``parser.error`` of the parser declaring it.
    """
    origins: dict[str, str] = vars(args).setdefault(_ORIGINS, {})
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if isinstance(chosen, argparse.ArgumentParser):
                resolve(chosen, args)
    for action in parser._actions:
        fallback: EnvFallback | None = getattr(action, "env_fallback", None)
        if fallback is None or action.dest in origins:
            continue
        if getattr(args, action.dest, None) is not None:
            origins[action.dest] = _flag_name(action)
            continue
        text = os.environ.get(fallback.env, "") if fallback.env else ""
        if text:
            setattr(args, action.dest, _from_env(parser, action, fallback, text))
            origins[action.dest] = f"env {fallback.env}"
        else:
            setattr(args, action.dest, fallback.default)
            origins[action.dest] = ""  # the default: origin() says None


def origin(args: argparse.Namespace, dest: str) -> str | None:
    """``--flag`` or ``env NAME`` for a value given by the user; None for a default."""
    origins: dict[str, str] = getattr(args, _ORIGINS, {})
    return origins.get(dest) or None


def _flag_name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len, default=action.dest)


def _from_env(parser: argparse.ArgumentParser, action: argparse.Action, fallback: EnvFallback,
              text: str) -> Any:
    where = f"{fallback.env}={text!r} ({_flag_name(action)})"
    try:
        value = fallback.convert(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(f"{where}: {exc}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{where}: not one of {choices}")
    return value


# -- value types ------------------------------------------------------------------------


def natural(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def seconds(text: str) -> float:
    """A finite duration in seconds, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds, not negative")
    return value


def positive_seconds(text: str) -> float:
    """A finite duration in seconds, > 0."""
    try:
        value = seconds(text)
    except argparse.ArgumentTypeError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds greater than 0")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def boolean(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off, any case (tvix-store's own parser takes true and false)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def error_line(prog: str, message: str) -> NoReturn:
    """Exit 2 with the one usage line, for problems found outside a parser."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
