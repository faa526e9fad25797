"""Named points of the save sequence where a test can kill the process, as a crash or ``kill -9`` would.

``CARDINAL_CRASH_AT=<point>`` (or ``<point>#N`` for the N-th time the point is reached) makes the process
exit at once with code 137, skipping every ``finally`` and cleanup, exactly like SIGKILL. Unset (always, in
normal use) a crash point costs one environment lookup. Tests prove with it that a run killed at any point
resumes to the records of an uninterrupted run.
"""

from __future__ import annotations

import os
from collections import Counter

CRASH_ENV = "CARDINAL_CRASH_AT"
KILLED = 137  # what a shell reports for SIGKILL
_reached: Counter = Counter()


def crash_point(name: str) -> None:
    """Exit now if ``CARDINAL_CRASH_AT`` names this point (and this is the asked-for time it is reached)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("#")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        die()


def die() -> None:
    """The kill itself; tests replace it to stop a run in-process."""
    os._exit(KILLED)
