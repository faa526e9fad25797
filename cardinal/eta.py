"""How long a run will take, estimated once its first steps are timed: a long run says so in its first minute.

One line, once, on the main process: ``estimated time for 10 epochs: ~8.9 h``. The first step (warm-up,
allocation, compilation) is left out of the timing, and evaluation is not included.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

TIMED_STEPS = 10  # the estimate is made at the first synchronised step at least this far in


def planned_steps(epochs_left: int, steps_per_epoch: int, steps_left: Optional[int] = None) -> int:
    """Optimizer steps this invocation will take (``steps_left``: what --max-steps still allows)."""
    steps = max(0, epochs_left) * steps_per_epoch
    return steps if steps_left is None else min(steps, max(0, steps_left))


def estimate_seconds(elapsed_s: float, intervals: int, total_steps: int) -> float:
    """Seconds for ``total_steps`` steps at the rate of ``intervals`` step-to-step intervals in ``elapsed_s``."""
    return elapsed_s / max(1, intervals) * total_steps


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"


class FirstStepsClock:
    """A step callback that times the first steps and announces the estimate once.

    ``wait`` blocks until the device has finished the work queued so far (a no-op on the CPU); it is called
    twice per run, after the first step and at the timed one, so on a GPU the estimate times finished work
    and the steps between never wait.
    """

    def __init__(self, total_steps: int, epochs: int, announce: Callable[[str], None],
                 timed_steps: int = TIMED_STEPS, clock: Callable[[], float] = time.perf_counter,
                 wait: Callable[[], None] = lambda: None) -> None:
        self.total_steps, self.epochs, self.announce = total_steps, epochs, announce
        self.timed_steps, self.clock, self.wait = timed_steps, clock, wait
        self.calls = 0
        self.started: Optional[float] = None
        self.done = total_steps <= timed_steps  # a run this short is over before an estimate helps

    def __call__(self, _loss: Optional[float] = None) -> None:
        if self.done:
            return
        self.calls += 1
        if self.started is None:
            self.wait()
            self.started = self.clock()  # after the first step: its warm-up is not timed
            return
        if self.calls < self.timed_steps:
            return
        self.wait()
        self.done = True
        seconds = estimate_seconds(self.clock() - self.started, self.calls - 1, self.total_steps)
        plural = "epoch" if self.epochs == 1 else "epochs"
        self.announce(f"estimated time for {self.epochs} {plural}: {format_duration(seconds)} "
                      f"({self.total_steps} steps, timed over the first {self.calls}; evaluation not included)")
