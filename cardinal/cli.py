"""What every command-line entry point shares: one-line usage errors with exit code 2, no tracebacks."""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from pathlib import PurePath
from typing import TYPE_CHECKING, Callable, NoReturn, Optional, Sequence

if TYPE_CHECKING:
    from rich.console import Console

USAGE_ERROR = 2
MAX_SEED = 2**32 - 1  # numpy and accelerate's set_seed accept 0 .. 2**32 - 1


class CardinalError(Exception):
    """A problem the user can fix (bad flag, missing data, unwritable path); shown as one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows choices and defaults only where they tell the reader something.

    A flag with a metavar (``--precisions PREC``) gets its choices listed in its help, since the metavar
    hides them and a ``{a,b,c}`` list would not fit 80 columns. Defaults are left out for switches
    (``--no-x`` is obviously off by default), ``None`` (the help text says what happens), and where the
    help text already states them. Paths and lists print as typed.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        notes = [note for note in (_hidden_choices(action), _useful_default(action, text)) if note]
        return f"{text} ({'; '.join(notes)})" if notes else text

    def _split_lines(self, text: str, width: int) -> list:
        """Wrapped as argparse does, but never inside a hyphenated flag name (``--grad-`` / ``clip``)."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _hidden_choices(action: argparse.Action) -> str:
    if not action.choices or action.metavar is None:
        return ""
    return "one of: " + ", ".join(_shown(choice) for choice in action.choices)


def _useful_default(action: argparse.Action, text: str) -> str:
    default = action.default
    if ("%(default)" in text or "default" in text.lower() or default is None
            or default is argparse.SUPPRESS or action.nargs == 0
            or isinstance(action, argparse.BooleanOptionalAction)):
        return ""
    return f"default: {_shown(default)}"


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, PurePath):
        return str(value)
    return str(value).replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with useful defaults shown in --help and usage errors reduced to one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def make_console(**kwargs) -> "Console":
    """A rich console; in logs and pipes (no terminal) wide enough that tables are not wrapped."""
    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal:
        console.width = max(console.width, 150)
    return console


def is_main_rank() -> bool:
    """Whether this is the main process of a launch (or the only process), before Accelerate is set up."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> NoReturn:
    """Print once (on the main process of a multi-process launch) and exit with code 2."""
    if is_main_rank():
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_int(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {text}")
    return value


def is_folder_name(text: str) -> bool:
    """One file or folder name, with no way to point outside the folder it is made in."""
    return bool(text) and text not in (".", "..") and PurePath(text).name == text and not {"/", "\\", "\0"} & set(text)


def single_name(text: str) -> str:
    """A run name or file name stem given on the command line ("" keeps the default)."""
    if text and not is_folder_name(text):
        raise argparse.ArgumentTypeError(f"must be a single file or folder name, got {text!r}")
    return text


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Call ``main`` and turn CardinalError into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except CardinalError as error:
        fail(str(error))
    except KeyboardInterrupt as interrupt:  # the command may attach what to do next (e.g. how to resume)
        hint = getattr(interrupt, "hint", "")
        print(f"interrupted; {hint}" if hint else "interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
