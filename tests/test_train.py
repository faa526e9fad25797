"""End-to-end training runs through the CLI, as users launch them."""

import json
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from cardinal import build_model
from cardinal.config import RECIPES
from cardinal.records import COLUMNS, TIMING_COLUMNS
from cardinal.threads import available_cores

from cifar_fixture import TEST_SIZE
from conftest import SYNTHETIC, TINY, cli, output_tail, train

pytestmark = pytest.mark.slow

PROMISED = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "train_time_s",
            "it_per_s", "img_per_s", "peak_mem_mb", "arch", "params", "gflops", "train_tflop_per_s",
            "global_batch", "world_size", "precision", "device", "torch_version", "accelerate_version",
            "cardinal_version", "seed", "command"]


def _check_run_folder(run_dir, frame, epochs, arch="tiny_resnet"):
    assert set(PROMISED) <= set(frame.columns) and set(COLUMNS) == set(frame.columns)
    assert list(frame["epoch"]) == list(range(1, epochs + 1))
    assert frame["arch"].eq(arch).all()
    assert frame["params"].eq(sum(p.numel() for p in build_model(arch).parameters())).all()
    assert (frame[["img_per_s", "it_per_s", "train_time_s", "peak_mem_mb"]] > 0).all().all()
    assert (frame["epoch_time_s"] >= frame["train_time_s"]).all()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == arch and config["recipe"]["batch_size"] == frame["global_batch"].iloc[0]
    assert (run_dir / "checkpoint" / "trainer.json").is_file()
    state = torch.load(run_dir / "model_state.pt", weights_only=True)
    model = build_model(arch).eval()
    model.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(run_dir / "model.ts"))
    x = torch.rand(4, 3, 32, 32)  # the exports take images in [0, 1] and normalise with model_state.json's
    norm = json.loads((run_dir / "model_state.json").read_text())
    normalised = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(normalised), atol=1e-5, rtol=0)
        program = torch.export.load(str(run_dir / "model.pt2")).module()
        torch.testing.assert_close(program(x), model(normalised), atol=1e-5, rtol=0)


def test_synthetic_run_writes_csv_config_checkpoint_and_export(tmp_path):
    frame = train([*TINY, *SYNTHETIC, "--epochs", "2"], tmp_path)
    _check_run_folder(tmp_path / "run", frame, epochs=2)
    assert frame["train_images"].eq(600).all() and frame["test_images"].eq(150).all()
    assert frame["train_loss"].iloc[1] < frame["train_loss"].iloc[0]  # it learns


def test_cifar10_run_in_bf16_and_channels_last(tmp_path, cifar_dir):
    frame = train([*TINY, "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "1",
                   "--max-steps", "3", "--recipe", "fast", "--batch-size", "64", "--mixed-precision", "bf16",
                   "--channels-last"], tmp_path)
    _check_run_folder(tmp_path / "run", frame, epochs=1)
    assert frame["steps"].iloc[0] == 3 and frame["train_images"].iloc[0] == 3 * 64
    assert frame["test_images"].iloc[0] == TEST_SIZE and frame["precision"].iloc[0] == "bf16"


def test_sample_cifar10_run(tmp_path, sample_dir):
    frame = train([*TINY, "--dataset", "cifar10", "--data-dir", str(sample_dir), "--epochs", "1",
                   "--max-steps", "2", "--recipe", "fast", "--batch-size", "64", "--mixed-precision", "bf16",
                   "--channels-last", "--no-export"], tmp_path)
    assert frame["test_images"].iloc[0] == 846 and frame["precision"].iloc[0] == "bf16"


def test_two_processes_match_one_process(tmp_path):
    # 600 images at batch 64: the last step holds 24, split 12 + 12 between the ranks
    # a warm-up of one epoch keeps the LR low enough that rounding differences (the 2-rank all-reduce sums in
    # another order) stay at the 1e-4 level instead of being amplified by a few high-LR steps
    args = [*TINY, *SYNTHETIC, "--epochs", "2", "--sync-bn", "--recipe", "fast", "--batch-size", "64",
            "--warmup-epochs", "1",
            "--no-export"]
    one = train(args, tmp_path, run_name="one")
    two = train(args, tmp_path, processes=2, run_name="two")
    assert two["world_size"].eq(2).all() and one["world_size"].eq(1).all()
    pd.testing.assert_series_equal(two["train_loss"], one["train_loss"], rtol=1e-3, atol=0)
    assert two["train_images"].eq(600).all()

    # the same weights give the same test accuracy with 1 and 2 processes: every image counted once
    torch.save(build_model("tiny_resnet").state_dict(), tmp_path / "w.pt")  # a fixed set of weights
    results = []
    for processes, name in ((1, "eval1"), (2, "eval2")):
        done = cli("cardinal.train", [*TINY, *SYNTHETIC, "--synthetic-test", "333", "--eval-only",
                                      "--init-weights", str(tmp_path / "w.pt"), "--eval-batch-size", "50",
                                      "--output-dir", str(tmp_path), "--run-name", name], processes)
        assert done.returncode == 0, output_tail(done)
        results.append(json.loads((tmp_path / name / "eval.json").read_text()))
    assert results[0]["test_images"] == results[1]["test_images"] == 333
    assert results[1]["world_size"] == 2
    assert results[0]["test_acc"] == pytest.approx(results[1]["test_acc"], abs=1e-9)
    assert results[0]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-5)


@pytest.mark.parametrize("optimizer", [["--optimizer", "sgd", "--lr", "0.1"], ["--optimizer", "adamw", "--lr", "0.002"],
                                       ["--lr", "0.002"]], ids=["sgd", "adamw", "muon"])
def test_resume_gives_the_same_csv_as_an_uninterrupted_run(tmp_path, optimizer):
    args = [*TINY, *SYNTHETIC, "--epochs", "2", "--recipe", "fast", "--warmup-epochs", "1", "--no-export", *optimizer]
    straight = train(args, tmp_path, run_name="straight")
    # 10 steps an epoch, 10 of warm-up to the peak, then linear decay: lr is the last step's rate
    peak = float(optimizer[-1]) * 64 / RECIPES["fast"].lr_scale_batch
    assert list(straight["lr"]) == pytest.approx([peak, peak / 10])
    first = train([*args, "--stop-after", "1"], tmp_path, run_name="resumed")
    assert list(first["epoch"]) == [1]
    done = cli("cardinal.train", ["--resume", str(tmp_path / "resumed"), "--no-progress"])
    assert done.returncode == 0, output_tail(done)
    resumed = pd.read_csv(tmp_path / "resumed" / "epochs.csv")
    compared = [c for c in straight.columns if c not in TIMING_COLUMNS + ("run_name", "command")]
    pd.testing.assert_frame_equal(resumed[compared], straight[compared], check_exact=False, rtol=1e-6)


def test_two_process_accuracy_is_the_saved_models_accuracy(tmp_path):
    """Without --sync-bn each rank's BatchNorm statistics drift apart; the CSV must still describe the
    model that is saved, evaluated in one process."""
    args = [*TINY, *SYNTHETIC, "--synthetic-train", "512", "--synthetic-test", "256", "--recipe", "fast",
            "--epochs", "2"]
    two = train(args, tmp_path, processes=2, run_name="two")
    done = cli("cardinal.train", [*TINY, *SYNTHETIC, "--synthetic-train", "512", "--synthetic-test", "256",
                                  "--eval-only", "--init-weights", str(tmp_path / "two" / "model_state.pt"),
                                  "--output-dir", str(tmp_path), "--run-name", "eval"])
    assert done.returncode == 0, output_tail(done)
    alone = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert alone["world_size"] == 1 and alone["test_images"] == 256
    assert abs(two["test_acc"].iloc[-1] - alone["test_acc"]) < 1e-6
    assert two["test_loss"].iloc[-1] == pytest.approx(alone["test_loss"], rel=1e-5)


def test_a_constant_schedule_run_can_be_lengthened_on_resume(tmp_path):
    args = [*TINY, *SYNTHETIC, "--epochs", "1", "--no-export", "--warmup-epochs", "0.5"]
    first = train(args, tmp_path, run_name="r")
    done = cli("cardinal.train", ["--resume", str(tmp_path / "r"), "--epochs", "2", "--no-progress"])
    assert done.returncode == 0, output_tail(done)
    frame = pd.read_csv(tmp_path / "r" / "epochs.csv")
    assert list(frame["epoch"]) == [1, 2] and frame["lr"].eq(0.01).all()  # warmed up in epoch 1, then constant
    assert frame["train_loss"].iloc[0] == pytest.approx(first["train_loss"].iloc[0])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["recipe"]["epochs"] == 2


def test_epoch_k_of_a_seed_run_is_a_k_epoch_run(tmp_path):
    """What lets the summary set one long seed run beside shorter runs of other recipes
    (Recipe.epochs_are_runs): nothing of epoch 1 depends on the planned length."""
    args = [*TINY, *SYNTHETIC, "--no-export", "--recipe", "seed"]
    short = train([*args, "--epochs", "1"], tmp_path, run_name="short")
    long = train([*args, "--epochs", "2"], tmp_path, run_name="long")
    compared = [c for c in short.columns if c not in TIMING_COLUMNS + ("run_name", "command")]
    pd.testing.assert_frame_equal(long[compared].iloc[:1], short[compared], check_exact=False, rtol=1e-6)
    assert RECIPES["seed"].epochs_are_runs


def test_tensorboard_receives_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train([*TINY, *SYNTHETIC, "--synthetic-train", "128", "--synthetic-test", "64", "--epochs", "2",
           "--no-export", "--log-with", "tensorboard"], tmp_path, run_name="tb")
    events = EventAccumulator(str(tmp_path / "tb" / "trackers" / "tb")).Reload()
    points = events.Scalars("test_acc")
    csv = pd.read_csv(tmp_path / "tb" / "epochs.csv")
    assert [p.step for p in points] == [1, 2]
    assert [p.value for p in points] == pytest.approx(list(csv["test_acc"]), rel=1e-6)
    assert "train_loss" in events.Tags()["scalars"] and "img_per_s" in events.Tags()["scalars"]


def _launch_one_process(tmp_path, extra_env):
    """A bare `accelerate launch` with no config, as a new user types it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(extra_env, PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "cardinal.train",
               *TINY, *SYNTHETIC, "--synthetic-train", "64", "--synthetic-test", "64", "--epochs", "1",
               "--no-export", "--output-dir", str(tmp_path), "--run-name", "t"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, output_tail(done)
    return pd.read_csv(tmp_path / "t" / "epochs.csv")["device"].iloc[0]


def test_a_bare_accelerate_launch_uses_every_available_core(tmp_path):
    cores = available_cores()
    assert _launch_one_process(tmp_path / "a", {}).endswith(f"({cores} thread{'s' if cores > 1 else ''})")
    assert _launch_one_process(tmp_path / "b", {"OMP_NUM_THREADS": "1"}).endswith("(1 thread)")  # the user's choice
