"""The time estimate a training run prints once its first steps are timed."""

import pytest

from cardinal.eta import FirstStepsClock, estimate_seconds, format_duration, planned_steps


def test_planned_steps_follow_epochs_and_max_steps():
    assert planned_steps(10, 130) == 1300
    assert planned_steps(10, 130, steps_left=200) == 200
    assert planned_steps(0, 130) == 0


def test_estimate_scales_the_timed_intervals_to_the_run():
    assert estimate_seconds(9.0, 9, 1300) == pytest.approx(1300.0)
    assert estimate_seconds(4.5, 9, 10) == pytest.approx(5.0)


@pytest.mark.parametrize("seconds, text", [(0.2, "~1 s"), (45, "~45 s"), (600, "~10 min"),
                                           (32_400, "~9.0 h"), (3 * 86_400, "~3.0 days")])
def test_durations_read_in_the_unit_that_fits(seconds, text):
    assert format_duration(seconds) == text


def test_the_clock_announces_once_at_a_synchronised_step_without_the_first_step():
    ticks = iter([100.0] + [100.0 + 2.0 * i for i in range(1, 40)])  # the first step took 100 s (warm-up)
    lines = []
    clock = FirstStepsClock(1300, 10, lines.append, clock=lambda: next(ticks))
    for step in range(1, 31):
        clock(0.5 if step % 10 == 0 else None)  # the loss is read (synchronised) every 10 steps
    assert len(lines) == 1
    assert lines[0].startswith("estimated time for 10 epochs: ~43 min (1300 steps, timed over the first 10")


def test_a_run_shorter_than_the_timed_steps_says_nothing():
    lines = []
    clock = FirstStepsClock(8, 1, lines.append)
    for _ in range(8):
        clock(0.5)
    assert lines == []
