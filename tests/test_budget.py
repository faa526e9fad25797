"""The budget rule: fast's batch and peak LR from the run's size, resolved once and kept."""

import json
import math

import pytest

import cardinal.train as train_module
from cardinal import budget
from cardinal.config import RECIPES, TrainConfig, resolve_recipe

SAMPLE_TRAIN = 4160  # the CIFAR-10 sample with 500 images held out for validation
FULL_TRAIN = 40000  # full-size data (40,000 training images + 10,000 held out as the dev test)


def sized(epochs, train_images, **overrides):
    """fast as the rule sizes it; with SGD (fast's measured SGD run) unless an optimizer is given."""
    overrides = {"optimizer": "sgd", **overrides}
    return budget.resolve(resolve_recipe("fast", {"epochs": epochs, **overrides}), train_images)


def test_the_sample_keeps_the_batch_and_lrs_it_was_tuned_with():
    for epochs, lr in ((1, 0.1), (3, 0.1), (10, 1.6)):  # the measured anchors (batch 32: 130 steps an epoch)
        recipe = sized(epochs, SAMPLE_TRAIN)
        assert (recipe.batch_size, recipe.lr) == (32, lr), epochs
    assert sized(1, SAMPLE_TRAIN).effective_lr() == pytest.approx(0.0125)


def test_full_size_data_gets_a_gpu_sized_batch_at_every_length():
    assert [sized(epochs, FULL_TRAIN).batch_size for epochs in (1, 2, 5, 10, 30)] == [288] * 5
    assert sized(1, 35000).batch_size == sized(5, 35000).batch_size == 256  # the measured batch (5,000 held out)
    assert sized(10, 50000).batch_size == 384
    assert sized(1, FULL_TRAIN).lr == 0.1  # 139 steps: below SGD's first anchor, flat
    assert sized(5, FULL_TRAIN).lr == 0.239  # 695 steps: between the anchors, in log-log
    assert sized(10, FULL_TRAIN).effective_lr() == pytest.approx(budget.MAX_PEAK_LR, rel=2e-3)  # capped


def _gives_enough_steps(images, batch):
    return images / batch >= budget.MIN_STEPS_PER_EPOCH


def test_batch_is_the_largest_multiple_of_32_that_gives_enough_steps_an_epoch():
    for images in (1, 100, 2400, 4160, 4660, 10000, 24000, 35000, 40000, 10**6):
        batch = budget.batch_for(images)
        assert batch % budget.BATCH_STEP == 0 and budget.BATCH_RANGE[0] <= batch <= budget.BATCH_RANGE[1]
        if budget.BATCH_RANGE[0] < batch < budget.BATCH_RANGE[1]:
            assert _gives_enough_steps(images, batch), images
            assert not _gives_enough_steps(images, batch + budget.BATCH_STEP), images


def test_the_rule_is_monotone_in_data_and_in_length():
    batches = [budget.batch_for(images) for images in range(0, 60001, 500)]
    assert batches == sorted(batches)
    per_256 = [budget.lr_per_256_for(steps) for steps in range(1, 3000, 7)]
    assert per_256 == sorted(per_256)
    for images in (SAMPLE_TRAIN, FULL_TRAIN):
        peaks = [sized(epochs, images).effective_lr() for epochs in range(1, 41)]
        assert peaks == sorted(peaks), images


def test_between_anchors_the_lr_is_a_power_of_the_steps():
    (short, short_lr), (long, long_lr) = budget.LR_BY_STEPS[:2]
    middle = round(math.sqrt(short * long))
    assert budget.lr_per_256_for(middle) == pytest.approx(math.sqrt(short_lr * long_lr), rel=2e-3)
    assert budget.lr_per_256_for(1) == short_lr and budget.lr_per_256_for(10**6) == budget.LR_BY_STEPS[-1][1]


def test_a_given_batch_or_lr_is_never_resized():
    by_batch = sized(10, FULL_TRAIN, batch_size=256)
    assert by_batch.batch_size == 256 and by_batch.sized_by_budget == ("lr",)
    assert by_batch.lr == budget.lr_per_256_for(10 * math.ceil(FULL_TRAIN / 256))  # the LR follows its steps
    by_lr = sized(10, FULL_TRAIN, lr=0.3)
    assert (by_lr.batch_size, by_lr.lr, by_lr.sized_by_budget) == (288, 0.3, ("batch_size",))
    both = sized(10, FULL_TRAIN, lr=0.3, batch_size=64)
    assert (both.batch_size, both.lr, both.sized_by_budget, both.budget_images) == (64, 0.3, (), 0)


def test_fast_trains_with_muon_at_the_rules_peak():
    fast = budget.resolve(resolve_recipe("fast", {"epochs": 1}), 35000)
    assert (fast.optimizer, fast.batch_size, fast.weight_decay, fast.grad_clip) == ("muon", 256, 0.05, 0.0)
    assert fast.effective_lr() == pytest.approx(budget.MUON_LR_FACTOR * budget.ADAMW_PEAK_LR)


def test_the_seed_recipe_sizes_nothing():
    assert RECIPES["seed"].sized_by_budget == ()
    assert budget.resolve(resolve_recipe("seed", {"epochs": 10}), FULL_TRAIN) == resolve_recipe("seed", {"epochs": 10})


def test_a_sized_recipe_is_never_sized_again():
    """A resumed run reads its config.json: the batch and LR it ran with, whatever the data now holds."""
    first = sized(10, SAMPLE_TRAIN)
    assert first.budget_images == SAMPLE_TRAIN
    saved = TrainConfig.from_dict(json.loads(TrainConfig(recipe_name="fast", recipe=first).to_json())).recipe
    assert saved == first
    assert budget.resolve(saved, FULL_TRAIN) == first


def test_resuming_keeps_the_sized_recipe_of_config_json(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ran = TrainConfig(recipe_name="fast", recipe=sized(10, SAMPLE_TRAIN), run_name="run")
    (run_dir / "config.json").write_text(ran.to_json())
    argv = ["--resume", str(run_dir), "--recipe", "fast"]
    fresh = train_module.config_from_args(train_module.build_parser().parse_args(argv))
    resumed = train_module.resumed_config(run_dir, fresh, train_module.explicit_flags(argv))
    assert resumed.recipe == ran.recipe
    assert budget.resolve(resumed.recipe, FULL_TRAIN) == ran.recipe


def test_adamw_gets_its_own_peak_scaled_by_the_square_root_of_the_batch():
    full, sample = sized(1, 35000, optimizer="adamw"), sized(1, SAMPLE_TRAIN, optimizer="adamw")
    assert full.batch_size == 256 and full.effective_lr() == pytest.approx(budget.ADAMW_PEAK_LR)
    assert sample.batch_size == 32 and sample.effective_lr() == pytest.approx(budget.ADAMW_PEAK_LR / 8 ** 0.5,
                                                                               rel=1e-3)
    long = sized(10, FULL_TRAIN, optimizer="adamw")  # batch 288: the same peak at every length, for now
    assert long.effective_lr() == pytest.approx(budget.ADAMW_PEAK_LR * (288 / 256) ** 0.5, rel=1e-3)
    assert sized(20, FULL_TRAIN, optimizer="adamw").lr == long.lr == sized(1, FULL_TRAIN, optimizer="adamw").lr
    absolute = sized(1, SAMPLE_TRAIN, optimizer="adamw", lr_scale_batch=0)
    assert absolute.lr == pytest.approx(sample.effective_lr())
    assert sized(2, FULL_TRAIN, optimizer="adamw", lr=3e-3).effective_lr() == pytest.approx(3e-3 * 288 / 256)


def test_help_states_the_rule():
    text = " ".join(train_module.build_parser().format_help().split())
    assert f">= {budget.MIN_STEPS_PER_EPOCH} steps an epoch, at every length" in text
    assert "0.1 at 390, 0.4 at 980, 1.6 at 1300 steps" in text
    assert f"AdamW {budget.ADAMW_PEAK_LR:g} at batch {budget.ADAMW_PEAK_BATCH}" in text


def test_an_absolute_lr_knob_gets_the_same_peak():
    for epochs in (1, 5, 10):  # config.json keeps 4 significant digits of either knob
        per_256, absolute = sized(epochs, FULL_TRAIN), sized(epochs, FULL_TRAIN, lr_scale_batch=0)
        assert absolute.lr == pytest.approx(per_256.effective_lr(), rel=5e-4) == absolute.effective_lr()
