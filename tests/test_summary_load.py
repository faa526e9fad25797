"""The summary's load step: a file whose values fall outside their meaning is skipped with one line saying
which file and why; nothing usable left is one line and exit 2; a FIFO or device is never opened; text
from the files is printed literally (never as rich markup)."""

import math
import os
import signal
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from test_summary import write_run

from cardinal import summary
from cardinal.cli import run
from cardinal.records import CONFIG_NAME, CSV_NAME
from cardinal.summary import load


def _summary(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(summary.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@contextmanager
def deadline(seconds=20):
    """A read that blocks (a FIFO opened for reading) fails the test instead of hanging it."""
    def fail(*_):
        raise TimeoutError("the summary blocked on a file")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _edit(folder, change):
    """Rewrite folder/epochs.csv through ``change(frame) -> frame``."""
    path = folder / CSV_NAME
    frame = change(pd.read_csv(path))
    frame.to_csv(path, index=False)
    return path


def _set(column, epoch_index, value):
    def change(frame):
        frame[column] = frame[column].astype(object)
        frame.loc[epoch_index, column] = value
        return frame
    return change


def _duplicate_epoch(frame):
    return pd.concat([frame, frame.iloc[[1]]], ignore_index=True)


BAD = {
    "accuracy inf": (_set("test_acc", 2, math.inf), "test_acc inf at epoch 3 is not a percentage"),
    "accuracy 250": (_set("test_acc", 2, 250.0), "test_acc 250 at epoch 3 is not a percentage"),
    "accuracy missing": (_set("test_acc", 0, math.nan), "test_acc is missing at epoch 1"),
    "epoch -3": (_set("epoch", 0, -3), "epoch -3 is not a whole number"),
    "epoch 0": (_set("epoch", 0, 0), "epoch 0 is not a whole number"),
    "epoch 1e15": (_set("epoch", 2, 1e15), "epoch 1e+15 is not a whole number"),
    "epoch 1.7": (_set("epoch", 0, 1.7), "epoch 1.7 is not a whole number"),
    "duplicate epoch": (_duplicate_epoch, "epoch 2 appears more than once"),
    "NaN seed": (lambda f: f.assign(seed=math.nan), "seed None is not a whole number"),
    "fractional seed": (lambda f: f.assign(seed=0.5), "seed 0.5 is not a whole number"),
    "zero img/s": (_set("img_per_s", 1, 0.0), "img_per_s 0 at epoch 2 is not a positive finite speed"),
    "negative it/s": (_set("it_per_s", 1, -1.0), "it_per_s -1 at epoch 2 is not a positive finite speed"),
    "inf time": (_set("train_time_s", 1, math.inf), "train_time_s inf at epoch 2 is not a finite number"),
    "two archs": (_set("arch", 2, "resnet50"), "arch changes within the run ('tiny_resnext', 'resnet50')"),
    "two seeds": (_set("seed", 2, 7), "seed changes within the run (2, 7)"),
    "two precisions": (_set("precision", 2, "bf16"), "precision changes within the run"),
    "text accuracy": (_set("test_acc", 0, "abc"), "non-numeric values"),
}


@pytest.fixture
def two_archs(tmp_path):
    """Two seeds of tiny_resnet and two of tiny_resnext, 3 epochs each: a valid summary on its own."""
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "tiny_resnet", seed, [30.0 + seed, 40.0 + seed, 45.0 + seed])
        write_run(tmp_path / f"b{seed}", "tiny_resnext", seed, [31.0 + seed, 42.0 + seed, 47.0 + seed])
    return tmp_path


@pytest.mark.parametrize("case", BAD)
def test_a_value_outside_its_meaning_skips_the_file_and_says_why(two_archs, capsys, case):
    change, reason = BAD[case]
    write_run(two_archs / "bad", "tiny_resnext", 2, [32.0, 43.0, 48.0])
    bad = _edit(two_archs / "bad", change)
    result = summary.summarize([two_archs])
    (skipped,) = result.skipped
    assert skipped.path == bad and reason in skipped.reason
    assert len(result.runs) == 4 and all(r.csv != bad for r in result.runs)
    assert set(result.finals["runs"]) == {2}  # the bad run counted nowhere
    code, out, err = _summary([two_archs, "--all"], capsys)
    assert code == 0 and err.splitlines() == [f"skipped {bad}: {skipped.reason}"]
    assert "nan" not in out.lower() and "250" not in out and "resnet50" not in out


@pytest.mark.parametrize("case", ["accuracy 250", "epoch 1.7", "NaN seed", "zero img/s", "two archs"])
def test_nothing_usable_left_is_one_line_and_exit_2(tmp_path, capsys, case):
    change, reason = BAD[case]
    write_run(tmp_path / "bad", "tiny_resnext", 0, [32.0, 43.0, 48.0])
    bad = _edit(tmp_path / "bad", change)
    code, out, err = _summary([tmp_path], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot use {bad}: ") and reason in err


def test_a_hand_edited_config_with_a_mapping_for_a_knob_is_its_own_setting(two_archs, capsys):
    import json

    write_run(two_archs / "edited", "tiny_resnext", 2, [32.0, 43.0, 48.0])
    config = json.loads((two_archs / "edited" / CONFIG_NAME).read_text())
    config["recipe"]["lr"] = {"peak": 0.1}
    (two_archs / "edited" / CONFIG_NAME).write_text(json.dumps(config))
    code, out, err = _summary([two_archs], capsys)
    assert code == 0 and err == "" and 'lr={"peak": 0.1}' in out


@pytest.mark.parametrize("flag", ["--output", "--plot"])
def test_an_output_over_a_runs_own_records_is_refused(two_archs, capsys, flag):
    records = (two_archs / "a0" / CSV_NAME).read_bytes()
    code, out, err = _summary([two_archs, flag, two_archs / "a0" / CSV_NAME], capsys)
    assert code == 2 and out == "" and "would replace a run's epochs.csv" in err and len(err.splitlines()) == 1
    assert (two_archs / "a0" / CSV_NAME).read_bytes() == records


def test_several_unusable_files_are_named_in_one_line(tmp_path, capsys):
    for name, case in (("x", "epoch 0"), ("y", "NaN seed")):
        write_run(tmp_path / name, "tiny_resnet", 0, [30.0, 40.0])
        _edit(tmp_path / name, BAD[case][0])
    code, _, err = _summary([tmp_path], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "none of the 2 epochs.csv files can be used" in err and "epoch 0" in err and "seed None" in err


def test_a_nan_seed_is_not_a_third_seed(tmp_path):
    for seed, acc in ((0, 60.0), (1, 64.0)):
        write_run(tmp_path / f"s{seed}", "tiny_resnet", seed, [50.0, acc])
    write_run(tmp_path / "nan-seed", "tiny_resnet", 2, [50.0, 62.0])
    _edit(tmp_path / "nan-seed", BAD["NaN seed"][0])
    row = summary.summarize([tmp_path]).finals.iloc[0]
    low, high = scipy_stats.t.interval(0.95, 1, loc=62.0, scale=scipy_stats.sem([60.0, 64.0]))
    assert row["runs"] == 2 and row["test_acc_ci95"] == pytest.approx((high - low) / 2)


# --------------------------------------------------------------------------------- files never opened
def test_fifo_and_device_files_are_skipped_without_being_opened(two_archs, capsys, monkeypatch):
    fifo_run, zero_run = two_archs / "fifo", two_archs / "zero"
    fifo_run.mkdir()
    zero_run.mkdir()
    os.mkfifo(fifo_run / CSV_NAME)
    (zero_run / CSV_NAME).symlink_to("/dev/zero")
    (two_archs / "a0" / CONFIG_NAME).unlink()
    os.mkfifo(two_archs / "a0" / CONFIG_NAME)  # a config.json that is a FIFO is never opened either
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    with deadline():
        result = summary.summarize([two_archs, zero_run / CSV_NAME])
        code, out, err = _summary([two_archs, zero_run / CSV_NAME], capsys)
    assert code == 0 and "tiny_resnext" in out
    assert sorted(err.splitlines()) == sorted(
        f"skipped {path}: not a regular file (a FIFO, device or socket is never opened)"
        for path in (fifo_run / CSV_NAME, zero_run / CSV_NAME))
    assert not any(name.endswith(("fifo/epochs.csv", "zero/epochs.csv", "a0/config.json")) for name in opened)
    assert any(name.endswith("a1/epochs.csv") for name in opened)  # the check above watches the right call
    assert [r.folder.name for r in result.runs if not r.recipe_resolved] == ["a0"]


def test_a_fifo_given_alone_is_one_line_and_exit_2(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.csv")
    with deadline():
        code, out, err = _summary([tmp_path / "pipe.csv"], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "not a regular file" in err


def test_an_oversized_csv_is_skipped_unread(two_archs, monkeypatch):
    limit = max((two_archs / name / CSV_NAME).stat().st_size for name in ("a0", "a1", "b0", "b1"))
    write_run(two_archs / "big", "tiny_resnet", 5, [30.0] * 12)
    monkeypatch.setattr(load, "MAX_CSV_BYTES", limit)
    result = summary.summarize([two_archs])
    (skipped,) = result.skipped
    assert skipped.path.parent.name == "big" and f"more than the {limit:,} read at most" in skipped.reason
    assert len(result.runs) == 4


# ------------------------------------------------------------------------------------- literal text
@pytest.mark.parametrize("form", ["table", "markdown"])
def test_text_from_files_is_printed_literally(tmp_path, capsys, monkeypatch, form):
    monkeypatch.setenv("COLUMNS", "250")
    for seed in (0, 1):
        write_run(tmp_path / f"plain{seed}", "tiny_resnet", seed, [40.0 + seed, 50.0 + seed],
                  device="cpu [/x] [red]")
        write_run(tmp_path / f"bold{seed}", "tiny_resnet[bold]", seed, [41.0 + seed, 52.0 + seed],
                  device="cpu [/x] [red]")
    result = summary.summarize([tmp_path])
    assert sorted(g.label for g in result.groups) == ["tiny_resnet (seed)", "tiny_resnet[bold] (seed)"]
    code, out, err = _summary([tmp_path, "--format", form, "--all"], capsys)
    assert code == 0, err
    assert "tiny_resnet[bold]" in out and "cpu [/x] [red]" in out
    assert "tiny_resnet vs tiny_resnet[bold]" in out  # compared as two archs, each under its own name


def test_seeds_and_epochs_of_valid_runs_are_whole_numbers(two_archs):
    for run_ in summary.summarize([two_archs]).runs:
        assert isinstance(run_.seed, int) and run_.frame["epoch"].dtype == np.int64


def test_steady_speed_skips_the_first_epoch_of_every_process_that_trained_the_run():
    from cardinal.records import speed_includes_warm_up, steady_state

    resumed = pd.DataFrame({"epoch": [1, 2, 3, 4], "img_per_s": [10.0, 100.0, 20.0, 110.0],
                            "warm_up": [True, False, True, False]})  # resumed after epoch 2: recompiled
    assert steady_state(resumed, "img_per_s") == 105.0 and not speed_includes_warm_up(resumed)
    older = resumed.drop(columns="warm_up")  # records written before the column: epoch 1 is the warm-up
    assert steady_state(older, "img_per_s") == 100.0
    single = pd.DataFrame({"epoch": [1], "img_per_s": [10.0], "warm_up": [True]})
    assert steady_state(single, "img_per_s") == 10.0 and speed_includes_warm_up(single)
    read_back = resumed.astype({"warm_up": str})  # as a CSV column of "True"/"False" may come back
    assert steady_state(read_back, "img_per_s") == 105.0
    mixed = resumed.astype({"warm_up": object})
    mixed.loc[[0, 1], "warm_up"] = None  # rows from before the column, then a resume that wrote it
    assert steady_state(mixed, "img_per_s") == 105.0
