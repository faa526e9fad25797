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
from cardinal.muon import Muon, filter_banks


def head_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The classifier's parameters: the final ``fc`` layer of a bottleneck stack (none for other models)."""
    head = getattr(model, "fc", None)
    return list(head.parameters()) if isinstance(head, nn.Linear) else []


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool,
                     head_lr_scale: float = 1.0, muon: bool = False) -> List[Dict]:
    """One group, or two when norms and biases (the 1-D parameters) are exempt from weight decay; the
    classifier's parameters get groups of their own, with ``lr_scale``, when ``head_lr_scale`` is not 1.
    With ``muon``, the filter banks Muon takes get groups of their own too (``muon``, ``conv_groups``), one
    per number of convolution groups.

    Why the classifier may want a lower LR: at initialisation its gradient is most of the network's (for
    resnet50 on CIFAR-10, norm 1.8 of 2.0) and its curvature is the highest, so one SGD step at LR 0.2 on it
    alone raises the loss (2.33 to 3.03) while every other stage still lowers it at LR 0.8
    (benchmarks/RECIPE_TUNING.md).
    """
    head = {id(p) for p in head_parameters(model)} if head_lr_scale != 1 else set()
    banks = filter_banks(model) if muon else {}
    groups: Dict[tuple, List[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            exempt = no_decay_norm_bias and parameter.ndim <= 1
            key = (id(parameter) in head, exempt, banks.get(id(parameter), 0))
            groups.setdefault(key, []).append(parameter)
    return [{"params": params, "weight_decay": 0.0 if exempt else weight_decay,
             **({"lr_scale": head_lr_scale} if in_head else {}),
             **({"muon": conv_groups > 0, "conv_groups": max(1, conv_groups)} if muon else {})}
            for (in_head, exempt, conv_groups), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, recipe: Recipe, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``fused``: torch's one-kernel step (None: torch's default, the foreach step).

    ``adamw`` takes ``momentum`` as its beta1 and ignores ``nesterov``; its weight decay is decoupled from the
    gradient (scaled by the LR), so it wants a larger value than SGD's L2 penalty (0.05 rather than 5e-4).
    ``muon`` (``cardinal.muon``) is AdamW for the stem, classifier, norms and biases and Muon for the other
    convolutions, with ``momentum`` (and ``nesterov``) for both halves; it has no fused step.
    """
    groups = parameter_groups(model, recipe.weight_decay, recipe.no_decay_norm_bias, recipe.head_lr_scale,
                              muon=recipe.optimizer == "muon")
    if recipe.optimizer == "muon":
        optimizer: torch.optim.Optimizer = Muon(groups, lr=recipe.effective_lr(), momentum=recipe.momentum,
                                                nesterov=recipe.nesterov, betas=(recipe.momentum, 0.999))
    elif recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=recipe.effective_lr(), betas=(recipe.momentum, 0.999),
                                      fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=recipe.effective_lr(), momentum=recipe.momentum,
                                    nesterov=recipe.nesterov and recipe.momentum > 0, fused=fused)
    set_lr(optimizer, recipe.effective_lr())
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The run's LR on every group, times the group's ``lr_scale`` (the classifier's, when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
        set_lr(self.optimizer, lr)
        return lr

    def advance(self, applied: bool = True) -> None:
        if applied:
            self.step += 1


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> ScheduledLR:
    """A fresh run's LR driver: the recipe's schedule at its peak LR, from step 0."""
    return ScheduledLR(optimizer, build_schedule(recipe, steps_per_epoch), recipe.effective_lr())
