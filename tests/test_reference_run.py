"""The independent reference runner: the same step as cardinal's seed recipe, and a CSV the summary compares."""

import json

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import cardinal.reference_run as reference_run
import cardinal.train as train_module
from cardinal import build_model
from cardinal.cli import run
from cardinal.config import RECIPES
from cardinal.data import DeviceLoader, Normalize, synthetic_split
from cardinal.engine import train_epoch
from cardinal.optim import build_optimizer, build_scheduler
from cardinal.records import COLUMNS
from cardinal.reference import torchvision_model
from cardinal.summary import summarize

TINY_DATA = ["--arch", "tiny_resnet", "--dataset", "synthetic", "--synthetic-train", "256", "--synthetic-test", "64",
             "--epochs", "1", "--seed", "3", "--limit-batches", "2"]


def _as_torchvision(mean, std):
    """ToTensor + Normalize on a whole uint8 batch, operation for operation."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return lambda images: images.float().div(255).sub(mean).div(std)


def test_two_steps_of_the_protocol_equal_two_steps_of_the_seed_recipe():
    """From the same weights on the same inputs, in order: the loss, the SGD update (weight decay on every
    parameter), the loss scaling and the BatchNorm statistics agree, so only the random draws (initialisation,
    shuffling) and float rounding of the normalisation differ between the two stacks."""
    seed = RECIPES["seed"]
    images, labels = synthetic_split(256, seed=1)
    torch.manual_seed(0)
    ours = build_model("tiny_resnet")
    theirs = torchvision_model("tiny_resnet")
    theirs.load_state_dict(ours.state_dict())

    accelerator = Accelerator(cpu=True)
    loader = DeviceLoader(images, labels, seed.batch_size, _as_torchvision(seed.mean, seed.std), accelerator.device,
                          shuffle=False)
    optimizer = build_optimizer(ours, seed)
    stats = train_epoch(accelerator, ours, loader, optimizer, build_scheduler(optimizer, seed, len(loader)))

    dataset = reference_run.PILImages(images, labels, seed.mean, seed.std)
    plain = DataLoader(dataset, batch_size=128, shuffle=False)
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    result = reference_run.train_one_epoch(theirs, plain, sgd, torch.device("cpu"))

    assert stats.steps == result.steps == 2 and stats.images == result.images == 256
    assert stats.loss == pytest.approx(result.loss, rel=1e-6)
    assert stats.accuracy == pytest.approx(100 * result.correct / result.images)
    expected = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_protocol_reads_images_as_cardinal_does_up_to_float_rounding():
    """Same channel order and scaling; cardinal computes x / (255 std) - mean / std in one multiply-add, the
    protocol (x / 255 - mean) / std: a few float32 ulps apart, nothing more."""
    seed = RECIPES["seed"]
    images, labels = synthetic_split(64, seed=2)
    dataset = reference_run.PILImages(images, labels, seed.mean, seed.std)
    theirs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(theirs, _as_torchvision(seed.mean, seed.std)(images), rtol=0, atol=0)
    ours = Normalize(seed.mean, seed.std, torch.device("cpu"))(images)
    assert (ours - theirs).abs().max() < 1e-6
    assert dataset[5][1] == int(labels[5])


@pytest.mark.slow
def test_reference_and_seed_runs_are_compared_by_the_summary(tmp_path):
    common = [*TINY_DATA, "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run(reference_run.main, [*common, "--workers", "0", "--eval-batch-size", "512"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, [*common, "--recipe", "seed", "--no-progress", "--no-export"])
    assert exit_info.value.code == 0

    folder = tmp_path / "tiny_resnet-reference-synthetic-seed3"
    frame = pd.read_csv(folder / "epochs.csv")
    seed_frame = pd.read_csv(tmp_path / "tiny_resnet-seed-synthetic-seed3" / "epochs.csv")
    assert list(frame.columns) == [c for c in COLUMNS if c in seed_frame.columns] == list(COLUMNS)
    row = frame.iloc[0]
    assert (row["recipe"], row["global_batch"], row["steps"], row["train_images"], row["test_images"]) == \
        ("reference", 128, 2, 256, 64)
    assert (row["lr"], row["precision"], row["params"]) == (0.01, "no", seed_frame.iloc[0]["params"])
    config = json.loads((folder / "config.json").read_text())
    assert config["recipe_name"] == "reference" and config["recipe"]["batch_size"] == 128

    summary = summarize([tmp_path])
    gaps = summary.recipe_gaps
    assert len(gaps) == 1, summary.notes
    gap = gaps.iloc[0]
    assert "(reference" in gap["model"] and "(seed" in gap["baseline"] and gap["epoch"] == 1
    assert gap["model_value"] == pytest.approx(row["test_acc"])


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "tiny_resnet-reference-synthetic-seed3"
    folder.mkdir()
    (folder / "epochs.csv").write_text("epoch,test_acc\n1,50.0\n")
    with pytest.raises(SystemExit) as exit_info:
        run(reference_run.main, [*TINY_DATA, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert (folder / "epochs.csv").read_text() == "epoch,test_acc\n1,50.0\n"


@pytest.mark.parametrize("flags, message", [
    (["--synthetic-classes", "1"], "--synthetic-classes must be between 2 and 1000"),
    (["--synthetic-train", "200000"], "--synthetic-train must be between 1 and 100000"),
])
def test_flags_are_held_to_the_bounds_train_holds_them_to(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(reference_run.main, [*TINY_DATA, "--output-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
