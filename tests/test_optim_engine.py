import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from cardinal import build_model
from cardinal.cli import CardinalError
from cardinal.config import RECIPES, Recipe, resolve_recipe
from cardinal.data import DeviceLoader, Normalize, synthetic_split
from cardinal.engine import NonFiniteLoss, losses, train_epoch
from cardinal.optim import ScheduledLR, build_optimizer, build_schedule, parameter_groups
from cardinal.syncbn import CrossProcessBatchNorm2d, convert_sync_batchnorm, revert_sync_batchnorm


def test_norm_and_bias_are_exempt_from_decay_only_when_asked():
    model = build_model("tiny_resnet")
    decay, no_decay = parameter_groups(model, 5e-4, True)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(model, 5e-4, False)) == 1


def test_classifier_gets_its_own_lr_only_when_scaled():
    model = build_model("tiny_resnet")
    head = {id(p) for p in model.fc.parameters()}
    groups = parameter_groups(model, 5e-4, True, head_lr_scale=0.1)
    assert len(groups) == 4 and groups[0].get("lr_scale", 1.0) == 1.0  # the body's decayed weights first
    scaled = [g for g in groups if "lr_scale" in g]
    assert {id(p) for g in scaled for p in g["params"]} == head and all(g["lr_scale"] == 0.1 for g in scaled)
    assert [g["weight_decay"] for g in scaled] == [5e-4, 0.0]  # fc.weight decays, fc.bias does not
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert not any("lr_scale" in g for g in parameter_groups(model, 5e-4, True))


def test_scheduled_lr_keeps_the_classifier_at_its_fraction():
    model = build_model("tiny_resnet")
    recipe = Recipe(epochs=1, lr=0.2, schedule="onecycle", warmup_fraction=0.5, head_lr_scale=0.25)
    optimizer = build_optimizer(model, recipe)
    scheduler = ScheduledLR(optimizer, build_schedule(recipe, 4), recipe.effective_lr())
    for _ in range(4):
        lr = scheduler.apply()
        rates = {group.get("lr_scale", 1.0): group["lr"] for group in optimizer.param_groups}
        assert rates == {1.0: pytest.approx(lr), 0.25: pytest.approx(0.25 * lr)}
        scheduler.advance()


def test_adamw_takes_momentum_as_beta1_and_keeps_the_groups():
    model = build_model("tiny_resnet")
    recipe = Recipe(optimizer="adamw", lr=0.002, momentum=0.8, weight_decay=0.05, no_decay_norm_bias=True,
                    head_lr_scale=0.5)
    optimizer = build_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.8, 0.999)
    groups = sorted((g["weight_decay"], round(g["lr"], 12)) for g in optimizer.param_groups)
    assert groups == [(0.0, 0.001), (0.0, 0.002), (0.05, 0.001), (0.05, 0.002)]
    assert isinstance(build_optimizer(model, Recipe()), torch.optim.SGD)


def test_switching_optimizer_brings_its_own_decay_and_clip_and_never_the_other_ones_learning_rate():
    switched = resolve_recipe("fast", {"optimizer": "sgd"})
    assert (switched.weight_decay, switched.grad_clip, switched.nesterov) == (5e-4, 1.0, True)  # L2; clip
    assert switched.sized_by_budget == ("batch_size", "lr")  # the budget rule sizes SGD's LR
    given = resolve_recipe("fast", {"optimizer": "sgd", "weight_decay": 0.01, "grad_clip": 2.0, "lr": 0.2})
    assert (given.weight_decay, given.grad_clip, given.lr, given.sized_by_budget) == (0.01, 2.0, 0.2,
                                                                                       ("batch_size",))
    assert resolve_recipe("fast", {"optimizer": "muon"}) == RECIPES["fast"]  # no switch, nothing changes
    assert (RECIPES["fast"].weight_decay, RECIPES["fast"].grad_clip) == (0.05, 0.0)  # decoupled; no clip
    with pytest.raises(CardinalError, match="--optimizer adamw on --recipe seed needs --lr"):
        resolve_recipe("seed", {"optimizer": "adamw"})  # seed's 0.01 is an SGD rate, and seed sizes nothing
    assert resolve_recipe("seed", {"optimizer": "adamw", "lr": 1e-3}).weight_decay == 0.05
    with pytest.raises(CardinalError, match="beta1"):
        resolve_recipe("seed", {"optimizer": "adamw", "lr": 1e-3, "momentum": 1.0})


def test_seed_recipe_is_the_reference_study():
    seed = RECIPES["seed"]
    assert (seed.lr, seed.momentum, seed.weight_decay, seed.batch_size) == (0.01, 0.9, 5e-4, 128)
    assert seed.schedule == "constant" and seed.augment == "none" and seed.label_smoothing == 0
    assert seed.std == (0.2023, 0.1994, 0.2010) and not seed.nesterov


def test_fast_recipe_scales_lr_with_batch():
    fast = RECIPES["fast"]
    doubled = Recipe(**{**fast.__dict__, "batch_size": 2 * fast.batch_size})
    assert doubled.effective_lr() == pytest.approx(2 * fast.effective_lr())
    assert fast.effective_lr() == pytest.approx(fast.lr * fast.batch_size / fast.lr_scale_batch)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warmup_then_decay(schedule):
    plan = build_schedule(Recipe(epochs=4, schedule=schedule, warmup_epochs=1, final_lr_fraction=0.1), 10)
    values = [plan.factor(s) for s in range(40)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:])) and values[-1] >= 0.1
    assert plan.depends_on_length and plan.total_steps == 40


def test_constant_schedule_warms_up_and_does_not_depend_on_length():
    plan = build_schedule(Recipe(epochs=3, schedule="constant", warmup_epochs=0.5), 10)
    assert [plan.factor(s) for s in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert not plan.depends_on_length
    assert build_schedule(Recipe(), 10).factor(0) == 1.0  # the reference study: constant from step 0


def test_schedule_drives_the_optimizer_from_any_step():
    recipe = Recipe(epochs=2, schedule="cosine", lr=0.1)
    optimizer = build_optimizer(nn.Linear(2, 2), recipe)
    plan = build_schedule(recipe, 5)
    straight = ScheduledLR(optimizer, plan, 0.1)
    rates = []
    for _ in range(10):
        rates.append(straight.apply())
        straight.advance()
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    resumed = ScheduledLR(optimizer, plan, 0.1, step=6)  # rebuilt from the step count alone
    assert resumed.apply() == pytest.approx(rates[6]) and optimizer.param_groups[0]["lr"] == pytest.approx(rates[6])


def _loader(accelerator, images=64, batch=32):
    data, labels = synthetic_split(images)
    return DeviceLoader(data, labels, batch, Normalize((0.5,) * 3, (0.25,) * 3, accelerator.device),
                        accelerator.device)


def test_non_finite_loss_is_detected():
    accelerator = Accelerator(cpu=True)
    model = build_model("tiny_resnet")
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    optimizer = build_optimizer(model, Recipe())
    with pytest.raises(NonFiniteLoss):
        train_epoch(accelerator, model, _loader(accelerator), optimizer,
                    ScheduledLR(optimizer, build_schedule(Recipe(), 2), 0.01))


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_steps_the_fp16_scaler_skips_do_not_move_the_schedule(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 training uses (accelerate adds none on CPU)
    recipe = Recipe(epochs=1, schedule="onecycle", lr=0.1)
    model = build_model("tiny_resnet")
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.fc.weight.register_hook(lambda grad: grad * float("inf"))  # every step overflows: the scaler skips it
    lr_schedule = ScheduledLR(optimizer, build_schedule(recipe, 2), 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(accelerator, model, _loader(accelerator), optimizer, lr_schedule)
    assert stats.steps == 2 and stats.skipped_steps == 2 and lr_schedule.step == 0
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # nothing applied


def test_train_loss_is_plain_cross_entropy_whatever_the_objective():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    plain, objective = losses(logits, targets, 0.1)
    torch.testing.assert_close(plain, F.cross_entropy(logits, targets, reduction="none"))
    torch.testing.assert_close(objective, F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1))
    accelerator = Accelerator(cpu=True)
    stats = []
    for smoothing in (0.0, 0.3):  # one step from the same weights on the same batch
        torch.manual_seed(0)
        model = build_model("tiny_resnet")
        optimizer = build_optimizer(model, Recipe())
        stats.append(train_epoch(accelerator, model, _loader(accelerator), optimizer,
                                 ScheduledLR(optimizer, build_schedule(Recipe(), 2), 0.01), label_smoothing=smoothing,
                                 max_steps=1))
    assert stats[1].loss == pytest.approx(stats[0].loss, rel=1e-9) == stats[0].objective
    assert stats[1].objective != pytest.approx(stats[1].loss, rel=1e-6)


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
