"""Every command's --help reads cleanly, and the per-epoch console row fits an 80-column terminal."""

import io

import pytest
from rich.console import Console

from cardinal.records import ConsoleReport

COMMANDS = ["cardinal.train", "cardinal.summary", "cardinal.study", "cardinal.bench", "cardinal.export",
            "cardinal.profile"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_has_no_noise(module, capsys):
    import importlib

    parser = importlib.import_module(module).build_parser()
    text = parser.format_help()
    for noise in ("PosixPath", "no-no-", "(default: None)", "(default: False)", "(default: True)", "(default: [",
                  " 1 threads", " 1 warm-up steps"):
        assert noise not in text, f"{module} --help shows {noise!r}"


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
