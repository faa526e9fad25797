"""Optimizer and learning-rate schedule of a recipe."""

from __future__ import annotations

import math
from typing import Callable, Dict, List

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


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = parameter_groups(model, recipe.weight_decay, recipe.no_decay_norm_bias)
    return torch.optim.SGD(groups, lr=recipe.effective_lr(), momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


def lr_factor(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based), for LambdaLR."""
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total, int(round(recipe.warmup_epochs * steps_per_epoch)))
    floor = recipe.final_lr_fraction

    def factor(step: int) -> float:
        if recipe.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if recipe.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)  # onecycle: linear up, linear down

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, steps_per_epoch))
