"""The short-budget recipe: a validation split held out of training, a schedule sized by the run's steps,
and every knob recorded in config.json and kept on resume."""

import io
import json

import pandas as pd
import pytest
import torch
from rich.console import Console

import cardinal.train as train_module
from cardinal.cli import CardinalError, run
from cardinal.config import RECIPES, TrainConfig, resolve_recipe
from cardinal.data import hold_out, split_validation, synthetic_split, validation_count
from cardinal.optim import build_schedule
from cardinal.records import TIMING_COLUMNS, ConsoleReport

from conftest import SYNTHETIC, TINY, cli_ok, train

# no --batch-size or --lr: the budget rule sizes both (batch 32 for 160 images, 2 epochs, and Muon's peak
# at batch 32: 4 * 2e-3 * sqrt(32 / 256), 0.02262 per 256)
RUN = [*TINY, "--dataset", "synthetic", "--synthetic-train", "200", "--synthetic-test", "64", "--recipe", "fast",
       "--val-images", "0.2", "--no-export"]
COMPARED_OUT = set(TIMING_COLUMNS) | {"run_name", "command"}


# ------------------------------------------------------------------------------------- validation split
def test_validation_split_is_disjoint_covering_and_decided_by_the_seed():
    train, val = split_validation(1000, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again_train, again_val = split_validation(1000, 100, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, split_validation(1000, 100, seed=4)[1])


def test_validation_size_is_a_count_or_a_fraction():
    assert validation_count(0, 4660) == 0
    assert validation_count(500, 4660) == 500
    assert validation_count(0.1, 4660) == 466
    with pytest.raises(CardinalError, match="at least one must stay"):
        split_validation(10, 10, seed=0)


def test_hold_out_moves_images_with_their_labels():
    images, labels = synthetic_split(120, seed=1)
    (train_images, train_labels), (val_images, val_labels) = hold_out(images, labels, 0.25, seed=1)
    _, val_index = split_validation(120, 30, seed=1)
    assert torch.equal(val_images, images[val_index]) and torch.equal(val_labels, labels[val_index])
    assert len(train_labels) + len(val_labels) == 120
    train_rows = {bytes(image.numpy()) for image in train_images}
    assert not any(bytes(image.numpy()) in train_rows for image in val_images)  # no image on both sides
    assert hold_out(images, labels, 0, seed=1)[1] is None


@pytest.mark.parametrize("text, value", [("500", 500), ("0.1", 0.1), ("0", 0)])
def test_val_images_flag_reads_counts_and_fractions(text, value):
    assert train_module.count_or_fraction(text) == value


@pytest.mark.parametrize("text", ["-1", "1.5", "nan", "ten"])
def test_val_images_flag_refuses_anything_else(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        train_module.count_or_fraction(text)


# -------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("steps_per_epoch", [10, 18, 200])
def test_fast_schedule_warms_up_and_decays_within_one_epoch(steps_per_epoch):
    plan = build_schedule(resolve_recipe("fast", {"epochs": 1}), steps_per_epoch)
    values = [plan.factor(s) for s in range(plan.total_steps)]
    peak = values.index(max(values))
    assert max(values) == pytest.approx(1.0) and 0 < peak < len(values) - 1
    assert values[0] < 1 and values[-1] < values[peak] / 2  # it rises, then falls, inside the one epoch
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))


def test_fast_schedule_has_the_same_shape_at_any_length():
    short = build_schedule(resolve_recipe("fast", {"epochs": 1}), 100)
    long = build_schedule(resolve_recipe("fast", {"epochs": 100}), 100)
    assert long.warmup_steps == 100 * short.warmup_steps
    for fraction in (0.1, 0.3, 0.6, 0.9):
        assert short.factor(int(fraction * 100)) == pytest.approx(long.factor(int(fraction * 10000)), abs=0.06)
    assert short.depends_on_length and long.depends_on_length


def test_decay_fraction_holds_the_peak_before_the_decay():
    plan = build_schedule(resolve_recipe("fast", {"epochs": 1, "warmup_fraction": 0.1, "decay_fraction": 0.5}), 100)
    assert plan.warmup_steps == 10 and plan.decay_start == 50
    assert all(plan.factor(s) == 1.0 for s in range(9, 51))
    assert plan.factor(75) == pytest.approx(0.5) and plan.factor(99) < 0.05


def test_giving_one_warmup_knob_replaces_the_recipes_other():
    assert resolve_recipe("fast", {"warmup_epochs": 1.0}).warmup_fraction == 0
    assert resolve_recipe("seed", {"warmup_fraction": 0.1}).warmup_epochs == 0
    with pytest.raises(CardinalError, match="not both"):
        resolve_recipe("fast", {"warmup_epochs": 1.0, "warmup_fraction": 0.1})


def test_seed_recipe_is_untouched_by_the_new_knobs():
    seed = RECIPES["seed"]
    assert (seed.warmup_epochs, seed.warmup_fraction, seed.decay_fraction) == (0, 0, 1)
    assert seed.val_images == 0 and not seed.eval_flip and seed.schedule == "constant"
    plan = build_schedule(seed, 36)
    assert all(plan.factor(s) == 1.0 for s in range(plan.total_steps))


# ----------------------------------------------------------------------------------------- console view
def test_console_row_shows_val_acc_when_a_split_exists_and_fits_80_columns():
    buffer = io.StringIO()
    report = ConsoleReport(console=Console(file=buffer, width=80, force_terminal=False), progress=False)
    report.end_epoch({"epoch": 10, "train_loss": 2.302585, "train_acc": 11.11, "val_acc": 99.99, "val_loss": 1.0,
                      "test_loss": 12.3456, "test_acc": 100.0, "lr": 0.0041666, "img_per_s": 12345.6,
                      "train_tflop_per_s": 123.456, "epoch_time_s": 1234.5, "peak_mem_mb": 123456.0})
    text = buffer.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "Val" in text and "99.99" in text and "11.11" not in text


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch fast run with a validation split, flip TTA, an EMA and the classifier at its own LR, and the
    same run stopped after 1 epoch."""
    root = tmp_path_factory.mktemp("recipe-runs")
    for name, extra in (("straight", []), ("half", ["--stop-after", "1"])):
        cli_ok("cardinal.train", [*RUN, "--epochs", "2", "--eval-flip", "--ema-decay", "0.9", "--warmup-fraction",
                                  "0.3", "--decay-fraction", "0.8", "--head-lr-scale", "0.5", *extra, "--output-dir",
                                  str(root), "--run-name", name])
    return root


@pytest.mark.slow
def test_validation_columns_count_every_image_once(runs):
    frame = pd.read_csv(runs / "straight" / "epochs.csv")
    assert frame["val_images"].eq(40).all() and frame["train_images"].eq(160).all()  # 0.2 of 200 held out
    assert frame["test_images"].eq(64).all()  # the test split is untouched
    for column in ("val_loss", "val_acc", "test_acc_tta", "val_acc_tta", "test_acc_ema", "val_acc_ema"):
        assert frame[column].notna().all() and column in frame
    assert frame["val_acc"].between(0, 100).all() and frame["test_acc_tta"].between(0, 100).all()


@pytest.mark.slow
def test_every_new_knob_reaches_config_json(runs):
    recipe = json.loads((runs / "straight" / "config.json").read_text())["recipe"]
    assert recipe["val_images"] == 0.2 and recipe["eval_flip"] is True and recipe["ema_decay"] == 0.9
    assert recipe["warmup_fraction"] == 0.3 and recipe["decay_fraction"] == 0.8 and recipe["warmup_epochs"] == 0
    assert recipe["head_lr_scale"] == 0.5
    # what the budget rule chose for the 160 training images is what ran, and what config.json keeps
    assert recipe["sized_by_budget"] == ["batch_size", "lr"] and recipe["budget_images"] == 160
    assert (recipe["optimizer"], recipe["batch_size"], recipe["lr"]) == ("muon", 32, 0.02262)
    frame = pd.read_csv(runs / "straight" / "epochs.csv")
    assert frame["global_batch"].eq(32).all() and frame["steps"].eq(5).all()
    config = TrainConfig.from_dict(json.loads((runs / "straight" / "config.json").read_text()))
    assert config.recipe.val_images == 0.2 and config.recipe.eval_flip and config.recipe.ema_decay == 0.9


@pytest.mark.slow
def test_resume_keeps_the_split_the_schedule_and_the_average(runs, tmp_path):
    import shutil

    half = shutil.copytree(runs / "half", tmp_path / "half")
    cli_ok("cardinal.train", ["--resume", str(half), "--no-progress"])
    straight, resumed = (pd.read_csv(folder / "epochs.csv") for folder in (runs / "straight", half))
    configs = [json.loads((folder / "config.json").read_text())["recipe"] for folder in (runs / "straight", half)]
    assert configs[0] == configs[1]  # sized once, at the start, and kept on resume
    compared = [c for c in straight.columns if c not in COMPARED_OUT]
    pd.testing.assert_frame_equal(resumed[compared], straight[compared], check_exact=False, rtol=1e-6)
    # the EMA went on from where it stopped rather than restarting from the resumed weights
    averages = [torch.load(folder / "checkpoint" / "ema.pt", weights_only=True) for folder in (runs / "straight", half)]
    assert int(averages[0]["n_averaged"]) == int(averages[1]["n_averaged"]) == 10
    for name, tensor in averages[0].items():
        torch.testing.assert_close(averages[1][name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_resume_refuses_another_validation_split(runs, tmp_path, capsys):
    import shutil

    half = shutil.copytree(runs / "half", tmp_path / "half")
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, ["--resume", str(half), "--val-images", "0.3", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--val-images 0.2, not 0.3" in capsys.readouterr().err


@pytest.mark.slow
def test_validation_split_is_the_same_for_one_and_two_processes(tmp_path):
    """Same images held out whatever the process count: with --sync-bn the runs compute the same metrics."""
    args = [*TINY, *SYNTHETIC, "--synthetic-train", "256", "--synthetic-test", "64", "--recipe", "fast",
            "--batch-size", "64", "--val-images", "56", "--epochs", "1", "--sync-bn", "--ema-decay", "0.9",
            "--no-export"]
    one = train(args, tmp_path, run_name="one")
    two = train(args, tmp_path, processes=2, run_name="two")
    assert two["world_size"].eq(2).all()
    assert one["val_images"].eq(56).all() and two["val_images"].eq(56).all()
    assert two["train_images"].eq(200).all()
    pd.testing.assert_series_equal(two["val_loss"], one["val_loss"], rtol=1e-3, atol=0)
    for column in ("val_acc", "val_acc_ema"):  # at most one borderline image
        assert (two[column] - one[column]).abs().max() <= 100 / 56 + 1e-9, column
