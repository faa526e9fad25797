"""Optimizer and learning-rate schedule of a recipe.

The schedule is a pure function of the number of optimizer steps actually applied, so a resumed run
rebuilds it from two numbers in its checkpoint (no pickled scheduler object), and steps that fp16's
GradScaler skips do not move it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from cardinal.config import Recipe


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> List[Dict]:
    """One group, or two when norms and biases (the 1-D parameters) are exempt from weight decay."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """``fused``: torch's one-kernel SGD step (None: torch's default, the foreach step)."""
    groups = parameter_groups(model, recipe.weight_decay, recipe.no_decay_norm_bias)
    return torch.optim.SGD(groups, lr=recipe.effective_lr(), momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the peak LR at applied step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, the peak held until the last ``decay_steps`` steps, then the decay
    (cosine or linear) towards ``floor``. ``decay_steps=None`` decays over every step after the warm-up.
    """

    kind: str  # constant | cosine | onecycle (linear decay)
    total_steps: int
    warmup_steps: int
    floor: float  # final LR / peak LR
    decay_steps: Optional[int] = None
    warmup_from_length: bool = False  # the warm-up is a fraction of total_steps

    @property
    def depends_on_length(self) -> bool:
        """Whether changing the run's length would change the LR of steps already taken."""
        return self.kind != "constant" or self.warmup_from_length

    @property
    def decay_start(self) -> int:
        after_warmup = self.total_steps - self.warmup_steps
        decay = after_warmup if self.decay_steps is None else min(self.decay_steps, after_warmup)
        return self.total_steps - decay

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant" or step < self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start) / max(1, self.total_steps - self.decay_start))
        if self.kind == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.floor + (1 - self.floor) * (1 - progress)


def build_schedule(recipe: Recipe, steps_per_epoch: int) -> Schedule:
    """Warm-up and decay in steps: from fractions of the run's steps, or the warm-up from epochs."""
    total = max(1, recipe.epochs * steps_per_epoch)
    if recipe.warmup_fraction > 0:
        warmup = max(1, int(round(recipe.warmup_fraction * total)))
    else:
        warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    warmup = min(total, warmup)
    decay = None if recipe.decay_fraction >= 1 else int(round(recipe.decay_fraction * total))
    return Schedule(recipe.schedule, total, warmup, recipe.final_lr_fraction, decay,
                    warmup_from_length=recipe.warmup_fraction > 0)


class ScheduledLR:
    """Sets each step's LR from the schedule and counts the steps that were really applied."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, peak_lr: float, step: int = 0):
        self.optimizer, self.schedule, self.peak_lr, self.step = optimizer, schedule, peak_lr, step

    def apply(self) -> float:
        """Set the LR for the coming optimizer step and return it."""
        lr = self.peak_lr * self.schedule.factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self, applied: bool = True) -> None:
        if applied:
            self.step += 1


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> ScheduledLR:
    """A fresh run's LR driver: the recipe's schedule at its peak LR, from step 0."""
    return ScheduledLR(optimizer, build_schedule(recipe, steps_per_epoch), recipe.effective_lr())
