"""What every command-line entry point shares: one-line usage errors with exit code 2, no tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

USAGE_ERROR = 2


class CardinalError(Exception):
    """A problem the user can fix (bad flag, missing data, unwritable path); shown as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and usage errors reduced to one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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


def fail(message: str) -> NoReturn:
    """Print once (on the main process of a multi-process launch) and exit with code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Call ``main`` and turn CardinalError into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except CardinalError as error:
        fail(str(error))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(code or 0)
