import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cardinal import build_model
from cardinal.config import RECIPES, Recipe
from cardinal.data import DeviceLoader, Normalize, synthetic_split
from cardinal.engine import NonFiniteLoss, train_epoch
from cardinal.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from cardinal.syncbn import CrossProcessBatchNorm2d, convert_sync_batchnorm, revert_sync_batchnorm


def test_norm_and_bias_are_exempt_from_decay_only_when_asked():
    model = build_model("tiny_resnet")
    decay, no_decay = parameter_groups(model, 5e-4, True)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(model, 5e-4, False)) == 1


def test_seed_recipe_is_the_reference_study():
    seed = RECIPES["seed"]
    assert (seed.lr, seed.momentum, seed.weight_decay, seed.batch_size) == (0.01, 0.9, 5e-4, 128)
    assert seed.schedule == "constant" and seed.augment == "none" and seed.label_smoothing == 0
    assert seed.std == (0.2023, 0.1994, 0.2010) and not seed.nesterov


def test_fast_recipe_scales_lr_with_batch():
    fast = RECIPES["fast"]
    assert Recipe(**{**fast.__dict__, "batch_size": 512}).effective_lr() == pytest.approx(2 * fast.effective_lr())


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warmup_then_decay(schedule):
    recipe = Recipe(epochs=4, schedule=schedule, warmup_epochs=1, final_lr_fraction=0.1)
    factor = lr_factor(recipe, steps_per_epoch=10)
    values = [factor(s) for s in range(40)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:])) and values[-1] >= 0.1
    assert lr_factor(Recipe(), 10)(25) == 1.0


def test_scheduler_drives_the_optimizer():
    recipe = Recipe(epochs=2, schedule="cosine", lr=0.1)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, 5)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_non_finite_loss_is_detected():
    accelerator = Accelerator(cpu=True)
    model = build_model("tiny_resnet")
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    images, labels = synthetic_split(64)
    loader = DeviceLoader(images, labels, 32, Normalize((0.5,) * 3, (0.25,) * 3, accelerator.device),
                          accelerator.device)
    optimizer = build_optimizer(model, Recipe())
    with pytest.raises(NonFiniteLoss):
        train_epoch(accelerator, model, loader, optimizer, build_scheduler(optimizer, Recipe(), 2))


def test_cross_process_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    reference = build_model("tiny_resnet").train()
    converted = convert_sync_batchnorm(build_model("tiny_resnet").train(), torch.device("cpu"))
    converted.load_state_dict(reference.state_dict())
    assert any(isinstance(m, CrossProcessBatchNorm2d) for m in converted.modules())
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.bn1.running_mean, reference.bn1.running_mean)
    reverted = revert_sync_batchnorm(converted)
    assert not any(isinstance(m, CrossProcessBatchNorm2d) for m in reverted.modules())
    assert list(reverted.state_dict()) == list(reference.state_dict())
