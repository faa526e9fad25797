"""The budget rule: a recipe's batch and peak LR from the size of the run, in one place.

A run's size is its number of training images ``N`` (after any validation hold-out) and its epochs ``E``.
The rule is two steps:

1. **Batch from the data.** The largest multiple of 32, between 32 and 512, that still gives at least
   ``MIN_STEPS_PER_EPOCH`` (130) optimizer steps an epoch: ``batch = clamp(32 * floor(N / 130 / 32), 32, 512)``,
   the same at every length. A small data set keeps a small batch (the 4,160 training images of the CIFAR-10
   sample with 500 held out: 32), a full-size one gets a GPU-sized one (40,000 images: 288, 139 steps an
   epoch; 35,000: 256).
2. **Peak LR from the optimizer.** AdamW normalises its step per coordinate: ``ADAMW_PEAK_LR`` at batch
   ``ADAMW_PEAK_BATCH``, scaled by the square root of the batch (the usual rule for adaptive optimizers), the
   same at every length. Muon's update (fast's) is scaled to AdamW's size (``cardinal.muon``), so it takes the
   same rule, times ``MUON_LR_FACTOR``.
   SGD's follows the run's ``S = E * ceil(N / batch)`` steps: per 256 images a function of ``S``
   (``LR_BY_STEPS``), a straight line in log-log between anchors and flat outside them, scaled linearly to
   the batch, and never above ``MAX_PEAK_LR``; a short SGD run wants a low peak, a long one a high one.

Where the constants come from (fast recipe, resnet50; benchmarks/RECIPE_TUNING.md):

- 130 steps an epoch: the sample's 1-epoch run at batch 32 (130 steps) beat batch 64 (65 steps), 26.4% against
  20.6% val_acc; on 35,000 full-size images 1 epoch at batch 256 (137 steps) beat batch 512 (69 steps): 39.6%
  against 38.1% val_acc with SGD, 53.3% against 47.0% with AdamW; and 5 epochs with Muon at batch 256 beat the
  448 of the earlier floor of 75 steps an epoch after every epoch, 85.2% against 83.9% val_acc at the end (one
  seed each, measured on a CPU, Muon at twice AdamW's peak), while batch 128 ended level with 256 (85.3%).
  Longer runs keep the floor: at 10 epochs it is not measured yet.
- SGD (390 steps, 0.1): the sample at batch 32 for 1 and 3 epochs (130 and 390 steps). Measured: 0.1 won at 1
  epoch; at 3, 0.1, 0.2 and 0.4 were within noise.
- (980 steps, 0.4): the 50,000 training images at batch 512 for 10 epochs. Measured, one seed: 84.4%; the
  only other run (1.6 at batch 256, 1,960 steps) reached 82.6%. Provisional: no LR sweep at batch 512 yet.
- (1,300 steps, 1.6): the sample at batch 32 for 10 epochs. Measured over 3 seeds; 1.6 was the largest LR
  tried, and every doubling up to it helped.
- ``MAX_PEAK_LR`` 1.6: the largest peak LR (after scaling) any measured run used; above it nothing was run.
- AdamW's 2e-3 at batch 256: 1 epoch on 35,000 full-size images at batch 256 reached 53.3% val_acc with it;
  at batch 512, peaks of 2e-3 and 4e-3 reached 47.0% and 46.5% (the square-root rule gives 2.8e-3 there).
  On the sample at batch 32 and 1 epoch the rule's 7.07e-4 beat 2e-3 and 2.5e-4 (35.6% against 33.4% and
  33.6% val_acc), and at 10 epochs (1,300 steps) it reached 59.4% (one seed, CPU) against SGD's 56.4 ± 1.8%
  (3 seeds, GPU).
- Muon's four times AdamW's peak: on 35,000 full-size images at batch 256, 4x beat 2x at 1 epoch in both
  seeds measured (64.0% and 62.9% val_acc against 58.8% and 58.2%) and at 5 epochs (86.3% against 85.2%, one
  seed; CPU). At 1 epoch 8x and 16x went higher still (67.6% and 66.8%; 68.9% and 68.8%), but one length's
  optimum does not set every length's: at 5 epochs 8x ended 0.4 points above 4x (86.7% against 86.3%, one
  seed; behind at epochs 1 and 2, level at 3 and 4), and the GPU tune reads 8x at 10 epochs. On the
  sample at 1 epoch (batch 32), 2x beat 1x by 3.2 points and 4x by 2.6 (val_acc, one seed). At 2x, on
  35,000 full-size images, Muon reached 83.9% val_acc at 5 epochs (batch 448) against AdamW's 72.2%, and
  58.8% at 1 epoch (batch 256) against 53.3% (one seed each).

Every other combination is an interpolation. On one H200, full-size data (40,000 images, 3 seeds), AdamW
made 53.2%, 73.2% and 82.5% dev-test accuracy at 1, 5 and 10 epochs at the earlier floor's batches 288, 512
and 512.
The resolved batch and LR are written to config.json, with ``budget_images``; a resumed run keeps them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Tuple

from cardinal.cli import CardinalError
from cardinal.config import Recipe, validate_recipe

MIN_STEPS_PER_EPOCH = 130
BATCH_STEP = 32  # batches are multiples of this (tensor-core friendly, divisible by 2, 4, 8 processes)
BATCH_RANGE = (32, 512)
LR_BY_STEPS: Tuple[Tuple[int, float], ...] = ((390, 0.1), (980, 0.4), (1300, 1.6))  # (steps, peak LR per 256)
MAX_PEAK_LR = 1.6  # after scaling to the batch
ADAMW_PEAK_LR = 2e-3  # at ADAMW_PEAK_BATCH; swept at 1 epoch only (benchmarks/RECIPE_TUNING.md)
ADAMW_PEAK_BATCH = 256
MUON_LR_FACTOR = 4  # Muon's peak over AdamW's: on full-size data 4x beat 2x at 1 and 5 epochs (RECIPE_TUNING.md)
ADAPTIVE_PEAK_FACTOR = {"adamw": 1, "muon": MUON_LR_FACTOR}  # the optimizers sized by AdamW's rule, times this
SIZED_KNOBS = ("batch_size", "lr")


def batch_for(train_images: int) -> int:
    """The largest multiple of 32 in [32, 512] giving at least MIN_STEPS_PER_EPOCH steps an epoch."""
    low, high = BATCH_RANGE
    fitting = BATCH_STEP * math.floor(train_images / MIN_STEPS_PER_EPOCH / BATCH_STEP)
    return max(low, min(high, fitting))


def steps_of(train_images: int, batch: int, epochs: int) -> int:
    """Optimizer steps of the run (the last, partial batch of an epoch is a step)."""
    return epochs * math.ceil(train_images / batch)


def lr_per_256_for(steps: int) -> float:
    """Peak LR per 256 images for a run of ``steps`` optimizer steps: log-log between the anchors, rounded
    to 3 significant digits so config.json reads cleanly; flat outside them."""
    anchors = LR_BY_STEPS
    if steps <= anchors[0][0]:
        return anchors[0][1]
    for (short, short_lr), (long, long_lr) in zip(anchors, anchors[1:]):
        if steps <= long:
            position = math.log(steps / short) / math.log(long / short)
            return float(f"{short_lr * (long_lr / short_lr) ** position:.3g}")
    return anchors[-1][1]


def adamw_peak_lr_for(batch: int) -> float:
    """AdamW's peak LR at this batch: square-root scaling from ADAMW_PEAK_LR, 3 significant digits."""
    return float(f"{ADAMW_PEAK_LR * math.sqrt(batch / ADAMW_PEAK_BATCH):.3g}")


def lr_for(steps: int, batch: int, lr_scale_batch: int, optimizer: str = "sgd") -> float:
    """The ``lr`` knob (given for ``lr_scale_batch`` images when that is > 0) for this many steps at this batch."""
    if optimizer in ADAPTIVE_PEAK_FACTOR:
        per_256 = adamw_peak_lr_for(batch) * 256 / batch * ADAPTIVE_PEAK_FACTOR[optimizer]
    else:
        per_256 = lr_per_256_for(steps)
        cap = MAX_PEAK_LR * 256 / batch  # the cap, per 256 images
        if per_256 > cap:
            per_256 = float(f"{cap:.3g}")
    knob = per_256 * lr_scale_batch / 256 if lr_scale_batch > 0 else per_256 * batch / 256
    return float(f"{knob:.4g}")


def resolve(recipe: Recipe, train_images: int) -> Recipe:
    """The recipe with its budget-sized knobs set for ``train_images``; unchanged if already sized or if the
    recipe sizes nothing. Called once, when the training split is known; config.json keeps the result."""
    if not recipe.sized_by_budget or recipe.budget_images:
        return recipe
    unknown = set(recipe.sized_by_budget) - set(SIZED_KNOBS)
    if unknown:
        raise CardinalError(f"the budget rule cannot size {', '.join(sorted(unknown))}")
    if train_images < 1:
        raise CardinalError("the budget rule needs at least one training image")
    batch = batch_for(train_images) if "batch_size" in recipe.sized_by_budget else recipe.batch_size
    lr = recipe.lr
    if "lr" in recipe.sized_by_budget:
        lr = lr_for(steps_of(train_images, batch, recipe.epochs), batch, recipe.lr_scale_batch, recipe.optimizer)
    sized = replace(recipe, batch_size=batch, lr=lr, budget_images=train_images)
    validate_recipe(sized)
    return sized


def describe_batch() -> str:
    """For --help."""
    low, high = BATCH_RANGE
    return (f"sized by the training images: the largest multiple of {BATCH_STEP} in [{low}, "
            f"{high}] giving >= {MIN_STEPS_PER_EPOCH} steps an epoch, at every length")


def describe_lr() -> str:
    """For --help."""
    anchors = ", ".join(f"{lr} at {steps}" for steps, lr in LR_BY_STEPS)
    return (f"sized by the optimizer and the run: AdamW {ADAMW_PEAK_LR:g} at batch {ADAMW_PEAK_BATCH}, times "
            f"sqrt(batch / {ADAMW_PEAK_BATCH}) (Muon {MUON_LR_FACTOR}x that); SGD per 256 images by the "
            f"optimizer steps S, {anchors} steps, log-log between, flat outside, at most {MAX_PEAK_LR} after "
            f"scaling")
