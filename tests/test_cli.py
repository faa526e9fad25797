"""Every command's --help reads cleanly, and the per-epoch console row fits an 80-column terminal."""

import io

import pytest
from rich.console import Console

from cardinal.records import ConsoleReport

COMMANDS = ["cardinal.train", "cardinal.summary", "cardinal.study", "cardinal.bench", "cardinal.export",
            "cardinal.profile", "cardinal.reference_run"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_has_no_noise(module, capsys):
    import importlib

    parser = importlib.import_module(module).build_parser()
    text = parser.format_help()
    for noise in ("PosixPath", "no-no-", "(default: None)", "(default: False)", "(default: True)", "(default: [",
                  " 1 threads", " 1 warm-up steps"):
        assert noise not in text, f"{module} --help shows {noise!r}"


@pytest.mark.parametrize("module", COMMANDS)
def test_help_fits_80_columns_and_keeps_flag_names_whole(module, monkeypatch):
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "80")
    lines = importlib.import_module(module).build_parser().format_help().splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert not [line for line in lines if re.search(r"--[a-z-]*[a-z]-$", line)], "a flag name split at a hyphen"


@pytest.mark.parametrize("module", COMMANDS)
def test_help_lists_the_choices_a_metavar_hides(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    text = " ".join(parser.format_help().split())
    hidden = [action for action in parser._actions if action.choices and action.metavar is not None]
    for action in hidden:
        listed = "one of: " + ", ".join(map(str, action.choices))
        assert listed in text, f"{module} {action.option_strings[0]} does not list its choices"


def test_train_help_states_the_switch_defaults_once():
    from cardinal.train import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--no-download" in text and "--decay-norm-bias" in text and "--no-decay-norm-bias" in text
    assert "(default: 0)" in text  # numbers still show their defaults


def _row(**values):
    row = {"epoch": 10, "train_loss": 2.302585, "train_acc": 99.99, "test_loss": 12.3456, "test_acc": 100.0,
           "lr": 0.0041666, "img_per_s": 12345.6, "train_tflop_per_s": 123.456, "epoch_time_s": 1234.5,
           "peak_mem_mb": 123456.0}
    return {**row, **values}


def test_epoch_rows_fit_80_columns_and_keep_every_digit():
    buffer = io.StringIO()
    report = ConsoleReport(console=Console(file=buffer, width=80, force_terminal=False), progress=False)
    report.end_epoch(_row())
    report.end_epoch(_row(epoch=11, img_per_s=38.123, lr=5e-05))
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    text = buffer.getvalue()
    for number in ("2.3026", "99.99", "12.3456", "100.00", "0.00417", "12345.6", "123.456", "1234.5", "123456",
                   "38.1", "5e-05"):
        assert number in text, (number, text)
    for title in ("Epoch", "loss", "acc", "LR", "img/s", "TFLOP/s", "Peak"):
        assert title in text


def _frame(epochs, run_dir_name):
    import pandas as pd

    rows = [{**_row(epoch=e), "it_per_s": 1.0, "arch": "resnext50_32x4d", "dataset": "cifar10", "recipe": "fast",
             "params": 22_992_714, "gflops": 2.69, "precision": "bf16", "world_size": 1,
             "device": "AMD EPYC 7B13 64-Core Processor (2 threads)"} for e in range(1, epochs + 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("epochs, label", [(1, "median, warm-up included"), (3, "median, after warm-up")])
def test_final_table_folds_long_paths_and_labels_speed_by_the_epochs_used(tmp_path, epochs, label):
    from pathlib import Path

    buffer = io.StringIO()
    report = ConsoleReport(console=Console(file=buffer, width=80, force_terminal=False), progress=False)
    run_dir = Path("/a/rather/long/output/folder/of/someone") / "resnext50_32x4d-fast-cifar10-seed1234567"
    report.final(_frame(epochs, run_dir.name), run_dir)
    text = buffer.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    assert "".join(line.strip("│ ") for line in text.splitlines()).count("seed1234567/epochs.csv") == 1
    assert label in text and ("after warm-up" in text) == (epochs > 1)


def test_an_interrupt_says_what_the_command_attached(capsys):
    from cardinal.cli import run

    def interrupted(argv):
        error = KeyboardInterrupt()
        error.hint = "resume with --resume runs/x"
        raise error

    with pytest.raises(SystemExit) as code:
        run(interrupted, [])
    assert code.value.code == 130 and capsys.readouterr().err == "interrupted; resume with --resume runs/x\n"


def test_prose_wraps_at_the_readers_width_even_where_tables_run_wide(monkeypatch):
    from cardinal.cli import make_console
    from cardinal.prose import wrap

    monkeypatch.setenv("COLUMNS", "80")
    console = make_console(file=io.StringIO())  # not a terminal: tables may use 150 columns
    text = wrap("* repeats disagree by more than 10%: that ratio is within the noise; " * 4, console, rest="  ")
    assert console.width >= 150 and all(len(line) <= 80 for line in text.splitlines()) and "\n  " in text


def test_the_csv_command_says_how_the_run_was_started(monkeypatch):
    from cardinal.train import launch_command

    for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert launch_command(["--arch", "tiny_resnet"]) == "python -m cardinal.train --arch tiny_resnet"
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert launch_command(["--epochs", "1"]) == "accelerate launch -m cardinal.train --epochs 1"


def test_an_interrupted_training_run_says_how_to_resume_it(tmp_path, capsys, monkeypatch):
    from cardinal import train
    from cardinal.cli import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_epochs", interrupted)
    with pytest.raises(SystemExit) as code:
        run(train.main, ["--arch", "tiny_resnet", "--dataset", "synthetic", "--synthetic-train", "64",
                         "--synthetic-test", "32", "--batch-size", "32", "--no-progress", "--output-dir",
                         str(tmp_path), "--run-name", "r"])
    assert code.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted; resume with --resume {tmp_path / 'r'}"
