"""The weight average (--ema-decay): what it computes, and that it stays beside test_acc, never in place of it."""

import pytest
import torch
from torch import nn

from cardinal import build_model
from cardinal.cli import CardinalError
from cardinal.config import RECIPES, resolve_recipe
from cardinal.ema import build_average, warmed_up_decay
from cardinal.engine import EvalStats, TrainStats
from cardinal.records import epoch_row


def test_decay_warms_up_then_holds():
    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 90) == pytest.approx(0.91)
    assert warmed_up_decay(0.9, 1000) == 0.9
    decays = [warmed_up_decay(0.99, n) for n in range(2000)]
    assert decays == sorted(decays) and decays[-1] == 0.99


def test_average_follows_the_formula_for_parameters_and_batchnorm_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = build_average(model, decay=0.5)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for update in range(4):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()(torch.randn(8, 3, 6, 6))  # moves the running statistics and num_batches_tracked
        average.update_parameters(model)
        decay = warmed_up_decay(0.5, update)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                expected[name] = expected[name] * decay + tensor * (1 - decay) if update else tensor.clone()
            else:
                expected[name] = tensor.clone()
    averaged = average.module.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(averaged[name], tensor, msg=name)
    assert averaged["1.num_batches_tracked"].item() == 4
    assert int(average.n_averaged) == 4


def test_the_update_never_reads_the_count_back_from_the_models_device():
    # Nothing can be read back from the meta device, as reading from a GPU makes the CPU wait for it: torch's
    # own update_parameters copies the count to the model's device and fails here.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("meta")
    average = build_average(model, decay=0.9)
    for _ in range(3):
        average.update_parameters(model)
    assert int(average.n_averaged) == 3


def test_average_is_a_copy_that_never_trains():
    model = build_model("tiny_resnet")
    average = build_average(model, decay=0.9)
    assert not average.training and not any(p.requires_grad for p in average.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(average.module.parameters()), next(model.parameters()))


def test_no_recipe_keeps_an_average_unless_asked():
    assert all(recipe.ema_decay == 0 for recipe in RECIPES.values())
    assert resolve_recipe("fast", {"ema_decay": 0.999}).ema_decay == 0.999
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(CardinalError, match="--ema-decay"):
            resolve_recipe("fast", {"ema_decay": bad})


def test_average_columns_sit_beside_test_acc():
    train = TrainStats(loss=1.0, objective=1.0, accuracy=50.0, steps=2, skipped_steps=0, images=64, time_s=1.0,
                       lr=0.1)
    plain, averaged = EvalStats(1.0, 40.0, 100, 0.1), EvalStats(0.9, 45.0, 100, 0.1)
    row = epoch_row(1, train, plain, 1.0, 1e9, 10.0, test_ema=averaged, val_ema=EvalStats(0.8, 47.0, 20, 0.1))
    assert row["test_acc"] == 40.0 and row["test_acc_ema"] == 45.0 and row["val_acc_ema"] == 47.0
    assert "test_acc_ema" not in epoch_row(1, train, plain, 1.0, 1e9, 10.0)
