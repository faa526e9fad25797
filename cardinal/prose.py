"""Sentences printed under a table wrap at the reader's width, not at the table's.

In logs and pipes ``cli.make_console`` lets tables run wide (150 columns) so that they are not folded;
prose printed through the same console would then run wide too. It wraps at the terminal's width, or
``COLUMNS``, or 80 columns.
"""

from __future__ import annotations

import shutil
import textwrap

from rich.console import Console


def prose_width(console: Console) -> int:
    return max(20, min(console.width, shutil.get_terminal_size((80, 24)).columns))


def wrap(text: str, console: Console, first: str = "", rest: str = "") -> str:
    """``text`` folded to the prose width; continuation lines start with ``rest``."""
    return textwrap.fill(text, width=prose_width(console), initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)
