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


def test_the_clock_announces_once_after_waiting_for_the_device_without_the_first_step():
    ticks = iter([100.0, 100.0 + 2.0 * 9])  # read after the first step (its warm-up) and at the tenth
    lines, waits = [], []
    clock = FirstStepsClock(1300, 10, lines.append, clock=lambda: next(ticks), wait=lambda: waits.append(1))
    for _ in range(30):
        clock(None)  # the loop reads no loss: the clock waits for the device itself
    assert len(lines) == 1 and len(waits) == 2  # the device is waited for twice in the whole run
    assert lines[0].startswith("estimated time for 10 epochs: ~43 min (1300 steps, timed over the first 10")


def test_a_run_shorter_than_the_timed_steps_says_nothing():
    lines = []
    clock = FirstStepsClock(8, 1, lines.append)
    for _ in range(8):
        clock(0.5)
    assert lines == []
